// A persist that fails is never silent: the failure reaches the training
// script at its next save(), wait_all() or close() unless a wait_durable()
// of that step raised it already.
#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include <sys/mount.h>

#include "fault_fs.h"
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
  o.keep_last = 0;
  o.commit_timeout = std::chrono::seconds(5);
  return o;
}

// Waits (up to 30 s) until the checkpointer counts `n` failed persists.
void AwaitFailures(Checkpointer& c, uint64_t n) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (c.persist_failures() < n) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "no persist failure counted after 30 s";
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string Raised(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(PersistFailure, AnUnwaitedFailureFailsTheNextSaveWhichSnapshotsNothing) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  Checkpointer c(Opts(dirs));
  FakeState one = FakeState::ForStep(1), two = FakeState::ForStep(2), three = FakeState::ForStep(3);
  c.save(1, one.Refs(), one.Blobs()).wait_durable();
  ffs.FailNext(Op::kWrite, "step-2/rank-0.data", ENOSPC);
  c.save(2, two.Refs(), two.Blobs());  // not waited for
  AwaitFailures(c, 1);
  std::string m = Raised([&] { c.save(3, three.Refs(), three.Blobs()); });
  EXPECT_NE(m.find("save of step 3 not taken"), std::string::npos) << m;
  EXPECT_NE(m.find("persisting step 2 failed"), std::string::npos) << m;
  EXPECT_NE(m.find("newest committed step is 1"), std::string::npos) << m;
  EXPECT_NE(m.find(std::strerror(ENOSPC)), std::string::npos) << m;
  EXPECT_EQ(c.latest_memory_step(), 2) << "the refused save must not have snapshotted step 3";
  // Told once: the retry goes ahead and persists.
  c.save(3, three.Refs(), three.Blobs()).wait_durable();
  EXPECT_EQ(c.latest_step(), 3);
  EXPECT_EQ(c.persist_failures(), 1u);
  c.close();
  c.unlink_memory();
}

TEST(PersistFailure, WaitAllRaisesEveryUnreportedFailureOnce) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  CheckpointerOptions o = Opts(dirs);
  o.num_slots = 3;
  Checkpointer c(o);
  FakeState two = FakeState::ForStep(2), three = FakeState::ForStep(3);
  ffs.FailNext(Op::kFsync, "rank-0.data", EIO, 2);
  c.save(2, two.Refs(), two.Blobs());
  AwaitFailures(c, 1);
  std::string m = Raised([&] { c.save(3, three.Refs(), three.Blobs()); });
  EXPECT_NE(m.find("persisting step 2 failed"), std::string::npos) << m;
  c.save(3, three.Refs(), three.Blobs());  // the retry; its persist fails too
  AwaitFailures(c, 2);
  m = Raised([&] { c.wait_all(); });
  EXPECT_NE(m.find("persisting step 3 failed"), std::string::npos) << m;
  EXPECT_NE(m.find(std::strerror(EIO)), std::string::npos) << m;
  EXPECT_EQ(Raised([&] { c.wait_all(); }), "") << "a failure is raised once";
  c.close();
  c.unlink_memory();
}

TEST(PersistFailure, AFailureTheHandleRaisedIsNotRaisedAgain) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  Checkpointer c(Opts(dirs));
  FakeState two = FakeState::ForStep(2), three = FakeState::ForStep(3);
  ffs.FailNext(Op::kRename, "step-2/COMMIT", EIO);
  SaveHandle h = c.save(2, two.Refs(), two.Blobs());
  EXPECT_NE(Raised([&] { h.wait_durable(); }).find("step 2"), std::string::npos);
  c.save(3, three.Refs(), three.Blobs()).wait_durable();
  EXPECT_EQ(Raised([&] { c.wait_all(); }), "");
  EXPECT_EQ(Raised([&] { c.close(); }), "");
  c.unlink_memory();
}

TEST(PersistFailure, CloseRaisesAnUnreportedFailureAfterReleasingEverything) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  {
    Checkpointer c(Opts(dirs));
    FakeState two = FakeState::ForStep(2);
    ffs.FailNext(Op::kFsync, "step-2/rank-0.manifest", ENOSPC);
    c.save(2, two.Refs(), two.Blobs());
    std::string m = Raised([&] { c.close(); });
    EXPECT_NE(m.find("persisting step 2 failed"), std::string::npos) << m;
    EXPECT_EQ(Raised([&] { c.close(); }), "") << "closed once";
    // Not durable: the snapshot stays in memory for the next process.
    EXPECT_TRUE(fs::exists(c.memory_segment_path()));
    c.unlink_memory();
  }
  // The directory was released: another Checkpointer opens it.
  Checkpointer again(Opts(dirs));
  again.close();
  again.unlink_memory();
}

}  // namespace
}  // namespace flashckpt

namespace flashckpt {
namespace {

// A tmpfs of `mib` MiB mounted over the scratch shm directory (root only;
// the test skips where mounting is not allowed). Unmounted at the end.
class SmallShm {
 public:
  SmallShm(const ScratchDirs& dirs, int mib) : dir_(dirs.shm.string()) {
    std::string opts = "size=" + std::to_string(mib) + "m";
    mounted_ = ::mount("tmpfs", dir_.c_str(), "tmpfs", 0, opts.c_str()) == 0;
  }
  ~SmallShm() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

TEST(SegmentGrowth, ASaveThatCannotGrowTheSlotsKeepsTheSnapshotInMemoryOnly) {
  ScratchDirs dirs;
  SmallShm shm(dirs, 16);  // two 4 MiB slots fit, and two 6 MiB ones, but not both at once
  if (!shm.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here (not root?)";
  CheckpointerOptions o = dirs.Options();
  o.persist = false;
  {
    Checkpointer c(o);
    FakeState small = FakeState::ForStep(1), big = FakeState::ForStep(2, 5);
    c.save(1, small.Refs(), small.Blobs());
    std::string m;
    try {
      c.save(2, big.Refs(), big.Blobs());
    } catch (const Error& e) {
      m = e.what();
      EXPECT_EQ(e.code(), ErrorCode::kResourceExhausted) << m;
    }
    EXPECT_NE(m.find("save of step 2"), std::string::npos) << m;
    EXPECT_NE(m.find("step 1, in memory only"), std::string::npos) << m;
    EXPECT_NE(m.find("nothing was dropped"), std::string::npos) << m;
    EXPECT_NE(m.find(" MiB"), std::string::npos) << "sizes under 1 GiB in MiB: " << m;
    EXPECT_EQ(c.latest_memory_step(), 1);
    std::unique_ptr<LoadedSnapshot> snap = c.load();
    EXPECT_EQ(snap->step(), 1);
    EXPECT_EQ(small.Diff(*snap), "");
    c.close();
    c.unlink_memory();
  }
  // With more room the new slots are built beside the old ones.
  SmallShm roomy(dirs, 40);
  ASSERT_TRUE(roomy.mounted());
  Checkpointer c(o);
  FakeState small = FakeState::ForStep(1), big = FakeState::ForStep(2, 5);
  c.save(1, small.Refs(), small.Blobs());
  c.save(2, big.Refs(), big.Blobs());
  EXPECT_EQ(big.Diff(*c.load()), "");
  c.close();
  c.unlink_memory();
}

TEST(SegmentGrowth, DurableSnapshotsMakeRoomForLargerSlots) {
  ScratchDirs dirs;
  SmallShm shm(dirs, 16);
  if (!shm.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here (not root?)";
  CheckpointerOptions o = dirs.Options();
  Checkpointer c(o);
  FakeState small = FakeState::ForStep(1), big = FakeState::ForStep(2, 5);
  c.save(1, small.Refs(), small.Blobs()).wait_durable();
  c.save(2, big.Refs(), big.Blobs()).wait_durable();
  EXPECT_EQ(c.latest_step(), 2);
  LoadOptions lo;
  lo.step = 1;
  EXPECT_EQ(small.Diff(*c.load(lo)), "") << "step 1 loads from storage";
  c.close();
  c.unlink_memory();
}

TEST(ResaveCommitted, ASaveOfACommittedStepIsRefusedAndTheStepStaysLoadable) {
  ScratchDirs dirs;
  fs::create_directories(dirs.ckpt);  // durable before the fault layer starts
  FaultFs ffs(dirs.ckpt);
  CheckpointerOptions o = Opts(dirs);
  o.reuse_memory = false;  // loads below come from storage
  {
    Checkpointer c(o);
    FakeState one = FakeState::ForStep(1), two = FakeState::ForStep(2), bigger = FakeState::ForStep(7, 3);
    c.save(1, one.Refs(), one.Blobs()).wait_durable();
    c.save(2, two.Refs(), two.Blobs()).wait_durable();
    // The disk is full: had the re-save gone ahead, its write would fail
    // after the old COMMIT was gone.
    ffs.FailNext(Op::kWrite, "rank-0.data", ENOSPC, 100);
    ffs.FailNext(Op::kFallocate, "rank-0.data", ENOSPC, 100);
    std::string m;
    try {
      c.save(2, bigger.Refs(), bigger.Blobs()).wait_durable();
    } catch (const Error& e) {
      m = e.what();
      EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition) << m;
    }
    EXPECT_NE(m.find("persist step 2 refused"), std::string::npos) << m;
    EXPECT_NE(m.find(dirs.ckpt + "/step-2"), std::string::npos) << m;
    EXPECT_NE(m.find("never overwritten"), std::string::npos) << m;
    EXPECT_EQ(c.persist_failures(), 1u);
    // The same state saved again is no re-save: it is durable as it is.
    c.save(2, two.Refs(), two.Blobs()).wait_durable();
    EXPECT_EQ(c.latest_step(), 2);
    c.close();
    c.unlink_memory();
  }
  ffs.PowerLoss();
  EXPECT_EQ(CommittedSteps(dirs.ckpt), (std::vector<int64_t>{2, 1}));
  CheckpointerOptions ro = o;
  ro.persist = false;
  Checkpointer reader(ro);
  LoadOptions lo;
  lo.step = 2;
  lo.prefer_memory = false;
  EXPECT_EQ(FakeState::ForStep(2).Diff(*reader.load(lo)), "") << "the committed step 2 is the one first saved";
  // Kept in memory only, a committed step may be saved again: storage is untouched.
  FakeState again = FakeState::ForStep(2, 2);
  reader.save(2, again.Refs(), again.Blobs());
  EXPECT_EQ(FakeState::ForStep(2).Diff(*reader.load(lo)), "");
  reader.close();
  reader.unlink_memory();
}

}  // namespace
}  // namespace flashckpt

namespace flashckpt {
namespace {

void Touch(const fs::path& p, const std::string& text = "x") {
  fs::create_directories(p.parent_path());
  FILE* f = std::fopen(p.c_str(), "w");
  ASSERT_NE(f, nullptr) << p;
  std::fputs(text.c_str(), f);
  std::fclose(f);
}

TEST(FailedSteps, OnlyDirectoriesHoldingNothingButFailureMarkersAreRemoved) {
  ScratchDirs dirs;
  {
    Checkpointer c(Opts(dirs));
    FakeState one = FakeState::ForStep(1);
    c.save(1, one.Refs(), one.Blobs()).wait_durable();
    c.close();
    c.unlink_memory();
  }
  const fs::path root = dirs.ckpt;
  Touch(root / "step-5" / "rank-0.failed", "disk full");
  Touch(root / "step-5" / "rank-1.failed", "disk full");
  Touch(root / "step-6" / "rank-0.failed");
  Touch(root / "step-6" / "rank-1.data");  // a rank still at work: kept
  fs::create_directories(root / "step-7");  // empty: a rank about to write: kept
  Touch(root / "step-1" / "rank-3.failed");  // committed: never touched
  EXPECT_EQ(RemoveFailedSteps(dirs.ckpt), (std::vector<int64_t>{5}));
  EXPECT_FALSE(fs::exists(root / "step-5"));
  EXPECT_TRUE(fs::exists(root / "step-6" / "rank-1.data"));
  EXPECT_TRUE(fs::exists(root / "step-7"));
  EXPECT_TRUE(fs::exists(root / "step-1" / "COMMIT"));
}

TEST(FailedSteps, CloseLeavesNoDirectoryOfAFailedPersist) {
  ScratchDirs dirs;
  FaultFs ffs(dirs.ckpt);
  Checkpointer c(Opts(dirs));
  FakeState two = FakeState::ForStep(2);
  ffs.FailNext(Op::kWrite, "step-2/rank-0.data", EIO);
  EXPECT_NE(Raised([&] { c.save(2, two.Refs(), two.Blobs()).wait_durable(); }), "");
  c.close();
  c.unlink_memory();
  EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-2")) << "junk of the failed persist of step 2";
}

TEST(LatestStep, NewestIsTheHighestStepNumberEverywhere) {
  ScratchDirs dirs;
  Checkpointer c(Opts(dirs));
  for (int64_t s : {1000, 1, 2, 3}) {
    FakeState st = FakeState::ForStep(s);
    c.save(s, st.Refs(), st.Blobs()).wait_durable();
  }
  EXPECT_EQ(c.latest_step(), 1000);
  std::ifstream latest(dirs.ckpt + "/latest");
  int64_t named = -1;
  latest >> named;
  EXPECT_EQ(named, 1000) << "the `latest` file names the highest committed step";
  EXPECT_EQ(c.load()->step(), 1000);
  c.close();
  c.unlink_memory();
}

}  // namespace
}  // namespace flashckpt
