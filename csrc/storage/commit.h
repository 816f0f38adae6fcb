// The cross-rank commit: every rank reports its files durable, one writer
// (rank 0) turns the reports into COMMIT, then replaces `latest`.
#pragma once

#include <chrono>
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
  explicit FileCommitBarrier(std::string root) : root_(std::move(root)) {}
  void rank_durable(int64_t step, int rank, const std::string& record) override;
  std::vector<std::string> wait_all(int64_t step, int world_size,
                                    std::chrono::milliseconds timeout) override;

 private:
  std::string root_;
};

// Writes COMMIT for `step` from the ranks' records (checked for step, world
// size and duplicates), then `latest`. Both durable before returning.
absl::Status WriteCommit(const std::string& root, int64_t step, int world_size,
                         const std::vector<std::string>& rank_records);

// Waits (polling, with a deadline) until COMMIT of `step` is valid.
absl::Status WaitForCommit(const std::string& root, int64_t step, std::chrono::milliseconds timeout);

}  // namespace flashckpt
