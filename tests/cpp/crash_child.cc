// Saves steps 1..N of deterministic state and waits for each to be durable;
// the crash tests kill it at a chosen crash point (FLASHCKPT_CRASH_AT).
#include <cstdio>
#include <cstdlib>

#include "flashckpt/checkpointer.h"
#include "test_util.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s CKPT_DIR SHM_DIR STEPS\n", argv[0]);
    return 2;
  }
  flashckpt::CheckpointerOptions o;
  o.directory = argv[1];
  o.shm_dir = argv[2];
  o.io_chunk_bytes = 64 << 10;
  o.keep_last = 2;
  o.unlink_memory_on_close = false;
  flashckpt::Checkpointer ckpt(o);
  int steps = std::atoi(argv[3]);
  for (int step = 1; step <= steps; ++step) {
    auto s = flashckpt::testing::FakeState::ForStep(step);
    ckpt.save(step, s.Refs(), s.Blobs()).wait_durable();
  }
  return 0;
}
