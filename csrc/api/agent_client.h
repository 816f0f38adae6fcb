// The worker's side of flashrun's checkpoint service: a connection to the
// node agent (hello: who this rank is and where its segment lives), then one
// message per published snapshot, answered when the agent made it durable
// (or gave it up). Reconnects once when the connection broke.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "storage/uring_io.h"

namespace flashckpt {

struct AgentHello {
  std::string socket;      // the agent's Unix socket
  int rank = 0;
  int world_size = 1;
  std::string directory;   // the checkpoint directory
  std::string shm_path;    // the rank's segment
  int keep_last = 0;
  std::chrono::milliseconds commit_timeout{0};
  IoOptions io;            // the agent writes this rank's files with them
};

class AgentClient {
 public:
  explicit AgentClient(AgentHello hello) : hello_(std::move(hello)) {}
  ~AgentClient();
  AgentClient(const AgentClient&) = delete;
  AgentClient& operator=(const AgentClient&) = delete;

  // Connects (again) and says hello; kUnavailable naming the socket.
  absl::Status Connect();
  // Asks the agent to persist `step` from `slot` (of `generation`) and waits
  // for its answer (up to commit_timeout + 60 s): OK when durable,
  // kCancelled when superseded, else the agent's error.
  absl::Status Persist(int64_t step, int slot, uint64_t generation);
  void Close();

 private:
  AgentHello hello_;
  int fd_ = -1;
};

}  // namespace flashckpt
