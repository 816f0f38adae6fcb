// The persist role. PersistSlot persists one snapshot slot: the data file
// through io_uring, the manifest, the rank record, and (rank 0) the COMMIT
// once every rank is durable. Persister is the one queue in front of it, with
// its policy (a newer snapshot supersedes queued older ones, a restart
// abandons what is queued and in flight, retention after a durable step),
// owned by a standalone Checkpointer (one per rank) and by flashrun's
// checkpoint service (one per local rank).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

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

// What became of one queued step.
struct PersistOutcome {
  int64_t step = -1;
  int slot = -1;
  // OK: durable. kCancelled: not persisted and not a failure (superseded by
  // a newer step, abandoned by a restart or a stop). Anything else: failed.
  absl::Status status;
  bool superseded = false;   // dropped from the queue by a newer step
  PersistStats stats;
  bool durable() const { return status.ok(); }
};

class Persister {
 public:
  // Persists `slot` holding `step`; `cancelled` turns true once the job is
  // abandoned (look at it while waiting on other ranks).
  using PersistFn = std::function<absl::StatusOr<PersistStats>(int64_t step, int slot,
                                                               const std::function<bool()>& cancelled)>;
  using DoneFn = std::function<void(const PersistOutcome&)>;
  struct Options {
    std::string name;  // "rank 3", for logs
    PersistFn persist;
    // World size > 1: tells the other ranks that this one dropped `step`
    // (superseded by `by`), so that none waits for its record. Runs on the
    // persister's thread, never on the caller of Enqueue (it may be I/O).
    std::function<void(int64_t step, int64_t by)> report_superseded;
    // After a step is durable and its DoneFn ran (rank 0: retention).
    std::function<void(int64_t step)> after_durable;
  };

  explicit Persister(Options options);
  // Stop(/*abandon=*/false): what is queued is persisted first.
  ~Persister();
  Persister(const Persister&) = delete;
  Persister& operator=(const Persister&) = delete;

  // Queues `step` (its slot pinned by the caller). Queued steps at or below
  // `step` are superseded: their DoneFn runs now, on this thread, with
  // kCancelled and superseded set, so the caller must not hold a lock its
  // DoneFns take. Every DoneFn runs exactly once.
  void Enqueue(int64_t step, int slot, DoneFn done);
  // A restart: every queued step is dropped (DoneFn with kCancelled, on this
  // thread) and the one in flight sees `cancelled` turn true. Returns at once.
  void Abandon(const std::string& why);
  // Waits until nothing is queued or in flight. kDeadlineExceeded after
  // `timeout`, naming the step in flight, how long it has run, and the queue.
  absl::Status Drain(std::chrono::milliseconds timeout);
  // Stops the thread after the queue (abandon=false: persisted; true: dropped,
  // and the step in flight cancelled). Idempotent.
  void Stop(bool abandon);

  size_t Queued();
  // Steps queued or in flight, oldest first.
  std::vector<int64_t> Pending();

 private:
  struct Job {
    int64_t step;
    int slot;
    DoneFn done;
  };
  void Loop();
  // Runs the DoneFns of `dropped` (no lock held).
  static void Drop(std::vector<Job>& dropped, const std::string& why, bool superseded);
  std::string DescribeLocked() const;

  Options options_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::vector<std::pair<int64_t, int64_t>> superseded_;  // (step, by): still to report
  std::optional<int64_t> in_flight_;
  std::chrono::steady_clock::time_point in_flight_since_;
  uint64_t epoch_ = 0;  // bumped by Abandon(); the job in flight compares
  bool stop_ = false, abandon_all_ = false;
  std::thread thread_;
};

}  // namespace flashckpt
