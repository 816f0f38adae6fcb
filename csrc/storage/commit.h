// The cross-rank commit: every rank reports its files durable, one writer
// (rank 0) turns the reports into COMMIT, then replaces `latest`.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "flashckpt.pb.h"
#include "flashckpt/checkpointer.h"

namespace flashckpt {

// Default barrier: rank-<r>.durable files in the step directory; works on a
// shared file system across nodes with no network of our own.
class FileCommitBarrier : public CommitBarrier {
 public:
  explicit FileCommitBarrier(std::string root, std::function<bool()> cancelled = nullptr)
      : root_(std::move(root)), cancelled_(std::move(cancelled)) {}
  void rank_durable(int64_t step, int rank, const std::string& record) override;
  std::vector<std::string> wait_all(int64_t step, int world_size,
                                    std::chrono::milliseconds timeout) override;

 private:
  std::string root_;
  std::function<bool()> cancelled_;
};

// Writes COMMIT for `step` from the ranks' records (checked for step, world
// size and duplicates), then `latest`. Both durable before returning.
absl::Status WriteCommit(const std::string& root, int64_t step, int world_size,
                         const std::vector<std::string>& rank_records);

// Best effort: records in the step directory that `rank` could not persist
// `step` (rank-<r>.failed), so that the committer gives up at once instead of
// waiting for the commit timeout.
void ReportPersistFailure(const std::string& root, int64_t step, int rank, const std::string& why);
void ClearPersistFailure(const std::string& root, int64_t step, int rank);

// Waits (polling, with a deadline) until COMMIT of `step` is valid.
absl::Status WaitForCommit(const std::string& root, int64_t step, std::chrono::milliseconds timeout);

}  // namespace flashckpt
