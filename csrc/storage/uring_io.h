// Bulk file I/O for the persister and the loader: io_uring with O_DIRECT,
// registered buffers and several 1–8 MiB requests in flight. Falls back to
// pread/pwrite when io_uring or O_DIRECT is refused, and says so once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace flashckpt {

struct IoOptions {
  bool use_io_uring = true;
  bool use_direct_io = true;
  uint32_t chunk_bytes = 8u << 20;
  int queue_depth = 8;
};

struct IoResult {
  uint64_t bytes = 0;
  uint32_t crc32c = 0;      // of the bytes written (writes only)
  bool used_io_uring = false;
  bool used_direct_io = false;
  double seconds = 0;
};

// Hook for fault-injection tests: called before each chunk is submitted with
// the file offset; a non-OK status aborts the operation with that status.
using IoFaultHook = absl::Status (*)(const std::string& path, uint64_t offset);
void SetIoFaultHookForTesting(IoFaultHook hook);

class BulkIo {
 public:
  explicit BulkIo(IoOptions options);
  ~BulkIo();
  BulkIo(const BulkIo&) = delete;
  BulkIo& operator=(const BulkIo&) = delete;

  // Registers [base, base+len) as fixed buffers (split in <= 1 GiB pieces)
  // so later writes from it skip per-request page pinning. Optional.
  void RegisterRegion(const void* base, uint64_t len);

  // Writes buf[0, len) to a new file at path (truncating an old one),
  // fallocated first, and fdatasyncs it. buf must stay readable up to len
  // rounded up to 4096 when direct I/O is used. Computes the crc as it goes.
  absl::StatusOr<IoResult> WriteFile(const std::string& path, const void* buf, uint64_t len);
  // Reads exactly len bytes of path into buf (4096-aligned, len rounded up
  // to 4096 writable).
  absl::StatusOr<IoResult> ReadFile(const std::string& path, void* buf, uint64_t len);
  // Reads the first len bytes of path through a few chunk-sized buffers of its
  // own (registered with io_uring, O_DIRECT when allowed), several reads in
  // flight, and hands every chunk to sink(offset, data, n) in file order while
  // the next ones are read. No buffer of the file's size; the chunk buffers
  // are kept for the next call (one allocation per BulkIo). A non-OK status from
  // sink stops the read and is returned.
  // hooks.acquired(base, len) is called with the buffers before the first
  // read (to page-lock them for a device backend, say), hooks.releasing(base)
  // before they are freed, on every path (also when acquired failed half-way).
  using ChunkSink = std::function<absl::Status(uint64_t offset, const uint8_t* data, uint64_t n)>;
  struct BufferHooks {
    std::function<absl::Status(void* base, size_t len)> acquired;
    std::function<void(void* base)> releasing;
  };
  absl::StatusOr<IoResult> ReadFileStreaming(const std::string& path, uint64_t len, const ChunkSink& sink,
                                             const BufferHooks& hooks = {});
  // The same for bytes [begin, begin + len) of path; sink offsets are file
  // offsets. With direct I/O the read starts at the 4 KiB boundary at or
  // below `begin`, and the sink gets those bytes before `begin` too.
  absl::StatusOr<IoResult> ReadFileStreaming(const std::string& path, uint64_t begin, uint64_t len,
                                             const ChunkSink& sink, const BufferHooks& hooks = {});

 private:
  class Ring;
  IoOptions options_;
  std::unique_ptr<Ring> ring_;
  const uint8_t* reg_base_ = nullptr;
  uint64_t reg_len_ = 0;
  std::shared_ptr<void> read_pool_;  // ReadFileStreaming's buffers, reused by the next call
  uint64_t read_pool_bytes_ = 0;
};

// Small-file helpers: write to a temp name, fsync, rename, fsync the directory.
absl::Status WriteFileAtomic(const std::string& path, const std::string& bytes);
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t max_bytes = 1u << 30);
absl::Status FsyncDirectory(const std::string& dir);

// 4096-aligned heap buffer.
// `prepared` (optional) says whether it is the buffer PrepareLoadBuffer made.
std::shared_ptr<void> AllocateAligned(uint64_t bytes, bool* prepared = nullptr);

}  // namespace flashckpt
