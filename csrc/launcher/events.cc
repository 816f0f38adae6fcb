#include "launcher/events.h"

#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace flashckpt::launcher {
namespace {

std::string Json(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string IntOrNull(int v) { return v < 0 ? "null" : std::to_string(v); }

}  // namespace

std::string FormatStatusEvent(const StatusEvent& e, long long timestamp_ms) {
  // As torchelastic's: the worker's identity in "metadata", and a nested JSON
  // string of the rest.
  const std::string inner = absl::StrCat(
      "{\"group_world_size\": ", e.group_world_size, ", \"entry_point\": ", Json(e.entry_point),
      ", \"local_rank\": ", IntOrNull(e.local_rank), ", \"role_rank\": ", IntOrNull(e.global_rank),
      ", \"role_world_size\": ", e.role_world_size, "}");
  const std::string worker_id = e.pid < 0 ? "null" : Json(std::to_string(e.pid));
  return absl::StrCat(
      "{\"name\": ", Json("torchelastic.worker.status." + e.state), ", \"source\": ", Json(e.source),
      ", \"timestamp\": ", timestamp_ms, ", \"metadata\": {\"run_id\": ", Json(e.run_id),
      ", \"global_rank\": ", IntOrNull(e.global_rank), ", \"group_rank\": ", e.group_rank,
      ", \"worker_id\": ", worker_id, ", \"role\": ", Json(e.role), ", \"hostname\": ", Json(e.hostname),
      ", \"state\": ", Json(e.state), ", \"total_run_time\": ", absl::StrFormat("%.0f", e.total_run_time_s),
      ", \"rdzv_backend\": ", Json(e.rdzv_backend), ", \"raw_error\": ",
      e.raw_error.empty() ? std::string("null") : Json(e.raw_error), ", \"metadata\": ", Json(inner),
      ", \"agent_restarts\": ", e.agent_restarts, "}}");
}

void RecordStatusEvent(const std::string& handler, const StatusEvent& e) {
  if (handler != "console") return;
  const long long ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
  std::fprintf(stderr, "%s\n", FormatStatusEvent(e, ms).c_str());
  std::fflush(stderr);
}

}  // namespace flashckpt::launcher
