// The cross-node commit through the rendezvous store: a real RendezvousServer
// on 127.0.0.1 (port 0), one StoreCommitBarrier (own connection) per rank
// thread, as the node agents' rank threads use them.
#include "agent/store_commit_barrier.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <future>
#include <thread>

#include "absl/strings/match.h"
#include "flashckpt.pb.h"
#include "rendezvous/rendezvous_server.h"
#include "storage/commit.h"
#include "storage/layout.h"

namespace flashckpt {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

class StoreCommit : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> n{0};
    dir_ = (fs::temp_directory_path() / ("flashckpt-store-commit-" + std::to_string(::getpid()) + "-" +
                                         std::to_string(n++))).string();
    fs::create_directories(dir_);
    rendezvous::RendezvousServerOptions so;
    so.token = "secret";
    so.run_id = "job";
    auto server = rendezvous::RendezvousServer::Start(so);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  void TearDown() override {
    server_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  CommitStoreOptions Store(uint64_t round = 1) const {
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
    rendezvous::RendezvousClient c("127.0.0.1", server_->port(), "secret", "job");
    auto v = c.StoreWait(key, milliseconds(0), Clock::now() + std::chrono::seconds(5));
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? *v : std::nullopt;
  }

  // What PersistSlot does with the barrier, without the data files.
  // Returns "" when committed, else the error or the reason it was given up.
  std::string Persist(CommitBarrier& b, int64_t step, int rank, int world, milliseconds timeout) {
    try {
      b.rank_durable(step, rank, Record(step, rank, world));
      if (rank == 0) {
        std::vector<std::string> records;
        try {
          records = b.wait_all(step, world, timeout);
        } catch (const Error& e) {
          b.report_failure(dir_, step, 0, e.what());
          return e.what();
        }
        absl::Status s = WriteCommit(dir_, step, world, records);
        if (!s.ok()) return std::string(s.message());
        b.committed(dir_, step);
        return "";
      }
      std::string why;
      if (!b.wait_committed(dir_, step, timeout, nullptr, &why)) return why;
      return "";
    } catch (const Error& e) {
      return e.what();
    }
  }

  std::string dir_;
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
  commits.Barrier(dir_, nullptr)->report_failure(dir_, 7, 2, "disk full");
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
  commits.Barrier(dir_, nullptr)->report_failure(dir_, 3, 0, "superseded by step 4 before it was persisted");
  const std::string why = waiter.get();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(2));
  EXPECT_NE(why.find("superseded by step 4"), std::string::npos) << why;
}

TEST_F(StoreCommit, ARoundsKeysDoNotSatisfyTheNextRound) {
  {
    StoreCommits round1(Store(1));
    for (int r = 0; r < 2; ++r) round1.Barrier(dir_, nullptr)->rank_durable(5, r, Record(5, r, 2));
    // Even a decision of round 1.
    rendezvous::RendezvousClient c("127.0.0.1", server_->port(), "secret", "job");
    ASSERT_TRUE(c.StoreSet(Store(1).step_prefix(5) + "/commit", "committed", Clock::now() + std::chrono::seconds(5)).ok());
  }
  StoreCommits round2(Store(2));
  auto b0 = round2.Barrier(dir_, nullptr);
  b0->rank_durable(5, 0, Record(5, 0, 2));
  try {
    b0->wait_all(5, 2, milliseconds(300));
    FAIL() << "round 1's record of rank 1 was taken for round 2's";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDeadlineExceeded);
    EXPECT_NE(std::string(e.what()).find("1/2 ranks durable"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("missing ranks 1"), std::string::npos) << e.what();
  }
  std::string why;
  EXPECT_THROW(round2.Barrier(dir_, nullptr)->wait_committed(dir_, 5, milliseconds(300), nullptr, &why), Error);
  // Round 2's first commit drops every key of round 1.
  round2.Barrier(dir_, nullptr)->rank_durable(5, 1, Record(5, 1, 2));
  EXPECT_EQ(b0->wait_all(5, 2, milliseconds(5000)).size(), 2u);
  b0->committed(dir_, 5);
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
    b->rank_durable(9, 0, Record(9, 0, 2));
    try {
      b->wait_all(9, 2, milliseconds(30000));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("committed");
  });
  auto rank1 = std::async(std::launch::async, [&] {
    auto b = commits.Barrier(dir_, [&] { return restarted.load(); });
    std::string why;
    b->wait_committed(dir_, 9, milliseconds(30000), [&] { return restarted.load(); }, &why);
    return why;
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
  b1->rank_durable(4, 1, Record(4, 1, 2));
  auto waiter = std::async(std::launch::async, [&] {
    std::string why;
    try {
      b1->wait_committed(dir_, 4, milliseconds(30000), nullptr, &why);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return "returned: " + why;
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

TEST_F(StoreCommit, ARankThatLostTheStoreAfterTheCommitReadsCOMMIT) {
  port_ = server_->port();
  StoreCommits commits(Store());
  auto b0 = commits.Barrier(dir_, nullptr);
  auto b1 = commits.Barrier(dir_, nullptr);
  b1->rank_durable(6, 1, Record(6, 1, 2));
  b0->rank_durable(6, 0, Record(6, 0, 2));
  ASSERT_TRUE(WriteCommit(dir_, 6, 2, b0->wait_all(6, 2, milliseconds(5000))).ok());
  server_.reset();  // gone before rank 0 could say so
  std::string why;
  EXPECT_TRUE(b1->wait_committed(dir_, 6, milliseconds(30000), nullptr, &why));
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

}  // namespace
}  // namespace flashckpt
