// What flashrun and torchrun tell a worker through its environment, read once,
// at the API edge, into CheckpointerOptions. Nothing below the API reads the
// environment (logging's FLASHCKPT_LOG and the test-only crash points aside).
#include <cctype>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "flashckpt/checkpointer.h"

namespace flashckpt {
namespace {

const char* Env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

}  // namespace

CheckpointerOptions WithEnvironment(CheckpointerOptions o) {
  if (o.agent_socket.empty() && o.use_agent) {
    if (const char* v = Env("FLASHCKPT_AGENT_SOCKET")) o.agent_socket = v;
  }
  if (o.run_id.empty()) {
    // Snapshots belong to one job run: a restarted worker of the same run
    // (torchrun or flashrun set TORCHELASTIC_RUN_ID) finds its predecessor's.
    const char* v = Env("FLASHCKPT_RUN_ID");
    if (!v) v = Env("TORCHELASTIC_RUN_ID");
    if (v) o.run_id = v;
  }
  if (o.shm_dir == "/dev/shm") {
    if (const char* v = Env("FLASHCKPT_SHM_DIR")) o.shm_dir = v;
  }
  if (!o.restore_step) {
    int64_t step = -1;
    if (const char* v = Env("FLASHCKPT_RESTORE_STEP"); v && absl::SimpleAtoi(v, &step) && step >= 0)
      o.restore_step = step;
  }
  return o;
}

}  // namespace flashckpt
