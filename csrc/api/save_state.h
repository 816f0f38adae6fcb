// What a SaveHandle waits on: one save's two milestones (snapshot in
// memory, durable on storage), each with its status, and whether a caller
// was told of a persist failure (so that it is raised once, see
// Checkpointer::Impl::TakePersistFailure).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "flashckpt/errors.h"

namespace flashckpt {

class SaveState {
 public:
  SaveState(int64_t step, std::chrono::milliseconds timeout) : step_(step), timeout_(timeout) {}
  std::chrono::milliseconds timeout() const { return timeout_; }
  int64_t step() const { return step_; }

  void SnapshotDone(absl::Status s) {
    { std::lock_guard<std::mutex> l(mu_); snapshot_done_ = true; snapshot_status_ = std::move(s); }
    cv_.notify_all();
  }
  void DurableDone(absl::Status s, bool persisted) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!snapshot_done_) { snapshot_done_ = true; snapshot_status_ = s; }
      durable_done_ = true;
      durable_status_ = std::move(s);
      persisted_ = persisted;
    }
    cv_.notify_all();
  }
  void WaitSnapshot() {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, timeout_, [&] { return snapshot_done_; }))
      throw Error(ErrorCode::kDeadlineExceeded,
                  absl::StrCat("snapshot of step ", step_, ": the device-to-host copies did not complete within ",
                               timeout_.count() / 1000.0, " s (is the device hung?)"));
    ThrowIfError(snapshot_status_);
  }
  bool WaitDurableFor(std::chrono::milliseconds timeout, bool throw_on_error) {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, timeout, [&] { return durable_done_; })) return false;
    if (throw_on_error && !durable_status_.ok()) {
      error_seen_ = true;  // the caller has it: save()/wait_all() need not raise it again
      ThrowStatus(durable_status_);
    }
    return true;
  }
  // True once wait_durable() has raised this step's persist failure.
  bool error_seen() {
    std::lock_guard<std::mutex> l(mu_);
    return error_seen_;
  }
  bool persisted() {
    std::lock_guard<std::mutex> l(mu_);
    return persisted_;
  }

 private:
  const int64_t step_;
  const std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool snapshot_done_ = false, durable_done_ = false, persisted_ = false, error_seen_ = false;
  absl::Status snapshot_status_, durable_status_;
};

}  // namespace flashckpt
