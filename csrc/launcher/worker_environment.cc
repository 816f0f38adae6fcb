#include "launcher/worker_environment.h"

#include <unistd.h>

#include <vector>

#include "absl/strings/str_split.h"

extern char** environ;

namespace flashckpt::launcher {

std::map<std::string, std::string> WorkerVariables(const WorkerIdentity& w,
                                                   const std::map<std::string, std::string>& agent_environment) {
  auto inherited_or = [&](const char* name, const char* fallback) {
    auto it = agent_environment.find(name);
    return it == agent_environment.end() ? std::string(fallback) : it->second;
  };
  std::map<std::string, std::string> v = {
      {"LOCAL_RANK", std::to_string(w.local_rank)},
      {"RANK", std::to_string(w.global_rank)},
      {"GROUP_RANK", std::to_string(w.group_rank)},
      {"ROLE_RANK", std::to_string(w.global_rank)},  // one role: the role rank is the global rank
      {"ROLE_NAME", w.role},
      {"LOCAL_WORLD_SIZE", std::to_string(w.local_world_size)},
      {"WORLD_SIZE", std::to_string(w.world_size)},
      {"GROUP_WORLD_SIZE", std::to_string(w.group_world_size)},
      {"ROLE_WORLD_SIZE", std::to_string(w.world_size)},
      {"MASTER_ADDR", w.master_addr},
      {"MASTER_PORT", std::to_string(w.master_port)},
      {"TORCHELASTIC_RESTART_COUNT", std::to_string(w.restart_count)},
      {"TORCHELASTIC_MAX_RESTARTS", std::to_string(w.max_restarts)},
      {"TORCHELASTIC_RUN_ID", w.run_id},
      {"TORCHELASTIC_USE_AGENT_STORE", w.use_agent_store ? "True" : "False"},
      // Both spellings: torch 1.13 reads the old one, 2.x the new one.
      {"NCCL_ASYNC_ERROR_HANDLING", inherited_or("NCCL_ASYNC_ERROR_HANDLING", "1")},
      {"TORCH_NCCL_ASYNC_ERROR_HANDLING", inherited_or("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")},
      {"TORCHELASTIC_ERROR_FILE", w.error_file},
      {"FLASHCKPT_AGENT_SOCKET", w.agent_socket},
      {"FLASHCKPT_RESTORE_STEP", w.restore_step},
      {"FLASHCKPT_HEARTBEAT_FILE", w.heartbeat_file},
  };
  if (w.virtual_local_rank) {
    // torchrun --virtual-local-rank: every worker is local rank 0 of its own
    // device, the local_rank-th of those the agent sees.
    v["LOCAL_RANK"] = "0";
    std::string device = std::to_string(w.local_rank);
    auto it = agent_environment.find("CUDA_VISIBLE_DEVICES");
    if (it != agent_environment.end()) {
      std::vector<std::string> listed = absl::StrSplit(it->second, ',', absl::SkipEmpty());
      if (w.local_rank < static_cast<int>(listed.size())) device = listed[w.local_rank];
    }
    v["CUDA_VISIBLE_DEVICES"] = device;
  }
  return v;
}

std::vector<std::string> MergeEnvironment(const std::map<std::string, std::string>& agent_environment,
                                          const std::map<std::string, std::string>& worker_variables) {
  std::map<std::string, std::string> merged = agent_environment;
  for (const auto& [k, value] : worker_variables) merged[k] = value;
  std::vector<std::string> out;
  out.reserve(merged.size());
  for (const auto& [k, value] : merged) out.push_back(k + "=" + value);
  return out;
}

std::map<std::string, std::string> CurrentEnvironment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry(*e);
    const size_t eq = entry.find('=');
    if (eq == std::string::npos) continue;
    env.emplace(entry.substr(0, eq), entry.substr(eq + 1));
  }
  return env;
}

}  // namespace flashckpt::launcher
