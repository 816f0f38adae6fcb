#include "api/public_commit_barrier.h"


#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "storage/commit.h"

namespace flashckpt {

// The public defaults: the file protocol in the step directory.
void CommitBarrier::report_failure(const std::string& directory, int64_t step, int rank, const std::string& why) {
  ReportPersistFailure(directory, step, rank, why);
}

void CommitBarrier::committed(const std::string&, int64_t) {}

bool CommitBarrier::wait_committed(const std::string& directory, int64_t step, std::chrono::milliseconds timeout,
                                   const std::function<bool()>& cancelled, std::string* why) {
  absl::Status s = WaitForCommit(directory, step, timeout, cancelled);
  if (core::GivenUp(s)) {
    if (why) *why = std::string(s.message());
    return false;
  }
  ThrowIfError(s);
  return true;
}

namespace {

// Runs one call of the user's barrier; an exception becomes a status.
template <typename F>
absl::Status Guarded(F&& call, const char* what) {
  try {
    call();
    return absl::OkStatus();
  } catch (const Error& e) {
    return StatusFromError(e);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("commit barrier ", what, ": ", e.what()));
  }
}

}  // namespace

absl::Status PublicCommitBarrier::RankDurable(int64_t step, int rank, const std::string& record) {
  return Guarded([&] { user_->rank_durable(step, rank, record); }, "rank_durable");
}

absl::StatusOr<std::vector<std::string>> PublicCommitBarrier::WaitAll(int64_t step, int world_size,
                                                                      std::chrono::milliseconds timeout) {
  std::vector<std::string> records;
  absl::Status s = Guarded([&] { records = user_->wait_all(step, world_size, timeout); }, "wait_all");
  // The public contract: kUnavailable means a rank reported that it will not
  // persist the step, which the core calls kAborted (no COMMIT may follow).
  if (s.code() == absl::StatusCode::kUnavailable) return absl::AbortedError(s.message());
  if (!s.ok()) return s;
  return records;
}

void PublicCommitBarrier::ReportFailure(int64_t step, int rank, const std::string& why) {
  Guarded([&] { user_->report_failure(root_, step, rank, why); }, "report_failure").IgnoreError();
}

void PublicCommitBarrier::Committed(int64_t step) {
  Guarded([&] { user_->committed(root_, step); }, "committed").IgnoreError();
}

absl::Status PublicCommitBarrier::WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                                                const std::function<bool()>& cancelled) {
  bool done = false;
  std::string why;
  FCK_RETURN_IF_ERROR(
      Guarded([&] { done = user_->wait_committed(root_, step, timeout, cancelled, &why); }, "wait_committed"));
  if (done) return absl::OkStatus();
  return absl::AbortedError(why.empty() ? absl::StrCat("step ", step, " was given up") : why);
}

std::string PublicCommitBarrier::Describe() const { return absl::StrCat("a user commit barrier over ", root_); }

}  // namespace flashckpt
