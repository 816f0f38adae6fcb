#include "api/device_backend.h"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "flashckpt/config.h"

namespace flashckpt {
namespace {

std::string DirOfThisObject() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&DirOfThisObject), &info) == 0 || info.dli_fname == nullptr) return "";
  std::string p = info.dli_fname;
  auto slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

struct Registry {
  std::mutex mu;
  std::map<std::string, std::unique_ptr<DeviceBackend>> by_type;  // never freed: copies may be in flight
  std::map<std::string, absl::Status> failed;                      // a type whose default plugin failed to load
};

Registry& Reg() {
  static Registry* r = new Registry();
  return *r;
}

absl::StatusOr<const fck_device_backend*> OpenPlugin(const std::string& path, void** handle_out, std::string* error) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    *error = dlerror();
    return absl::NotFoundError(*error);
  }
  auto entry = reinterpret_cast<fck_device_backend_v1_fn>(dlsym(handle, "fck_device_backend_v1"));
  if (entry == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a flashckpt device plugin: it exports no fck_device_backend_v1"));
  const fck_device_backend* t = entry();
  if (t == nullptr || t->abi_version != FCK_DEVICE_ABI_VERSION || t->device_type == nullptr || !t->init ||
      !t->register_host || !t->unregister_host || !t->copy_to_host || !t->copy_to_device || !t->wait)
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": its device backend table is incomplete or of ABI version ", t ? t->abi_version : 0,
        " (this flashckpt speaks version ", FCK_DEVICE_ABI_VERSION, ", include/flashckpt/device_plugin.h)"));
  *handle_out = handle;
  return t;
}

// Where libflashckpt_cuda.so may be: $FLASHCKPT_CUDA_LIB, next to this library, its lib/.
absl::StatusOr<std::string> FindCudaPlugin() {
#if !FLASHCKPT_HAVE_CUDA
  if (std::getenv("FLASHCKPT_CUDA_LIB") == nullptr)
    return absl::UnavailableError(
        "this flashckpt was built without CUDA (no toolkit found at build time): it cannot save "
        "CUDA tensors; rebuild with the CUDA toolkit installed, or move the tensors to the CPU");
#endif
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("FLASHCKPT_CUDA_LIB")) candidates.push_back(env);
  std::string here = DirOfThisObject();
  for (const char* rel : {"/libflashckpt_cuda.so", "/lib/libflashckpt_cuda.so", "/../lib/libflashckpt_cuda.so"})
    candidates.push_back(here + rel);
  candidates.push_back("libflashckpt_cuda.so");
  std::string tried;
  for (const auto& c : candidates) {
    void* h = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h != nullptr) {
      dlclose(h);
      return c;
    }
    absl::StrAppend(&tried, "\n  ", c, ": ", dlerror());
  }
  return absl::UnavailableError(absl::StrCat("cannot load the flashckpt CUDA copy engine; tried:", tried,
                                             "\nset FLASHCKPT_CUDA_LIB to its path"));
}

std::string Fail(const char* what, const char* err) { return absl::StrCat(what, ": ", err); }

}  // namespace

absl::StatusOr<DeviceBackend*> DeviceBackend::Load(const std::string& path) {
  void* handle = nullptr;
  std::string dl_error;
  absl::StatusOr<const fck_device_backend*> t = OpenPlugin(path, &handle, &dl_error);
  if (!t.ok())
    return absl::Status(t.status().code(), absl::StrCat("cannot load device plugin ", path, ": ", t.status().message()));
  char err[512] = {0};
  if ((*t)->init(err, sizeof(err)) != 0)
    return absl::UnavailableError(absl::StrCat((*t)->device_type, " tensors cannot be saved here (plugin ", path,
                                               "): ", err));
  Registry& r = Reg();
  std::lock_guard<std::mutex> l(r.mu);
  auto& slot = r.by_type[(*t)->device_type];
  slot.reset(new DeviceBackend(*t, path));
  r.failed.erase((*t)->device_type);
  return slot.get();
}

absl::StatusOr<DeviceBackend*> DeviceBackend::For(const std::string& device_type) {
  Registry& r = Reg();
  {
    std::lock_guard<std::mutex> l(r.mu);
    if (auto it = r.by_type.find(device_type); it != r.by_type.end()) return it->second.get();
    if (auto it = r.failed.find(device_type); it != r.failed.end()) return it->second;
  }
  if (device_type == "cuda") {
    absl::StatusOr<std::string> path = FindCudaPlugin();
    absl::StatusOr<DeviceBackend*> b = path.ok() ? Load(*path) : absl::StatusOr<DeviceBackend*>(path.status());
    if (!b.ok()) {
      std::lock_guard<std::mutex> l(r.mu);
      r.failed[device_type] = b.status();
    }
    return b;
  }
  std::vector<std::string> types = Types();
  return absl::UnavailableError(absl::StrCat(
      "no device backend for '", device_type, "' tensors (backends loaded: ",
      types.empty() ? std::string("none") : absl::StrJoin(types, ", "),
      "); move the tensors to the CPU first, or load a plugin for this device type that implements "
      "include/flashckpt/device_plugin.h (flashckpt.load_device_plugin(path) in Python, "
      "flashckpt::LoadDevicePlugin(path) in C++)"));
}

std::vector<std::string> DeviceBackend::Types() {
  Registry& r = Reg();
  std::lock_guard<std::mutex> l(r.mu);
  std::vector<std::string> out;
  for (auto& [type, b] : r.by_type) out.push_back(type);
  return out;
}

absl::Status DeviceBackend::RegisterHost(void* base, size_t len) {
  char err[512] = {0};
  if (t_->register_host(base, len, err, sizeof(err)) != 0) return absl::InternalError(Fail(type_.c_str(), err));
  return absl::OkStatus();
}

absl::Status DeviceBackend::UnregisterHost(void* base) {
  char err[512] = {0};
  if (t_->unregister_host(base, err, sizeof(err)) != 0) return absl::InternalError(Fail(type_.c_str(), err));
  return absl::OkStatus();
}

namespace {
template <typename Fn>
absl::StatusOr<void*> Queue(Fn fn, const std::string& type, const char* dir, int device, void* stream,
                            const std::vector<DeviceBackend::Copy>& copies) {
  std::vector<void*> dst;
  std::vector<const void*> src;
  std::vector<size_t> n;
  for (const auto& c : copies) {
    dst.push_back(c.dst);
    src.push_back(c.src);
    n.push_back(c.n);
  }
  void* done = nullptr;
  char err[512] = {0};
  if (fn(device, stream, dst.data(), src.data(), n.data(), copies.size(), &done, err, sizeof(err)) != 0)
    return absl::InternalError(absl::StrCat(type, ":", device, " ", dir, " copy of ", copies.size(), " tensors: ", err));
  return done;
}
}  // namespace

absl::StatusOr<void*> DeviceBackend::CopyToHostAsync(int device, void* stream, const std::vector<Copy>& copies) {
  return Queue(t_->copy_to_host, type_, "device-to-host", device, stream, copies);
}

absl::StatusOr<void*> DeviceBackend::CopyToDeviceAsync(int device, void* stream, const std::vector<Copy>& copies) {
  return Queue(t_->copy_to_device, type_, "host-to-device", device, stream, copies);
}

absl::Status DeviceBackend::Wait(void* done) {
  char err[512] = {0};
  if (t_->wait(done, err, sizeof(err)) != 0) return absl::InternalError(Fail(type_.c_str(), err));
  return absl::OkStatus();
}

}  // namespace flashckpt
