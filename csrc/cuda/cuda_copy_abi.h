// The C ABI between the core and libflashckpt_cuda.so, which the core loads
// with dlopen() on the first CUDA tensor: the core never links CUDA, so one
// build runs on machines with and without a GPU. Every function returns 0 on
// success, else writes a message naming the CUDA call into err.
#pragma once

#include <cstddef>

extern "C" {
// 0 when a CUDA device is usable.
int fck_cuda_init(char* err, size_t err_len);
// Page-locks [base, base+len) once (cudaHostRegister; split into pieces).
int fck_cuda_register_host(void* base, size_t len, char* err, size_t err_len);
int fck_cuda_unregister_host(void* base, char* err, size_t err_len);
// Queues device-to-host copies on a side stream of `device`, ordered after
// the work queued so far on `caller_stream`; *done receives an event to wait on.
int fck_cuda_copy_d2h(int device, void* caller_stream, void* const* dst, const void* const* src,
                      const size_t* n, size_t count, void** done, char* err, size_t err_len);
// Blocks until `done` completed and releases it.
int fck_cuda_wait(void* done, char* err, size_t err_len);
}
