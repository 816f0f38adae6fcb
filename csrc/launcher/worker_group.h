// The supervisor's hands: starts the local workers, each in its own process
// group (and killed with the agent through PR_SET_PDEATHSIG), notices exits at
// once through pidfds, checks heartbeat files, and stops the whole group
// (SIGTERM to each process group, SIGKILL after the shutdown timeout), reaping
// every child so that no worker or zombie outlives a stop.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "launcher/failure_report.h"
#include "launcher/standby.h"

namespace flashckpt::launcher {

inline constexpr int kStdout = 1;
inline constexpr int kStderr = 2;

struct WorkerLaunch {
  int local_rank = 0;
  int global_rank = 0;
  std::vector<std::string> argv;  // argv[0] is an absolute path
  std::vector<std::string> env;   // KEY=VALUE
  std::string stdout_log;         // used when the stream is redirected or teed
  std::string stderr_log;
  int redirect_streams = 0;  // kStdout | kStderr: to the log file only
  int tee_streams = 0;       // kStdout | kStderr: to the log file and the console, prefixed
  std::string console_prefix;  // "[default0]:"
  // Lines containing any of these are also appended, prefixed, to the
  // attempt's filtered_{stdout,stderr}.log (--duplicate-stdout-filters).
  std::vector<std::string> stdout_filters, stderr_filters;
  std::string filtered_stdout_log, filtered_stderr_log;
  std::string error_file;
  std::string heartbeat_file;  // empty: no hang detection
  // Warm standby (WorkerGroup::EnableStandby): what a standby must have been
  // started with to take this worker's place (command and start-up
  // environment), and where its output goes until then.
  std::string standby_key;
  std::string standby_log;
};

struct StandbyOptions {
  std::string imports = "torch";  // modules a standby imports ahead
  // Standbys are started this long after the workers (not to slow their start-up).
  std::chrono::duration<double> delay = std::chrono::seconds(5);
  // Standbys hold a touched load buffer of their rank's snapshot size
  // (PrepareStandbys); FLASHRUN_STANDBY_PREPARE_LOAD=0 turns it off.
  bool prepare_load_buffers = true;
};

// Makes orphaned descendants children of this process, so that it can reap them
// (pid 1 in a container may never do it).
void BecomeSubreaper();

enum class GroupState { kRunning, kSucceeded, kFailed };

class OutputForwarder;

class WorkerGroup {
 public:
  WorkerGroup();
  ~WorkerGroup();  // stops (SIGKILL) whatever still runs
  WorkerGroup(const WorkerGroup&) = delete;
  WorkerGroup& operator=(const WorkerGroup&) = delete;

  absl::Status Start(std::vector<WorkerLaunch> launches);

  // Keeps one warm interpreter per local rank for the next Start (see standby.h).
  void EnableStandby(StandbyOptions options) { standby_ = std::move(options); }
  // How many workers of the last Start were standbys taking over.
  int standbys_used() const { return standbys_used_; }
  std::vector<pid_t> standby_pids() const;
  int standbys_ready();  // standbys done importing, waiting for a hand-over
  // Each worker's snapshot size, by global rank (from the node's checkpoint
  // service): the waiting standby of that rank makes a load buffer of that
  // size ready (Standby::Prepare). Sizes not given are left as they are.
  void PrepareStandbys(const std::map<int, uint64_t>& snapshot_bytes_by_rank);
  // While held, no standby is started (one already started stays).
  void HoldStandbys(bool hold) { standbys_held_ = hold; }

  // File descriptors that become readable when a worker exits (for poll).
  std::vector<int> ExitNotifiers() const;

  // Notices exits (without reaping, so that a process group id stays reserved
  // until Stop) and hung workers; returns the state of the group.
  GroupState Check(std::chrono::duration<double> worker_timeout);

  // Failures noticed so far, in the order they were noticed.
  const std::vector<WorkerFailure>& failures() const { return failures_; }

  // Sends a signal to every worker's process group.
  void Signal(int signal_number);

  // Stops all workers: first_signal to each process group, SIGKILL to what is left
  // after `grace`, then reaps every worker. Safe to call more than once.
  void Stop(int first_signal, std::chrono::duration<double> grace);

  // For a restart: like Stop, but returns as soon as no worker can run user code
  // any more (exited, or its exit is under way in the kernel), so that the
  // teardown of their memory overlaps with the next rendezvous and start. They
  // are reaped later (Check, Stop, the destructor).
  void StopForRestart(int first_signal, std::chrono::duration<double> grace);

  std::vector<pid_t> pids() const;

  // The agent is a child subreaper (see BecomeSubreaper), so orphaned
  // grandchildren of workers become its children: reap those that exited.
  // Returns how many children other than workers are still alive.
  int ReapOrphans();

  // Check() also reads /proc/<pid>/stat of running workers to notice a failing
  // worker while the kernel is still freeing its memory (see ExitStatusIfExiting).
  void set_exit_probe(bool enabled) { exit_probe_ = enabled; }
  // Starts the standbys that are missing, once the workers have run for the
  // delay (Check calls it).
  void MaintainStandbys();
  bool empty() const { return workers_.empty(); }

 private:
  struct Worker {
    WorkerLaunch launch;
    pid_t pid = -1;
    int pidfd = -1;
    bool exited = false;   // noticed, not necessarily reaped
    bool reaped = false;
    int exitcode = 0;
    std::chrono::steady_clock::time_point started;
    std::chrono::system_clock::time_point started_wall;
  };
  bool PeekExit(Worker& worker);
  void Reap(Worker& worker);
  // Reaps stopped workers of earlier starts; with block, waits for all of them.
  void ReapDraining(bool block);
  // Sends first_signal, then SIGKILL after grace, until `done` holds for every worker.
  template <typename Predicate>
  void SignalUntil(int first_signal, std::chrono::duration<double> grace, Predicate done);

  bool exit_probe_ = false;
  std::optional<StandbyOptions> standby_;
  bool standbys_held_ = false;
  std::map<int, std::unique_ptr<Standby>> standbys_;  // by local rank
  std::map<int, bool> standby_broken_;                 // died while starting: not tried again
  int standbys_used_ = 0;
  std::chrono::steady_clock::time_point started_at_;
  std::vector<Worker> draining_;
  std::vector<std::unique_ptr<OutputForwarder>> draining_forwarders_;

  std::vector<Worker> workers_;
  std::vector<WorkerFailure> failures_;
  std::unique_ptr<OutputForwarder> forwarder_;
};

// Copies worker pipes to their log files and, prefixed line by line, to the console.
class OutputForwarder {
 public:
  OutputForwarder();
  ~OutputForwarder();
  // Takes ownership of pipe_fd and file_fd; console_fd is 1 or 2, or -1 for
  // none; console lines get `prefix` when `prefix_console`. Lines with any of
  // `filters` in them also go, prefixed, to `filtered_path` (shared by the
  // streams that name it).
  absl::Status Add(int pipe_fd, int file_fd, int console_fd, std::string prefix, bool prefix_console = true,
                   std::vector<std::string> filters = {}, const std::string& filtered_path = "");
  void Start();
  // Waits until every pipe reached end of file, at most until the deadline, then closes all.
  void Finish(std::chrono::steady_clock::time_point deadline);

 private:
  struct Stream {
    int pipe_fd;
    int file_fd;
    int console_fd;
    std::string prefix;
    bool prefix_console;
    std::vector<std::string> filters;
    int filtered_fd = -1;  // owned by filtered_fds_
    std::string partial_line;
  };
  void Lines(Stream& stream, bool flush);
  std::map<std::string, int> filtered_fds_;
  void Loop();
  void Drain(Stream& stream, bool at_eof);
  std::vector<Stream> streams_;
  int wake_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace flashckpt::launcher
