#include "storage/file_ops.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <filesystem>
#include <system_error>

namespace flashckpt::fileops {
namespace {

std::atomic<Interceptor*> g_interceptor{nullptr};

// Runs `call` unless the interceptor fails `op` first; reports success after.
template <typename F>
auto Guard(Op op, const std::string& path, const std::string& to, F&& call) -> decltype(call()) {
  Interceptor* i = g_interceptor.load(std::memory_order_acquire);
  if (i != nullptr) {
    if (int err = i->Before(op, path); err != 0) {
      errno = err;
      return -1;
    }
  }
  auto rc = call();
  if (i != nullptr && rc >= 0) {
    int saved = errno;
    i->After(op, path, to);
    errno = saved;
  }
  return rc;
}

}  // namespace

const char* OpName(Op op) {
  switch (op) {
    case Op::kCreate: return "create";
    case Op::kOpenDirect: return "open O_DIRECT";
    case Op::kFallocate: return "fallocate";
    case Op::kWrite: return "write";
    case Op::kTruncate: return "ftruncate";
    case Op::kFsync: return "fsync";
    case Op::kRename: return "rename";
    case Op::kUnlink: return "unlink";
    case Op::kMkdir: return "mkdir";
    case Op::kRemoveAll: return "remove";
    case Op::kFsyncDir: return "fsync directory";
  }
  return "?";
}

void SetInterceptor(Interceptor* interceptor) { g_interceptor.store(interceptor, std::memory_order_release); }
Interceptor* Current() { return g_interceptor.load(std::memory_order_acquire); }

int Open(const std::string& path, int flags, mode_t mode) {
  Interceptor* i = Current();
  if (i == nullptr) return ::open(path.c_str(), flags, mode);
  if ((flags & O_DIRECT) != 0) {
    if (int err = i->Before(Op::kOpenDirect, path); err != 0) {
      errno = err;
      return -1;
    }
  }
  const bool creates = (flags & O_CREAT) != 0 && ::access(path.c_str(), F_OK) != 0;
  if (!creates) return ::open(path.c_str(), flags, mode);
  return Guard(Op::kCreate, path, "", [&] { return ::open(path.c_str(), flags, mode); });
}

int Fallocate(int fd, const std::string& path, off_t len) {
  return Guard(Op::kFallocate, path, "", [&] { return ::fallocate(fd, 0, 0, len); });
}

ssize_t Pwrite(int fd, const std::string& path, const void* buf, size_t n, off_t offset) {
  Interceptor* i = Current();
  if (i == nullptr) return ::pwrite(fd, buf, n, offset);
  if (int err = i->Before(Op::kWrite, path); err != 0) {
    errno = err;
    return -1;
  }
  i->Submitted(path, static_cast<uint64_t>(offset), n, false, 1);
  // A shortened write writes only what it reports.
  const int64_t keep = i->Completed(path, static_cast<uint64_t>(offset), static_cast<int64_t>(n));
  return ::pwrite(fd, buf, static_cast<size_t>(keep), offset);
}

int Ftruncate(int fd, const std::string& path, off_t len) {
  return Guard(Op::kTruncate, path, "", [&] { return ::ftruncate(fd, len); });
}

int Fsync(int fd, const std::string& path) { return Guard(Op::kFsync, path, "", [&] { return ::fsync(fd); }); }

int Fdatasync(int fd, const std::string& path) {
  return Guard(Op::kFsync, path, "", [&] { return ::fdatasync(fd); });
}

int Rename(const std::string& from, const std::string& to) {
  return Guard(Op::kRename, from, to, [&] { return ::rename(from.c_str(), to.c_str()); });
}

int Unlink(const std::string& path) {
  if (Current() != nullptr && ::access(path.c_str(), F_OK) != 0) {
    errno = ENOENT;
    return -1;
  }
  return Guard(Op::kUnlink, path, "", [&] { return ::unlink(path.c_str()); });
}

int FsyncDir(const std::string& dir) {
  return Guard(Op::kFsyncDir, dir, "", [&] {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    errno = err;
    return rc;
  });
}

int MakeDirs(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) return 0;
  const std::string parent = fs::path(path).parent_path().string();
  if (!parent.empty() && parent != path && MakeDirs(parent) != 0) return -1;
  int rc = Guard(Op::kMkdir, path, "", [&] { return ::mkdir(path.c_str(), 0755); });
  if (rc != 0 && errno == EEXIST) return 0;  // made meanwhile by another rank
  return rc;
}

int RemoveAll(const std::string& path) {
  return Guard(Op::kRemoveAll, path, "", [&] {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) {
      errno = ec.value();
      return -1;
    }
    return 0;
  });
}

int BeforeWrite(const std::string& path) {
  Interceptor* i = Current();
  return i ? i->Before(Op::kWrite, path) : 0;
}

void Submitted(const std::string& path, uint64_t offset, uint64_t len, bool fixed, int in_flight) {
  if (Interceptor* i = Current()) i->Submitted(path, offset, len, fixed, in_flight);
}

int64_t Completed(const std::string& path, uint64_t offset, int64_t res) {
  Interceptor* i = Current();
  return i ? i->Completed(path, offset, res) : res;
}

bool RefuseIoUring() {
  Interceptor* i = Current();
  return i != nullptr && i->RefuseIoUring();
}

}  // namespace flashckpt::fileops
