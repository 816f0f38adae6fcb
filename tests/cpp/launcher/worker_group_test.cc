#include "launcher/worker_group.h"

#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "launcher/failure_report.h"

namespace flashckpt::launcher {
namespace {

using Clock = std::chrono::steady_clock;

WorkerLaunch Shell(int local_rank, const std::string& command) {
  WorkerLaunch l;
  l.local_rank = local_rank;
  l.global_rank = local_rank;
  l.argv = {"/bin/sh", "-c", command};
  l.env = {"PATH=/usr/bin:/bin"};
  return l;
}

GroupState WaitForState(WorkerGroup& group, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  GroupState state = GroupState::kRunning;
  while (Clock::now() < deadline && (state = group.Check(std::chrono::seconds(0))) == GroupState::kRunning) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return state;
}

bool Alive(pid_t pid) { return ::kill(pid, 0) == 0; }

class SubreaperEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { BecomeSubreaper(); }  // as flashrun's main does
};
const auto* const kSubreaper = ::testing::AddGlobalTestEnvironment(new SubreaperEnvironment);

TEST(WorkerGroup, SucceedsWhenAllExitZero) {
  WorkerGroup group;
  ASSERT_TRUE(group.Start({Shell(0, "exit 0"), Shell(1, "exit 0")}).ok());
  EXPECT_EQ(WaitForState(group, std::chrono::seconds(10)), GroupState::kSucceeded);
  group.Stop(SIGTERM, std::chrono::seconds(1));
}

TEST(WorkerGroup, FailureIsRecordedAndStopKillsTheRestAndTheirChildren) {
  WorkerGroup group;
  ASSERT_TRUE(group.Start({Shell(0, "exit 3"), Shell(1, "sleep 300 & sleep 300; wait")}).ok());
  EXPECT_EQ(WaitForState(group, std::chrono::seconds(10)), GroupState::kFailed);
  ASSERT_EQ(group.failures().size(), 1u);
  EXPECT_EQ(group.failures()[0].exitcode, 3);
  EXPECT_EQ(group.failures()[0].local_rank, 0);
  const pid_t survivor = group.pids()[1];
  const auto started = Clock::now();
  group.Stop(SIGTERM, std::chrono::seconds(5));
  EXPECT_LT(Clock::now() - started, std::chrono::seconds(5));
  EXPECT_FALSE(Alive(survivor));
  EXPECT_NE(::kill(-survivor, 0), 0);  // no one left in its process group, not even a zombie
}

TEST(WorkerGroup, WorkerIgnoringSigtermIsKilledAfterGrace) {
  WorkerGroup group;
  ASSERT_TRUE(group.Start({Shell(0, "trap '' TERM; sleep 300")}).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const auto started = Clock::now();
  group.Stop(SIGTERM, std::chrono::milliseconds(300));
  const auto took = Clock::now() - started;
  EXPECT_GE(took, std::chrono::milliseconds(250));
  EXPECT_LT(took, std::chrono::seconds(5));
  EXPECT_NE(::kill(-group.pids()[0], 0), 0);
}

TEST(WorkerGroup, HungWorkerIsNoticedThroughItsHeartbeatFile) {
  const std::string beat = std::filesystem::temp_directory_path() / ("flashrun_beat_" + std::to_string(::getpid()));
  WorkerLaunch l = Shell(0, "sleep 300");
  l.heartbeat_file = beat;
  WorkerGroup group;
  ASSERT_TRUE(group.Start({l}).ok());
  EXPECT_EQ(group.Check(std::chrono::milliseconds(300)), GroupState::kRunning);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_EQ(group.Check(std::chrono::milliseconds(300)), GroupState::kFailed);
  EXPECT_NE(group.failures()[0].message.find("no heartbeat"), std::string::npos);
  group.Stop(SIGTERM, std::chrono::seconds(1));
  std::filesystem::remove(beat);
}

TEST(WorkerGroup, TeeWritesFileAndPrefixedConsole) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("flashrun_tee_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  WorkerLaunch l = Shell(0, "echo hello; printf partial");
  l.stdout_log = dir / "stdout.log";
  l.stderr_log = dir / "stderr.log";
  l.redirect_streams = kStdout;
  WorkerGroup group;
  ASSERT_TRUE(group.Start({l}).ok());
  EXPECT_EQ(WaitForState(group, std::chrono::seconds(10)), GroupState::kSucceeded);
  group.Stop(SIGTERM, std::chrono::seconds(1));
  std::ifstream in(dir / "stdout.log");
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "hello\npartial");
  std::filesystem::remove_all(dir);
}

TEST(FailureReport, ReadsTracebackAndPutsRootCauseFirstObserved) {
  const std::string path = std::filesystem::temp_directory_path() / ("flashrun_err_" + std::to_string(::getpid()));
  std::ofstream(path) << R"({"message": {"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "Traceback:\n  line 1\nRuntimeError: boom", "timestamp": "1700000000"}}})";
  WorkerFailure first;
  first.global_rank = 3;
  first.local_rank = 1;
  first.exitcode = -9;
  first.pid = 42;
  first.timestamp_s = 100;
  ReadErrorFile(&first);
  EXPECT_EQ(first.message, "Signal 9 (SIGKILL) received by PID 42");
  WorkerFailure second;
  second.exitcode = 1;
  second.timestamp_s = 200;
  second.error_file = path;
  ReadErrorFile(&second);
  EXPECT_EQ(second.message, "Traceback:\n    line 1\n  RuntimeError: boom");
  const std::string summary = FormatFailureSummary("train.py", "host", {second, first});
  const size_t root = summary.find("Root Cause (first observed failure):");
  ASSERT_NE(root, std::string::npos);
  EXPECT_NE(summary.find("rank      : 3 (local_rank: 1)", root), std::string::npos);
  EXPECT_NE(summary.find("train.py FAILED"), std::string::npos);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace flashckpt::launcher
