// Sharded tensors: each rank saves its box of a global tensor under one key;
// the commit checks the boxes against each other, and a load into any layout
// (another world size, another split, the whole tensor) reads the chunks that
// cover the box it asks for, from whichever rank's files hold them.
#include <cstring>
#include <thread>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"
#include "snapshot/shard.h"
#include "storage/layout.h"
#include "test_util.h"

namespace flashckpt::testing {
namespace {

constexpr int64_t kRows = 40, kCols = 24;

// Element (i, j) of the global matrix at `step`.
float Global(int64_t step, int64_t i, int64_t j) { return static_cast<float>(step * 100000 + i * 1000 + j); }

// The box [r0, r0 + nr) x [c0, c0 + nc) of the global matrix, row-major.
std::vector<float> BoxValues(int64_t step, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  std::vector<float> v;
  for (int64_t i = r0; i < r0 + nr; ++i)
    for (int64_t j = c0; j < c0 + nc; ++j) v.push_back(Global(step, i, j));
  return v;
}

struct Block {
  int64_t r0, nr, c0, nc;
};

TensorRef ShardRef(const std::string& key, const std::vector<float>& v, const Block& b,
                   std::vector<int64_t> global = {kRows, kCols}) {
  TensorRef r;
  r.key = key;
  r.data = v.data();
  r.nbytes = v.size() * 4;
  r.dtype = "torch.float32";
  r.shape = {b.nr, b.nc};
  r.element_size = 4;
  r.global_shape = std::move(global);
  r.global_offset = {b.r0, b.c0};
  return r;
}

MutableTensorRef Target(std::vector<float>& v, const Block& b) {
  MutableTensorRef t;
  t.data = v.data();
  t.nbytes = v.size() * 4;
  t.dtype = "torch.float32";
  t.shape = {b.nr, b.nc};
  t.global_shape = {kRows, kCols};
  t.global_offset = {b.r0, b.c0};
  return t;
}

// Rank r of `blocks.size()` saves blocks[r] of the matrix at `step` (all
// ranks at once, as a job does); the error of the first failing rank, or "".
std::string SaveBlocks(ScratchDirs& dirs, int64_t step, const std::vector<Block>& blocks,
                       const std::vector<std::vector<int64_t>>& globals = {}) {
  const int world = static_cast<int>(blocks.size());
  std::vector<std::string> errors(world);
  // Every rank's Checkpointer is open before any rank saves, as in a job
  // whose ranks start together.
  std::vector<std::unique_ptr<Checkpointer>> ranks;
  for (int r = 0; r < world; ++r) ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, world)));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      Checkpointer& c = *ranks[r];
      try {
        const Block& b = blocks[r];
        std::vector<float> v = BoxValues(step, b.r0, b.nr, b.c0, b.nc);
        TensorRef ref = globals.empty() ? ShardRef("w", v, b) : ShardRef("w", v, b, globals[r]);
        c.save(step, {ref}, {}).wait_durable();
      } catch (const Error& e) {
        errors[r] = e.what();
      }
      c.unlink_memory();
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (!e.empty()) return e;
  return "";
}

const std::vector<Block> k2x2 = {{0, 20, 0, 12}, {0, 20, 12, 12}, {20, 20, 0, 12}, {20, 20, 12, 12}};

TEST(Shard, BlocksOfFourRanksLoadIntoAnyBoxBitExact) {
  ScratchDirs dirs;
  ASSERT_EQ(SaveBlocks(dirs, 3, k2x2), "");
  const StepDescription d = DescribeGlobalStep(dirs.ckpt, 3);
  ASSERT_EQ(d.tensors.size(), 4u);
  for (const auto& t : d.tensors) EXPECT_EQ(t.global_shape, (std::vector<int64_t>{kRows, kCols}));

  // The whole matrix, three column shards, and a row band across two blocks.
  std::vector<Block> layouts = {{0, kRows, 0, kCols}, {0, kRows, 0, 8}, {0, kRows, 8, 8}, {0, kRows, 16, 8},
                                {13, 11, 0, kCols}, {19, 2, 11, 2}};
  for (const Block& b : layouts) {
    std::vector<float> got(static_cast<size_t>(b.nr * b.nc), -1.0f);
    ReadGlobalInto(dirs.ckpt, 3, {{"w", Target(got, b)}});
    EXPECT_EQ(got, BoxValues(3, b.r0, b.nr, b.c0, b.nc)) << b.r0 << "+" << b.nr << ", " << b.c0 << "+" << b.nc;
  }
  // Without a box: the whole tensor, by its global shape.
  std::vector<float> whole(kRows * kCols);
  MutableTensorRef t = Target(whole, {0, kRows, 0, kCols});
  t.global_shape.clear();
  t.global_offset.clear();
  ReadGlobalInto(dirs.ckpt, 3, {{"w", t}});
  EXPECT_EQ(whole, BoxValues(3, 0, kRows, 0, kCols));
}

TEST(Shard, RunsOfAFirstDimensionSplitAreOneCopy) {
  const Box chunk{{20, 0}, {20, 24}}, dest{{10, 0}, {20, 24}};
  const Box common = *Intersection(chunk, dest);
  const std::vector<CopyRun> runs = RunsOf(chunk, dest, common, 4);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].src, 0u);
  EXPECT_EQ(runs[0].dst, 10u * 24 * 4);
  EXPECT_EQ(runs[0].len, 10u * 24 * 4);
  // A column split: one run per row.
  const Box cols{{0, 8}, {40, 8}}, block{{0, 0}, {20, 12}};
  EXPECT_EQ(RunsOf(block, cols, *Intersection(block, cols), 4).size(), 20u);
}

TEST(Shard, EqualCopiesOfOneShardCommitAndLoad) {
  ScratchDirs dirs;
  // Two data-parallel copies of each row half (tensor parallelism x 2).
  const std::vector<Block> blocks = {{0, 20, 0, kCols}, {20, 20, 0, kCols}, {0, 20, 0, kCols}, {20, 20, 0, kCols}};
  ASSERT_EQ(SaveBlocks(dirs, 4, blocks), "");
  std::vector<float> whole(kRows * kCols);
  ReadGlobalInto(dirs.ckpt, 4, {{"w", Target(whole, {0, kRows, 0, kCols})}});
  EXPECT_EQ(whole, BoxValues(4, 0, kRows, 0, kCols));
}

TEST(Shard, OverlappingShardsFailTheCommitNamingKeyAndRanks) {
  ScratchDirs dirs;
  ASSERT_EQ(SaveBlocks(dirs, 1, {{0, 20, 0, kCols}, {20, 20, 0, kCols}}), "");
  const std::string err = SaveBlocks(dirs, 2, {{0, 21, 0, kCols}, {20, 20, 0, kCols}});
  EXPECT_NE(err.find("shards of 'w' overlap"), std::string::npos) << err;
  EXPECT_NE(err.find("rank 0 holds [0:21, 0:24]"), std::string::npos) << err;
  EXPECT_NE(err.find("rank 1 holds [20:40, 0:24]"), std::string::npos) << err;
  EXPECT_NE(err.find("step 2"), std::string::npos) << err;
  // Step 1 stays and loads; step 2 never committed.
  std::vector<float> whole(kRows * kCols);
  ReadGlobalInto(dirs.ckpt, 1, {{"w", Target(whole, {0, kRows, 0, kCols})}});
  EXPECT_EQ(whole, BoxValues(1, 0, kRows, 0, kCols));
  EXPECT_THROW(DescribeGlobalStep(dirs.ckpt, 2), Error);
}

TEST(Shard, CopiesOfOneBoxWithOtherBytesFailTheCommit) {
  ScratchDirs dirs;
  // Ranks 0 and 1 both hold rows 0:20, but rank 1's copy has other values
  // (step 6's matrix where the others save step 5's).
  const std::vector<Block> blocks = {{0, 20, 0, kCols}, {0, 20, 0, kCols}, {20, 20, 0, kCols}};
  std::vector<std::string> errors(3);
  std::vector<std::unique_ptr<Checkpointer>> ranks;
  for (int r = 0; r < 3; ++r) ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, 3)));
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      try {
        std::vector<float> v = BoxValues(r == 1 ? 6 : 5, blocks[r].r0, blocks[r].nr, 0, kCols);
        ranks[r]->save(5, {ShardRef("w", v, blocks[r])}, {}).wait_durable();
      } catch (const Error& e) {
        errors[r] = e.what();
      }
      ranks[r]->unlink_memory();
    });
  for (auto& t : threads) t.join();
  EXPECT_NE(errors[0].find("with other bytes"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("'w'"), std::string::npos) << errors[0];
}

TEST(Shard, GlobalShapesThatDifferFailTheCommit) {
  ScratchDirs dirs;
  const std::string err =
      SaveBlocks(dirs, 1, {{0, 20, 0, kCols}, {20, 20, 0, kCols}}, {{kRows, kCols}, {kRows + 1, kCols}});
  EXPECT_NE(err.find("shards of 'w' disagree"), std::string::npos) << err;
  EXPECT_NE(err.find("[40,24]"), std::string::npos) << err;
  EXPECT_NE(err.find("[41,24]"), std::string::npos) << err;
}

TEST(Shard, ABoxNoShardCoversIsRefusedBeforeAByteIsWritten) {
  ScratchDirs dirs;
  // Only the top half of the matrix was saved.
  ASSERT_EQ(SaveBlocks(dirs, 1, {{0, 20, 0, 12}, {0, 20, 12, 12}}), "");
  std::vector<float> got(static_cast<size_t>(10 * kCols), -1.0f);
  try {
    ReadGlobalInto(dirs.ckpt, 1, {{"w", Target(got, {15, 10, 0, kCols})}});
    FAIL() << "loaded a box no shard covers";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("do not cover"), std::string::npos) << msg;
    EXPECT_NE(msg.find("w [15:25, 0:24]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("120 of 240 elements"), std::string::npos) << msg;
    EXPECT_NE(msg.find("step 1"), std::string::npos) << msg;
  }
  EXPECT_EQ(got, std::vector<float>(got.size(), -1.0f));
  // Another global shape than the saved one.
  MutableTensorRef t = Target(got, {0, 10, 0, kCols});
  t.global_shape = {kRows + 8, kCols};
  EXPECT_THROW(ReadGlobalInto(dirs.ckpt, 1, {{"w", t}}), Error);
}

TEST(Shard, ABoxOutsideItsGlobalShapeIsRefusedAtSave) {
  ScratchDirs dirs;
  Checkpointer c(dirs.Options(0, 1));
  std::vector<float> v = BoxValues(1, 30, 20, 0, kCols);
  try {
    c.save(1, {ShardRef("w", v, {30, 20, 0, kCols})}, {});
    FAIL() << "saved a shard past its global shape";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("tensor 'w'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("dimension 0 runs past the global shape (30 + 20 > 40)"), std::string::npos) << msg;
  }
  c.unlink_memory();
}

TEST(Shard, TheSameWorldLoadsItsOwnBoxAndRefusesAnother) {
  ScratchDirs dirs;
  const std::vector<Block> rows = {{0, 20, 0, kCols}, {20, 20, 0, kCols}};
  std::vector<std::unique_ptr<Checkpointer>> ranks;
  std::vector<std::vector<float>> vals;
  for (int r = 0; r < 2; ++r) {
    ranks.push_back(std::make_unique<Checkpointer>(dirs.Options(r, 2)));
    vals.push_back(BoxValues(7, rows[r].r0, rows[r].nr, 0, kCols));
  }
  std::vector<SaveHandle> hs;
  for (int r = 0; r < 2; ++r) hs.push_back(ranks[r]->save(7, {ShardRef("w", vals[r], rows[r])}, {}));
  for (auto& h : hs) h.wait_durable();
  std::vector<float> got(20 * kCols);
  EXPECT_EQ(ranks[1]->load_into({{"w", Target(got, rows[1])}}), 7);
  EXPECT_EQ(got, vals[1]);
  try {
    ranks[1]->load_into({{"w", Target(got, rows[0])}});
    FAIL() << "loaded rank 1's box into rank 0's";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("load_resharded"), std::string::npos) << e.what();
  }
  for (auto& r : ranks) r->unlink_memory();
}

}  // namespace
}  // namespace flashckpt::testing
