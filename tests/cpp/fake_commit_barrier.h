// An in-memory core::CommitBarrier for tests (as c10d's HashStore stands in
// for a TCPStore): ranks in one process, one thread each, agree on a step
// through a shared table. It keeps the contract of the real barriers
// (storage/commit_barrier.h): a rank's failure ends rank 0's wait, rank 0's
// decision ends the others', every wait has its deadline.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "storage/commit_barrier.h"

namespace flashckpt::testing {

class InMemoryCommits {
 public:
  class Barrier : public core::CommitBarrier {
   public:
    explicit Barrier(std::shared_ptr<InMemoryCommits> table) : t_(std::move(table)) {}
    absl::Status RankDurable(int64_t step, int rank, const std::string& record) override {
      std::lock_guard<std::mutex> l(t_->mu);
      t_->steps[step].records[rank] = record;
      t_->cv.notify_all();
      return absl::OkStatus();
    }
    absl::StatusOr<std::vector<std::string>> WaitAll(int64_t step, int world_size,
                                                     std::chrono::milliseconds timeout) override {
      std::unique_lock<std::mutex> l(t_->mu);
      Step& s = t_->steps[step];
      bool done = t_->cv.wait_for(l, timeout, [&] {
        return !s.failed.empty() || static_cast<int>(s.records.size()) >= world_size;
      });
      if (!s.failed.empty()) return absl::AbortedError(absl::StrCat("commit of step ", step, " abandoned: ", s.failed));
      if (!done) {
        std::vector<int> missing;
        for (int r = 0; r < world_size; ++r)
          if (!s.records.count(r)) missing.push_back(r);
        return absl::DeadlineExceededError(absl::StrCat("commit of step ", step, ": ", s.records.size(), "/",
                                                        world_size, " ranks durable; missing ranks ",
                                                        absl::StrJoin(missing, ",")));
      }
      std::vector<std::string> out;
      for (int r = 0; r < world_size; ++r) out.push_back(s.records[r]);
      return out;
    }
    void ReportFailure(int64_t step, int rank, const std::string& why) override {
      std::lock_guard<std::mutex> l(t_->mu);
      Step& s = t_->steps[step];
      s.failed = absl::StrCat("rank ", rank, " did not persist it: ", why);
      if (rank == 0) s.decision = "abandoned";
      t_->cv.notify_all();
    }
    void Committed(int64_t step) override {
      std::lock_guard<std::mutex> l(t_->mu);
      t_->steps[step].decision = "committed";
      t_->cv.notify_all();
    }
    absl::Status WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                               const std::function<bool()>& cancelled) override {
      std::unique_lock<std::mutex> l(t_->mu);
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      for (;;) {
        Step& s = t_->steps[step];
        if (s.decision == "committed") return absl::OkStatus();
        if (s.decision == "abandoned") return absl::AbortedError(absl::StrCat("abandoned by rank 0: ", s.failed));
        if (cancelled && cancelled()) return absl::CancelledError(absl::StrCat("step ", step, " cancelled"));
        if (std::chrono::steady_clock::now() >= deadline)
          return absl::DeadlineExceededError(absl::StrCat("no decision of rank 0 on step ", step));
        t_->cv.wait_for(l, std::chrono::milliseconds(10));
      }
    }
    std::string Describe() const override { return "an in-memory commit table"; }

   private:
    std::shared_ptr<InMemoryCommits> t_;
  };

  static std::shared_ptr<InMemoryCommits> Make() { return std::make_shared<InMemoryCommits>(); }

 private:
  struct Step {
    std::map<int, std::string> records;
    std::string failed, decision;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::map<int64_t, Step> steps;
};

}  // namespace flashckpt::testing
