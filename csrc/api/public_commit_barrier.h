// The public flashckpt::CommitBarrier (checkpointer.h), which a user may
// implement and which reports failure by throwing flashckpt::Error, seen by
// the core as a core::CommitBarrier: exceptions become statuses here, at the
// API edge, and nowhere below it.
#pragma once

#include <memory>
#include <string>

#include "flashckpt/checkpointer.h"
#include "storage/commit_barrier.h"

namespace flashckpt {

class PublicCommitBarrier : public core::CommitBarrier {
 public:
  PublicCommitBarrier(std::shared_ptr<flashckpt::CommitBarrier> user, std::string root)
      : user_(std::move(user)), root_(std::move(root)) {}
  absl::Status RankDurable(int64_t step, int rank, const std::string& record) override;
  absl::StatusOr<std::vector<std::string>> WaitAll(int64_t step, int world_size,
                                                   std::chrono::milliseconds timeout) override;
  void ReportFailure(int64_t step, int rank, const std::string& why) override;
  void Committed(int64_t step) override;
  absl::Status WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                             const std::function<bool()>& cancelled) override;
  std::string Describe() const override;

 private:
  std::shared_ptr<flashckpt::CommitBarrier> user_;
  std::string root_;
};

}  // namespace flashckpt
