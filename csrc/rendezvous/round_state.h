// The rendezvous state machine, free of networking so that it can be tested
// with a fake clock: nodes join, a round completes between min and max nodes,
// silent nodes expire, and a completed round breaks when a member leaves, dies,
// joins again, or a new node waits while there is room.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "rendezvous.pb.h"

namespace flashckpt::rendezvous {

using SteadyTime = std::chrono::steady_clock::time_point;
using Duration = std::chrono::steady_clock::duration;

struct RoundSettings {
  uint32_t min_nodes = 1;
  uint32_t max_nodes = 1;
  Duration last_call_timeout = std::chrono::seconds(30);
  // A node that has not been heard from for this long is dead
  // (keep_alive_interval x keep_alive_max_attempt).
  Duration node_expiry = std::chrono::seconds(15);
};

// The round as a store (etcd) holds it: the record one agent at a time
// rewrites, and the nodes in line for a newer round, in join order.
struct StoredRound {
  RoundRecord record;
  std::vector<NodeDescriptor> in_line;
};

class RoundState {
 public:
  explicit RoundState(RoundSettings settings) : settings_(settings) {}

  // The same rules applied to a stored round at `now_unix_ms`: a member not
  // in `alive` is dead and breaks the round, a member in line breaks it, a
  // newcomer breaks it when there is room; the round completes as Join and
  // Advance complete one (min/max nodes, the last call). Silence is not
  // timed here: the store's leases decide who is alive.
  static RoundRecord AdvanceStored(const RoundSettings& settings, const StoredRound& stored,
                                   const std::set<std::string>& alive, int64_t now_unix_ms);
  static RoundView ViewOfStored(const RoundSettings& settings, const StoredRound& stored,
                                const std::string& node_id);

  // Adds the node to the next round. Returns true when the state changed in a
  // way pollers must hear about.
  void Join(const NodeDescriptor& node, SteadyTime now);
  void Leave(const std::string& node_id, SteadyTime now);
  void KeepAlive(const std::string& node_id, SteadyTime now);

  // Completes a round or expires silent nodes when their time has come.
  void Advance(SteadyTime now);

  // The view of one node; must_rejoin is set when the node is in the newest
  // round and that round is broken.
  RoundView ViewFor(const std::string& node_id) const;

  // Whether a Sync from `node_id` that knows `known_round` has news to report.
  bool HasNewsFor(const std::string& node_id, uint64_t known_round) const;

  // The earliest time Advance may change something; nullopt when nothing is timed.
  std::optional<SteadyTime> NextDeadline() const;

  uint64_t round() const { return round_; }
  bool round_broken() const { return round_broken_; }
  size_t waiting_count() const { return waiting_.size(); }
  // Bumped on every change that pollers may care about.
  uint64_t version() const { return version_; }

 private:
  struct Waiting {
    NodeDescriptor node;
    uint64_t join_order;
  };
  bool IsParticipant(const std::string& node_id) const;
  // A node in line breaks a healthy round when it is a member or there is room.
  void BreakForNewcomer(const std::string& node_id);
  static RoundState FromStored(const RoundSettings& settings, const StoredRound& stored);
  void MaybeComplete(SteadyTime now);
  void Complete(SteadyTime now);
  void Touch(const std::string& node_id, SteadyTime now);

  RoundSettings settings_;
  uint64_t round_ = 0;
  uint64_t version_ = 0;
  uint64_t next_join_order_ = 0;
  std::vector<NodeDescriptor> participants_;  // of round_, in group-rank order
  std::map<std::string, bool> participant_alive_;
  bool round_broken_ = false;
  std::map<std::string, Waiting> waiting_;
  std::map<std::string, SteadyTime> last_heard_;
  std::optional<SteadyTime> last_call_deadline_;
};

}  // namespace flashckpt::rendezvous
