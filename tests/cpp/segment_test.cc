// The sequence-locked slot protocol under real SIGKILLs: a child process
// saves continuously and is killed at seeded moments; whatever the parent
// then finds in shared memory must be a whole snapshot, bit-exact.
#include "shm/segment.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
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

// A process that did not write a slot reads it through the segment's file
// (pread), not through fresh page faults: the bytes are the slot's, and a file
// truncated under the reader is an error, not a SIGBUS.
TEST(SharedSegment, ReaderThatDidNotWriteReadsThroughTheFile) {
  ScratchDirs dirs;
  const std::string path = (dirs.shm / "seg").string();
  auto writer = SharedSegment::Create(path, 2, 1 << 20, 0, dirs.ckpt);
  ASSERT_TRUE(writer.ok()) << writer.status();
  SharedSegment& w = **writer;
  ASSERT_TRUE(w.LockForWriting().ok());
  ASSERT_TRUE(w.AllocateSlot(1).ok());
  EXPECT_FALSE(w.slot_touched_here(1)) << "allocating is not writing";
  w.BeginWrite(1);
  std::mt19937 rng(9);
  for (uint64_t i = 0; i < (1 << 20); ++i) w.slot_data(1)[i] = static_cast<uint8_t>(rng());
  EXPECT_TRUE(w.slot_touched_here(1));

  auto reader = SharedSegment::Open(path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const SharedSegment& r = **reader;
  EXPECT_FALSE(r.slot_touched_here(1));
  std::vector<uint8_t> got(300000, 0);
  ASSERT_EQ(r.ReadMapped(r.slot_data(1) + 12345, got.data(), got.size()), 0);
  EXPECT_EQ(0, std::memcmp(got.data(), w.slot_data(1) + 12345, got.size()));
  std::vector<uint8_t> elsewhere(10);
  EXPECT_EQ(r.ReadMapped(elsewhere.data(), got.data(), 10), EFAULT) << "an address outside the mapping";
  EXPECT_EQ(r.ReadMapped(r.slot_data(1), got.data(), r.mapped_bytes()), EFAULT) << "a range past its end";
  ASSERT_EQ(::truncate(path.c_str(), 8192), 0);
  EXPECT_EQ(r.ReadMapped(r.slot_data(1), got.data(), got.size()), EIO);
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
