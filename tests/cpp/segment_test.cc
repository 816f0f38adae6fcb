// The sequence-locked slot protocol under real SIGKILLs: a child process
// saves continuously and is killed at seeded moments; whatever the parent
// then finds in shared memory must be a whole snapshot, bit-exact.
#include "shm/segment.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <thread>

#include "gtest/gtest.h"
#include "test_util.h"

namespace flashckpt {
namespace {

using testing::FakeState;
using testing::ScratchDirs;

TEST(SharedSegment, TooSmallIsAClearErrorNotSigbus) {
  ScratchDirs dirs;
  std::string mnt = (dirs.root / "tiny").string();
  std::filesystem::create_directories(mnt);
  if (system(("mount -t tmpfs -o size=1m tmpfs " + mnt + " 2>/dev/null").c_str()) != 0)
    GTEST_SKIP() << "cannot mount a tmpfs here (needs root)";
  CheckpointerOptions o = dirs.Options();
  o.shm_dir = mnt;
  {
    Checkpointer ckpt(o);
    FakeState s = FakeState::ForStep(1, 4);  // ~4 MiB per slot, 2 slots
    try {
      ckpt.save(1, s.Refs(), s.Blobs());
      ADD_FAILURE() << "save into a 1 MiB shared-memory mount succeeded";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kResourceExhausted);
      std::string m = e.what();
      EXPECT_NE(m.find(mnt), std::string::npos) << m;
      EXPECT_NE(m.find("needed"), std::string::npos) << m;
      EXPECT_NE(m.find("remount"), std::string::npos) << m;
    }
  }
  EXPECT_EQ(system(("umount " + mnt).c_str()), 0);
}

TEST(SharedSegment, SigkilledWriterNeverLeavesAHalfSnapshot) {
  ScratchDirs dirs;
  std::mt19937 rng(20261128);
  int loaded_from_memory = 0;
  for (int round = 0; round < 12; ++round) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      CheckpointerOptions o = dirs.Options();
      o.persist = false;
      o.copy_threads = 1;
      Checkpointer ckpt(o);
      for (int64_t step = 1000 * round;; ++step) {
        FakeState s = FakeState::ForStep(step, 8);
        ckpt.save(step, s.Refs(), s.Blobs());
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50 + rng() % 400));
    kill(pid, SIGKILL);
    int status;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    CheckpointerOptions o = dirs.Options();
    o.persist = false;
    o.unlink_memory_on_close = false;
    Checkpointer ckpt(o);
    auto step = ckpt.latest_memory_step();
    if (!step) continue;  // killed before the first publish
    LoadOptions lo;
    lo.step = *step;
    auto snap = ckpt.load(lo);
    ASSERT_EQ(snap->source(), Source::kMemory);
    EXPECT_EQ(FakeState::ForStep(*step, 8).Diff(*snap), "") << "round " << round << " step " << *step;
    ++loaded_from_memory;
    ckpt.close();
  }
  EXPECT_GE(loaded_from_memory, 6);
  CheckpointerOptions o = dirs.Options();
  Checkpointer(o).unlink_memory();
}

}  // namespace
}  // namespace flashckpt
