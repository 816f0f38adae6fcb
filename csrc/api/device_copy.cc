#include "api/device_copy.h"

#include <dlfcn.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
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

absl::StatusOr<DeviceCopier*> Load() {
#if !FLASHCKPT_HAVE_CUDA
  if (std::getenv("FLASHCKPT_CUDA_LIB") == nullptr)
    return absl::UnavailableError(
        "this flashckpt was built without CUDA (no toolkit found at build time): it cannot save "
        "CUDA tensors; rebuild with the CUDA toolkit installed, or move the tensors to the CPU");
#endif
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("FLASHCKPT_CUDA_LIB")) candidates.push_back(env);
  std::string here = DirOfThisObject();
  candidates.push_back(here + "/libflashckpt_cuda.so");
  candidates.push_back(here + "/lib/libflashckpt_cuda.so");
  candidates.push_back(here + "/../lib/libflashckpt_cuda.so");
  candidates.push_back("libflashckpt_cuda.so");
  void* handle = nullptr;
  std::string tried;
  for (const auto& c : candidates) {
    handle = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) break;
    absl::StrAppend(&tried, "\n  ", c, ": ", dlerror());
  }
  if (handle == nullptr)
    return absl::UnavailableError(absl::StrCat("cannot load the flashckpt CUDA copy engine; tried:", tried,
                                               "\nset FLASHCKPT_CUDA_LIB to its path"));
  auto init = reinterpret_cast<int (*)(char*, size_t)>(dlsym(handle, "fck_cuda_init"));
  char err[512] = {0};
  if (init == nullptr) return absl::UnavailableError("libflashckpt_cuda.so lacks fck_cuda_init");
  if (init(err, sizeof(err)) != 0)
    return absl::UnavailableError(absl::StrCat("CUDA tensors cannot be saved here: ", err));
  return DeviceCopier::FromLibrary(handle);
}

}  // namespace

absl::StatusOr<DeviceCopier*> DeviceCopier::Get() {
  static const absl::StatusOr<DeviceCopier*> instance = Load();
  return instance;
}

absl::StatusOr<DeviceCopier*> DeviceCopier::FromLibrary(void* lib) {
  auto* c = new DeviceCopier();  // process-wide, never freed
  c->register_ = reinterpret_cast<RegisterFn>(dlsym(lib, "fck_cuda_register_host"));
  c->unregister_ = reinterpret_cast<UnregisterFn>(dlsym(lib, "fck_cuda_unregister_host"));
  c->copy_ = reinterpret_cast<CopyFn>(dlsym(lib, "fck_cuda_copy_d2h"));
  c->wait_ = reinterpret_cast<WaitFn>(dlsym(lib, "fck_cuda_wait"));
  if (!c->register_ || !c->unregister_ || !c->copy_ || !c->wait_)
    return absl::InternalError("libflashckpt_cuda.so lacks a required symbol");
  return c;
}

absl::Status DeviceCopier::RegisterHost(void* base, size_t len) {
  char err[512] = {0};
  if (register_(base, len, err, sizeof(err)) != 0) return absl::InternalError(err);
  return absl::OkStatus();
}

absl::Status DeviceCopier::UnregisterHost(void* base) {
  char err[512] = {0};
  if (unregister_(base, err, sizeof(err)) != 0) return absl::InternalError(err);
  return absl::OkStatus();
}

absl::StatusOr<void*> DeviceCopier::CopyToHostAsync(int device, void* caller_stream,
                                                    const std::vector<Copy>& copies) {
  std::vector<void*> dst;
  std::vector<const void*> src;
  std::vector<size_t> n;
  for (const auto& c : copies) { dst.push_back(c.dst); src.push_back(c.src); n.push_back(c.n); }
  void* done = nullptr;
  char err[512] = {0};
  if (copy_(device, caller_stream, dst.data(), src.data(), n.data(), copies.size(), &done, err, sizeof(err)) != 0)
    return absl::InternalError(absl::StrCat("device ", device, ": ", err));
  return done;
}

absl::Status DeviceCopier::Wait(void* done) {
  char err[512] = {0};
  if (wait_(done, err, sizeof(err)) != 0) return absl::InternalError(err);
  return absl::OkStatus();
}

}  // namespace flashckpt
