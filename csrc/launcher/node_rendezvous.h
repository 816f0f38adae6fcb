// How an agent gets into a round: the static scheme (ranks from --node-rank)
// or the built-in dynamic rendezvous (a server in one agent, clients in all).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "rendezvous/etcd_client.h"
#include "rendezvous/rendezvous_client.h"
#include "rendezvous/rendezvous_server.h"

namespace flashckpt::launcher {

struct NodeInRound {
  std::string node_id;
  std::string address;
  int local_world_size = 0;
  std::string payload;  // what NodeHooks::NodePayload gave on that node
};

// The agents' key-value store: the checkpoint service runs the cross-node
// commit through it. With the c10d rendezvous it is the built-in server at
// host:port; with etcd-v3 it is etcd, every key under key_prefix + run_id + "/".
struct RendezvousStore {
  std::string host;
  uint16_t port = 0;
  std::string token;
  std::string run_id;
  std::optional<rendezvous::EtcdOptions> etcd;  // set: the store is etcd
  std::string key_prefix;                       // etcd only, e.g. "/flashrun/"
};

struct RoundAssignment {
  uint64_t round = 0;
  int group_rank = 0;
  int group_world_size = 1;
  int rank_offset = 0;  // global rank of this node's local rank 0
  int world_size = 1;
  std::string master_addr;
  int master_port = 0;
  int restart_count = 0;  // the highest of the nodes' restart counts
  std::vector<NodeInRound> nodes;  // in group-rank order
  std::optional<RendezvousStore> store;  // none with the static rendezvous
};

class NodeRendezvous {
 public:
  virtual ~NodeRendezvous() = default;
  // Joins the next round and waits (up to the join timeout) until it completes.
  // Returns kCancelled soon after `stop_requested` turns true (a signal to the agent).
  virtual absl::StatusOr<RoundAssignment> NextRound(const std::string& payload, int restart_count,
                                                    const std::function<bool()>& stop_requested) = 0;
  // Readable (an eventfd) when the current round is over and the agent must
  // stop its workers and call NextRound; -1 when that never happens.
  virtual int RejoinNotifier() const = 0;
  // Every node of the round reached `name` (the exit barrier), up to the deadline.
  virtual absl::Status Barrier(const std::string& name, std::chrono::steady_clock::time_point deadline,
                               const std::function<bool()>& stop_requested) = 0;
  // Tells the others this node is gone for good (after it failed), so that they need not wait for its keep-alives to lapse.
  virtual void Leave() = 0;
  virtual void Shutdown() = 0;
  virtual std::string Describe() const = 0;
};

struct DynamicRendezvousOptions {
  std::string run_id;
  std::string endpoint_host;
  uint16_t endpoint_port = 29400;
  std::optional<bool> is_host;  // unset: host when the endpoint is a local address and free
  std::string token;
  std::string node_id;
  std::string node_address;  // MASTER_ADDR if this node gets group rank 0
  int local_world_size = 1;
  int min_nodes = 1;
  int max_nodes = 1;
  std::chrono::milliseconds join_timeout{600000};
  std::chrono::milliseconds last_call_timeout{30000};
  std::chrono::milliseconds keep_alive_interval{5000};
  int keep_alive_max_attempt = 3;
  std::chrono::milliseconds read_timeout{60000};
};

absl::StatusOr<std::unique_ptr<NodeRendezvous>> StartDynamicRendezvous(DynamicRendezvousOptions options);

// The rendezvous through etcd's v3 API: the round in one key, changed by
// transactions; a lease per agent (TTL keep_alive_interval x
// keep_alive_max_attempt) for liveness; watches instead of polls. Keys under
// key_prefix + run_id + "/". `rendezvous.endpoint_*` and `is_host` are unused.
struct EtcdRendezvousOptions {
  DynamicRendezvousOptions rendezvous;
  rendezvous::EtcdOptions etcd;
  std::string key_prefix = "/flashrun/";
};

absl::StatusOr<std::unique_ptr<NodeRendezvous>> StartEtcdRendezvous(EtcdRendezvousOptions options);

struct StaticRendezvousOptions {
  int node_rank = 0;
  int nnodes = 1;
  int local_world_size = 1;
  std::string master_addr;
  int master_port = 29500;
};
std::unique_ptr<NodeRendezvous> MakeStaticRendezvous(StaticRendezvousOptions options);

// The assignment a round view gives its node (ranks, MASTER_ADDR, the nodes).
RoundAssignment AssignmentFromView(const rendezvous::RoundView& view);

// What this node tells the others when it joins a round (a free port picked for MASTER_PORT).
rendezvous::NodeDescriptor DescribeThisNode(const DynamicRendezvousOptions& options, const std::string& payload,
                                            int restart_count);

// In a barrier's wait: an error when the round ended (the rejoin notifier
// fired; it is left readable for the agent loop) or the agent is stopping.
absl::Status BarrierInterrupted(int rejoin_fd, const std::function<bool()>& stop_requested);

// A port nothing listens on right now (bind to port 0, read it, close).
int PickFreePort();
// Whether host names this machine (localhost, a loopback or interface address, its host name).
bool IsLocalHost(const std::string& host);
std::string FullyQualifiedHostName();

}  // namespace flashckpt::launcher
