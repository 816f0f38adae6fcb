// Device backends: plugins implementing include/flashckpt/device_plugin.h,
// one per tensor device type, loaded with dlopen() so that the core links no
// accelerator runtime. "cuda" is found on first use (libflashckpt_cuda.so next
// to the library); other types are loaded by path (LoadDevicePlugin).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "flashckpt/device_plugin.h"

namespace flashckpt {

class DeviceBackend {
 public:
  // The backend for tensors of `device_type`, or an error that names the type,
  // the backends loaded, and how to add one.
  static absl::StatusOr<DeviceBackend*> For(const std::string& device_type);
  // Loads the plugin at `path` and registers it for the type it serves
  // (replacing an earlier backend of that type). Errors name the path.
  static absl::StatusOr<DeviceBackend*> Load(const std::string& path);
  // Types with a loaded backend.
  static std::vector<std::string> Types();

  const std::string& device_type() const { return type_; }
  const std::string& path() const { return path_; }
  absl::Status RegisterHost(void* base, size_t len);
  absl::Status UnregisterHost(void* base);
  struct Copy {
    void* dst;
    const void* src;
    size_t n;
  };
  // Queued after the work on `stream`; wait on the returned handle.
  absl::StatusOr<void*> CopyToHostAsync(int device, void* stream, const std::vector<Copy>& copies);
  absl::StatusOr<void*> CopyToDeviceAsync(int device, void* stream, const std::vector<Copy>& copies);
  absl::Status Wait(void* done);

 private:
  DeviceBackend(const fck_device_backend* table, std::string path) : t_(table), type_(table->device_type), path_(std::move(path)) {}
  const fck_device_backend* t_;
  std::string type_, path_;
};

}  // namespace flashckpt
