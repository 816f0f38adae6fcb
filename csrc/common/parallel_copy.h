// A small pool of persistent threads for the snapshot copy: big buffers are
// cut into chunks handed out through an atomic counter, so both cores stay
// busy whatever the mix of tensor sizes. The caller's thread takes part.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace flashckpt {

struct CopyTask {
  void* dst = nullptr;        // nullptr: checksum only
  const void* src = nullptr;
  size_t n = 0;
};

class CopyPool {
 public:
  explicit CopyPool(int threads);  // threads <= 0: one per core
  ~CopyPool();
  CopyPool(const CopyPool&) = delete;
  CopyPool& operator=(const CopyPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Copies (or only checksums) every task; crcs[i] is the crc32c of task i.
  void CopyAndChecksum(const std::vector<CopyTask>& tasks, std::vector<uint32_t>* crcs);
  // Like CopyAndChecksum, but the bytes at src are fetched through `fill` (a
  // pread of the file that src maps, say) into a small per-thread buffer, then
  // copied into dst with their crc. fill(buf, src, n) returns 0 or an errno;
  // the first errno is returned (0: all copied).
  using Fill = std::function<int(void* dst, const void* src, size_t n)>;
  int FillAndChecksum(const std::vector<CopyTask>& tasks, const Fill& fill, std::vector<uint32_t>* crcs);
  // Runs fn(i) for i in [0, n) on all threads; returns when all finished.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn);

  static constexpr size_t kChunkBytes = 4u << 20;

 private:
  void WorkerLoop();
  // Cuts tasks into chunks of kChunkBytes, runs chunk(task, offset, n) -> crc
  // on every thread and combines the crcs per task.
  void Chunked(const std::vector<CopyTask>& tasks, std::vector<uint32_t>* crcs,
               const std::function<uint32_t(const CopyTask&, size_t, size_t)>& chunk);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t job_n_ = 0;
  uint64_t generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
  std::atomic<size_t> next_{0};
};

}  // namespace flashckpt
