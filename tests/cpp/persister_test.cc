// The one persist queue (storage/persister.h), with a persist function the
// test controls: superseding, abandoning, draining with a deadline, and every
// queued step's DoneFn run exactly once.
#include "storage/persister.h"

#include <atomic>
#include <future>
#include <map>
#include <mutex>
#include <vector>

#include "gtest/gtest.h"

namespace flashckpt {
namespace {

using std::chrono::milliseconds;

// A persist function that blocks until released (or cancelled).
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  std::vector<int64_t> started;
  absl::StatusOr<PersistStats> Run(int64_t step, const std::function<bool()>& cancelled) {
    std::unique_lock<std::mutex> l(mu);
    started.push_back(step);
    cv.notify_all();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!open && !cancelled() && std::chrono::steady_clock::now() < deadline) cv.wait_for(l, milliseconds(5));
    if (cancelled()) return absl::CancelledError("cancelled while persisting");
    if (!open) return absl::DeadlineExceededError("gate never opened");
    PersistStats s;
    s.bytes = static_cast<uint64_t>(step);
    return s;
  }
  void Open() {
    std::lock_guard<std::mutex> l(mu);
    open = true;
    cv.notify_all();
  }
  bool WaitStarted(size_t n) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, std::chrono::seconds(10), [&] { return started.size() >= n; });
  }
};

struct Outcomes {
  std::mutex mu;
  std::map<int64_t, std::vector<PersistOutcome>> by_step;
  Persister::DoneFn Done() {
    return [this](const PersistOutcome& o) {
      std::lock_guard<std::mutex> l(mu);
      by_step[o.step].push_back(o);
    };
  }
  std::vector<PersistOutcome> Of(int64_t step) {
    std::lock_guard<std::mutex> l(mu);
    return by_step[step];
  }
};

TEST(Persister, ANewerStepSupersedesTheQueuedOnesNotTheOneInFlight) {
  Gate gate;
  Outcomes out;
  std::vector<std::pair<int64_t, int64_t>> reported;
  std::vector<int64_t> retained;
  Persister::Options o;
  o.name = "rank 0";
  o.persist = [&](int64_t step, int, const std::function<bool()>& c) { return gate.Run(step, c); };
  o.report_superseded = [&](int64_t step, int64_t by) { reported.emplace_back(step, by); };
  o.after_durable = [&](int64_t step) { retained.push_back(step); };
  {
    Persister p(o);
    p.Enqueue(1, 0, out.Done());
    ASSERT_TRUE(gate.WaitStarted(1));
    p.Enqueue(2, 1, out.Done());
    p.Enqueue(3, 2, out.Done());  // supersedes 2 at once, while 1 is in flight
    ASSERT_EQ(out.Of(2).size(), 1u);
    EXPECT_TRUE(out.Of(2)[0].superseded);
    EXPECT_EQ(out.Of(2)[0].status.code(), absl::StatusCode::kCancelled);
    EXPECT_EQ(out.Of(2)[0].slot, 1);
    EXPECT_EQ(p.Pending(), (std::vector<int64_t>{1, 3}));
    gate.Open();
    ASSERT_TRUE(p.Drain(std::chrono::seconds(10)).ok());
  }
  ASSERT_EQ(out.Of(1).size(), 1u);
  EXPECT_TRUE(out.Of(1)[0].durable());
  ASSERT_EQ(out.Of(3).size(), 1u);
  EXPECT_TRUE(out.Of(3)[0].durable());
  EXPECT_EQ(out.Of(3)[0].stats.bytes, 3u);
  EXPECT_EQ(reported, (std::vector<std::pair<int64_t, int64_t>>{{2, 3}}));  // on the persister's thread
  EXPECT_EQ(retained, (std::vector<int64_t>{1, 3}));
}

TEST(Persister, AbandonDropsTheQueueAndCancelsTheOneInFlight) {
  Gate gate;
  Outcomes out;
  Persister::Options o;
  o.persist = [&](int64_t step, int, const std::function<bool()>& c) { return gate.Run(step, c); };
  Persister p(o);
  p.Enqueue(5, 0, out.Done());
  ASSERT_TRUE(gate.WaitStarted(1));
  p.Enqueue(6, 1, out.Done());
  p.Abandon("abandoned: a restart made it obsolete");
  ASSERT_EQ(out.Of(6).size(), 1u);
  EXPECT_FALSE(out.Of(6)[0].superseded);
  EXPECT_NE(out.Of(6)[0].status.message().find("a restart made it obsolete"), std::string::npos);
  ASSERT_TRUE(p.Drain(std::chrono::seconds(10)).ok());
  ASSERT_EQ(out.Of(5).size(), 1u);
  EXPECT_EQ(out.Of(5)[0].status.code(), absl::StatusCode::kCancelled);
  // After a restart the persister takes new steps as before.
  gate.Open();
  p.Enqueue(7, 2, out.Done());
  ASSERT_TRUE(p.Drain(std::chrono::seconds(10)).ok());
  ASSERT_EQ(out.Of(7).size(), 1u);
  EXPECT_TRUE(out.Of(7)[0].durable());
}

TEST(Persister, DrainGivesUpAtItsDeadlineNamingWhatIsPending) {
  Gate gate;
  Outcomes out;
  Persister::Options o;
  o.name = "rank 2";
  o.persist = [&](int64_t step, int, const std::function<bool()>& c) { return gate.Run(step, c); };
  Persister p(o);
  p.Enqueue(10, 0, out.Done());
  ASSERT_TRUE(gate.WaitStarted(1));
  p.Enqueue(11, 1, out.Done());
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status s = p.Drain(milliseconds(200));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  ASSERT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(s.message().find("rank 2"), std::string::npos) << s;
  EXPECT_NE(s.message().find("step 10 in flight"), std::string::npos) << s;
  EXPECT_NE(s.message().find("queued: 11"), std::string::npos) << s;
  gate.Open();
  ASSERT_TRUE(p.Drain(std::chrono::seconds(10)).ok());
}

TEST(Persister, AFailureIsReportedAndTheNextStepStillPersists) {
  Outcomes out;
  Persister::Options o;
  std::vector<int64_t> retained;
  o.persist = [&](int64_t step, int, const std::function<bool()>&) -> absl::StatusOr<PersistStats> {
    if (step == 1) return absl::ResourceExhaustedError("write /ckpt/step-1/rank-0.data: No space left on device");
    return PersistStats{};
  };
  o.after_durable = [&](int64_t step) { retained.push_back(step); };
  Persister p(o);
  p.Enqueue(1, 0, out.Done());
  ASSERT_TRUE(p.Drain(std::chrono::seconds(10)).ok());
  p.Enqueue(2, 1, out.Done());
  ASSERT_TRUE(p.Drain(std::chrono::seconds(10)).ok());
  EXPECT_EQ(out.Of(1)[0].status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(out.Of(2)[0].durable());
  EXPECT_EQ(retained, std::vector<int64_t>{2});  // no retention after a failed step
}

TEST(Persister, StopWithAbandonRunsEveryDoneOnce) {
  Gate gate;
  Outcomes out;
  Persister::Options o;
  o.persist = [&](int64_t step, int, const std::function<bool()>& c) { return gate.Run(step, c); };
  Persister p(o);
  p.Enqueue(1, 0, out.Done());
  ASSERT_TRUE(gate.WaitStarted(1));
  p.Enqueue(2, 1, out.Done());
  p.Stop(/*abandon=*/true);
  p.Enqueue(3, 2, out.Done());  // after the stop: dropped at once
  for (int64_t step : {1, 2, 3}) {
    ASSERT_EQ(out.Of(step).size(), 1u) << "step " << step;
    EXPECT_EQ(out.Of(step)[0].status.code(), absl::StatusCode::kCancelled) << "step " << step;
  }
}

}  // namespace
}  // namespace flashckpt
