// The environment of a worker: the agent's own, plus what torchrun sets, plus ours.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace flashckpt::launcher {

struct WorkerIdentity {
  int local_rank = 0;
  int global_rank = 0;
  int group_rank = 0;
  int local_world_size = 1;
  int world_size = 1;
  int group_world_size = 1;
  std::string role = "default";
  std::string master_addr;
  int master_port = 0;
  int restart_count = 0;
  int max_restarts = 0;
  std::string run_id;
  bool use_agent_store = false;
  std::string error_file;
  std::string agent_socket;
  std::string restore_step;
  std::string heartbeat_file;
  bool virtual_local_rank = false;  // LOCAL_RANK=0, CUDA_VISIBLE_DEVICES = this worker's device
};

// The variables flashrun sets for one worker, by name.
std::map<std::string, std::string> WorkerVariables(const WorkerIdentity& worker,
                                                   const std::map<std::string, std::string>& agent_environment);

// agent_environment overridden by the worker's variables, as KEY=VALUE strings.
std::vector<std::string> MergeEnvironment(const std::map<std::string, std::string>& agent_environment,
                                          const std::map<std::string, std::string>& worker_variables);

std::map<std::string, std::string> CurrentEnvironment();

}  // namespace flashckpt::launcher
