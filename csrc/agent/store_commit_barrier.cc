#include "agent/store_commit_barrier.h"

#include <algorithm>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/log.h"
#include "common/status.h"
#include "flashckpt.pb.h"
#include "storage/commit.h"
#include "storage/layout.h"

namespace flashckpt {
namespace {

using Clock = std::chrono::steady_clock;
constexpr char kCommitted[] = "committed";
constexpr char kAbandoned[] = "abandoned: ";

std::string Padded(uint64_t n) { return absl::StrFormat("%020d", n); }

std::string RestartMessage(int64_t step) {
  return absl::StrCat("step ", step, " abandoned: a restart made it obsolete");
}

// Every round's keys start with it.
std::string CommitRoot(const CommitStoreOptions& o) { return absl::StrCat(o.key_root, o.run_id, "/commit/r"); }

}  // namespace

rendezvous::KeyStoreAddress CommitStoreOptions::address() const {
  rendezvous::KeyStoreAddress a{host, port, token, run_id, etcd};
  if (a.etcd) a.etcd->request_timeout = std::min(a.etcd->request_timeout, unreachable_timeout);
  return a;
}

std::string CommitStoreOptions::endpoint() const { return rendezvous::KeyStoreEndpoint(address()); }

std::string CommitStoreOptions::Describe() const { return rendezvous::DescribeKeyStore(address()); }

std::string CommitStoreOptions::round_prefix() const { return absl::StrCat(CommitRoot(*this), Padded(round)); }

std::string CommitStoreOptions::step_prefix(int64_t step) const {
  return absl::StrCat(round_prefix(), "/s", Padded(static_cast<uint64_t>(std::max<int64_t>(0, step))));
}

StoreCommitBarrier::StoreCommitBarrier(CommitStoreOptions options, std::string directory,
                                       std::function<bool()> cancelled)
    : options_(std::move(options)), directory_(std::move(directory)), cancelled_(std::move(cancelled)) {}

StoreCommitBarrier::~StoreCommitBarrier() = default;

void StoreCommitBarrier::Wake() {
  std::lock_guard<std::mutex> l(mu_);
  woken_ = true;
  if (store_) store_->Interrupt();
}

rendezvous::KeyStore& StoreCommitBarrier::Store() {
  // Asked outside mu_: `cancelled_` belongs to the persist's owner.
  const bool abandoned = Abandoned();
  std::lock_guard<std::mutex> l(mu_);
  if (!store_) store_ = rendezvous::OpenKeyStore(options_.address());
  // A wake before the first call is not lost; and once the step is abandoned
  // every call fails at once, also the first on a connection that a wake's
  // Rearm() replaced: with the store unreachable, each would otherwise wait
  // out unreachable_timeout, one after the other, in a persist nobody wants.
  if (woken_ || abandoned) store_->Interrupt();
  return *store_;
}

bool StoreCommitBarrier::Abandoned() const { return cancelled_ && cancelled_(); }

void StoreCommitBarrier::Rearm() {
  std::lock_guard<std::mutex> l(mu_);
  store_.reset();
  woken_ = false;
}

absl::Status StoreCommitBarrier::Unreachable(int64_t step, const char* doing, const absl::Status& s) const {
  return absl::UnavailableError(absl::StrCat("commit of step ", step, ": ", doing, " through ", options_.Describe(),
                                             options_.etcd ? " failed (is etcd up and reachable from this node?): "
                                                           : " failed (is the agent hosting the rendezvous gone?): ",
                                             s.message()));
}

template <typename T, typename F>
absl::StatusOr<T> StoreCommitBarrier::Run(int64_t step, const char* doing, F&& call) {
  for (;;) {
    absl::StatusOr<T> r = call();
    if (r.ok()) return r;
    // An abandoned step's calls end at once, whatever the store said.
    if (Abandoned()) return absl::CancelledError(RestartMessage(step));
    if (r.status().code() != absl::StatusCode::kCancelled) return Unreachable(step, doing, r.status());
    // Interrupted by Wake() while the step is still wanted: the next call
    // gets a fresh connection.
    Rearm();
  }
}

absl::Status StoreCommitBarrier::Set(int64_t step, const std::string& key, const std::string& value) {
  return Run<bool>(
             step, "setting a key",
             [&]() -> absl::StatusOr<bool> {
               FCK_RETURN_IF_ERROR(Store().Set(key, value, Clock::now() + options_.unreachable_timeout));
               return true;
             })
      .status();
}

absl::StatusOr<std::optional<std::string>> StoreCommitBarrier::GetNow(int64_t step, const std::string& key) {
  return Run<std::optional<std::string>>(
      step, "reading a key",
      [&] { return Store().Wait(key, std::chrono::milliseconds(0), Clock::now() + options_.unreachable_timeout); });
}

absl::StatusOr<std::optional<std::string>> StoreCommitBarrier::WaitKey(int64_t step, const std::string& key,
                                                                       Clock::time_point until) {
  const auto now = Clock::now();
  const auto wait = std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(until - now),
                               std::chrono::milliseconds(0), options_.poll);
  absl::StatusOr<std::optional<std::string>> r =
      Store().Wait(key, wait, now + wait + options_.unreachable_timeout);
  if (r.ok()) return r;
  // Abandoned: an error, so that no caller's loop turns on a store that fails at once.
  if (Abandoned()) return absl::CancelledError(RestartMessage(step));
  if (r.status().code() != absl::StatusCode::kCancelled) return Unreachable(step, "waiting", r.status());
  Rearm();  // woken: the caller looks at cancelled
  return std::optional<std::string>();
}

void StoreCommitBarrier::DropStepKeys(int64_t step) {
  // "/commit" sorts before every other key of the step: it stays for the
  // ranks still waiting on it; the next commit drops it with the older steps.
  const std::string p = options_.step_prefix(step);
  (void)Store().DeleteRange(p + "/count", p + "/~", Clock::now() + options_.unreachable_timeout);
}

absl::Status StoreCommitBarrier::RankDurable(int64_t step, int rank, const std::string& record) {
  pb::RankRecord rec;
  FCK_RETURN_IF_ERROR(
      ParseRecord(record, RecordKind::kRankRecord, absl::StrCat("rank ", rank, " record of step ", step), &rec));
  // Never polled: `flashckpt ls` shows which ranks of an incomplete step are durable.
  FCK_RETURN_IF_ERROR(WriteRankRecordFile(directory_, step, rank, record));
  const std::string p = options_.step_prefix(step);
  FCK_RETURN_IF_ERROR(Set(step, absl::StrCat(p, "/rank/", rank), record));
  FCK_ASSIGN_OR_RETURN(int64_t n, Run<int64_t>(
                                      step, "counting durable ranks",
                                      [&] {
                                        return Store().Add(p + "/count", 1,
                                                           Clock::now() + options_.unreachable_timeout);
                                      }));
  if (n >= static_cast<int64_t>(rec.world_size())) FCK_RETURN_IF_ERROR(Set(step, p + "/wake", "all"));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> StoreCommitBarrier::WaitAll(int64_t step, int world_size,
                                                                     std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  const std::string p = options_.step_prefix(step);
  const std::string where = absl::StrCat("commit of step ", step, " in ", directory_);
  // A step given up earlier in this round stays given up: the other ranks
  // already read the decision.
  FCK_ASSIGN_OR_RETURN(std::optional<std::string> decided, GetNow(step, p + "/commit"));
  if (decided && absl::StartsWith(*decided, kAbandoned))
    return absl::AbortedError(absl::StrCat(where, " was abandoned earlier in this round (",
                                           decided->substr(sizeof(kAbandoned) - 1), ")"));
  for (;;) {
    if (cancelled_ && cancelled_()) return absl::CancelledError(absl::StrCat(where, " abandoned: a restart made it obsolete"));
    if (Clock::now() >= deadline) {
      std::vector<int> missing;
      for (int r = 0; r < world_size; ++r) {
        auto rec = GetNow(step, absl::StrCat(p, "/rank/", r));
        if (!rec.ok() || !*rec) missing.push_back(r);
      }
      return absl::DeadlineExceededError(
          absl::StrCat(where, ": ", world_size - static_cast<int>(missing.size()), "/", world_size,
                       " ranks durable after ", std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                       " s (", absl::StripPrefix(options_.Describe(), "the "), "); missing ranks ",
                       absl::StrJoin(missing, ",")));
    }
    FCK_ASSIGN_OR_RETURN(std::optional<std::string> woke, WaitKey(step, p + "/wake", deadline));
    if (!woke) continue;
    FCK_ASSIGN_OR_RETURN(std::optional<std::string> failed, GetNow(step, p + "/failed"));
    if (failed) return absl::AbortedError(absl::StrCat(where, " abandoned: ", *failed));
    std::vector<std::string> records;
    for (int r = 0; r < world_size; ++r) {
      FCK_ASSIGN_OR_RETURN(std::optional<std::string> rec, GetNow(step, absl::StrCat(p, "/rank/", r)));
      if (!rec) break;
      records.push_back(std::move(*rec));
    }
    if (static_cast<int>(records.size()) == world_size) return records;
    // The count overshot (a rank reported twice): look again shortly.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void StoreCommitBarrier::ReportFailure(int64_t step, int rank, const std::string& why) {
  // Best effort: a store that is gone cannot be told, and nobody can wait on it either.
  const std::string p = options_.step_prefix(step);
  if (!Set(step, p + "/failed", absl::StrCat("rank ", rank, " did not persist it: ", why)).ok()) return;
  if (!Set(step, p + "/wake", "failed").ok()) return;
  if (rank == 0 && Set(step, p + "/commit", absl::StrCat(kAbandoned, why)).ok()) DropStepKeys(step);
}

void StoreCommitBarrier::Committed(int64_t step) {
  absl::Status s = Set(step, options_.step_prefix(step) + "/commit", kCommitted);
  if (!s.ok()) {
    // COMMIT is durable: the other ranks that cannot hear it read the file.
    FCK_LOG(kWarn, s.message());
    return;
  }
  // Every rank reported this step durable, so none waits on an older one
  // any more (each rank persists its steps in order): older steps' keys,
  // this step's records, and older rounds' keys go.
  const auto deadline = Clock::now() + options_.unreachable_timeout;
  const std::string round = options_.round_prefix();
  (void)Store().DeleteRange(round + "/s", options_.step_prefix(step), deadline);
  DropStepKeys(step);
  (void)Store().DeleteRange(CommitRoot(options_), round, deadline);
}

absl::Status StoreCommitBarrier::WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                                               const std::function<bool()>& cancelled) {
  const auto deadline = Clock::now() + timeout;
  const std::string key = options_.step_prefix(step) + "/commit";
  for (;;) {
    if (cancelled && cancelled()) return absl::CancelledError(RestartMessage(step));
    if (Clock::now() >= deadline)
      return absl::DeadlineExceededError(
          absl::StrCat("COMMIT of step ", step, " in ", directory_, ": no word from rank 0 through ", options_.Describe(),
                       " within ", std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                       " s (is rank 0 running and persisting?)"));
    absl::StatusOr<std::optional<std::string>> decided = WaitKey(step, key, deadline);
    if (!decided.ok()) {
      // Rank 0 may have committed just before the store went away.
      if (ReadCommit(directory_, step).ok()) return absl::OkStatus();
      return decided.status();
    }
    if (!*decided) continue;
    if (**decided == kCommitted) return absl::OkStatus();
    return absl::AbortedError(absl::StrCat("commit of step ", step, " in ", directory_, " abandoned by rank 0: ",
                                           absl::StartsWith(**decided, kAbandoned)
                                               ? (*decided)->substr(sizeof(kAbandoned) - 1)
                                               : **decided));
  }
}

std::string StoreCommitBarrier::Describe() const { return options_.Describe(); }

class StoreCommits::Tracked : public StoreCommitBarrier {
 public:
  Tracked(std::shared_ptr<Live> live, CommitStoreOptions options, std::string directory,
          std::function<bool()> cancelled)
      : StoreCommitBarrier(std::move(options), std::move(directory), std::move(cancelled)), live_(std::move(live)) {
    std::lock_guard<std::mutex> l(live_->mu);
    live_->barriers.insert(this);
  }
  ~Tracked() override {
    std::lock_guard<std::mutex> l(live_->mu);
    live_->barriers.erase(this);
  }

 private:
  std::shared_ptr<Live> live_;
};

std::unique_ptr<core::CommitBarrier> StoreCommits::Barrier(const std::string& directory, std::function<bool()> cancelled) {
  return std::make_unique<Tracked>(live_, options_, directory, std::move(cancelled));
}

void StoreCommits::WakeAll() {
  std::lock_guard<std::mutex> l(live_->mu);
  for (StoreCommitBarrier* b : live_->barriers) b->Wake();
}

std::string StoreCommits::Describe() const { return options_.Describe(); }

}  // namespace flashckpt
