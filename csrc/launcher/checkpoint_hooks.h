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
// memory>;committed=<committed steps it sees>;world=<the world size those
// snapshots were taken in>;ranks=<the global ranks whose snapshots it holds>";
// empty before any worker registered.
struct NodeSteps {
  bool known = false;
  std::set<int64_t> memory;
  std::set<int64_t> committed;
  int world = 0;  // 0: not said (memory then counts for nothing)
  std::set<int> ranks;
};
std::string EncodeNodeSteps(const NodeSteps& s);
NodeSteps DecodeNodeSteps(const std::string& payload);

// The world of a round and the global ranks each of its nodes runs, in the
// order of RoundAssignment::nodes.
struct RoundLayout {
  int world = 0;
  std::vector<std::set<int>> ranks;
};
RoundLayout LayoutOf(const RoundAssignment& round);
// Whether node `i`'s memory snapshots can restore its workers in `layout`:
// they were taken by the same ranks in a world of the same size. After an
// elastic change (a node lost for good, one added, ranks renumbered) they
// cannot: their steps were never committed by the old world, or are read from
// storage, which every node shares.
bool MemoryRestores(const NodeSteps& node, const RoundLayout& layout, size_t i);
// The newest step every node of the round can get: from its memory where
// MemoryRestores, else committed (storage is shared: any node's commits count).
std::optional<int64_t> AgreeRestoreStep(const std::vector<NodeSteps>& nodes, const RoundLayout& layout);

class CheckpointHooks : public NodeHooks {
 public:
  void BeforeRejoin() override;
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
