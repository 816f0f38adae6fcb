// Faults: a full disk, SIGKILL at every crash point of persist and commit,
// and corrupted, truncated, missing or foreign files on load.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"
#include "common/process_lock.h"
#include "shm/segment.h"
#include "storage/commit.h"
#include "storage/layout.h"
#include "storage/persister.h"
#include "storage/uring_io.h"
#include "test_util.h"

namespace flashckpt {
namespace {

namespace fs = std::filesystem;
using testing::FakeState;
using testing::ScratchDirs;

TEST(Faults, DiskFullKeepsThePreviousStepLoadable) {
  ScratchDirs dirs;
  fs::create_directories(dirs.ckpt);
  if (system(("mount -t tmpfs -o size=3m tmpfs " + dirs.ckpt + " 2>/dev/null").c_str()) != 0)
    GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  {
    CheckpointerOptions o = dirs.Options();
    Checkpointer ckpt(o);
    FakeState small = FakeState::ForStep(1);  // ~1 MiB
    ckpt.save(1, small.Refs(), small.Blobs()).wait_durable();
    FakeState big = FakeState::ForStep(2, 3);  // ~3 MiB: does not fit beside step 1
    auto h = ckpt.save(2, big.Refs(), big.Blobs());
    try {
      h.wait_durable();
      ADD_FAILURE() << "persisting onto a full disk succeeded";
    } catch (const Error& e) {
      std::string m = e.what();
      EXPECT_EQ(e.code(), ErrorCode::kResourceExhausted) << m;
      EXPECT_NE(m.find("step 2"), std::string::npos) << m;
      EXPECT_NE(m.find(dirs.ckpt + "/step-2/rank-0.data"), std::string::npos) << m;
      EXPECT_NE(m.find("No space left"), std::string::npos) << m;
    }
    EXPECT_EQ(ckpt.latest_step(), 1);
    EXPECT_FALSE(fs::exists(dirs.ckpt + "/step-2/COMMIT"));
    LoadOptions lo;
    lo.prefer_memory = false;
    auto snap = ckpt.load(lo);
    EXPECT_EQ(snap->step(), 1);
    EXPECT_EQ(small.Diff(*snap), "");
    ckpt.close();
    ckpt.unlink_memory();
  }
  EXPECT_EQ(system(("umount " + dirs.ckpt).c_str()), 0);
}

// Runs the crash child; returns its wait status.
// `crash_at`: FLASHCKPT_CRASH_AT ("N" or "NAME@N"); empty: trace every point instead.
int RunChild(const ScratchDirs& dirs, const std::string& crash_at, int steps, std::string* trace_out = nullptr) {
  std::string log = (dirs.root / "child.log").string();
  pid_t pid = fork();
  if (pid == 0) {
    if (!crash_at.empty()) setenv("FLASHCKPT_CRASH_AT", crash_at.c_str(), 1);
    else setenv("FLASHCKPT_CRASH_TRACE", "1", 1);
    setenv("FLASHCKPT_LOG", "error", 1);
    FILE* f = freopen(log.c_str(), "w", stderr);
    (void)f;
    execl(FLASHCKPT_CRASH_CHILD, FLASHCKPT_CRASH_CHILD, dirs.ckpt.c_str(), dirs.shm.c_str(),
          std::to_string(steps).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  // The child finishes in well under a second; 60 s is a hang.
  for (int i = 0; i < 6000; ++i) {
    if (waitpid(pid, &status, WNOHANG) == pid) break;
    if (i == 5999) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ADD_FAILURE() << "crash child hung";
    }
    usleep(10000);
  }
  if (trace_out) {
    std::ifstream in(log);
    *trace_out = std::string(std::istreambuf_iterator<char>(in), {});
  }
  return status;
}

int RunChild(const ScratchDirs& dirs, long crash_at, int steps, std::string* trace_out = nullptr) {
  return RunChild(dirs, crash_at > 0 ? std::to_string(crash_at) : std::string(), steps, trace_out);
}

TEST(Faults, NamedCrashPointKillsTheNthTimeItIsPassed) {
  // Each step passes "persist: before rank record" once: the 3rd time is step 3's
  // persist, after steps 1 and 2 were committed.
  ScratchDirs dirs;
  std::string log;
  int st = RunChild(dirs, "persist: before rank record@3", 5, &log);
  ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) << log;
  EXPECT_NE(log.find("injected crash at point"), std::string::npos) << log;
  EXPECT_NE(log.find("(persist: before rank record)"), std::string::npos) << log;
  CheckpointerOptions o = dirs.Options();
  o.persist = false;
  o.unlink_memory_on_close = false;
  Checkpointer ckpt(o);
  EXPECT_EQ(ckpt.latest_step(), 2);
  ckpt.close();
  ckpt.unlink_memory();
}

TEST(Faults, SigkillAtEveryCrashPointLeavesACommittedStepLoadable) {
  constexpr int kSteps = 3;
  long points = 0;
  {
    ScratchDirs dirs;
    std::string trace;
    int st = RunChild(dirs, 0, kSteps, &trace);
    ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << trace;
    std::regex re("crash point ([0-9]+):");
    for (std::sregex_iterator it(trace.begin(), trace.end(), re), end; it != end; ++it)
      points = std::max(points, std::stol((*it)[1]));
  }
  ASSERT_GE(points, 50) << "too few crash points to be a meaningful test";
  // Every point, in a seeded order (so a failure names a reproducible point).
  std::vector<long> order(points);
  for (long i = 0; i < points; ++i) order[i] = i + 1;
  std::shuffle(order.begin(), order.end(), std::mt19937(42));
  int killed = 0;
  for (long at : order) {
    ScratchDirs dirs;
    int st = RunChild(dirs, at, kSteps);
    ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) << "crash point " << at << " did not kill the child";
    ++killed;
    CheckpointerOptions o = dirs.Options();
    o.persist = false;
    o.unlink_memory_on_close = false;
    Checkpointer ckpt(o);
    auto latest = ckpt.latest_step();
    if (latest) {
      LoadOptions lo;
      lo.prefer_memory = false;
      auto snap = ckpt.load(lo);
      EXPECT_EQ(snap->step(), *latest) << "crash point " << at;
      EXPECT_EQ(FakeState::ForStep(*latest).Diff(*snap), "") << "crash point " << at;
    }
    // Whatever is in memory is whole, and at least as new as storage.
    if (auto mem = ckpt.latest_memory_step()) {
      LoadOptions lo;
      lo.step = *mem;
      auto snap = ckpt.load(lo);
      EXPECT_EQ(FakeState::ForStep(*mem).Diff(*snap), "") << "crash point " << at;
      if (latest) EXPECT_GE(*mem, *latest);
    }
    ckpt.close();
    ckpt.unlink_memory();
  }
  EXPECT_EQ(killed, points);
}

TEST(ProcessLock, TellsALiveProcessFromOneThatIsGone) {
  pid_t live = ::fork();
  if (live == 0) {
    ::pause();
    ::_exit(0);
  }
  pid_t zombie = ::fork();
  if (zombie == 0) ::_exit(0);
  siginfo_t info{};
  ASSERT_EQ(::waitid(P_PID, zombie, &info, WEXITED | WNOWAIT), 0);  // exited, not reaped
  EXPECT_FALSE(ProcessGoneOrExiting(live));
  EXPECT_FALSE(ProcessGoneOrExiting(::getpid()));
  EXPECT_TRUE(ProcessGoneOrExiting(zombie));
  ::waitpid(zombie, nullptr, 0);
  EXPECT_TRUE(ProcessGoneOrExiting(zombie));  // reaped: gone
  ::kill(live, SIGKILL);
  ::waitpid(live, nullptr, 0);
}

// Another live process holds the rank: refused at once, naming it (a dying
// predecessor, by contrast, is taken over at once: see tests/e2e/test_standby.py).
TEST(ProcessLock, ALiveHolderOfTheRankIsRefusedAtOnceByPid) {
  ScratchDirs dirs;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  if (child == 0) {
    ::close(ready[0]);
    Checkpointer c(dirs.Options());
    (void)!::write(ready[1], "x", 1);
    ::pause();
    ::_exit(0);
  }
  ::close(ready[1]);
  char x;
  ASSERT_EQ(::read(ready[0], &x, 1), 1);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    Checkpointer c(dirs.Options());
    ADD_FAILURE() << "two live processes opened rank 0";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find("in use by another process for rank 0 (pid " + std::to_string(child) + ")"),
              std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(ready[0]);
  Checkpointer again(dirs.Options());  // its holder is gone: the rank opens
}

// flashrun's agent persisting again a snapshot whose step was committed while
// a restart cut the rank's wait for COMMIT short: nothing is rewritten, the
// COMMIT stays as it is (rank 0 will not write it again), and there is no wait.
TEST(Faults, PersistingACommittedSnapshotAgainKeepsItsCommit) {
  ScratchDirs dirs;
  FakeState s0 = FakeState::ForStep(3), s1 = FakeState::ForStep(4);
  Checkpointer r0(dirs.Options(0, 2)), r1(dirs.Options(1, 2));
  auto h0 = r0.save(3, s0.Refs(), s0.Blobs());
  auto h1 = r1.save(3, s1.Refs(), s1.Blobs());
  h0.wait_durable();
  h1.wait_durable();
  const std::string commit = dirs.ckpt + "/step-3/COMMIT", data = dirs.ckpt + "/step-3/rank-1.data";
  struct stat commit_before, data_before, commit_after, data_after;
  ASSERT_EQ(::stat(commit.c_str(), &commit_before), 0);
  ASSERT_EQ(::stat(data.c_str(), &data_before), 0);

  auto seg = SharedSegment::Open(r1.memory_segment_path());
  ASSERT_TRUE(seg.ok()) << seg.status();
  SlotView v;
  ASSERT_TRUE((*seg)->Newest(&v, 3));
  (*seg)->slot(v.index)->durable.store(0);  // the fault: the rank never learned of the COMMIT
  BulkIo io{IoOptions{}};
  FileCommitBarrier barrier(dirs.ckpt);
  PersistContext ctx;
  ctx.root = dirs.ckpt;
  ctx.rank = 1;
  ctx.world_size = 2;
  ctx.barrier = &barrier;
  ctx.commit_timeout = std::chrono::seconds(60);
  ctx.io = &io;
  ctx.where = r1.memory_segment_path();
  const auto t0 = std::chrono::steady_clock::now();
  auto st = PersistSlot(**seg, v.index, 3, ctx);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  EXPECT_EQ((*seg)->slot(v.index)->durable.load(), 1u);
  ASSERT_EQ(::stat(commit.c_str(), &commit_after), 0);
  ASSERT_EQ(::stat(data.c_str(), &data_after), 0);
  EXPECT_EQ(commit_after.st_ino, commit_before.st_ino);
  EXPECT_EQ(data_after.st_ino, data_before.st_ino);
  EXPECT_EQ(data_after.st_mtim.tv_nsec, data_before.st_mtim.tv_nsec);
  LoadOptions lo;
  lo.prefer_memory = false;
  lo.verify = true;
  EXPECT_EQ(s1.Diff(*r1.load(lo)), "");
}

TEST(Faults, RestartPersistsTheSnapshotACrashLeftInMemory) {
  ScratchDirs dirs;
  // Point 3 is "save: before publish" of step 2? Find the first point after step 2's publish instead:
  // kill during step 2's data write; step 2 is then only in memory.
  std::string trace;
  {
    ScratchDirs probe;
    RunChild(probe, 0, 2, &trace);
  }
  long at = 0;
  std::regex re("crash point ([0-9]+): persist: write chunk");
  int seen_publish = 0;
  std::istringstream lines(trace);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("save: before publish") != std::string::npos) ++seen_publish;
    std::smatch m;
    if (seen_publish == 2 && std::regex_search(line, m, re)) { at = std::stol(m[1]); break; }
  }
  ASSERT_GT(at, 0) << trace;
  int st = RunChild(dirs, at, 2);
  ASSERT_TRUE(WIFSIGNALED(st));
  Checkpointer ckpt(dirs.Options());
  EXPECT_EQ(ckpt.latest_memory_step(), 2);
  ckpt.wait_all();
  EXPECT_EQ(ckpt.latest_step(), 2) << "the restarted Checkpointer did not persist step 2 from memory";
  LoadOptions lo;
  lo.prefer_memory = false;
  EXPECT_EQ(FakeState::ForStep(2).Diff(*ckpt.load(lo)), "");
}

class Corruption : public ::testing::Test {
 protected:
  void SetUp() override {
    CheckpointerOptions o = dirs.Options();
    Checkpointer ckpt(o);
    for (int64_t step = 1; step <= 2; ++step) {
      FakeState s = FakeState::ForStep(step);
      ckpt.save(step, s.Refs(), s.Blobs()).wait_durable();
    }
  }
  std::string Step2(const std::string& name) { return dirs.ckpt + "/step-2/" + name; }
  std::string LoadError(bool fallback = false, int64_t* loaded = nullptr) {
    Checkpointer ckpt(dirs.Options());
    LoadOptions lo;
    lo.allow_fallback = fallback;
    try {
      auto snap = ckpt.load(lo);
      if (loaded) *loaded = snap->step();
      EXPECT_EQ(FakeState::ForStep(snap->step()).Diff(*snap), "");
      return "";
    } catch (const Error& e) {
      return e.what();
    }
  }
  ScratchDirs dirs;
};

TEST_F(Corruption, FlippedByteNamesFileAndTensor) {
  {
    std::fstream f(Step2("rank-0.data"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 * 2 + 100);  // inside layer3.weight (offsets 0, 4096, 8192, ...)
    char c;
    f.seekg(4096 * 2 + 100);
    f.get(c);
    f.seekp(4096 * 2 + 100);
    f.put(static_cast<char>(c ^ 0x10));
  }
  std::string m = LoadError();
  EXPECT_NE(m.find(Step2("rank-0.data")), std::string::npos) << m;
  EXPECT_NE(m.find("'layer2.weight'"), std::string::npos) << m;
  EXPECT_NE(m.find("crc32c"), std::string::npos) << m;
  int64_t loaded = -1;
  EXPECT_EQ(LoadError(true, &loaded), "");
  EXPECT_EQ(loaded, 1);
}

TEST_F(Corruption, TruncatedFileIsNamed) {
  fs::resize_file(Step2("rank-0.data"), 5000);
  std::string m = LoadError();
  EXPECT_NE(m.find(Step2("rank-0.data")), std::string::npos) << m;
  EXPECT_NE(m.find("truncated"), std::string::npos) << m;
}

TEST_F(Corruption, MissingFileIsNamed) {
  fs::remove(Step2("rank-0.manifest"));
  std::string m = LoadError();
  EXPECT_NE(m.find(Step2("rank-0.manifest")), std::string::npos) << m;
  int64_t loaded = -1;
  EXPECT_EQ(LoadError(true, &loaded), "");
  EXPECT_EQ(loaded, 1);
}

TEST_F(Corruption, CommitOfANewerFormatIsRefused) {
  std::string path = Step2("COMMIT");
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  uint32_t v = 7;
  std::memcpy(bytes.data() + 12, &v, 4);  // the frame's format version
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  Checkpointer ckpt(dirs.Options());
  LoadOptions lo;
  lo.step = 2;
  try {
    ckpt.load(lo);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition) << e.what();
    EXPECT_NE(std::string(e.what()).find("newer flashckpt"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flashckpt
