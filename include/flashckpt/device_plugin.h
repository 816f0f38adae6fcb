/* flashckpt device backends: the C ABI a plugin implements so that tensors in
 * an accelerator's memory can be saved (device-to-host into the pinned
 * shared-memory slot) and loaded (host-to-device from it). The core never
 * links an accelerator runtime: it loads a backend with dlopen() and calls it
 * only through this table. CUDA is one such plugin (libflashckpt_cuda.so,
 * loaded on the first CUDA tensor); others are loaded by path
 * (flashckpt::LoadDevicePlugin, flashckpt.load_device_plugin).
 *
 * A plugin exports one symbol:
 *
 *   const struct fck_device_backend* fck_device_backend_v1(void);
 *
 * Every function returns 0 on success; otherwise it writes a message naming
 * the failed runtime call into err (at most err_len bytes, NUL-terminated)
 * and returns non-zero. Functions may be called from several threads.
 */
#ifndef FLASHCKPT_DEVICE_PLUGIN_H_
#define FLASHCKPT_DEVICE_PLUGIN_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FCK_DEVICE_ABI_VERSION 1u

struct fck_device_backend {
  uint32_t abi_version; /* FCK_DEVICE_ABI_VERSION */
  /* The tensor device type it serves, as torch names it: "cuda", "xpu", ... */
  const char* device_type;
  /* 0 when at least one device is usable. */
  int (*init)(char* err, size_t err_len);
  /* Page-locks [base, base+len) for fast DMA, once per segment (may be a no-op). */
  int (*register_host)(void* base, size_t len, char* err, size_t err_len);
  int (*unregister_host)(void* base, char* err, size_t err_len);
  /* Queues copies src[i] (device memory) -> dst[i] (host) of n[i] bytes on
   * `device`, ordered after the work queued so far on `stream` (the caller's
   * stream; NULL: the device's default). *done receives a handle to wait on. */
  int (*copy_to_host)(int device, void* stream, void* const* dst, const void* const* src, const size_t* n,
                      size_t count, void** done, char* err, size_t err_len);
  /* The same from host to device memory; the work queued on `stream` after
   * this call sees the bytes once `done` completed. */
  int (*copy_to_device)(int device, void* stream, void* const* dst, const void* const* src, const size_t* n,
                        size_t count, void** done, char* err, size_t err_len);
  /* Blocks until `done` completed and releases it. */
  int (*wait)(void* done, char* err, size_t err_len);
};

typedef const struct fck_device_backend* (*fck_device_backend_v1_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* FLASHCKPT_DEVICE_PLUGIN_H_ */
