// A device backend for tests (include/flashckpt/device_plugin.h) that needs no
// accelerator: its "device" memory is host memory, and every batch of copies
// runs on a thread of its own after FLASHCKPT_TEST_DEVICE_DELAY_MS (default
// 0), like a DMA engine that takes that long. Like a DMA engine it refuses
// host memory that was not registered (page-locked) first, so a test fails
// when a copy would go through pageable memory. It makes the non-blocking
// save, the fence, device loads and plugin loading testable on any machine.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "flashckpt/device_plugin.h"

namespace {

struct Batch {
  std::thread worker;
};

std::mutex g_mu;
std::map<const uint8_t*, size_t> g_registered;  // base -> length

int Init(char*, size_t) { return 0; }
int RegisterHost(void* base, size_t len, char*, size_t) {
  std::lock_guard<std::mutex> l(g_mu);
  g_registered[static_cast<const uint8_t*>(base)] = len;
  return 0;
}
int UnregisterHost(void* base, char* err, size_t err_len) {
  std::lock_guard<std::mutex> l(g_mu);
  if (g_registered.erase(static_cast<const uint8_t*>(base)) == 0) {
    std::snprintf(err, err_len, "test device: %p was not registered", base);
    return 1;
  }
  return 0;
}

bool Registered(const void* p, size_t n) {
  std::lock_guard<std::mutex> l(g_mu);
  const auto* q = static_cast<const uint8_t*>(p);
  auto it = g_registered.upper_bound(q);
  if (it == g_registered.begin()) return false;
  --it;
  return q + n <= it->first + it->second;
}

int Check(int device, const void* const* host, const size_t* n, size_t count, char* err, size_t err_len) {
  if (device != 0) {
    std::snprintf(err, err_len, "test device %d does not exist (only device 0)", device);
    return 1;
  }
  for (size_t i = 0; i < count; ++i) {
    if (n[i] != 0 && !Registered(host[i], n[i])) {
      std::snprintf(err, err_len, "test device: host memory %p (%zu bytes) is not registered (pageable)", host[i], n[i]);
      return 1;
    }
  }
  return 0;
}

int Copy(void* const* dst, const void* const* src, const size_t* n, size_t count, void** done) {
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

int CopyToHost(int device, void*, void* const* dst, const void* const* src, const size_t* n, size_t count, void** done,
               char* err, size_t err_len) {
  if (int rc = Check(device, reinterpret_cast<const void* const*>(dst), n, count, err, err_len)) return rc;
  return Copy(dst, src, n, count, done);
}

std::atomic<uint64_t> g_to_device_bytes{0};

int CopyToDevice(int device, void*, void* const* dst, const void* const* src, const size_t* n, size_t count,
                 void** done, char* err, size_t err_len) {
  if (int rc = Check(device, src, n, count, err, err_len)) return rc;
  for (size_t i = 0; i < count; ++i) g_to_device_bytes += n[i];
  return Copy(dst, src, n, count, done);
}

int Wait(void* done, char*, size_t) {
  auto* b = static_cast<Batch*>(done);
  b->worker.join();
  delete b;
  return 0;
}

const fck_device_backend kTestBackend = {
    FCK_DEVICE_ABI_VERSION, "flashckpt_test", Init, RegisterHost, UnregisterHost, CopyToHost, CopyToDevice, Wait,
};

}  // namespace

extern "C" const fck_device_backend* fck_device_backend_v1(void) { return &kTestBackend; }
// For tests: bytes copied host-to-device so far (a load that bypassed the
// backend would leave it unchanged).
extern "C" uint64_t flashckpt_test_device_to_device_bytes(void) { return g_to_device_bytes.load(); }
