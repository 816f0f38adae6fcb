// PersistSlot against the in-memory commit barrier: two ranks of one step,
// each persisting its own shared-memory slot on its own thread, agree on the
// COMMIT; a rank that gives the step up ends rank 0's wait at once and leaves
// no files; a rank that hears nothing from rank 0 keeps its files.
#include "storage/persister.h"

#include <filesystem>
#include <future>

#include "fake_commit_barrier.h"
#include "gtest/gtest.h"
#include "storage/commit.h"
#include "storage/layout.h"
#include "test_util.h"

namespace flashckpt {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using testing::FakeState;
using testing::InMemoryCommits;
using testing::ScratchDirs;

// Both ranks' snapshots of `step` in shared memory, not persisted.
struct TwoRanks {
  explicit TwoRanks(const ScratchDirs& dirs, int64_t step) {
    for (int r = 0; r < 2; ++r) {
      CheckpointerOptions o = dirs.Options(r, 2);
      o.persist = false;
      o.unlink_memory_on_close = false;
      Checkpointer c(o);
      FakeState st = FakeState::ForStep(step + r);
      c.save(step, st.Refs(), st.Blobs()).wait_snapshot();
      path[r] = c.memory_segment_path();
    }
    for (int r = 0; r < 2; ++r) {
      auto s = SharedSegment::Open(path[r]);
      EXPECT_TRUE(s.ok()) << s.status();
      seg[r] = std::move(*s);
      EXPECT_TRUE(seg[r]->Newest(&view[r], step));
    }
  }
  ~TwoRanks() {
    for (auto& p : path) SharedSegment::Unlink(p).IgnoreError();
  }
  std::string path[2];
  std::unique_ptr<SharedSegment> seg[2];
  SlotView view[2];
};

PersistContext Context(const ScratchDirs& dirs, int rank, core::CommitBarrier* b, BulkIo* io,
                       milliseconds timeout = milliseconds(30000)) {
  PersistContext ctx;
  ctx.root = dirs.ckpt;
  ctx.rank = rank;
  ctx.world_size = 2;
  ctx.barrier = b;
  ctx.commit_timeout = timeout;
  ctx.io = io;
  ctx.where = "test segment of rank " + std::to_string(rank);
  return ctx;
}

TEST(PersistSlot, TwoRanksCommitThroughTheBarrier) {
  ScratchDirs dirs;
  TwoRanks ranks(dirs, 4);
  auto table = InMemoryCommits::Make();
  InMemoryCommits::Barrier b0(table), b1(table);
  BulkIo io0{IoOptions{}}, io1{IoOptions{}};
  auto r1 = std::async(std::launch::async, [&] {
    return PersistSlot(*ranks.seg[1], ranks.view[1].index, 4, Context(dirs, 1, &b1, &io1));
  });
  auto r0 = PersistSlot(*ranks.seg[0], ranks.view[0].index, 4, Context(dirs, 0, &b0, &io0));
  ASSERT_TRUE(r0.ok()) << r0.status();
  auto s1 = r1.get();
  ASSERT_TRUE(s1.ok()) << s1.status();
  auto commit = ReadCommit(dirs.ckpt, 4);
  ASSERT_TRUE(commit.ok()) << commit.status();
  EXPECT_EQ(commit->world_size(), 2);
  EXPECT_EQ(ranks.seg[0]->slot(ranks.view[0].index)->durable.load(), 1u);
  EXPECT_EQ(ranks.seg[1]->slot(ranks.view[1].index)->durable.load(), 1u);
  // What each rank committed is its own state, bit-exact, from storage.
  for (int r = 0; r < 2; ++r) {
    CheckpointerOptions o = dirs.Options(r, 2);
    o.reuse_memory = false;
    o.persist = false;
    Checkpointer reader(o);
    LoadOptions lo;
    lo.prefer_memory = false;
    auto snap = reader.load(lo);
    EXPECT_EQ(snap->source(), Source::kStorage);
    EXPECT_EQ(FakeState::ForStep(4 + r).Diff(*snap), "") << "rank " << r;
  }
}

TEST(PersistSlot, ARankGivingUpEndsRankZerosWaitAndLeavesNoFiles) {
  ScratchDirs dirs;
  TwoRanks ranks(dirs, 7);
  auto table = InMemoryCommits::Make();
  InMemoryCommits::Barrier b0(table), b1(table);
  BulkIo io{IoOptions{}};
  auto t0 = std::chrono::steady_clock::now();
  auto r0 = std::async(std::launch::async, [&] {
    return PersistSlot(*ranks.seg[0], ranks.view[0].index, 7, Context(dirs, 0, &b0, &io));
  });
  std::this_thread::sleep_for(milliseconds(100));
  b1.ReportFailure(7, 1, "disk full");
  auto s0 = r0.get();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));  // not the 30 s timeout
  ASSERT_FALSE(s0.ok());
  EXPECT_EQ(s0.status().code(), absl::StatusCode::kAborted) << s0.status();
  EXPECT_NE(s0.status().message().find("rank 1 did not persist it: disk full"), std::string::npos) << s0.status();
  EXPECT_NE(s0.status().message().find("persist step 7"), std::string::npos) << s0.status();
  EXPECT_FALSE(ReadCommit(dirs.ckpt, 7).ok());
  EXPECT_FALSE(fs::exists(StepDir(dirs.ckpt, 7) + "/" + RankDataName(0)));
  EXPECT_EQ(ranks.seg[0]->slot(ranks.view[0].index)->durable.load(), 0u);
  EXPECT_EQ(ranks.seg[0]->slot(ranks.view[0].index)->pin_pid.load(), 0u);  // unpinned after the persist
}

TEST(PersistSlot, NoWordFromRankZeroKeepsTheRanksFilesAndSaysSo) {
  ScratchDirs dirs;
  TwoRanks ranks(dirs, 9);
  auto table = InMemoryCommits::Make();
  InMemoryCommits::Barrier b1(table);
  BulkIo io{IoOptions{}};
  auto s1 = PersistSlot(*ranks.seg[1], ranks.view[1].index, 9, Context(dirs, 1, &b1, &io, milliseconds(200)));
  ASSERT_FALSE(s1.ok());
  EXPECT_EQ(s1.status().code(), absl::StatusCode::kDeadlineExceeded) << s1.status();
  EXPECT_NE(s1.status().message().find("step 9"), std::string::npos) << s1.status();
  // Rank 0 may still commit from what this rank wrote.
  EXPECT_TRUE(fs::exists(StepDir(dirs.ckpt, 9) + "/" + RankDataName(1)));
  EXPECT_TRUE(fs::exists(StepDir(dirs.ckpt, 9) + "/" + RankManifestName(1)));
}

}  // namespace
}  // namespace flashckpt
