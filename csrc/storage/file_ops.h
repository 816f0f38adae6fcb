// Every call of the storage layer that changes durable state (create, write,
// fallocate, truncate, fsync, rename, unlink, mkdir, remove) goes through
// these functions, so that a test can stand between them and the kernel: an
// Interceptor (tests/cpp/fault_fs.h) fails a chosen operation with an errno,
// shortens writes, refuses O_DIRECT or io_uring, or records what a power
// loss would undo. Without one (production) each is the plain syscall.
// Functions return as the syscalls do: -1 with errno set on failure.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace flashckpt::fileops {

enum class Op {
  kCreate,     // open(O_CREAT) of a file that did not exist
  kOpenDirect, // open with O_DIRECT (fail with EINVAL: "refused")
  kFallocate,
  kWrite,      // one write request (pwrite, or an io_uring submission)
  kTruncate,
  kFsync,      // fsync or fdatasync of a file
  kRename,
  kUnlink,
  kMkdir,
  kRemoveAll,
  kFsyncDir,
};
const char* OpName(Op op);

class Interceptor {
 public:
  virtual ~Interceptor() = default;
  // Before the real call: 0 lets it run; an errno fails it without running it.
  virtual int Before(Op op, const std::string& path) = 0;
  // After a successful real call (`to`: a rename's target).
  virtual void After(Op op, const std::string& path, const std::string& to) = 0;
  // A write request going out: its range, whether its buffer is registered
  // with io_uring, how many requests are then in flight (1 for pwrite).
  virtual void Submitted(const std::string& path, uint64_t offset, uint64_t len, bool fixed, int in_flight) = 0;
  // What a completed write reports: may shorten `res` (bytes), never lengthen it.
  virtual int64_t Completed(const std::string& path, uint64_t offset, int64_t res) = 0;
  virtual bool RefuseIoUring() = 0;
};

// Tests only; nullptr restores the plain syscalls. Not thread-safe against
// calls in flight: set it while no persist runs.
void SetInterceptor(Interceptor* interceptor);
Interceptor* Current();

int Open(const std::string& path, int flags, mode_t mode);
int Fallocate(int fd, const std::string& path, off_t len);
ssize_t Pwrite(int fd, const std::string& path, const void* buf, size_t n, off_t offset);
int Ftruncate(int fd, const std::string& path, off_t len);
int Fsync(int fd, const std::string& path);
int Fdatasync(int fd, const std::string& path);
int Rename(const std::string& from, const std::string& to);
int Unlink(const std::string& path);
int FsyncDir(const std::string& dir);
// mkdir -p; every directory it creates is reported (kMkdir).
int MakeDirs(const std::string& path);
// rm -r; a missing path is not an error.
int RemoveAll(const std::string& path);

// For the io_uring path, which the kernel carries out.
inline bool Intercepted() { return Current() != nullptr; }
int BeforeWrite(const std::string& path);
void Submitted(const std::string& path, uint64_t offset, uint64_t len, bool fixed, int in_flight);
int64_t Completed(const std::string& path, uint64_t offset, int64_t res);
bool RefuseIoUring();

}  // namespace flashckpt::fileops
