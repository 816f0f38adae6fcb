// One shared-memory segment per rank, holding `num_slots` snapshot slots.
//
//   [SegmentHeader 4 KiB][SlotHeader 4 KiB][data ... capacity][SlotHeader][data]...
//
// A slot is published with a sequence lock: the writer makes `seq` odd, writes
// data, manifest and header fields, then makes `seq` even with release order.
// A reader takes a slot only when `seq` is even and READY before and unchanged
// after its copy, so a half-written slot (even one whose writer was SIGKILLed
// mid-copy, leaving `seq` odd forever) is never taken for a whole one.
//
// The file lives on tmpfs (/dev/shm), so it outlives a crashed process; pages
// are allocated with fallocate() up front, so a too-small /dev/shm is an error
// at creation rather than a SIGBUS in the middle of a copy.
#pragma once

#include <atomic>
#include <thread>
#include <vector>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace flashckpt {

inline constexpr uint64_t kSegmentMagic = 0x31304d4853434b46ull;  // "FCKSHM01"
inline constexpr uint32_t kSegmentLayoutVersion = 1;
inline constexpr uint32_t kSlotAlignment = 4096;  // O_DIRECT-safe on every device seen

enum SlotState : uint32_t { kSlotEmpty = 0, kSlotWriting = 1, kSlotReady = 2 };

struct alignas(64) SlotHeader {
  std::atomic<uint64_t> seq;       // odd while being written
  std::atomic<uint32_t> state;     // SlotState
  std::atomic<uint32_t> pin_pid;   // non-zero: a persister reads this slot; do not overwrite
  int64_t step;
  uint64_t generation;             // increases with every save of this rank
  uint64_t data_bytes;             // tensor region size (aligned)
  uint64_t manifest_offset;        // within the slot data region
  uint64_t manifest_len;
  uint32_t manifest_crc;
  int32_t writer_pid;
  int64_t created_unix_ns;
  std::atomic<uint32_t> durable;   // 1 once this slot's step is committed on storage
};
static_assert(sizeof(SlotHeader) <= kSlotAlignment);

struct SegmentHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t num_slots;
  uint64_t slot_stride;            // header + capacity, aligned
  uint64_t slot_capacity;          // data bytes per slot
  uint32_t alignment;
  int32_t rank;
  int32_t owner_pid;
  char directory[1024];
};
static_assert(sizeof(SegmentHeader) <= kSlotAlignment);

// A consistent copy of a slot header, taken under the sequence lock.
struct SlotView {
  int index = -1;
  uint64_t seq = 0;
  int64_t step = -1;
  uint64_t generation = 0;
  uint64_t data_bytes = 0;
  uint64_t manifest_offset = 0;
  uint64_t manifest_len = 0;
  uint32_t manifest_crc = 0;
  bool durable = false;
};

class SharedSegment {
 public:
  // Creates (or replaces) the segment file at `path` with the given geometry,
  // allocating every page. Fails with kResourceExhausted, naming the size
  // needed and how to raise it, when the file system is too small.
  // Only the headers are allocated here; AllocateSlot() allocates a slot's
  // pages before it is first written (the space for all is checked up front).
  //
  // staged: the file stays under a temporary name, invisible to openers,
  // until Install() renames it over `path` (a caller that must allocate
  // before replacing the old segment); the destructor removes a staged file
  // never installed. The space an existing file at `path` holds counts as
  // free only when it is not staged (that file goes first).
  static absl::StatusOr<std::unique_ptr<SharedSegment>> Create(
      const std::string& path, int num_slots, uint64_t slot_capacity, int rank,
      const std::string& directory, bool staged = false);
  // Makes a staged segment the one at its path (atomically replacing any).
  absl::Status Install();
  // Opens an existing segment (left by a crashed process, or by the agent).
  static absl::StatusOr<std::unique_ptr<SharedSegment>> Open(const std::string& path);

  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  // Takes the writer lock (flock): one writer per segment across processes.
  absl::Status LockForWriting();
  // Allocates slot i's pages (fallocate) and maps them (MADV_POPULATE_WRITE),
  // on `threads` threads: ~1 s/GiB of fresh tmpfs pages on one core here, so
  // it is done once, ahead of the copy, and in parallel. Idempotent.
  absl::Status AllocateSlot(int i, int threads = 2);
  bool slot_allocated(int i) const { return allocated_[i].load(std::memory_order_acquire); }
  absl::Status AllocateAll(int threads = 2);
  // Copies n bytes at `src`, an address inside this mapping, into dst with
  // pread on the segment's file. The kernel reads the pages through its own
  // mapping, so a process that never touched them (a fresh one restoring)
  // pays no page-table fill per 4 KiB page; under shadow paging each such fill
  // is a hypervisor exit (2 GiB through a fresh mapping: 1.2 s here; through
  // pread: 0.3 s). Returns 0 or an errno.
  int ReadMapped(const void* src, void* dst, size_t n) const;
  // True when reading slot i through the mapping is the cheap way: this
  // process wrote the slot (populating the pages is not enough: under shadow
  // paging the first user access to each page still exits to the hypervisor).
  bool slot_touched_here(int i) const { return written_here_[i].load(std::memory_order_acquire); }

  const std::string& path() const { return path_; }
  // False once the file was unlinked or replaced under us (another process
  // removed it: systemd-logind's RemoveIPC=yes does so at a user's last logout).
  bool StillLinked() const;
  int num_slots() const { return static_cast<int>(header()->num_slots); }
  uint64_t slot_capacity() const { return header()->slot_capacity; }
  uint64_t mapped_bytes() const { return size_; }
  SegmentHeader* header() const { return reinterpret_cast<SegmentHeader*>(base_); }
  SlotHeader* slot(int i) const;
  uint8_t* slot_data(int i) const;

  // Snapshot of slot i's header if it holds a complete snapshot.
  bool ReadSlot(int i, SlotView* view) const;
  // True if slot i's seq is still `seq` (the copy taken after ReadSlot is whole).
  bool StillValid(const SlotView& view) const;
  // The framed manifest of a slot read with ReadSlot: kUnavailable when the
  // slot was overwritten meanwhile, kDataLoss when it fails its checksum.
  absl::StatusOr<std::string> ManifestBytes(const SlotView& view) const;
  // The newest complete slot (highest generation), optionally with a given step.
  bool Newest(SlotView* view, int64_t step = -1) const;

  // Write protocol (writer only).
  void BeginWrite(int i);
  void Publish(int i, int64_t step, uint64_t generation, uint64_t data_bytes,
               uint64_t manifest_offset, uint64_t manifest_len, uint32_t manifest_crc);

  // Drops the snapshot of `view` from slot i if the slot still holds it
  // (a persister that refused it: no later load or restart may take it).
  void Retract(const SlotView& view);

  static absl::Status Unlink(const std::string& path);

 private:
  SharedSegment(std::string path, int fd, uint8_t* base, uint64_t size)
      : path_(std::move(path)), fd_(fd), base_(base), size_(size) {
    for (auto& a : allocated_) a.store(false);
    for (auto& a : written_here_) a.store(false);
  }
  std::atomic<bool> allocated_[64];
  std::atomic<bool> written_here_[64];
  std::string path_;
  std::string staged_path_;  // where a staged segment lives until Install()
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  std::thread lock_taker_;  // takes the write lock from a predecessor on its way out (LockForWriting)
};

uint64_t SegmentBytes(int num_slots, uint64_t slot_capacity);
uint64_t AlignUp(uint64_t v, uint64_t a);
// "512.0 MiB" under 1 GiB, else "2.50 GiB".
std::string HumanBytes(uint64_t bytes);
// Faults every page of [base, base + len) in for writing, contents kept
// (MADV_POPULATE_WRITE; before Linux 5.14, a write per page).
void PopulateWrite(uint8_t* base, uint64_t len);

}  // namespace flashckpt
