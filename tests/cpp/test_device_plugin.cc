// A device backend for tests (include/flashckpt/device_plugin.h) that needs no
// accelerator: its "device" memory is host memory, and every batch of copies
// runs on a thread of its own after FLASHCKPT_TEST_DEVICE_DELAY_MS (default
// 0), like a DMA engine that takes that long. It makes the non-blocking save,
// the fence and plugin loading testable on any machine.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "flashckpt/device_plugin.h"

namespace {

struct Batch {
  std::thread worker;
};

int Init(char*, size_t) { return 0; }
int RegisterHost(void*, size_t, char*, size_t) { return 0; }
int UnregisterHost(void*, char*, size_t) { return 0; }

int Copy(int device, void*, void* const* dst, const void* const* src, const size_t* n, size_t count, void** done,
         char* err, size_t err_len) {
  if (device != 0) {
    std::snprintf(err, err_len, "test device %d does not exist (only device 0)", device);
    return 1;
  }
  const char* env = std::getenv("FLASHCKPT_TEST_DEVICE_DELAY_MS");
  const int delay_ms = env ? std::atoi(env) : 0;
  std::vector<void*> d(dst, dst + count);
  std::vector<const void*> s(src, src + count);
  std::vector<size_t> len(n, n + count);
  auto* b = new Batch;
  b->worker = std::thread([d, s, len, delay_ms] {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    for (size_t i = 0; i < d.size(); ++i) std::memcpy(d[i], s[i], len[i]);
  });
  *done = b;
  return 0;
}

int Wait(void* done, char*, size_t) {
  auto* b = static_cast<Batch*>(done);
  b->worker.join();
  delete b;
  return 0;
}

const fck_device_backend kTestBackend = {
    FCK_DEVICE_ABI_VERSION, "flashckpt_test", Init, RegisterHost, UnregisterHost, Copy, Copy, Wait,
};

}  // namespace

extern "C" const fck_device_backend* fck_device_backend_v1(void) { return &kTestBackend; }
