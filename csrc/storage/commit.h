// The cross-rank commit: every rank reports its files durable, one writer
// (rank 0) turns the reports into COMMIT, then replaces `latest`.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "flashckpt.pb.h"
#include "flashckpt/types.h"
#include "storage/commit_barrier.h"

namespace flashckpt {

// The file protocol: rank-<r>.durable records and rank-<r>.failed markers
// in the step directory, polled with backoff. Works on a shared file system
// across nodes with no network of our own; the default of a Checkpointer.
class FileCommitBarrier : public core::CommitBarrier {
 public:
  explicit FileCommitBarrier(std::string root, std::function<bool()> cancelled = nullptr)
      : root_(std::move(root)), cancelled_(std::move(cancelled)) {}
  absl::Status RankDurable(int64_t step, int rank, const std::string& record) override;
  absl::StatusOr<std::vector<std::string>> WaitAll(int64_t step, int world_size,
                                                   std::chrono::milliseconds timeout) override;
  void ReportFailure(int64_t step, int rank, const std::string& why) override;
  void Committed(int64_t) override {}
  absl::Status WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                             const std::function<bool()>& cancelled) override;
  std::string Describe() const override;

 private:
  std::string root_;
  std::function<bool()> cancelled_;
};

// rank-<r>.durable (temp file, fsync, rename): the rank's record, for the
// file barrier and for `flashckpt ls`.
absl::Status WriteRankRecordFile(const std::string& root, int64_t step, int rank, const std::string& record);

// Writes COMMIT for `step` from the ranks' records (checked for step, world
// size and duplicates), then `latest`. Both durable before returning.
absl::Status WriteCommit(const std::string& root, int64_t step, int world_size,
                         const std::vector<std::string>& rank_records);

// Rank 0, before COMMIT: the replicated tensors (TensorEntry.replicated) are
// the same on every rank: the same keys in the same order, dtypes, shapes and
// crc32cs (which the save computed anyway), and every rank stored its slice of
// the replicated region. A difference fails the commit naming the key and the
// ranks; the step's files go and the committed steps stay. `mine` is rank 0's
// manifest; the others' are read from the step directory, only when some rank
// has replicated state (the rank records list a .replica file) or shards
// (RankRecord.sharded), each read once. Shards: CheckShardsAgree (one global
// shape and dtype per key, no overlapping boxes).
absl::Status CheckAcrossRanks(const std::string& root, int64_t step, const pb::Manifest& mine,
                              const std::vector<std::string>& rank_records);

// Best effort: records in the step directory that `rank` will not persist
// `step` (rank-<r>.failed: it failed, or the step was superseded in its queue
// by a newer one), so that the others give up at once instead of waiting for
// the commit timeout: rank 0 stops waiting for the records, and rank 0's own
// marker tells the other ranks that no COMMIT will come.
void ReportPersistFailure(const std::string& root, int64_t step, int rank, const std::string& why);
void ClearPersistFailure(const std::string& root, int64_t step, int rank);
// The reason `rank` recorded for not persisting `step`, if it did.
std::optional<std::string> PersistFailure(const std::string& root, int64_t step, int rank);

// Before a rank persists anything, after a restart of a standalone job: its
// rank record (.durable) and failure marker in every step without a valid
// COMMIT are removed, so that rank 0 never takes a record of an earlier
// incarnation (other bytes) for this one's, nor a stale marker for a failure.
void ForgetUncommittedRecords(const std::string& root, int rank);

// Waits (polling, with a deadline) until COMMIT of `step` is valid. Gives up
// early, with kAborted, when rank 0 marked the step failed (no COMMIT will
// come), and with kCancelled when `cancelled` says so.
absl::Status WaitForCommit(const std::string& root, int64_t step, std::chrono::milliseconds timeout,
                           const std::function<bool()>& cancelled = nullptr);

}  // namespace flashckpt
