// Persisting one snapshot slot: the data file through io_uring, the
// manifest, the rank record, and (rank 0) the COMMIT once every rank is
// durable. Used by the in-process persister of a standalone Checkpointer and
// by flashrun's checkpoint service, which persists its workers' slots.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "flashckpt/types.h"
#include "shm/segment.h"
#include "storage/commit_barrier.h"
#include "storage/uring_io.h"

namespace flashckpt {

struct PersistContext {
  std::string root;                    // checkpoint directory (absolute)
  int rank = 0;
  int world_size = 1;
  int keep_last = 3;
  core::CommitBarrier* barrier = nullptr;
  std::chrono::milliseconds commit_timeout{600000};
  BulkIo* io = nullptr;
  std::string where;                   // the segment's path, for messages
  // Polled before the rank record is written and while waiting for the other
  // ranks: true abandons this persist (flashrun, after a restart made the
  // step obsolete). The barrier's WaitAll must look at it too (see FileCommitBarrier).
  std::function<bool()> cancelled;
};

struct PersistStats {
  uint64_t bytes = 0;
  double seconds = 0;
  bool io_uring = false;
  bool direct_io = false;
};

// Pins the slot (pin_pid) while reading it, marks it durable when committed.
// Rank 0 callers then run ApplyRetention (after reporting the step durable).
// On failure, this rank's files of the step are removed unless the step got
// committed, so no partial step is left behind.
absl::StatusOr<PersistStats> PersistSlot(SharedSegment& seg, int slot, int64_t step, const PersistContext& ctx);

}  // namespace flashckpt
