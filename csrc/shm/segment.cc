#include "shm/segment.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crc32c.h"
#include "common/process_lock.h"
#include "common/status.h"

namespace flashckpt {

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t SegmentBytes(int num_slots, uint64_t slot_capacity) {
  return kSlotAlignment + static_cast<uint64_t>(num_slots) *
                              (kSlotAlignment + AlignUp(slot_capacity, kSlotAlignment));
}

std::string HumanBytes(uint64_t b) {
  if (b < (1ull << 30)) return absl::StrFormat("%.1f MiB", b / double(1ull << 20));
  return absl::StrFormat("%.2f GiB", b / double(1ull << 30));
}

namespace {

absl::Status ShmTooSmall(const std::string& path, uint64_t need, uint64_t free_bytes,
                         int num_slots, uint64_t capacity) {
  std::string dir = path.substr(0, path.rfind('/'));
  return absl::ResourceExhaustedError(absl::StrCat(
      "shared memory at ", dir, " is too small for the snapshot slots: ", HumanBytes(need),
      " needed (", num_slots, " slots x ", HumanBytes(capacity), "), ", HumanBytes(free_bytes),
      " free. Raise it (e.g. `mount -o remount,size=", (need * 2 >> 30) + 1, "G ", dir,
      "`, or `docker run --shm-size=", (need * 2 >> 30) + 1,
      "g`), lower num_slots, or point shm_dir elsewhere"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Create(
    const std::string& path, int num_slots, uint64_t slot_capacity, int rank,
    const std::string& directory, bool staged) {
  if (num_slots < 2) return absl::InvalidArgumentError("num_slots must be at least 2");
  slot_capacity = AlignUp(std::max<uint64_t>(slot_capacity, kSlotAlignment), kSlotAlignment);
  const uint64_t size = SegmentBytes(num_slots, slot_capacity);
  std::string dir = path.substr(0, path.rfind('/'));
  struct statvfs vfs;
  if (statvfs(dir.c_str(), &vfs) != 0) return ErrnoStatus("statvfs", dir, errno);
  uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  // An existing file of ours at this path gives its space back once replaced.
  struct stat old;
  if (!staged && stat(path.c_str(), &old) == 0) free_bytes += static_cast<uint64_t>(old.st_blocks) * 512;
  if (free_bytes < size) return ShmTooSmall(path, size, free_bytes, num_slots, slot_capacity);

  // Build under a temporary name and rename, so an opener never sees a
  // segment of the wrong size.
  std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus("create shared-memory segment", tmp, errno);
  // The file gets its full size now (a hole), and real pages only for the
  // headers; slots are allocated by AllocateSlot before their first write.
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return ErrnoStatus("ftruncate", tmp, err);
  }
  const uint64_t stride = kSlotAlignment + slot_capacity;
  for (int i = -1; i < num_slots; ++i) {
    off_t off = i < 0 ? 0 : static_cast<off_t>(kSlotAlignment + i * stride);
    if (::fallocate(fd, 0, off, kSlotAlignment) != 0 && errno != EOPNOTSUPP) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      if (err == ENOSPC) return ShmTooSmall(path, size, free_bytes, num_slots, slot_capacity);
      return ErrnoStatus("fallocate", tmp, err);
    }
  }
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return ErrnoStatus("mmap", tmp, err);
  }
  std::unique_ptr<SharedSegment> seg(new SharedSegment(path, fd, static_cast<uint8_t*>(base), size));
  SegmentHeader* h = seg->header();
  std::memset(h, 0, sizeof(*h));
  h->layout_version = kSegmentLayoutVersion;
  h->num_slots = static_cast<uint32_t>(num_slots);
  h->slot_stride = kSlotAlignment + slot_capacity;
  h->slot_capacity = slot_capacity;
  h->alignment = kSlotAlignment;
  h->rank = rank;
  h->owner_pid = getpid();
  std::strncpy(h->directory, directory.c_str(), sizeof(h->directory) - 1);
  for (int i = 0; i < num_slots; ++i) {
    SlotHeader* s = seg->slot(i);
    new (s) SlotHeader();
    s->seq.store(0, std::memory_order_relaxed);
    s->state.store(kSlotEmpty, std::memory_order_relaxed);
    s->pin_pid.store(0, std::memory_order_relaxed);
    s->durable.store(0, std::memory_order_relaxed);
    s->step = -1;
  }
  std::atomic_thread_fence(std::memory_order_release);
  h->magic = kSegmentMagic;
  seg->staged_path_ = tmp;
  if (!staged) FCK_RETURN_IF_ERROR(seg->Install());
  return seg;
}

bool SharedSegment::StillLinked() const {
  struct stat st;
  return ::fstat(fd_, &st) != 0 || st.st_nlink > 0;
}

absl::Status SharedSegment::Install() {
  if (staged_path_.empty()) return absl::OkStatus();
  if (::rename(staged_path_.c_str(), path_.c_str()) != 0) {
    int err = errno;
    return ErrnoStatus("rename shared-memory segment to", path_, err);
  }
  staged_path_.clear();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<SharedSegment>> SharedSegment::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open shared-memory segment", path, errno);
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(kSlotAlignment)) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat("shared-memory segment ", path, " is truncated"));
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    int err = errno;
    ::close(fd);
    return ErrnoStatus("mmap", path, err);
  }
  std::unique_ptr<SharedSegment> seg(new SharedSegment(path, fd, static_cast<uint8_t*>(base), size));
  const SegmentHeader* h = seg->header();
  if (h->magic != kSegmentMagic || h->layout_version != kSegmentLayoutVersion ||
      h->num_slots < 2 || h->num_slots > 64 ||
      SegmentBytes(h->num_slots, h->slot_capacity) != size) {
    return absl::DataLossError(absl::StrCat(
        "shared-memory segment ", path, " has an unknown layout (magic, version or size); "
        "remove it to start over"));
  }
  return seg;
}

SharedSegment::~SharedSegment() {
  if (lock_taker_.joinable()) lock_taker_.join();
  if (!staged_path_.empty()) ::unlink(staged_path_.c_str());  // never installed
  if (base_ != nullptr) ::munmap(base_, size_);
  if (fd_ >= 0) ::close(fd_);
}

absl::Status SharedSegment::LockForWriting() {
  pid_t holder = 0;
  auto taker = LockOrTakeOverFromExitingOwner(
      fd_, [this] { return static_cast<pid_t>(header()->owner_pid); }, path_, &holder);
  if (taker.status().code() == absl::StatusCode::kFailedPrecondition)
    return absl::FailedPreconditionError(absl::StrCat("shared-memory segment ", path_,
                                                      " is in use by another live process (pid ", holder,
                                                      "): one Checkpointer per rank and directory"));
  if (!taker.ok()) return taker.status();
  lock_taker_ = std::move(*taker);
  header()->owner_pid = getpid();
  return absl::OkStatus();
}

void PopulateWrite(uint8_t* base, uint64_t len) {
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  if (::madvise(base, len, MADV_POPULATE_WRITE) == 0) return;
  volatile uint8_t* q = base;  // kernels before 5.14: touch each page
  for (uint64_t k = 0; k < len; k += 4096) q[k] = q[k];
}

int SharedSegment::ReadMapped(const void* src, void* dst, size_t n) const {
  const auto* s = static_cast<const uint8_t*>(src);
  if (s < base_ || s + n > base_ + size_) return EFAULT;
  auto off = static_cast<off_t>(s - base_);
  auto* d = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t k = ::pread(fd_, d, n, off);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return errno;
    if (k == 0) return EIO;  // the file is shorter than its mapping: truncated under us
    d += k; off += k; n -= static_cast<size_t>(k);
  }
  return 0;
}

absl::Status SharedSegment::AllocateSlot(int i, int threads) {
  if (slot_allocated(i)) return absl::OkStatus();
  const uint64_t begin = kSlotAlignment + i * header()->slot_stride + kSlotAlignment;
  const uint64_t len = header()->slot_capacity;
  constexpr uint64_t kPiece = 64u << 20;
  const uint64_t pieces = (len + kPiece - 1) / kPiece;
  std::atomic<uint64_t> next{0};
  std::atomic<int> failed_errno{0};
  auto work = [&] {
    for (uint64_t p; (p = next.fetch_add(1)) < pieces && failed_errno.load() == 0;) {
      uint64_t off = begin + p * kPiece, n = std::min(kPiece, begin + len - off);
      if (::fallocate(fd_, 0, static_cast<off_t>(off), static_cast<off_t>(n)) != 0 && errno != EOPNOTSUPP) {
        failed_errno = errno;
        return;
      }
      PopulateWrite(base_ + off, n);
    }
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads && static_cast<uint64_t>(t) < pieces; ++t) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
  if (int err = failed_errno.load()) {
    if (err == ENOSPC) {
      std::string dir = path_.substr(0, path_.rfind('/'));
      return absl::ResourceExhaustedError(absl::StrCat(
          "shared memory at ", dir, " ran out while allocating snapshot slot ", i, " of ", path_, " (",
          len >> 20, " MiB): something else filled it since the segment was created; free space there "
          "or raise its size"));
    }
    return ErrnoStatus("fallocate", path_, err, static_cast<int64_t>(begin));
  }
  allocated_[i].store(true, std::memory_order_release);
  return absl::OkStatus();
}

absl::Status SharedSegment::AllocateAll(int threads) {
  for (int i = 0; i < num_slots(); ++i) FCK_RETURN_IF_ERROR(AllocateSlot(i, threads));
  return absl::OkStatus();
}

SlotHeader* SharedSegment::slot(int i) const {
  return reinterpret_cast<SlotHeader*>(base_ + kSlotAlignment + i * header()->slot_stride);
}

uint8_t* SharedSegment::slot_data(int i) const {
  return base_ + kSlotAlignment + i * header()->slot_stride + kSlotAlignment;
}

bool SharedSegment::ReadSlot(int i, SlotView* v) const {
  const SlotHeader* s = slot(i);
  uint64_t seq = s->seq.load(std::memory_order_acquire);
  if (seq == 0 || (seq & 1)) return false;
  if (s->state.load(std::memory_order_acquire) != kSlotReady) return false;
  SlotView r;
  r.index = i;
  r.seq = seq;
  r.step = s->step;
  r.generation = s->generation;
  r.data_bytes = s->data_bytes;
  r.manifest_offset = s->manifest_offset;
  r.manifest_len = s->manifest_len;
  r.manifest_crc = s->manifest_crc;
  r.durable = s->durable.load(std::memory_order_acquire) != 0;
  std::atomic_thread_fence(std::memory_order_acquire);
  if (s->seq.load(std::memory_order_relaxed) != seq) return false;
  if (r.manifest_offset + r.manifest_len > slot_capacity() || r.data_bytes > slot_capacity())
    return false;
  *v = r;
  return true;
}

bool SharedSegment::StillValid(const SlotView& v) const {
  std::atomic_thread_fence(std::memory_order_acquire);
  return slot(v.index)->seq.load(std::memory_order_relaxed) == v.seq;
}

absl::StatusOr<std::string> SharedSegment::ManifestBytes(const SlotView& v) const {
  std::string framed(reinterpret_cast<const char*>(slot_data(v.index)) + v.manifest_offset, v.manifest_len);
  if (!StillValid(v))
    return absl::UnavailableError(absl::StrCat("slot ", v.index, " of ", path_, " (step ", v.step,
                                               ") was overwritten while reading it"));
  if (Crc32c(framed.data(), framed.size()) != v.manifest_crc)
    return absl::DataLossError(absl::StrCat("manifest of step ", v.step, " in ", path_, " fails its checksum"));
  return framed;
}

bool SharedSegment::Newest(SlotView* out, int64_t step) const {
  bool found = false;
  for (int i = 0; i < num_slots(); ++i) {
    SlotView v;
    if (!ReadSlot(i, &v)) continue;
    if (step >= 0 && v.step != step) continue;
    if (!found || v.generation > out->generation) { *out = v; found = true; }
  }
  return found;
}

void SharedSegment::BeginWrite(int i) {
  SlotHeader* s = slot(i);
  uint64_t seq = s->seq.load(std::memory_order_relaxed);
  s->seq.store(seq | 1, std::memory_order_relaxed);  // odd; stays odd after a crashed writer
  s->state.store(kSlotWriting, std::memory_order_relaxed);
  s->durable.store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  written_here_[i].store(true, std::memory_order_release);
}

void SharedSegment::Retract(const SlotView& view) {
  SlotHeader* s = slot(view.index);
  uint64_t seq = view.seq;
  if (!s->seq.compare_exchange_strong(seq, view.seq | 1, std::memory_order_acq_rel)) return;  // rewritten since
  s->state.store(kSlotEmpty, std::memory_order_relaxed);
  s->step = -1;
  s->seq.store((view.seq | 1) + 1, std::memory_order_release);
}

void SharedSegment::Publish(int i, int64_t step, uint64_t generation, uint64_t data_bytes,
                            uint64_t manifest_offset, uint64_t manifest_len,
                            uint32_t manifest_crc) {
  SlotHeader* s = slot(i);
  s->step = step;
  s->generation = generation;
  s->data_bytes = data_bytes;
  s->manifest_offset = manifest_offset;
  s->manifest_len = manifest_len;
  s->manifest_crc = manifest_crc;
  s->writer_pid = getpid();
  s->created_unix_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch()).count();
  s->state.store(kSlotReady, std::memory_order_relaxed);
  uint64_t seq = s->seq.load(std::memory_order_relaxed);
  s->seq.store(seq + 1, std::memory_order_release);  // odd -> even
}

absl::Status SharedSegment::Unlink(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoStatus("unlink", path, errno);
  return absl::OkStatus();
}

}  // namespace flashckpt
