// The CUDA device backend (include/flashckpt/device_plugin.h): snapshot
// copies with cudaMemcpyAsync on one side stream per device, between device
// memory and the page-locked slot memory, ordered after an event recorded on
// the caller's stream, so a save sees every kernel queued before it and the
// caller's later kernels see a load.
#include <cuda_runtime.h>

#include <cstdio>
#include <mutex>
#include <vector>

#include "flashckpt/device_plugin.h"

namespace {

int Fail(cudaError_t e, const char* what, char* err, size_t err_len) {
  std::snprintf(err, err_len, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  return 1;
}

std::mutex g_mu;
std::vector<cudaStream_t> g_streams;  // per device
constexpr size_t kRegisterPiece = size_t{1} << 30;

int Init(char* err, size_t err_len) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return Fail(e, "cudaGetDeviceCount", err, err_len);
  if (n == 0) {
    std::snprintf(err, err_len, "no CUDA device is visible");
    return 1;
  }
  return 0;
}

int RegisterHost(void* base, size_t len, char* err, size_t err_len) {
  // Registering very large regions in one call fails on some drivers.
  for (size_t off = 0; off < len; off += kRegisterPiece) {
    size_t n = len - off < kRegisterPiece ? len - off : kRegisterPiece;
    cudaError_t e = cudaHostRegister(static_cast<char*>(base) + off, n, cudaHostRegisterPortable);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();
      continue;
    }
    if (e != cudaSuccess) return Fail(e, "cudaHostRegister", err, err_len);
  }
  return 0;
}

int UnregisterHost(void* base, char* err, size_t err_len) {
  cudaError_t e = cudaHostUnregister(base);
  if (e != cudaSuccess && e != cudaErrorHostMemoryNotRegistered) return Fail(e, "cudaHostUnregister", err, err_len);
  cudaGetLastError();
  return 0;
}

int Copy(cudaMemcpyKind kind, int device, void* caller_stream, void* const* dst, const void* const* src,
         const size_t* n, size_t count, void** done, char* err, size_t err_len) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return Fail(e, "cudaSetDevice", err, err_len);
  cudaStream_t side;
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (g_streams.size() <= static_cast<size_t>(device)) g_streams.resize(device + 1, nullptr);
    if (g_streams[device] == nullptr) {
      e = cudaStreamCreateWithFlags(&g_streams[device], cudaStreamNonBlocking);
      if (e != cudaSuccess) return Fail(e, "cudaStreamCreate", err, err_len);
    }
    side = g_streams[device];
  }
  cudaEvent_t ready;
  e = cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
  if (e != cudaSuccess) return Fail(e, "cudaEventCreate", err, err_len);
  e = cudaEventRecord(ready, static_cast<cudaStream_t>(caller_stream));
  if (e == cudaSuccess) e = cudaStreamWaitEvent(side, ready, 0);
  cudaEventDestroy(ready);
  if (e != cudaSuccess) return Fail(e, "cudaEventRecord/cudaStreamWaitEvent", err, err_len);
  for (size_t i = 0; i < count; ++i) {
    if (n[i] == 0) continue;
    e = cudaMemcpyAsync(dst[i], src[i], n[i], kind, side);
    if (e != cudaSuccess)
      return Fail(e, kind == cudaMemcpyDeviceToHost ? "cudaMemcpyAsync device-to-host" : "cudaMemcpyAsync host-to-device",
                  err, err_len);
  }
  cudaEvent_t finished;
  e = cudaEventCreateWithFlags(&finished, cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventRecord(finished, side);
  if (e != cudaSuccess) return Fail(e, "cudaEventRecord", err, err_len);
  // A load: the caller's later work must not start before the bytes are there.
  if (kind == cudaMemcpyHostToDevice) {
    e = cudaStreamWaitEvent(static_cast<cudaStream_t>(caller_stream), finished, 0);
    if (e != cudaSuccess) return Fail(e, "cudaStreamWaitEvent (caller's stream after the load)", err, err_len);
  }
  *done = finished;
  return 0;
}

int CopyToHost(int device, void* stream, void* const* dst, const void* const* src, const size_t* n, size_t count,
               void** done, char* err, size_t err_len) {
  return Copy(cudaMemcpyDeviceToHost, device, stream, dst, src, n, count, done, err, err_len);
}

int CopyToDevice(int device, void* stream, void* const* dst, const void* const* src, const size_t* n, size_t count,
                 void** done, char* err, size_t err_len) {
  return Copy(cudaMemcpyHostToDevice, device, stream, dst, src, n, count, done, err, err_len);
}

int Wait(void* done, char* err, size_t err_len) {
  auto ev = static_cast<cudaEvent_t>(done);
  cudaError_t e = cudaEventSynchronize(ev);
  cudaEventDestroy(ev);
  if (e != cudaSuccess) return Fail(e, "cudaEventSynchronize (snapshot copy)", err, err_len);
  return 0;
}

const fck_device_backend kCudaBackend = {
    FCK_DEVICE_ABI_VERSION, "cuda", Init, RegisterHost, UnregisterHost, CopyToHost, CopyToDevice, Wait,
};

}  // namespace

extern "C" const fck_device_backend* fck_device_backend_v1(void) { return &kCudaBackend; }
