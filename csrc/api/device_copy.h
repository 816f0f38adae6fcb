// Loads libflashckpt_cuda.so on first use; reports clearly when CUDA tensors
// are saved on a build or machine without CUDA.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flashckpt {

class DeviceCopier {
 public:
  // The process-wide copier, or an error saying why CUDA copies are unavailable.
  static absl::StatusOr<DeviceCopier*> Get();
  absl::Status RegisterHost(void* base, size_t len);
  absl::Status UnregisterHost(void* base);
  struct Copy { void* dst; const void* src; size_t n; };
  absl::StatusOr<void*> CopyToHostAsync(int device, void* caller_stream, const std::vector<Copy>& copies);
  absl::Status Wait(void* done);
  static absl::StatusOr<DeviceCopier*> FromLibrary(void* dl_handle);

 private:
  using InitFn = int (*)(char*, size_t);
  using RegisterFn = int (*)(void*, size_t, char*, size_t);
  using UnregisterFn = int (*)(void*, char*, size_t);
  using CopyFn = int (*)(int, void*, void* const*, const void* const*, const size_t*, size_t, void**, char*, size_t);
  using WaitFn = int (*)(void*, char*, size_t);
  RegisterFn register_ = nullptr;
  UnregisterFn unregister_ = nullptr;
  CopyFn copy_ = nullptr;
  WaitFn wait_ = nullptr;
};

}  // namespace flashckpt
