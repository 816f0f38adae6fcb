#include "agent/store_commit_barrier.h"

#include <algorithm>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
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

}  // namespace

std::string CommitStoreOptions::endpoint() const { return rendezvous::FormatEndpoint(host, port); }

std::string CommitStoreOptions::round_prefix() const { return absl::StrCat(run_id, "/commit/r", Padded(round)); }

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
  if (client_) client_->Interrupt();
}

rendezvous::RendezvousClient& StoreCommitBarrier::Client() {
  std::lock_guard<std::mutex> l(mu_);
  if (!client_) {
    client_ = std::make_unique<rendezvous::RendezvousClient>(options_.host, options_.port, options_.token,
                                                             options_.run_id);
    if (woken_) client_->Interrupt();  // a wake before the first call is not lost
  }
  return *client_;
}

void StoreCommitBarrier::Rearm() {
  std::lock_guard<std::mutex> l(mu_);
  client_.reset();
  woken_ = false;
}

void StoreCommitBarrier::ThrowUnreachable(int64_t step, const char* doing, const absl::Status& s) {
  throw Error(ErrorCode::kUnavailable,
              absl::StrCat("commit of step ", step, ": ", doing, " through the rendezvous store at ",
                           options_.endpoint(), " failed (is the agent hosting the rendezvous gone?): ", s.message()));
}

template <typename T, typename F>
std::optional<T> StoreCommitBarrier::Run(int64_t step, const char* doing, F&& call,
                                         const std::function<bool()>& cancelled) {
  for (;;) {
    absl::StatusOr<T> r = call();
    if (r.ok()) return std::move(*r);
    if (r.status().code() != absl::StatusCode::kCancelled) ThrowUnreachable(step, doing, r.status());
    // Interrupted by Wake(): the next call gets a fresh connection.
    Rearm();
    if (cancelled && cancelled()) return std::nullopt;
  }
}

void StoreCommitBarrier::Set(int64_t step, const std::string& key, const std::string& value) {
  auto ok = Run<bool>(
      step, "setting a key",
      [&]() -> absl::StatusOr<bool> {
        absl::Status s = Client().StoreSet(key, value, Clock::now() + options_.unreachable_timeout);
        if (!s.ok()) return s;
        return true;
      },
      cancelled_);
  if (!ok) throw Error(ErrorCode::kUnavailable, RestartMessage(step));
}

std::optional<std::string> StoreCommitBarrier::GetNow(int64_t step, const std::string& key) {
  auto v = Run<std::optional<std::string>>(
      step, "reading a key",
      [&] { return Client().StoreWait(key, std::chrono::milliseconds(0), Clock::now() + options_.unreachable_timeout); },
      cancelled_);
  if (!v) throw Error(ErrorCode::kUnavailable, RestartMessage(step));
  return *v;
}

std::optional<std::string> StoreCommitBarrier::WaitKey(int64_t step, const std::string& key, Clock::time_point until) {
  const auto now = Clock::now();
  const auto wait = std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(until - now),
                               std::chrono::milliseconds(0), options_.poll);
  absl::StatusOr<std::optional<std::string>> r =
      Client().StoreWait(key, wait, now + wait + options_.unreachable_timeout);
  if (r.ok()) return *r;
  if (r.status().code() != absl::StatusCode::kCancelled) ThrowUnreachable(step, "waiting", r.status());
  Rearm();  // woken: the caller looks at cancelled
  return std::nullopt;
}

void StoreCommitBarrier::DropStepKeys(int64_t step) {
  // "/commit" sorts before every other key of the step: it stays for the
  // ranks still waiting on it; the next commit drops it with the older steps.
  const std::string p = options_.step_prefix(step);
  (void)Client().StoreDelete(p + "/count", p + "/~", Clock::now() + options_.unreachable_timeout);
}

void StoreCommitBarrier::rank_durable(int64_t step, int rank, const std::string& record) {
  pb::RankRecord rec;
  ThrowIfError(ParseRecord(record, RecordKind::kRankRecord, absl::StrCat("rank ", rank, " record of step ", step), &rec));
  // Never polled: `flashckpt ls` shows which ranks of an incomplete step are durable.
  WriteRankRecordFile(directory_, step, rank, record);
  const std::string p = options_.step_prefix(step);
  Set(step, absl::StrCat(p, "/rank/", rank), record);
  auto n = Run<int64_t>(
      step, "counting durable ranks",
      [&] { return Client().StoreAdd(p + "/count", 1, Clock::now() + options_.unreachable_timeout); }, cancelled_);
  if (!n) throw Error(ErrorCode::kUnavailable, RestartMessage(step));
  if (*n >= static_cast<int64_t>(rec.world_size())) Set(step, p + "/wake", "all");
}

std::vector<std::string> StoreCommitBarrier::wait_all(int64_t step, int world_size, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  const std::string p = options_.step_prefix(step);
  const std::string where = absl::StrCat("commit of step ", step, " in ", directory_);
  // A step given up earlier in this round stays given up: the other ranks
  // already read the decision.
  if (auto decided = GetNow(step, p + "/commit"); decided && absl::StartsWith(*decided, kAbandoned))
    throw Error(ErrorCode::kUnavailable, absl::StrCat(where, " was abandoned earlier in this round (",
                                                      decided->substr(sizeof(kAbandoned) - 1), ")"));
  for (;;) {
    if (cancelled_ && cancelled_())
      throw Error(ErrorCode::kUnavailable, absl::StrCat(where, " abandoned: a restart made it obsolete"));
    if (Clock::now() >= deadline) {
      std::vector<int> missing;
      for (int r = 0; r < world_size; ++r)
        if (!GetNow(step, absl::StrCat(p, "/rank/", r))) missing.push_back(r);
      throw Error(ErrorCode::kDeadlineExceeded,
                  absl::StrCat(where, ": ", world_size - static_cast<int>(missing.size()), "/", world_size,
                               " ranks durable after ", std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                               " s (rendezvous store at ", options_.endpoint(), "); missing ranks ",
                               absl::StrJoin(missing, ",")));
    }
    if (!WaitKey(step, p + "/wake", deadline)) continue;
    if (auto failed = GetNow(step, p + "/failed"))
      throw Error(ErrorCode::kUnavailable, absl::StrCat(where, " abandoned: ", *failed));
    std::vector<std::string> records;
    for (int r = 0; r < world_size; ++r) {
      auto rec = GetNow(step, absl::StrCat(p, "/rank/", r));
      if (!rec) break;
      records.push_back(std::move(*rec));
    }
    if (static_cast<int>(records.size()) == world_size) return records;
    // The count overshot (a rank reported twice): look again shortly.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void StoreCommitBarrier::report_failure(const std::string&, int64_t step, int rank, const std::string& why) {
  // Best effort: a store that is gone cannot be told, and nobody can wait on it either.
  try {
    const std::string p = options_.step_prefix(step);
    Set(step, p + "/failed", absl::StrCat("rank ", rank, " did not persist it: ", why));
    Set(step, p + "/wake", "failed");
    if (rank == 0) {
      Set(step, p + "/commit", absl::StrCat(kAbandoned, why));
      DropStepKeys(step);
    }
  } catch (const Error&) {
  }
}

void StoreCommitBarrier::committed(const std::string&, int64_t step) {
  try {
    Set(step, options_.step_prefix(step) + "/commit", kCommitted);
    // Every rank reported this step durable, so none waits on an older one
    // any more (each rank persists its steps in order): older steps' keys,
    // this step's records, and older rounds' keys go.
    const auto deadline = Clock::now() + options_.unreachable_timeout;
    const std::string round = options_.round_prefix();
    (void)Client().StoreDelete(round + "/s", options_.step_prefix(step), deadline);
    DropStepKeys(step);
    (void)Client().StoreDelete(absl::StrCat(options_.run_id, "/commit/r"), round, deadline);
  } catch (const Error& e) {
    // COMMIT is durable: the other ranks that cannot hear it read the file.
    FCK_LOG(kWarn, e.what());
  }
}

bool StoreCommitBarrier::wait_committed(const std::string& directory, int64_t step, std::chrono::milliseconds timeout,
                                        const std::function<bool()>& cancelled, std::string* why) {
  const auto deadline = Clock::now() + timeout;
  const std::string key = options_.step_prefix(step) + "/commit";
  for (;;) {
    if (cancelled && cancelled()) {
      if (why) *why = RestartMessage(step);
      return false;
    }
    if (Clock::now() >= deadline)
      throw Error(ErrorCode::kDeadlineExceeded,
                  absl::StrCat("COMMIT of step ", step, " in ", directory, ": no word from rank 0 through the rendezvous store at ",
                               options_.endpoint(), " within ", std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                               " s (is rank 0 running and persisting?)"));
    std::optional<std::string> decided;
    try {
      decided = WaitKey(step, key, deadline);
    } catch (const Error&) {
      // Rank 0 may have committed just before the store went away.
      if (ReadCommit(directory, step).ok()) return true;
      throw;
    }
    if (!decided) continue;
    if (*decided == kCommitted) return true;
    if (why)
      *why = absl::StrCat("commit of step ", step, " in ", directory, " abandoned by rank 0: ",
                          absl::StartsWith(*decided, kAbandoned) ? decided->substr(sizeof(kAbandoned) - 1) : *decided);
    return false;
  }
}

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

std::unique_ptr<CommitBarrier> StoreCommits::Barrier(const std::string& directory, std::function<bool()> cancelled) {
  return std::make_unique<Tracked>(live_, options_, directory, std::move(cancelled));
}

void StoreCommits::WakeAll() {
  std::lock_guard<std::mutex> l(live_->mu);
  for (StoreCommitBarrier* b : live_->barriers) b->Wake();
}

std::string StoreCommits::Describe() const {
  return absl::StrCat("the rendezvous store at ", options_.endpoint());
}

}  // namespace flashckpt
