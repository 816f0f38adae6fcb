// --event-log-handler: torchelastic's worker and agent status events
// (torch.distributed.elastic.events), as one JSON object a line on stderr
// with the "console" handler, nothing with "null" (the default, as in torchrun).
#pragma once

#include <string>

namespace flashckpt::launcher {

struct StatusEvent {
  std::string state;          // SUCCEEDED, FAILED
  std::string source;         // AGENT or WORKER
  std::string run_id;
  int global_rank = -1;       // -1: null (the agent)
  int group_rank = 0;
  int local_rank = -1;
  std::string role;
  std::string hostname;
  int pid = -1;               // the worker's (-1: null)
  double total_run_time_s = 0;
  std::string rdzv_backend;
  std::string raw_error;      // empty: null
  int agent_restarts = 0;
  int group_world_size = 0;
  int role_world_size = 0;
  std::string entry_point;
};

// `{"name": "torchelastic.worker.status.<state>", "source": ..., "timestamp": <ms>, "metadata": {...}}`
std::string FormatStatusEvent(const StatusEvent& e, long long timestamp_ms);
// Writes it to stderr when `handler` is "console".
void RecordStatusEvent(const std::string& handler, const StatusEvent& e);

}  // namespace flashckpt::launcher
