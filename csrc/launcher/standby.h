// Warm standby workers (flashrun --standby): one Python interpreter per local
// rank, started while the workers run, that has already imported the heavy
// modules (torch). When the group restarts, the agent hands each standby the
// worker's command line, environment and output streams over a Unix socket
// (with SCM_RIGHTS), and it runs the training script in place of a fresh
// interpreter: the restart skips the interpreter start and `import torch`.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace flashckpt::launcher {

// How a worker command runs inside a standby: the interpreter and its flags
// (started ahead), then the script or module with its arguments.
struct StandbyPlan {
  std::vector<std::string> interpreter;  // e.g. {"/usr/bin/python3", "-u"}
  bool module = false;                   // `-m module` rather than a script path
  std::string target;                    // the script path or the module name
  std::vector<std::string> args;         // sys.argv[1:]
};

// The plan for a worker command as flashrun builds it ([python, -u, script,
// args...] or [python, -u, -m, module, args...]); nullopt for anything else
// (--no-python, a -c command), which then always starts fresh.
std::optional<StandbyPlan> PlanStandby(const std::vector<std::string>& command);

// The Python program a standby runs (python -c): exposed for tests.
const char* StandbyBootstrap();

class Standby {
 public:
  // Starts the interpreter with `env` (the workers' environment: what Python
  // reads at start-up, like PYTHONPATH, is the same), in its own process
  // group, killed with the agent; its output before activation goes to `log`.
  static absl::StatusOr<std::unique_ptr<Standby>> Spawn(const StandbyPlan& plan, const std::string& imports,
                                                        const std::vector<std::string>& env, const std::string& log,
                                                        const std::string& key);
  ~Standby();  // kills and reaps the process unless it was activated
  Standby(const Standby&) = delete;
  Standby& operator=(const Standby&) = delete;

  // True once the imports are done and it waits for work; never blocks.
  bool Ready();
  // False when it died (a failed start): it is then of no use.
  bool Alive();
  pid_t pid() const { return pid_; }
  // What it was started for (command and start-up environment): it may only
  // replace a worker with the same key.
  const std::string& key() const { return key_; }

  // Asks it to map and touch a load buffer of `bytes` (the rank's snapshot
  // size) while it waits, so the load after a hand-over takes no page faults;
  // 0 releases it. Sent once per size; false when not sent (not ready, or the
  // socket is full: call again).
  bool Prepare(uint64_t bytes);
  uint64_t prepared_bytes() const { return prepared_bytes_; }

  // Hands over one worker: the environment replaces the standby's, stdout and
  // stderr become `stdout_fd`/`stderr_fd` (the caller keeps its copies), and
  // FLASHRUN_STANDBY_ACTIVATED_AT is set to the wall-clock time of the hand-over.
  // Afterwards the process is the worker: the caller owns (signals, reaps) it.
  absl::Status Activate(const std::vector<std::string>& env, int stdout_fd, int stderr_fd);

 private:
  Standby() = default;
  void Kill();
  pid_t pid_ = -1;
  int pidfd_ = -1;
  int control_fd_ = -1;
  bool ready_ = false;
  bool activated_ = false;
  uint64_t prepared_bytes_ = 0;
  StandbyPlan plan_;
  std::string key_;
};

}  // namespace flashckpt::launcher
