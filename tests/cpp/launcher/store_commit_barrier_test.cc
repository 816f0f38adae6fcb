// The cross-node commit through the rendezvous store: a real RendezvousServer
// on 127.0.0.1 (port 0), or a real etcd member (skipped without the etcd
// binary), one StoreCommitBarrier (own connection) per rank thread, as the
// node agents' rank threads use them; and the KeyStore under it, on both.
#include "agent/store_commit_barrier.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <future>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "flashckpt.pb.h"
#include "etcd_test_server.h"
#include "rendezvous/key_store.h"
#include "rendezvous/rendezvous_server.h"
#include "storage/commit.h"
#include "storage/layout.h"

namespace flashckpt {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

using rendezvous::etcd_testing::EtcdServer;

// What the tests on either store share: the checkpoint directory, the
// records, and what a rank's persist does with the barrier.
class CommitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> n{0};
    dir_ = (fs::temp_directory_path() / ("flashckpt-store-commit-" + std::to_string(::getpid()) + "-" +
                                         std::to_string(n++))).string();
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  virtual CommitStoreOptions Options(uint64_t round) const = 0;
  CommitStoreOptions Store(uint64_t round = 1) const { return Options(round); }

  // Rank r's record of `step`, and its step directory (the record's files are not needed here).
  std::string Record(int64_t step, int rank, int world) {
    fs::create_directories(StepDir(dir_, step));
    pb::RankRecord rec;
    rec.set_format_version(kFormatVersion);
    rec.set_step(step);
    rec.set_rank(rank);
    rec.set_world_size(world);
    auto* f = rec.add_files();
    f->set_name(RankDataName(rank));
    f->set_size(4096);
    f->set_crc32c(1234);
    return FrameRecord(RecordKind::kRankRecord, rec);
  }

  std::optional<std::string> Key(const std::string& key) {
    auto store = rendezvous::OpenKeyStore(Store().address());
    auto v = store->Wait(key, milliseconds(0), Clock::now() + std::chrono::seconds(5));
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? *v : std::nullopt;
  }

  // What PersistSlot does with the barrier, without the data files.
  // Returns "" when committed, else the error or the reason it was given up.
  std::string Persist(core::CommitBarrier& b, int64_t step, int rank, int world, milliseconds timeout) {
    absl::Status s = b.RankDurable(step, rank, Record(step, rank, world));
    if (!s.ok()) return std::string(s.message());
    if (rank == 0) {
      absl::StatusOr<std::vector<std::string>> records = b.WaitAll(step, world, timeout);
      if (!records.ok()) {
        b.ReportFailure(step, 0, std::string(records.status().message()));
        return std::string(records.status().message());
      }
      s = WriteCommit(dir_, step, world, *records);
      if (!s.ok()) return std::string(s.message());
      b.Committed(step);
      return "";
    }
    s = b.WaitCommitted(step, timeout, nullptr);
    return s.ok() ? "" : std::string(s.message());
  }

  // Persist on a thread and barrier of its own, as a rank's persister runs it.
  std::future<std::string> PersistOnThread(StoreCommits& commits, int64_t step, int rank, int world) {
    return std::async(std::launch::async, [this, &commits, step, rank, world] {
      return Persist(*commits.Barrier(dir_, nullptr), step, rank, world, milliseconds(30000));
    });
  }

  std::string dir_;
};

class StoreCommit : public CommitTest {
 protected:
  void SetUp() override {
    CommitTest::SetUp();
    rendezvous::RendezvousServerOptions so;
    so.token = "secret";
    so.run_id = "job";
    auto server = rendezvous::RendezvousServer::Start(so);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  void TearDown() override {
    server_.reset();
    CommitTest::TearDown();
  }

  CommitStoreOptions Options(uint64_t round) const override {
    CommitStoreOptions o;
    o.host = "127.0.0.1";
    o.port = port_ ? port_ : server_->port();
    o.token = "secret";
    o.run_id = "job";
    o.round = round;
    o.unreachable_timeout = milliseconds(500);
    o.poll = milliseconds(200);
    return o;
  }

  std::unique_ptr<rendezvous::RendezvousServer> server_;
  uint16_t port_ = 0;
};

TEST_F(StoreCommit, AllRanksDurableCommitsOnceAndEveryRankSeesIt) {
  constexpr int kWorld = 4;
  StoreCommits commits(Store());
  for (int64_t step : {10, 20}) {
    std::vector<std::future<std::string>> ranks;
    for (int r = kWorld - 1; r >= 0; --r)  // rank 0 last: the others are already waiting
      ranks.push_back(std::async(std::launch::async, [&, r] {
        auto b = commits.Barrier(dir_, nullptr);
        return Persist(*b, step, r, kWorld, milliseconds(20000));
      }));
    for (auto& f : ranks) EXPECT_EQ(f.get(), "");
    auto commit = ReadCommit(dir_, step);
    ASSERT_TRUE(commit.ok()) << commit.status();
    EXPECT_EQ(commit->files_size(), kWorld);
    // The record files stay for `flashckpt ls`; nobody polled them.
    for (int r = 0; r < kWorld; ++r) EXPECT_TRUE(fs::exists(StepDir(dir_, step) + "/" + RankDurableName(r)));
    const std::string p = Store().step_prefix(step);
    EXPECT_EQ(Key(p + "/commit"), "committed");
    for (const char* k : {"/count", "/wake", "/failed", "/rank/0", "/rank/3"}) EXPECT_FALSE(Key(p + k)) << k;
  }
  // The second commit dropped the first step's decision: one key is left.
  EXPECT_FALSE(Key(Store().step_prefix(10) + "/commit"));
  EXPECT_EQ(server_->counters().store_keys.load(), 1u);
}

TEST_F(StoreCommit, AFailedRankEndsEveryWaitAtOnceAndNothingIsCommitted) {
  constexpr int kWorld = 3;
  StoreCommits commits(Store());
  const auto t0 = Clock::now();
  auto waiter = std::async(std::launch::async, [&] {
    auto b = commits.Barrier(dir_, nullptr);
    return Persist(*b, 7, 1, kWorld, milliseconds(30000));
  });
  auto rank0 = std::async(std::launch::async, [&] {
    auto b = commits.Barrier(dir_, nullptr);
    return Persist(*b, 7, 0, kWorld, milliseconds(30000));
  });
  std::this_thread::sleep_for(milliseconds(100));
  commits.Barrier(dir_, nullptr)->ReportFailure(7, 2, "disk full");
  const std::string why0 = rank0.get();
  const std::string why1 = waiter.get();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(3));  // not the 30 s timeout
  EXPECT_NE(why0.find("rank 2 did not persist it: disk full"), std::string::npos) << why0;
  EXPECT_NE(why1.find("abandoned by rank 0"), std::string::npos) << why1;
  EXPECT_NE(why1.find("disk full"), std::string::npos) << why1;
  EXPECT_FALSE(ReadCommit(dir_, 7).ok());
  EXPECT_FALSE(fs::exists(StepDir(dir_, 7) + "/COMMIT"));
  // Rank 0's decision stays for late waiters; the step's other keys are gone.
  const std::string p = Store().step_prefix(7);
  EXPECT_TRUE(absl::StartsWith(Key(p + "/commit").value_or(""), "abandoned: "));
  EXPECT_FALSE(Key(p + "/rank/0"));
  // A rank that reports late gives up at once too.
  auto late = commits.Barrier(dir_, nullptr);
  const auto t1 = Clock::now();
  EXPECT_NE(Persist(*late, 7, 1, kWorld, milliseconds(30000)).find("abandoned by rank 0"), std::string::npos);
  EXPECT_LT(Clock::now() - t1, std::chrono::seconds(2));
}

TEST_F(StoreCommit, RankZeroGivingUpEndsTheOthersWait) {
  StoreCommits commits(Store());
  auto waiter = std::async(std::launch::async, [&] {
    auto b = commits.Barrier(dir_, nullptr);
    return Persist(*b, 3, 1, 2, milliseconds(30000));
  });
  std::this_thread::sleep_for(milliseconds(100));
  const auto t0 = Clock::now();
  // Rank 0 dropped the step from its queue (a newer one superseded it).
  commits.Barrier(dir_, nullptr)->ReportFailure(3, 0, "superseded by step 4 before it was persisted");
  const std::string why = waiter.get();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(2));
  EXPECT_NE(why.find("superseded by step 4"), std::string::npos) << why;
}

TEST_F(StoreCommit, ARoundsKeysDoNotSatisfyTheNextRound) {
  {
    StoreCommits round1(Store(1));
    for (int r = 0; r < 2; ++r) ASSERT_TRUE(round1.Barrier(dir_, nullptr)->RankDurable(5, r, Record(5, r, 2)).ok());
    // Even a decision of round 1.
    rendezvous::RendezvousClient c("127.0.0.1", server_->port(), "secret", "job");
    ASSERT_TRUE(c.StoreSet(Store(1).step_prefix(5) + "/commit", "committed", Clock::now() + std::chrono::seconds(5)).ok());
  }
  StoreCommits round2(Store(2));
  auto b0 = round2.Barrier(dir_, nullptr);
  ASSERT_TRUE(b0->RankDurable(5, 0, Record(5, 0, 2)).ok());
  absl::StatusOr<std::vector<std::string>> early = b0->WaitAll(5, 2, milliseconds(300));
  ASSERT_FALSE(early.ok()) << "round 1's record of rank 1 was taken for round 2's";
  EXPECT_EQ(early.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(early.status().message().find("1/2 ranks durable"), std::string::npos) << early.status();
  EXPECT_NE(early.status().message().find("missing ranks 1"), std::string::npos) << early.status();
  EXPECT_EQ(round2.Barrier(dir_, nullptr)->WaitCommitted(5, milliseconds(300), nullptr).code(),
            absl::StatusCode::kDeadlineExceeded);
  // Round 2's first commit drops every key of round 1.
  ASSERT_TRUE(round2.Barrier(dir_, nullptr)->RankDurable(5, 1, Record(5, 1, 2)).ok());
  absl::StatusOr<std::vector<std::string>> all = b0->WaitAll(5, 2, milliseconds(5000));
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), 2u);
  b0->Committed(5);
  EXPECT_FALSE(Key(Store(1).step_prefix(5) + "/commit"));
  EXPECT_EQ(server_->counters().store_keys.load(), 1u);
}

TEST_F(StoreCommit, ARestartWakesABlockedWaitAtOnce) {
  CommitStoreOptions o = Store();
  o.poll = milliseconds(5000);  // only the wake can end the wait early
  StoreCommits commits(o);
  std::atomic<bool> restarted{false};
  auto rank0 = std::async(std::launch::async, [&] {
    auto b = commits.Barrier(dir_, [&] { return restarted.load(); });
    EXPECT_TRUE(b->RankDurable(9, 0, Record(9, 0, 2)).ok());
    absl::StatusOr<std::vector<std::string>> r = b->WaitAll(9, 2, milliseconds(30000));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
    return r.ok() ? std::string("committed") : std::string(r.status().message());
  });
  auto rank1 = std::async(std::launch::async, [&] {
    auto b = commits.Barrier(dir_, [&] { return restarted.load(); });
    absl::Status s = b->WaitCommitted(9, milliseconds(30000), [&] { return restarted.load(); });
    EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
    return std::string(s.message());
  });
  std::this_thread::sleep_for(milliseconds(300));
  const auto t0 = Clock::now();
  restarted = true;
  commits.WakeAll();
  EXPECT_NE(rank0.get().find("a restart made it obsolete"), std::string::npos);
  EXPECT_NE(rank1.get().find("a restart made it obsolete"), std::string::npos);
  EXPECT_LT(Clock::now() - t0, milliseconds(1000));
}

TEST_F(StoreCommit, AStoreThatWentAwayFailsThePersistNamingHostPort) {
  port_ = server_->port();
  const std::string endpoint = "127.0.0.1:" + std::to_string(port_);
  StoreCommits commits(Store());
  auto b1 = commits.Barrier(dir_, nullptr);
  ASSERT_TRUE(b1->RankDurable(4, 1, Record(4, 1, 2)).ok());
  auto waiter = std::async(std::launch::async, [&] {
    absl::Status s = b1->WaitCommitted(4, milliseconds(30000), nullptr);
    // The store is gone: rank 0 may still commit, so this is not "given up".
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
    return std::string(s.message());
  });
  std::this_thread::sleep_for(milliseconds(100));
  server_.reset();  // the agent hosting the rendezvous died
  const auto t0 = Clock::now();
  const std::string why1 = waiter.get();
  const std::string why0 = Persist(*commits.Barrier(dir_, nullptr), 4, 0, 2, milliseconds(30000));
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  EXPECT_NE(why1.find(endpoint), std::string::npos) << why1;
  EXPECT_NE(why0.find(endpoint), std::string::npos) << why0;
  EXPECT_NE(why0.find("rendezvous store"), std::string::npos) << why0;
  EXPECT_FALSE(fs::exists(StepDir(dir_, 4) + "/COMMIT"));  // nothing committed from partial information
}

// An abandoned persist whose store went away (etcd down at a restart) ends at
// once: every later call fails without waiting out unreachable_timeout, also
// after a wake replaced the connection.
TEST_F(StoreCommit, AnAbandonedStepOnAStoreThatIsGoneEndsEveryCallAtOnce) {
  port_ = server_->port();
  CommitStoreOptions o = Store();
  o.unreachable_timeout = milliseconds(4000);
  StoreCommits commits(o);
  std::atomic<bool> restarted{false};
  auto b = commits.Barrier(dir_, [&] { return restarted.load(); });
  ASSERT_TRUE(b->RankDurable(3, 0, Record(3, 0, 2)).ok());
  server_.reset();  // the store is gone
  restarted = true;
  commits.WakeAll();
  const auto t0 = Clock::now();
  absl::StatusOr<std::vector<std::string>> all = b->WaitAll(3, 2, milliseconds(30000));
  EXPECT_EQ(all.status().code(), absl::StatusCode::kCancelled) << all.status();
  EXPECT_NE(std::string(all.status().message()).find("a restart made it obsolete"), std::string::npos);
  absl::Status durable = b->RankDurable(4, 0, Record(4, 0, 2));
  EXPECT_EQ(durable.code(), absl::StatusCode::kCancelled) << durable;
  absl::Status committed = b->WaitCommitted(3, milliseconds(30000), [&] { return restarted.load(); });
  EXPECT_EQ(committed.code(), absl::StatusCode::kCancelled) << committed;
  b->ReportFailure(3, 0, "obsolete");
  b->Committed(3);
  // Before: each of these calls waited out the 4 s unreachable timeout.
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));
  EXPECT_FALSE(fs::exists(StepDir(dir_, 3) + "/COMMIT"));
}

TEST_F(StoreCommit, ARankThatLostTheStoreAfterTheCommitReadsCOMMIT) {
  port_ = server_->port();
  StoreCommits commits(Store());
  auto b0 = commits.Barrier(dir_, nullptr);
  auto b1 = commits.Barrier(dir_, nullptr);
  ASSERT_TRUE(b1->RankDurable(6, 1, Record(6, 1, 2)).ok());
  ASSERT_TRUE(b0->RankDurable(6, 0, Record(6, 0, 2)).ok());
  absl::StatusOr<std::vector<std::string>> all = b0->WaitAll(6, 2, milliseconds(5000));
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_TRUE(WriteCommit(dir_, 6, 2, *all).ok());
  server_.reset();  // gone before rank 0 could say so
  absl::Status s = b1->WaitCommitted(6, milliseconds(30000), nullptr);
  EXPECT_TRUE(s.ok()) << s;
}

TEST(RendezvousStoreDelete, DeletesAKeyOrARange) {
  rendezvous::RendezvousServerOptions so;
  auto server = rendezvous::RendezvousServer::Start(so);
  ASSERT_TRUE(server.ok());
  rendezvous::RendezvousClient c("127.0.0.1", (*server)->port(), "", "");
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  for (const char* k : {"a/1", "a/2", "a/3", "b/1"}) ASSERT_TRUE(c.StoreSet(k, "x", deadline).ok());
  EXPECT_EQ(*c.StoreDelete("a/1", "", deadline), 1);
  EXPECT_EQ(*c.StoreDelete("a/1", "", deadline), 0);
  EXPECT_EQ(*c.StoreDelete("a/", "a/~", deadline), 2);
  EXPECT_FALSE(c.StoreWait("a/3", milliseconds(0), deadline)->has_value());
  EXPECT_EQ(c.StoreWait("b/1", milliseconds(0), deadline)->value_or(""), "x");
  EXPECT_EQ((*server)->counters().store_keys.load(), 1u);
  // A wait that ends without the key is not an error.
  const auto t0 = Clock::now();
  auto none = c.StoreWait("c", milliseconds(100), deadline);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  EXPECT_GE(Clock::now() - t0, milliseconds(50));
}

// The same barrier through etcd, every key under /flashrun/.
class StoreCommitBarrierEtcd : public CommitTest {
 protected:
  void SetUp() override {
    REQUIRE_ETCD(etcd_);
    CommitTest::SetUp();
  }

  CommitStoreOptions Options(uint64_t round) const override {
    CommitStoreOptions o;
    o.run_id = "job";
    o.round = round;
    o.etcd.emplace();
    o.etcd->endpoints = {etcd_.endpoint()};
    o.key_root = "/flashrun/";
    o.unreachable_timeout = milliseconds(1000);
    o.poll = milliseconds(200);
    return o;
  }

  int64_t KeysUnder(const std::string& prefix) {
    auto c = rendezvous::EtcdClient::Connect(*Store().etcd);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return -1;
    auto r = (*c)->Get(prefix, /*prefix=*/true);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->kvs_size() : -1;
  }

  EtcdServer etcd_;
};

// What a rank's thread said, or a failure (and "timed out") when it did not end within `limit`.
std::string Outcome(std::future<std::string>& f, milliseconds limit = milliseconds(10000)) {
  if (f.wait_for(limit) != std::future_status::ready) {
    ADD_FAILURE() << "a rank is still waiting after " << limit.count() << " ms";
    return "timed out";
  }
  return f.get();
}

TEST_F(StoreCommitBarrierEtcd, EveryRankDurableGivesRankZeroEveryRecordAndTheOthersCommitted) {
  constexpr int kWorld = 4;
  StoreCommits commits(Store());
  EXPECT_EQ(commits.Describe(), "etcd at " + etcd_.endpoint());
  EXPECT_EQ(Store().step_prefix(10), "/flashrun/job/commit/r00000000000000000001/s00000000000000000010");
  for (int64_t step : {10, 20}) {
    std::vector<std::future<std::string>> others;
    for (int r = 1; r < kWorld; ++r) others.push_back(PersistOnThread(commits, step, r, kWorld));
    // Rank 0 by hand: the records it gets are every rank's.
    auto b0 = commits.Barrier(dir_, nullptr);
    ASSERT_TRUE(b0->RankDurable(step, 0, Record(step, 0, kWorld)).ok());
    absl::StatusOr<std::vector<std::string>> records = b0->WaitAll(step, kWorld, milliseconds(20000));
    ASSERT_TRUE(records.ok()) << records.status();
    ASSERT_EQ(records->size(), static_cast<size_t>(kWorld));
    for (int r = 0; r < kWorld; ++r) EXPECT_EQ((*records)[r], Record(step, r, kWorld)) << "rank " << r;
    ASSERT_TRUE(WriteCommit(dir_, step, kWorld, *records).ok());
    b0->Committed(step);
    for (auto& f : others) EXPECT_EQ(Outcome(f), "");
    const std::string p = Store().step_prefix(step);
    EXPECT_EQ(Key(p + "/commit"), "committed");
    for (const char* k : {"/count", "/wake", "/rank/0", "/rank/3"}) EXPECT_FALSE(Key(p + k)) << k;
  }
  EXPECT_EQ(KeysUnder("/flashrun/"), 1);  // the older step's decision went with the second commit
}

TEST_F(StoreCommitBarrierEtcd, AReportedFailureAbortsRankZeroWithTheReasonAndAbandonsTheOthers) {
  StoreCommits commits(Store());
  const auto t0 = Clock::now();
  auto rank1 = PersistOnThread(commits, 7, 1, 3);
  auto rank0 = PersistOnThread(commits, 7, 0, 3);
  std::this_thread::sleep_for(milliseconds(300));
  commits.Barrier(dir_, nullptr)->ReportFailure(7, 2, "disk full");
  const std::string why0 = Outcome(rank0), why1 = Outcome(rank1);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));  // not the 30 s timeout
  EXPECT_NE(why0.find("abandoned: rank 2 did not persist it: disk full"), std::string::npos) << why0;
  EXPECT_NE(why1.find("abandoned by rank 0"), std::string::npos) << why1;
  EXPECT_NE(why1.find("disk full"), std::string::npos) << why1;
  EXPECT_FALSE(fs::exists(StepDir(dir_, 7) + "/COMMIT"));
  EXPECT_TRUE(absl::StartsWith(Key(Store().step_prefix(7) + "/commit").value_or(""), "abandoned: "));
}

TEST_F(StoreCommitBarrierEtcd, WakeEndsABlockedWaitPromptly) {
  CommitStoreOptions o = Store();
  o.poll = milliseconds(5000);  // only the wake can end a wait early
  StoreCommits commits(o);
  std::atomic<bool> restarted{false};
  auto obsolete = [&] { return restarted.load(); };
  auto b0 = commits.Barrier(dir_, obsolete);
  auto b1 = commits.Barrier(dir_, obsolete);
  ASSERT_TRUE(b0->RankDurable(9, 0, Record(9, 0, 2)).ok());
  auto all = std::async(std::launch::async, [&] { return b0->WaitAll(9, 2, milliseconds(30000)).status(); });
  auto committed = std::async(std::launch::async, [&] { return b1->WaitCommitted(9, milliseconds(30000), obsolete); });
  std::this_thread::sleep_for(milliseconds(500));  // both are in a watch by now
  const auto t0 = Clock::now();
  restarted = true;
  commits.WakeAll();
  for (auto* f : {&all, &committed}) {
    ASSERT_EQ(f->wait_for(std::chrono::seconds(5)), std::future_status::ready);
    absl::Status s = f->get();
    EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
    EXPECT_NE(s.message().find("a restart made it obsolete"), std::string::npos) << s;
  }
  EXPECT_LT(Clock::now() - t0, milliseconds(1000));
}

TEST_F(StoreCommitBarrierEtcd, AnEtcdKilledMidWaitFailsThePersistNamingItsEndpoint) {
  const CommitStoreOptions o = Store();
  StoreCommits commits(o);
  auto b1 = commits.Barrier(dir_, nullptr);
  ASSERT_TRUE(b1->RankDurable(4, 1, Record(4, 1, 2)).ok());
  auto waiting = std::async(std::launch::async, [&] { return b1->WaitCommitted(4, milliseconds(30000), nullptr); });
  std::this_thread::sleep_for(milliseconds(300));
  etcd_.Stop();
  // At most the wait in progress (one poll), then the unreachable timeout, and one request in flight.
  const auto bound = o.poll + 2 * o.unreachable_timeout + milliseconds(1000);
  const auto t0 = Clock::now();
  ASSERT_EQ(waiting.wait_for(bound), std::future_status::ready);
  const absl::Status gone = waiting.get();
  // Rank 0 may still commit: this is not "given up".
  EXPECT_EQ(gone.code(), absl::StatusCode::kUnavailable) << gone;
  auto rank0 = PersistOnThread(commits, 4, 0, 2);
  const std::string why0 = Outcome(rank0, std::chrono::duration_cast<milliseconds>(bound));
  EXPECT_LT(Clock::now() - t0, 2 * bound);
  for (const std::string why : {std::string(gone.message()), why0}) {
    EXPECT_NE(why.find("through etcd at " + etcd_.endpoint()), std::string::npos) << why;
    EXPECT_EQ(why.find("agent hosting"), std::string::npos) << why;
  }
  EXPECT_FALSE(fs::exists(StepDir(dir_, 4) + "/COMMIT"));  // nothing committed from partial information
}

// The KeyStore contract, on the built-in store and on etcd.
class KeyStore : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "etcd") {
      etcd_ = std::make_unique<EtcdServer>();
      REQUIRE_ETCD(*etcd_);
      return;
    }
    auto server = rendezvous::RendezvousServer::Start(rendezvous::RendezvousServerOptions{});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    port_ = server_->port();
  }

  rendezvous::KeyStoreAddress Address() const {
    rendezvous::KeyStoreAddress a;
    a.host = "127.0.0.1";
    a.port = port_;
    if (etcd_) {
      a.etcd.emplace();
      a.etcd->endpoints = {etcd_->endpoint()};
    }
    return a;
  }
  std::unique_ptr<rendezvous::KeyStore> Open() const { return rendezvous::OpenKeyStore(Address()); }
  std::string Endpoint() const { return etcd_ ? etcd_->endpoint() : "127.0.0.1:" + std::to_string(port_); }
  void Kill() {
    if (etcd_) etcd_->Stop();
    server_.reset();
  }

  std::unique_ptr<EtcdServer> etcd_;
  std::unique_ptr<rendezvous::RendezvousServer> server_;
  uint16_t port_ = 0;
};

Clock::time_point In(milliseconds d) { return Clock::now() + d; }

TEST_P(KeyStore, SetsWaitsAndDeletesARange) {
  auto s = Open();
  EXPECT_EQ(s->Describe(), rendezvous::DescribeKeyStore(Address()));
  EXPECT_NE(s->Describe().find(Endpoint()), std::string::npos);
  for (const char* k : {"a/1", "a/2", "a/3", "b/1"}) ASSERT_TRUE(s->Set(k, "x", In(milliseconds(5000))).ok());
  EXPECT_EQ(s->DeleteRange("a/1", "", In(milliseconds(5000))).value_or(-1), 1);
  EXPECT_EQ(s->DeleteRange("a/1", "", In(milliseconds(5000))).value_or(-1), 0);
  EXPECT_EQ(s->DeleteRange("a/", "a/~", In(milliseconds(5000))).value_or(-1), 2);
  auto gone = s->Wait("a/3", milliseconds(0), In(milliseconds(5000)));
  ASSERT_TRUE(gone.ok()) << gone.status();
  EXPECT_FALSE(gone->has_value());
  EXPECT_EQ(s->Wait("b/1", milliseconds(0), In(milliseconds(5000)))->value_or(""), "x");
  const auto t0 = Clock::now();
  auto none = s->Wait("c", milliseconds(200), In(milliseconds(5000)));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  EXPECT_GE(Clock::now() - t0, milliseconds(150));
}

TEST_P(KeyStore, ConcurrentAddsCountEveryOne) {
  constexpr int kThreads = 4, kAdds = 25;
  std::vector<std::future<std::vector<int64_t>>> adders;
  for (int t = 0; t < kThreads; ++t)
    adders.push_back(std::async(std::launch::async, [&] {
      auto s = Open();  // one store per thread, as the ranks have
      std::vector<int64_t> seen;
      for (int i = 0; i < kAdds; ++i) {
        auto n = s->Add("count", 1, In(milliseconds(10000)));
        EXPECT_TRUE(n.ok()) << n.status();
        if (n.ok()) seen.push_back(*n);
      }
      return seen;
    }));
  std::set<int64_t> sums;
  for (auto& a : adders) {
    ASSERT_EQ(a.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    for (int64_t n : a.get()) EXPECT_TRUE(sums.insert(n).second) << n << " returned twice";
  }
  EXPECT_EQ(sums.size(), static_cast<size_t>(kThreads * kAdds));
  EXPECT_EQ(*sums.begin(), 1);
  EXPECT_EQ(*sums.rbegin(), kThreads * kAdds);
  EXPECT_EQ(Open()->Add("count", 0, In(milliseconds(5000))).value_or(-1), kThreads * kAdds);
  EXPECT_EQ(Open()->Wait("count", milliseconds(0), In(milliseconds(5000)))->value_or(""), "100");
}

TEST_P(KeyStore, AWaitReturnsAValueSetWhileItWaits) {
  auto waiter = std::async(std::launch::async, [&] {
    return Open()->Wait("late", milliseconds(10000), In(milliseconds(15000)));
  });
  std::this_thread::sleep_for(milliseconds(300));
  const auto t0 = Clock::now();
  ASSERT_TRUE(Open()->Set("late", "here", In(milliseconds(5000))).ok());
  ASSERT_EQ(waiter.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));  // not the 10 s wait
  auto v = waiter.get();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->value_or(""), "here");
}

TEST_P(KeyStore, InterruptEndsABlockedCallAndEveryLaterOne) {
  auto s = Open();
  ASSERT_TRUE(s->Set("k", "v", In(milliseconds(5000))).ok());
  auto waiter = std::async(std::launch::async, [&] {
    return s->Wait("never", milliseconds(20000), In(milliseconds(25000)));
  });
  std::this_thread::sleep_for(milliseconds(300));
  const auto t0 = Clock::now();
  s->Interrupt();
  ASSERT_EQ(waiter.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_LT(Clock::now() - t0, milliseconds(1000));
  EXPECT_EQ(waiter.get().status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(s->Set("k", "w", In(milliseconds(5000))).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(Open()->Wait("k", milliseconds(0), In(milliseconds(5000)))->value_or(""), "v");
}

TEST_P(KeyStore, AStoreThatIsGoneFailsByTheDeadlineNamingItsEndpoint) {
  auto s = Open();
  ASSERT_TRUE(s->Set("k", "v", In(milliseconds(5000))).ok());
  Kill();
  const auto t0 = Clock::now();
  absl::Status set = s->Set("k", "w", In(milliseconds(500)));
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
  EXPECT_EQ(set.code(), absl::StatusCode::kUnavailable) << set;
  EXPECT_NE(set.message().find(Endpoint()), std::string::npos) << set;
}

INSTANTIATE_TEST_SUITE_P(Backends, KeyStore, ::testing::Values("builtin", "etcd"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

}  // namespace
}  // namespace flashckpt
