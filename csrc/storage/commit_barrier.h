// How the ranks of a step agree that it is complete, inside the core. Every
// operation returns a status (no exceptions below the API edge); the public
// flashckpt::CommitBarrier, which users implement and which may throw, is
// adapted to this one in csrc/api/public_commit_barrier.h.
//
// One barrier serves one checkpoint root. COMMIT itself is always a file,
// written by rank 0: the barrier only coordinates. Implementations: the file
// protocol (FileCommitBarrier, storage/commit.h), flashrun's rendezvous store
// (StoreCommitBarrier, agent/store_commit_barrier.h), an in-memory fake for
// tests (tests/cpp/fake_commit_barrier.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace flashckpt::core {

class CommitBarrier {
 public:
  virtual ~CommitBarrier() = default;

  // Every rank, once its files of `step` are durable; `record` is the framed
  // RankRecord (file names, sizes, crc32c).
  virtual absl::Status RankDurable(int64_t step, int rank, const std::string& record) = 0;

  // The committing rank (0): the records of all `world_size` ranks, in rank
  // order. kAborted: a rank gave the step up (ReportFailure), no COMMIT may
  // be written; kCancelled: the barrier's own cancellation (a restart);
  // kDeadlineExceeded after `timeout`, naming the ranks durable (k/n) and the
  // missing ones; kUnavailable: the barrier cannot be reached.
  virtual absl::StatusOr<std::vector<std::string>> WaitAll(int64_t step, int world_size,
                                                           std::chrono::milliseconds timeout) = 0;

  // Best effort, never fails: `rank` will not persist `step` (it failed, or a
  // newer step superseded it), so that the others stop waiting for it; from
  // rank 0 it also says that no COMMIT will come.
  virtual void ReportFailure(int64_t step, int rank, const std::string& why) = 0;

  // Rank 0, once COMMIT of `step` is durable (best effort).
  virtual void Committed(int64_t step) = 0;

  // Every other rank, after RankDurable: OK once `step` is committed.
  // kAborted (rank 0 gave it up) or kCancelled (`cancelled` said so): no
  // COMMIT will come and the rank's files may go. Any other error
  // (kDeadlineExceeded after `timeout`, kUnavailable): the barrier cannot
  // tell, rank 0 may still commit, so the rank's files must stay.
  virtual absl::Status WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                                     const std::function<bool()>& cancelled) = 0;

  // For messages: "rank records in /ckpt", "the rendezvous store at h:p".
  virtual std::string Describe() const = 0;
};

// True for the WaitCommitted results that mean "no COMMIT will come".
inline bool GivenUp(const absl::Status& s) {
  return s.code() == absl::StatusCode::kAborted || s.code() == absl::StatusCode::kCancelled;
}

}  // namespace flashckpt::core
