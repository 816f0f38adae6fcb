// The node agent's loop: rendezvous, start workers, watch them, and on a failure
// stop the local group, re-rendezvous and restart, until success, a signal, or
// the restarts run out (then torchrun's failure summary and a non-zero exit).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "launcher/launch_options.h"
#include "launcher/node_rendezvous.h"

namespace flashckpt::launcher {

// Seams for the checkpoint service of the next issue; the default does nothing.
class NodeHooks {
 public:
  virtual ~NodeHooks() = default;
  // Before every round after the first, once the workers stopped: nothing of
  // the round that ended may change what NodePayload() reports from now on
  // (e.g. its persists still in flight are abandoned, so that no step commits
  // after the payload said it was not committed).
  virtual void BeforeRejoin() {}
  // Carried by the rendezvous to every agent (e.g. the snapshot steps held here).
  virtual std::string NodePayload() { return {}; }
  // Called after each round, before workers start, with every node's payload
  // (e.g. persist the newest snapshot, agree on a restore step).
  virtual absl::Status BeforeWorkersStart(int restart_count, const RoundAssignment& round) {
    (void)restart_count;
    (void)round;
    return absl::OkStatus();
  }
  // FLASHCKPT_RESTORE_STEP for the workers ("" for none).
  virtual std::string RestoreStep() { return {}; }
  // Once, before the first round: where the workers will find the agent.
  virtual absl::Status OnJobStart(const std::string& agent_socket, const std::string& run_log_dir,
                                  const std::string& node_name) {
    (void)agent_socket;
    (void)run_log_dir;
    (void)node_name;
    return absl::OkStatus();
  }
  // Moments of a restart ("failure noticed", "workers stopped", "round complete", "workers started").
  virtual void OnEvent(const char* what) { (void)what; }
  // Before flashrun exits (success, failure or a signal), after the workers
  // stopped. An error: snapshots the workers took could not be made durable
  // (a job that succeeded then exits kExitNotDurable).
  virtual absl::Status BeforeExit() { return absl::OkStatus(); }
  // The size of each local worker's newest snapshot, by global rank (warm
  // standbys make a load buffer of that size ready).
  virtual std::map<int, uint64_t> SnapshotBytes() { return {}; }
  // Snapshots the local workers published so far (all attempts).
  virtual uint64_t SnapshotsTaken() { return 0; }
};

// flashrun's exit status when every worker succeeded but the newest
// snapshots could not be made durable (persists failed).
inline constexpr int kExitNotDurable = 3;

// Runs the job; returns the process exit code. The handled signals must already
// be blocked in every thread (see BlockHandledSignals).
int RunElasticAgent(const LaunchOptions& options, NodeHooks& hooks);

void BlockHandledSignals(const LaunchOptions& options);

}  // namespace flashckpt::launcher
