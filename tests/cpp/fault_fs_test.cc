// The persist and commit path under the fault-injecting file layer
// (fault_fs.h): a power loss at every operation, injected errors of each
// kind, short writes, and proof that the io_uring path (O_DIRECT, registered
// buffers, several requests in flight) and its fallback really run.
#include "fault_fs.h"

#include <cerrno>
#include <filesystem>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"
#include "storage/layout.h"
#include "test_util.h"

namespace flashckpt {
namespace {

namespace fs = std::filesystem;
using fileops::Op;
using testing::FakeState;
using testing::FaultFs;
using testing::ScratchDirs;

CheckpointerOptions Opts(const ScratchDirs& dirs) {
  CheckpointerOptions o = dirs.Options();
  o.keep_last = 0;          // every committed step stays: what is visible is what survived
  o.reuse_memory = false;   // loads come from storage
  o.commit_timeout = std::chrono::seconds(5);
  return o;
}

// Saves `steps` one after the other, each waited for; returns the newest
// step reported durable (-1: none). Failures (the crash) are expected.
int64_t SaveSteps(const ScratchDirs& dirs, std::initializer_list<int64_t> steps) {
  int64_t durable = -1;
  try {
    Checkpointer c(Opts(dirs));
    for (int64_t s : steps) {
      FakeState st = FakeState::ForStep(s);
      try {
        c.save(s, st.Refs(), st.Blobs()).wait_durable();
        durable = s;
      } catch (const Error&) {
      }
    }
    c.close();
    c.unlink_memory();
  } catch (const Error&) {
  }
  return durable;
}

// Every committed step loads bit-exact from storage; returns them.
std::vector<int64_t> CheckCommittedSteps(const ScratchDirs& dirs, const std::string& where, size_t scale = 1) {
  std::vector<int64_t> committed = CommittedSteps(dirs.ckpt);
  CheckpointerOptions o = Opts(dirs);
  o.persist = false;
  Checkpointer reader(o);
  for (int64_t s : committed) {
    LoadOptions lo;
    lo.step = s;
    lo.prefer_memory = false;
    try {
      auto snap = reader.load(lo);
      EXPECT_EQ(FakeState::ForStep(s, scale).Diff(*snap), "") << where << ": step " << s;
    } catch (const Error& e) {
      ADD_FAILURE() << where << ": committed step " << s << " does not load: " << e.what();
    }
  }
  reader.close();
  reader.unlink_memory();
  return committed;
}

TEST(FaultFs, PowerLossAtEveryOperationKeepsEveryStepReportedDurable) {
  // How many operations persisting steps 2..4 takes.
  int64_t total = 0;
  {
    ScratchDirs dirs;
    SaveSteps(dirs, {1});
    FaultFs ffs(dirs.ckpt);
    ASSERT_EQ(SaveSteps(dirs, {2, 3, 4}), 4);
    total = ffs.ops();
  }
  ASSERT_GE(total, 50) << "too few operations to crash at";
  for (int64_t k = 0; k <= total; ++k) {  // k == total: no crash at all
    ScratchDirs dirs;
    ASSERT_EQ(SaveSteps(dirs, {1}), 1);
    int64_t reported = -1;
    {
      FaultFs ffs(dirs.ckpt);
      ffs.CrashAtOp(k);
      reported = SaveSteps(dirs, {2, 3, 4});
      EXPECT_EQ(ffs.crashed(), k < total) << "crash point " << k << " of " << total;
      ffs.PowerLoss();
    }
    const std::string where = "power loss at operation " + std::to_string(k) + " of " + std::to_string(total);
    std::vector<int64_t> visible = CheckCommittedSteps(dirs, where);
    ASSERT_FALSE(visible.empty()) << where << ": step 1, committed before, is gone";
    EXPECT_EQ(visible.back(), 1) << where;  // CommittedSteps is newest first
    // A step the save reported durable is never lost.
    EXPECT_GE(visible.front(), std::max<int64_t>(reported, 1)) << where;
    // Only steps that were saved are visible, and loading without a step takes the newest.
    for (int64_t s : visible) EXPECT_TRUE(s >= 1 && s <= 4) << where << ": step " << s;
    {
      CheckpointerOptions o = Opts(dirs);
      o.persist = false;
      Checkpointer c(o);
      LoadOptions lo;
      lo.prefer_memory = false;
      EXPECT_EQ(c.load(lo)->step(), visible.front()) << where;
      c.close();
      c.unlink_memory();
    }
    if (k == total) EXPECT_EQ(visible, (std::vector<int64_t>{4, 3, 2, 1}));
  }
}

struct Injected {
  Op op;
  const char* path_part;
  int err;
  const char* says;  // in the error message
};

TEST(FaultFs, EachInjectedErrorFailsThatSaveNamingOperationPathAndStep) {
  const Injected cases[] = {
      {Op::kWrite, "step-2/rank-0.data", EIO, "write"},
      {Op::kFallocate, "step-2/rank-0.data", ENOSPC, "fallocate"},
      {Op::kFsync, "step-2/rank-0.data", EIO, "fdatasync"},
      {Op::kFsync, "step-2/rank-0.manifest", ENOSPC, "fsync"},
      {Op::kRename, "step-2/COMMIT", EIO, "rename"},
      {Op::kCreate, "step-2/rank-0.durable", ENOSPC, "create"},
      {Op::kMkdir, "step-2", EIO, "create step directory"},
  };
  for (const Injected& c : cases) {
    const std::string what = std::string(fileops::OpName(c.op)) + " of " + c.path_part + ": " + std::strerror(c.err);
    ScratchDirs dirs;
    FaultFs ffs(dirs.ckpt);
    {
      Checkpointer ckpt(Opts(dirs));
      FakeState one = FakeState::ForStep(1), two = FakeState::ForStep(2), three = FakeState::ForStep(3);
      ckpt.save(1, one.Refs(), one.Blobs()).wait_durable();
      ffs.FailNext(c.op, c.path_part, c.err);
      try {
        ckpt.save(2, two.Refs(), two.Blobs()).wait_durable();
        ADD_FAILURE() << what << ": the save succeeded";
      } catch (const Error& e) {
        std::string m = e.what();
        EXPECT_NE(m.find("step 2"), std::string::npos) << what << ": " << m;
        EXPECT_NE(m.find(c.says), std::string::npos) << what << ": " << m;
        EXPECT_NE(m.find(dirs.ckpt + "/step-2"), std::string::npos) << what << ": " << m;
        EXPECT_NE(m.find(std::strerror(c.err)), std::string::npos) << what << ": " << m;
      }
      EXPECT_EQ(ckpt.latest_step(), 1) << what;
      EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-2/COMMIT")) << what;
      // The failure does not stick: the next step persists.
      ckpt.save(3, three.Refs(), three.Blobs()).wait_durable();
      ckpt.close();
      ckpt.unlink_memory();
    }
    EXPECT_EQ(CheckCommittedSteps(dirs, what), (std::vector<int64_t>{3, 1})) << what;
  }
}

TEST(FaultFs, ShortWritesAreResubmittedOnBothPaths) {
  for (bool uring : {true, false}) {
    ScratchDirs dirs;
    FaultFs ffs(dirs.ckpt);
    ffs.ShortWrites(true);
    ffs.RefuseIoUringSetup(!uring);
    {
      CheckpointerOptions o = Opts(dirs);
      o.io_chunk_bytes = 1 << 20;
      Checkpointer c(o);
      FakeState st = FakeState::ForStep(7, 8);  // ~8 MiB: many chunks, each cut short
      c.save(7, st.Refs(), st.Blobs()).wait_durable();
      c.close();
      c.unlink_memory();
    }
    EXPECT_GT(ffs.writes(), 8) << (uring ? "io_uring" : "pwrite");
    EXPECT_EQ(CheckCommittedSteps(dirs, uring ? "io_uring" : "pwrite", 8), std::vector<int64_t>{7});
  }
}

TEST(FaultFs, TheIoUringPathRunsWithDirectIoRegisteredBuffersAndSeveralInFlight) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  {
    CheckpointerOptions o = Opts(dirs);
    o.io_chunk_bytes = 1 << 20;
    o.io_queue_depth = 8;
    Checkpointer c(o);
    FakeState st = FakeState::ForStep(5, 16);  // ~16 MiB
    c.save(5, st.Refs(), st.Blobs()).wait_durable();
    c.close();
    c.unlink_memory();
  }
  if (ffs.writes() > 0 && ffs.max_in_flight() == 1 && !ffs.all_writes_fixed())
    GTEST_SKIP() << "io_uring is not available on this kernel (the pwrite fallback ran)";
  EXPECT_TRUE(ffs.saw_direct_open());
  EXPECT_TRUE(ffs.all_writes_fixed()) << "writes went out without registered buffers";
  EXPECT_GE(ffs.max_in_flight(), 2) << "one request at a time";
  EXPECT_GE(ffs.writes(), 16);
  EXPECT_EQ(CheckCommittedSteps(dirs, "io_uring", 16), std::vector<int64_t>{5});
}

TEST(FaultFs, WhenIoUringAndDirectIoAreRefusedTheFallbackPersists) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  ffs.RefuseIoUringSetup(true);
  ffs.RefuseDirectIo(true);
  {
    CheckpointerOptions o = Opts(dirs);
    o.io_chunk_bytes = 1 << 20;
    Checkpointer c(o);
    FakeState st = FakeState::ForStep(6, 4);
    c.save(6, st.Refs(), st.Blobs()).wait_durable();
    c.close();
    c.unlink_memory();
  }
  EXPECT_FALSE(ffs.saw_direct_open());
  EXPECT_EQ(ffs.max_in_flight(), 1);  // pwrite, one chunk at a time
  EXPECT_GT(ffs.writes(), 1);
  EXPECT_EQ(CheckCommittedSteps(dirs, "fallback", 4), std::vector<int64_t>{6});
}

}  // namespace
}  // namespace flashckpt
