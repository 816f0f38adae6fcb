// flashrun's checkpoint integration: runs the node's CheckpointService (the
// workers' snapshots outlive them there), tells the other agents which steps
// this node can restore, agrees on the restore step, persists it if only
// memory holds it, and persists the newest snapshot before flashrun exits.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "agent/checkpoint_service.h"
#include "launcher/elastic_agent.h"

namespace flashckpt::launcher {

// What a node reports in the rendezvous: "v1;mem=<steps every local rank holds in
// memory>;committed=<committed steps it sees>"; empty before any worker registered.
struct NodeSteps {
  bool known = false;
  std::set<int64_t> memory;
  std::set<int64_t> committed;
};
std::string EncodeNodeSteps(const NodeSteps& s);
NodeSteps DecodeNodeSteps(const std::string& payload);
// The newest step every node can get from its memory or from committed storage.
std::optional<int64_t> AgreeRestoreStep(const std::vector<NodeSteps>& nodes);

class CheckpointHooks : public NodeHooks {
 public:
  std::string NodePayload() override;
  absl::Status BeforeWorkersStart(int restart_count, const RoundAssignment& round) override;
  std::string RestoreStep() override { return restore_step_; }
  absl::Status OnJobStart(const std::string& agent_socket, const std::string& run_log_dir,
                          const std::string& node_name) override;
  void OnEvent(const char* what) override;
  absl::Status BeforeExit() override;
  std::map<int, uint64_t> SnapshotBytes() override;
  uint64_t SnapshotsTaken() override { return service_ ? service_->SnapshotsTaken() : 0; }

 private:
  std::unique_ptr<CheckpointService> service_;
  std::string restore_step_;
  using Clock = std::chrono::steady_clock;
  std::optional<Clock::time_point> noticed_, stopped_, round_;
  int restarts_ = 0;
  int rounds_ = 0;
  bool announced_store_ = false;
};

}  // namespace flashckpt::launcher
