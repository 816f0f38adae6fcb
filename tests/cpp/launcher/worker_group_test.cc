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

// --- warm standbys (flashrun --standby) ------------------------------------------------------
constexpr const char* kPython = "/usr/bin/python3";

struct StandbyScratch {
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("flashrun_standby_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
  StandbyScratch() { std::filesystem::create_directories(dir); }
  ~StandbyScratch() { std::filesystem::remove_all(dir); }
  static inline int counter = 0;
  std::string Read(const std::string& name) const {
    std::ifstream in(dir / name);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
};

WorkerLaunch PythonWorker(const StandbyScratch& s, const std::string& attempt) {
  {
    std::ofstream py(s.dir / "work.py");
    py << "import os, sys, time\n"
          "time.sleep(float(os.environ.get('SLEEP', '0')))\n"
          "print('attempt', os.environ.get('ATTEMPT'), 'pid', os.getpid(), 'argv', sys.argv, 'name', __name__,\n"
          "      'path0', sys.path[0], 'json' in sys.modules, 'activated' if os.environ.get("
          "'FLASHRUN_STANDBY_ACTIVATED_AT') else 'fresh')\n"
          "print('to stderr', file=sys.stderr)\n"
          "sys.exit(int(os.environ.get('EXIT', '0')))\n";
  }
  WorkerLaunch l;
  l.argv = {kPython, "-u", (s.dir / "work.py").string(), "one", "two words"};
  l.env = {"PATH=/usr/bin:/bin", "ATTEMPT=" + attempt, "EXIT=" + std::string(attempt == "1" ? "7" : "0"),
           "SLEEP=" + std::string(attempt == "0" ? "1" : "0")};
  l.stdout_log = (s.dir / ("out" + attempt)).string();
  l.stderr_log = (s.dir / ("err" + attempt)).string();
  l.redirect_streams = kStdout | kStderr;
  l.standby_key = "same command, same start-up environment";
  l.standby_log = (s.dir / "standby.log").string();
  return l;
}

StandbyOptions StandbyAtOnce(const std::string& imports) {
  StandbyOptions o;
  o.imports = imports;
  o.delay = std::chrono::seconds(0);
  return o;
}

// Runs the group's checks until one standby is ready (it starts, imports, and waits).
bool WaitForReadyStandby(WorkerGroup& group) {
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (group.standbys_ready() < 1 && Clock::now() < deadline) {
    group.Check(std::chrono::seconds(0));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return group.standbys_ready() == 1;
}

TEST(Standby, PlanRunsScriptsAndModulesOnly) {
  auto p = PlanStandby({"/usr/bin/python3", "-u", "train.py", "--lr", "1"});
  ASSERT_TRUE(p.has_value());
  EXPECT_FALSE(p->module);
  EXPECT_EQ(p->target, "train.py");
  EXPECT_EQ(p->args, (std::vector<std::string>{"--lr", "1"}));
  auto m = PlanStandby({"/usr/bin/python3", "-u", "-m", "pkg.train", "x"});
  ASSERT_TRUE(m.has_value());
  EXPECT_TRUE(m->module);
  EXPECT_EQ(m->target, "pkg.train");
  EXPECT_FALSE(PlanStandby({"/usr/bin/python3", "-u", "-c", "print(1)", "x"}).has_value());  // --run-path
  EXPECT_FALSE(PlanStandby({"/usr/local/bin/trainer", "--x"}).has_value());                  // --no-python
}

TEST(Standby, TakesOverTheRestartWithTheWorkersEnvironmentStreamsAndExitCode) {
  if (::access(kPython, X_OK) != 0) GTEST_SKIP() << kPython << " is not installed";
  StandbyScratch s;
  WorkerGroup group;
  group.EnableStandby(StandbyAtOnce("json"));
  ASSERT_TRUE(group.Start({PythonWorker(s, "0")}).ok());
  EXPECT_EQ(group.standbys_used(), 0);
  ASSERT_TRUE(WaitForReadyStandby(group)) << s.Read("standby.log");
  const pid_t standby = group.standby_pids().at(0);
  // A prepare frame (the rank's snapshot size) goes first; the launch after it still lands.
  group.PrepareStandbys({{0, 3u << 20}});
  const auto seen = Clock::now() + std::chrono::seconds(30);
  while (s.Read("standby.log").find("load buffer") == std::string::npos && Clock::now() < seen)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_NE(s.Read("standby.log").find("load buffer"), std::string::npos) << s.Read("standby.log");
  EXPECT_EQ(WaitForState(group, std::chrono::seconds(30)), GroupState::kSucceeded);
  EXPECT_NE(s.Read("out0").find("fresh"), std::string::npos) << s.Read("out0");

  group.StopForRestart(SIGTERM, std::chrono::seconds(1));
  ASSERT_TRUE(group.Start({PythonWorker(s, "1")}).ok());
  EXPECT_EQ(group.standbys_used(), 1);
  EXPECT_EQ(group.pids().at(0), standby);
  EXPECT_EQ(WaitForState(group, std::chrono::seconds(30)), GroupState::kFailed);
  ASSERT_EQ(group.failures().size(), 1u);
  EXPECT_EQ(group.failures()[0].exitcode, 7);  // sys.exit(7) of the script is the worker's exit code
  const std::string out = s.Read("out1");
  EXPECT_NE(out.find("attempt 1 pid " + std::to_string(standby)), std::string::npos) << out;
  EXPECT_NE(out.find("argv ['" + (s.dir / "work.py").string() + "', 'one', 'two words'] name __main__"),
            std::string::npos) << out;
  EXPECT_NE(out.find("path0 " + s.dir.string() + " True activated"), std::string::npos) << out;
  EXPECT_EQ(s.Read("err1"), "to stderr\n");
  group.Stop(SIGTERM, std::chrono::seconds(1));
  EXPECT_NE(::kill(standby, 0), 0);
}

TEST(Standby, OneStartedForAnotherCommandIsNotUsedAndStopLeavesNoneBehind) {
  if (::access(kPython, X_OK) != 0) GTEST_SKIP() << kPython << " is not installed";
  StandbyScratch s;
  WorkerGroup group;
  group.EnableStandby(StandbyAtOnce(""));
  WorkerLaunch first = PythonWorker(s, "0");
  first.env.back() = "SLEEP=30";
  ASSERT_TRUE(group.Start({first}).ok());
  ASSERT_TRUE(WaitForReadyStandby(group)) << s.Read("standby.log");
  const pid_t standby = group.standby_pids().at(0);
  group.StopForRestart(SIGTERM, std::chrono::seconds(1));
  WorkerLaunch other = PythonWorker(s, "2");
  other.standby_key = "another command";
  other.env.back() = "SLEEP=30";
  ASSERT_TRUE(group.Start({other}).ok());
  EXPECT_EQ(group.standbys_used(), 0);
  EXPECT_NE(group.pids().at(0), standby);
  EXPECT_NE(::kill(standby, 0), 0);  // the unusable standby was killed and reaped
  ASSERT_TRUE(WaitForReadyStandby(group)) << s.Read("standby.log");  // one for the new command
  const pid_t second = group.standby_pids().at(0);
  group.Stop(SIGTERM, std::chrono::seconds(1));  // the job ends: the standby goes with the workers
  EXPECT_NE(::kill(second, 0), 0);
  EXPECT_TRUE(group.standby_pids().empty());
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
