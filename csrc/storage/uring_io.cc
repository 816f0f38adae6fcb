#include "storage/uring_io.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "flashckpt/types.h"
#include "storage/file_ops.h"
#include "common/crash_point.h"
#include "common/crc32c.h"
#include "common/log.h"
#include "common/status.h"
#include "shm/segment.h"

namespace flashckpt {
namespace {

constexpr uint64_t kDirectAlign = 4096;
constexpr uint64_t kMaxRegisteredPiece = 1ull << 30;
std::atomic<IoFaultHook> g_fault_hook{nullptr};

void WarnOnce(std::atomic<bool>& flag, const std::string& msg) {
  if (!flag.exchange(true)) FCK_LOG(kWarn, msg);
}
std::atomic<bool> g_warned_uring{false}, g_warned_direct{false}, g_warned_register{false};

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Fd {
  int fd = -1;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

}  // namespace

void SetIoFaultHookForTesting(IoFaultHook hook) { g_fault_hook.store(hook); }

class BulkIo::Ring {
 public:
  io_uring ring;
  bool ok = false;
  int depth = 0;
  std::vector<iovec> registered;
  explicit Ring(int queue_depth) : depth(queue_depth) {
    int rc = fileops::RefuseIoUring() ? -ENOSYS
                                      : io_uring_queue_init(static_cast<unsigned>(std::max(2, queue_depth * 2)), &ring, 0);
    ok = rc == 0;
    if (!ok)
      WarnOnce(g_warned_uring, absl::StrCat("io_uring is not available (", std::strerror(-rc),
                                            "); persisting with pwrite/pread instead"));
  }
  ~Ring() {
    if (ok) io_uring_queue_exit(&ring);
  }
};

BulkIo::BulkIo(IoOptions options) : options_(options) {
  options_.chunk_bytes = std::clamp<uint32_t>(options_.chunk_bytes, 4096, 64u << 20);
  options_.chunk_bytes = static_cast<uint32_t>(AlignUp(options_.chunk_bytes, kDirectAlign));
  options_.queue_depth = std::clamp(options_.queue_depth, 1, 128);
  if (options_.use_io_uring) ring_ = std::make_unique<Ring>(options_.queue_depth);
}

BulkIo::~BulkIo() = default;

void BulkIo::RegisterRegion(const void* base, uint64_t len) {
  if (!ring_ || !ring_->ok) return;
  if (reg_base_ == base && reg_len_ == len) return;
  if (!ring_->registered.empty()) {
    io_uring_unregister_buffers(&ring_->ring);
    ring_->registered.clear();
  }
  std::vector<iovec> iov;
  for (uint64_t off = 0; off < len; off += kMaxRegisteredPiece) {
    iov.push_back({const_cast<uint8_t*>(static_cast<const uint8_t*>(base)) + off,
                   static_cast<size_t>(std::min(kMaxRegisteredPiece, len - off))});
  }
  int rc = io_uring_register_buffers(&ring_->ring, iov.data(), static_cast<unsigned>(iov.size()));
  if (rc != 0) {
    WarnOnce(g_warned_register,
             absl::StrCat("io_uring buffer registration of ", len >> 20, " MiB refused (",
                          std::strerror(-rc), "; RLIMIT_MEMLOCK?); writing unregistered"));
    return;
  }
  ring_->registered = std::move(iov);
  reg_base_ = static_cast<const uint8_t*>(base);
  reg_len_ = len;
}

namespace {

// Opens for direct I/O when asked and possible; says once when it is not.
absl::StatusOr<int> OpenMaybeDirect(const std::string& path, int flags, bool direct, bool* got_direct) {
  *got_direct = false;
  if (direct) {
    int fd = fileops::Open(path, flags | O_DIRECT | O_CLOEXEC, 0644);
    if (fd >= 0) {
      *got_direct = true;
      return fd;
    }
    if (errno != EINVAL && errno != EOPNOTSUPP) return ErrnoStatus("open", path, errno);
    WarnOnce(g_warned_direct, absl::StrCat("O_DIRECT refused for ", path,
                                           "; using the page cache (data is still fdatasynced)"));
  }
  int fd = fileops::Open(path, flags | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus("open", path, errno);
  return fd;
}

// Opens path for a read of its first len bytes (direct I/O when asked and
// possible); a file shorter than that is named as truncated.
absl::StatusOr<int> OpenForReading(const std::string& path, uint64_t len, bool direct, bool* got_direct) {
  FCK_ASSIGN_OR_RETURN(int fd, OpenMaybeDirect(path, O_RDONLY, direct, got_direct));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoStatus("fstat", path, err);
  }
  if (static_cast<uint64_t>(st.st_size) < len) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, " is truncated: ", st.st_size, " bytes, expected ", len));
  }
  return fd;
}

struct Request {
  uint64_t offset = 0;  // file offset of the next byte
  uint64_t left = 0;
  uint8_t* buf = nullptr;
  bool busy = false;
};

}  // namespace

// Submits what is queued, waits for at least one completion and hands every
// completion there is to on_cqe(tag, res).
static absl::Status Reap(io_uring* ring, const std::string& path, const std::function<void(uint64_t, int)>& on_cqe) {
  int rc = io_uring_submit_and_wait(ring, 1);
  if (rc < 0 && rc != -EINTR) return ErrnoStatus("io_uring_submit", path, -rc);
  io_uring_cqe* cqe;
  unsigned head, seen = 0;
  io_uring_for_each_cqe(ring, head, cqe) {
    ++seen;
    on_cqe(io_uring_cqe_get_data64(cqe), cqe->res);
  }
  io_uring_cq_advance(ring, seen);
  return absl::OkStatus();
}

// Waits out every request still in flight (before their buffers go away).
static void Drain(io_uring* ring, int* inflight) {
  while (*inflight > 0) {
    io_uring_cqe* c;
    if (io_uring_submit_and_wait(ring, 1) < 0 || io_uring_peek_cqe(ring, &c) != 0) break;
    io_uring_cqe_seen(ring, c);
    --*inflight;
  }
}

// Runs one sequential transfer over [0, total) with up to queue_depth
// requests in flight; `write` picks the direction.
static absl::Status Transfer(io_uring* ring, const std::vector<iovec>* fixed,
                             bool write, int fd, const std::string& path, uint8_t* buf,
                             uint64_t total, uint32_t chunk, int depth,
                             const std::function<void(uint64_t, uint64_t)>& on_submit) {
  std::vector<Request> reqs(static_cast<size_t>(depth));
  uint64_t next = 0;
  int inflight = 0;
  auto fixed_index = [&](const uint8_t* p, uint64_t n) -> int {
    if (fixed == nullptr) return -1;
    for (size_t i = 0; i < fixed->size(); ++i) {
      auto* b = static_cast<const uint8_t*>((*fixed)[i].iov_base);
      if (p >= b && p + n <= b + (*fixed)[i].iov_len) return static_cast<int>(i);
    }
    return -1;
  };
  auto prep = [&](size_t idx) -> absl::Status {
    Request& r = reqs[idx];
    io_uring_sqe* sqe = io_uring_get_sqe(ring);
    if (sqe == nullptr) return absl::InternalError("io_uring submission queue full");
    unsigned n = static_cast<unsigned>(std::min<uint64_t>(r.left, chunk));
    int fi = fixed_index(r.buf, n);
    if (write) {
      if (fi >= 0) io_uring_prep_write_fixed(sqe, fd, r.buf, n, r.offset, fi);
      else io_uring_prep_write(sqe, fd, r.buf, n, r.offset);
    } else {
      if (fi >= 0) io_uring_prep_read_fixed(sqe, fd, r.buf, n, r.offset, fi);
      else io_uring_prep_read(sqe, fd, r.buf, n, r.offset);
    }
    io_uring_sqe_set_data64(sqe, idx);
    r.busy = true;
    ++inflight;
    if (write && fileops::Intercepted()) fileops::Submitted(path, r.offset, n, fi >= 0, inflight);
    return absl::OkStatus();
  };
  absl::Status failure;
  while (next < total || inflight > 0) {
    for (size_t i = 0; i < reqs.size() && next < total && failure.ok(); ++i) {
      if (reqs[i].busy) continue;
      uint64_t n = std::min<uint64_t>(chunk, total - next);
      if (IoFaultHook hook = g_fault_hook.load()) {
        absl::Status s = hook(path, next);
        if (!s.ok()) { failure = s; break; }
      }
      if (int err = write ? fileops::BeforeWrite(path) : 0; err != 0) {
        failure = ErrnoStatus("write", path, err, static_cast<int64_t>(next));
        break;
      }
      CrashPoint(write ? "persist: write chunk" : "load: read chunk");
      if (on_submit) on_submit(next, n);
      reqs[i] = Request{next, n, buf + next, false};
      next += n;
      absl::Status s = prep(i);
      if (!s.ok()) { failure = s; break; }
    }
    if (inflight == 0) break;
    absl::Status reaped = Reap(ring, path, [&](uint64_t tag, int res) {
      size_t idx = static_cast<size_t>(tag);
      Request& r = reqs[idx];
      r.busy = false;
      --inflight;
      if (write && res > 0 && fileops::Intercepted())
        res = static_cast<int>(fileops::Completed(path, r.offset, res));  // a short write, injected
      if (res == -EAGAIN || res == -EINTR) {
        if (failure.ok()) failure = prep(idx);  // resubmit the same range
        return;
      }
      if (res < 0) {
        if (failure.ok()) failure = ErrnoStatus(write ? "write" : "read", path, -res, static_cast<int64_t>(r.offset));
        return;
      }
      if (res == 0 && !write) {
        r.left = 0;  // end of file (a padded tail past EOF)
        return;
      }
      uint64_t done = std::min<uint64_t>(static_cast<uint64_t>(res), r.left);
      r.offset += done;
      r.buf += done;
      r.left -= done;
      if (r.left > 0 && failure.ok()) failure = prep(idx);  // short transfer: the rest
    });
    if (!reaped.ok()) {
      failure = reaped;
      break;
    }
    if (!failure.ok()) {
      Drain(ring, &inflight);  // before returning the buffers
      break;
    }
  }
  return failure;
}

absl::StatusOr<IoResult> BulkIo::WriteFile(const std::string& path, const void* buf, uint64_t len) {
  auto t0 = std::chrono::steady_clock::now();
  IoResult result;
  bool direct = false;
  Fd f;
  FCK_ASSIGN_OR_RETURN(f.fd, OpenMaybeDirect(path, O_WRONLY | O_CREAT | O_TRUNC,
                                             options_.use_direct_io, &direct));
  result.used_direct_io = direct;
  const uint64_t padded = direct ? AlignUp(len, kDirectAlign) : len;
  if (padded > 0 && fileops::Fallocate(f.fd, path, static_cast<off_t>(padded)) != 0 && errno != EOPNOTSUPP) {
    return ErrnoStatus("fallocate", path, errno);
  }
  auto* p = static_cast<uint8_t*>(const_cast<void*>(buf));
  uint32_t crc = 0;
  uint64_t crc_done = 0;
  auto on_submit = [&](uint64_t off, uint64_t n) {
    // Checksum the logical bytes as their chunk goes out (the padding is not part of the file).
    uint64_t end = std::min(off + n, len);
    if (end > crc_done) {
      crc = Crc32c(p + crc_done, end - crc_done, crc);
      crc_done = end;
    }
  };
  absl::Status st;
  if (ring_ && ring_->ok) {
    result.used_io_uring = true;
    st = Transfer(&ring_->ring, ring_->registered.empty() ? nullptr : &ring_->registered, true,
                  f.fd, path, p, padded, options_.chunk_bytes, options_.queue_depth, on_submit);
  } else {
    for (uint64_t off = 0; off < padded && st.ok();) {
      uint64_t n = std::min<uint64_t>(options_.chunk_bytes, padded - off);
      if (IoFaultHook hook = g_fault_hook.load()) st = hook(path, off);
      if (!st.ok()) break;
      CrashPoint("persist: write chunk");
      on_submit(off, n);
      ssize_t w = fileops::Pwrite(f.fd, path, p + off, n, static_cast<off_t>(off));
      if (w < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        st = ErrnoStatus("write", path, errno, static_cast<int64_t>(off));
        break;
      }
      off += static_cast<uint64_t>(w);
    }
  }
  FCK_RETURN_IF_ERROR(st);
  if (crc_done < len) crc = Crc32c(p + crc_done, len - crc_done, crc);
  if (padded != len && fileops::Ftruncate(f.fd, path, static_cast<off_t>(len)) != 0)
    return ErrnoStatus("ftruncate", path, errno);
  CrashPoint("persist: before fdatasync");
  if (fileops::Fdatasync(f.fd, path) != 0) return ErrnoStatus("fdatasync", path, errno);
  result.bytes = len;
  result.crc32c = crc;
  result.seconds = Since(t0);
  return result;
}

absl::StatusOr<IoResult> BulkIo::ReadFile(const std::string& path, void* buf, uint64_t len) {
  auto t0 = std::chrono::steady_clock::now();
  IoResult result;
  Fd f;
  FCK_ASSIGN_OR_RETURN(f.fd, OpenForReading(path, len, options_.use_direct_io, &result.used_direct_io));
  const bool direct = result.used_direct_io;
  const uint64_t padded = direct ? AlignUp(len, kDirectAlign) : len;
  auto* p = static_cast<uint8_t*>(buf);
  absl::Status s;
  if (ring_ && ring_->ok) {
    result.used_io_uring = true;
    s = Transfer(&ring_->ring, nullptr, false, f.fd, path, p, padded, options_.chunk_bytes,
                 options_.queue_depth, nullptr);
  } else {
    for (uint64_t off = 0; off < padded;) {
      ssize_t r = ::pread(f.fd, p + off, std::min<uint64_t>(options_.chunk_bytes, padded - off),
                          static_cast<off_t>(off));
      if (r < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        s = ErrnoStatus("read", path, errno, static_cast<int64_t>(off));
        break;
      }
      if (r == 0) break;
      off += static_cast<uint64_t>(r);
    }
  }
  FCK_RETURN_IF_ERROR(s);
  result.bytes = len;
  result.seconds = Since(t0);
  return result;
}

absl::StatusOr<IoResult> BulkIo::ReadFileStreaming(const std::string& path, uint64_t len, const ChunkSink& sink,
                                                   const BufferHooks& hooks) {
  return ReadFileStreaming(path, 0, len, sink, hooks);
}

absl::StatusOr<IoResult> BulkIo::ReadFileStreaming(const std::string& path, uint64_t begin, uint64_t count,
                                                   const ChunkSink& sink, const BufferHooks& hooks) {
  auto t0 = std::chrono::steady_clock::now();
  IoResult result;
  Fd f;
  FCK_ASSIGN_OR_RETURN(f.fd, OpenForReading(path, begin + count, options_.use_direct_io, &result.used_direct_io));
  const bool direct = result.used_direct_io;
  // Direct I/O reads from a 4 KiB boundary: the bytes before `begin` are
  // read (and handed to the sink) too. Below, chunk k is at file offset
  // start + k * chunk, and len counts from start.
  const uint64_t start = direct ? begin / kDirectAlign * kDirectAlign : begin;
  const uint64_t len = begin + count - start;
  const uint64_t chunk = options_.chunk_bytes;
  const uint64_t chunks = (len + chunk - 1) / chunk;
  const int depth = static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(options_.queue_depth), std::max<uint64_t>(chunks, 1)));
  // One buffer per read in flight; chunk k lives in buffer k % depth until the
  // sink took it. Kept for the next file of the same load: fresh pages cost a
  // fault each (~64 ms for the default 64 MiB here), once per BulkIo.
  const uint64_t pool_bytes = chunk * static_cast<uint64_t>(depth);
  if (read_pool_bytes_ < pool_bytes) {
    read_pool_.reset();
    read_pool_ = AllocateAligned(pool_bytes);
    read_pool_bytes_ = read_pool_ ? pool_bytes : 0;
  }
  std::shared_ptr<void> pool = read_pool_;
  if (!pool) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate read buffers for ", path));
  auto* base = static_cast<uint8_t*>(pool.get());
  struct Release {
    const BufferHooks& h;
    void* base;
    ~Release() {
      if (h.releasing) h.releasing(base);
    }
  } release{hooks, base};  // destroyed before `pool`: declared after it
  if (hooks.acquired) FCK_RETURN_IF_ERROR(hooks.acquired(base, chunk * static_cast<uint64_t>(depth)));
  auto buffer = [&](uint64_t k) { return base + (k % static_cast<uint64_t>(depth)) * chunk; };
  // Bytes of chunk k to read: direct I/O reads whole 4 KiB blocks, the padded tail past EOF is cut by the kernel.
  auto span = [&](uint64_t k) {
    uint64_t n = std::min(chunk, len - k * chunk);
    return direct ? AlignUp(n, kDirectAlign) : n;
  };
  auto deliver = [&](uint64_t k) { return sink(start + k * chunk, buffer(k), std::min(chunk, len - k * chunk)); };
  const bool uring = ring_ && ring_->ok;
  if (!uring) {
    for (uint64_t k = 0; k < chunks; ++k) {
      for (uint64_t got = 0, want = span(k); got < want;) {
        ssize_t r = ::pread(f.fd, buffer(k) + got, want - got, static_cast<off_t>(start + k * chunk + got));
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r < 0) return ErrnoStatus("read", path, errno, static_cast<int64_t>(start + k * chunk + got));
        if (r == 0) {
          if (k * chunk + got < len)
            return absl::DataLossError(absl::StrCat(path, " ended at byte ", start + k * chunk + got, " while reading"));
          break;
        }
        got += static_cast<uint64_t>(r);
      }
      FCK_RETURN_IF_ERROR(deliver(k));
    }
  } else {
    result.used_io_uring = true;
    io_uring* ring = &ring_->ring;
    iovec whole{base, static_cast<size_t>(chunk * static_cast<uint64_t>(depth))};
    const bool fixed = whole.iov_len <= kMaxRegisteredPiece && io_uring_register_buffers(ring, &whole, 1) == 0;
    struct Unregister { io_uring* r; bool on; ~Unregister() { if (on) io_uring_unregister_buffers(r); } } unreg{ring, fixed};
    std::vector<uint64_t> got(chunks, 0);  // bytes landed per chunk
    std::vector<bool> done(chunks, false);
    uint64_t submitted = 0, delivered = 0;
    int inflight = 0;
    absl::Status failure;
    auto prep = [&](uint64_t k) -> absl::Status {
      io_uring_sqe* sqe = io_uring_get_sqe(ring);
      if (sqe == nullptr) return absl::InternalError("io_uring submission queue full");
      auto n = static_cast<unsigned>(span(k) - got[k]);
      uint8_t* dst = buffer(k) + got[k];
      if (fixed) io_uring_prep_read_fixed(sqe, f.fd, dst, n, start + k * chunk + got[k], 0);
      else io_uring_prep_read(sqe, f.fd, dst, n, start + k * chunk + got[k]);
      io_uring_sqe_set_data64(sqe, k);
      ++inflight;
      return absl::OkStatus();
    };
    while (delivered < chunks && failure.ok()) {
      while (submitted < chunks && submitted < delivered + static_cast<uint64_t>(depth) && failure.ok()) {
        if (IoFaultHook hook = g_fault_hook.load()) failure = hook(path, start + submitted * chunk);
        if (!failure.ok()) break;
        CrashPoint("load: read chunk");
        failure = prep(submitted++);
      }
      if (!failure.ok()) break;
      // Hand over every chunk that is whole, in order; each frees a buffer for the next read.
      if (done[delivered]) {
        failure = deliver(delivered++);
        continue;
      }
      absl::Status reaped = Reap(ring, path, [&](uint64_t k, int res) {
        --inflight;
        if (res == -EAGAIN || res == -EINTR) {
          if (failure.ok()) failure = prep(k);
          return;
        }
        if (res < 0) {
          if (failure.ok()) failure = ErrnoStatus("read", path, -res, static_cast<int64_t>(start + k * chunk + got[k]));
          return;
        }
        got[k] += static_cast<uint64_t>(res);
        if (res == 0 || got[k] >= span(k)) {
          if (k * chunk + got[k] < std::min(len, (k + 1) * chunk) && failure.ok())
            failure = absl::DataLossError(absl::StrCat(path, " ended at byte ", start + k * chunk + got[k], " while reading"));
          done[k] = true;
        } else if (failure.ok()) {
          failure = prep(k);  // short read: the rest
        }
      });
      if (failure.ok()) failure = reaped;
    }
    Drain(ring, &inflight);  // nothing in flight may still write into the buffers freed below
    FCK_RETURN_IF_ERROR(failure);
  }
  result.bytes = len;
  result.seconds = Since(t0);
  return result;
}

absl::Status FsyncDirectory(const std::string& dir) {
  if (fileops::FsyncDir(dir) != 0) return ErrnoStatus("fsync directory", dir, errno);
  return absl::OkStatus();
}

absl::Status WriteFileAtomic(const std::string& path, const std::string& bytes) {
  std::string tmp = absl::StrCat(path, ".tmp-", ::getpid());
  Fd f;
  f.fd = fileops::Open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (f.fd < 0) return ErrnoStatus("create", tmp, errno);
  auto fail = [&](const char* op, const std::string& where, int64_t offset = -1) {
    int err = errno;
    fileops::Unlink(tmp);
    return ErrnoStatus(op, where, err, offset);
  };
  if (!bytes.empty() && fileops::Fallocate(f.fd, tmp, static_cast<off_t>(bytes.size())) != 0 && errno != EOPNOTSUPP)
    return fail("fallocate", tmp);
  for (size_t off = 0; off < bytes.size();) {
    ssize_t w = fileops::Pwrite(f.fd, tmp, bytes.data() + off, bytes.size() - off, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return fail("write", tmp, static_cast<int64_t>(off));
    }
    off += static_cast<size_t>(w);
  }
  if (fileops::Fsync(f.fd, tmp) != 0) return fail("fsync", tmp);
  CrashPoint("atomic write: before rename");
  if (fileops::Rename(tmp, path) != 0) return fail("rename to", path);
  CrashPoint("atomic write: after rename");
  return FsyncDirectory(path.substr(0, path.rfind('/')));
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes) {
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) return ErrnoStatus("open", path, errno);
  struct stat st;
  if (fstat(f.fd, &st) != 0) return ErrnoStatus("fstat", path, errno);
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    return absl::DataLossError(absl::StrCat(path, " is larger than expected (", st.st_size, " bytes)"));
  std::string out(static_cast<size_t>(st.st_size), '\0');
  for (size_t off = 0; off < out.size();) {
    ssize_t r = ::pread(f.fd, out.data() + off, out.size() - off, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("read", path, errno, static_cast<int64_t>(off));
    }
    if (r == 0) break;
    off += static_cast<size_t>(r);
  }
  return out;
}

namespace {
constexpr uint64_t kHugeAlign = 2u << 20;

// Fresh anonymous memory, 2 MiB aligned, len a multiple of 2 MiB.
void* MapAligned(uint64_t len) {
  void* raw = ::mmap(nullptr, len + kHugeAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = AlignUp(reinterpret_cast<uintptr_t>(raw), kHugeAlign);
  const uint64_t head = start - reinterpret_cast<uintptr_t>(raw);
  if (head) ::munmap(raw, head);
  if (kHugeAlign - head) ::munmap(reinterpret_cast<void*>(start + len), kHugeAlign - head);
  return reinterpret_cast<void*>(start);
}

// The buffer PrepareLoadBuffer made: touched by `toucher`, taken by the next
// large AllocateAligned.
struct PreparedBuffer {
  std::mutex mu;
  void* base = nullptr;
  uint64_t len = 0;
  std::thread toucher;

  // Under mu. Waits for the touching thread; the buffer stays.
  void JoinLocked() {
    if (toucher.joinable()) toucher.join();
  }
  void ReleaseLocked() {
    JoinLocked();
    if (base) ::munmap(base, len);
    base = nullptr;
    len = 0;
  }
};

PreparedBuffer& Prepared() {
  static PreparedBuffer* p = new PreparedBuffer();  // never destroyed: used until exit
  return *p;
}
}  // namespace

void PrepareLoadBuffer(uint64_t bytes) {
  PreparedBuffer& p = Prepared();
  std::lock_guard<std::mutex> l(p.mu);
  p.ReleaseLocked();
  if (bytes == 0) return;
  const uint64_t len = AlignUp(bytes, kHugeAlign);
  void* base = MapAligned(len);
  if (base == nullptr) {
    FCK_LOG(kWarn, "cannot map a load buffer of ", len, " bytes ahead: loads allocate as usual");
    return;
  }
  p.base = base;
  p.len = len;
  p.toucher = std::thread([base, len] { PopulateWrite(static_cast<uint8_t*>(base), len); });
}

uint64_t PreparedLoadBufferBytes() {
  PreparedBuffer& p = Prepared();
  std::lock_guard<std::mutex> l(p.mu);
  return p.len;
}

std::shared_ptr<void> AllocateAligned(uint64_t bytes, bool* prepared) {
  if (prepared) *prepared = false;
  bytes = std::max<uint64_t>(AlignUp(bytes, kDirectAlign), kDirectAlign);
  const uint64_t len = AlignUp(bytes, kHugeAlign);
  {
    // A buffer made ready ahead (PrepareLoadBuffer) for a load of about this
    // size is taken once: no page faults left on the load's path. One too
    // small is given back; a much larger one is kept for the load it is for.
    PreparedBuffer& p = Prepared();
    std::lock_guard<std::mutex> l(p.mu);
    if (p.base != nullptr && p.len >= len && p.len / 2 <= len) {
      p.JoinLocked();
      void* base = std::exchange(p.base, nullptr);
      const uint64_t have = std::exchange(p.len, 0);
      if (prepared) *prepared = true;
      return std::shared_ptr<void>(base, [have](void* q) { ::munmap(q, have); });
    }
    if (p.len < len) p.ReleaseLocked();
  }
  if (bytes < (64u << 20)) {
    void* p = std::aligned_alloc(kDirectAlign, bytes);
    if (p == nullptr) return nullptr;
    return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }
  // Large load buffers: anonymous memory, first touched by the parallel copy
  // (so page faults are taken on every core). Transparent huge pages were
  // tried and measured no faster here (a VM: fresh 2 MiB pages are often not
  // backed by the host yet), and with fragmented memory the kernel stalls in
  // direct compaction.
  void* base = MapAligned(len);
  if (base == nullptr) return nullptr;
  return std::shared_ptr<void>(base, [len](void* q) { ::munmap(q, len); });
}

}  // namespace flashckpt
