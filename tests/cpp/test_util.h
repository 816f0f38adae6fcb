// Shared helpers for the core tests: scratch directories (storage on disk,
// shared memory under /dev/shm) removed after each test, and deterministic
// tensor contents per step.
#pragma once

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "flashckpt/checkpointer.h"
#include "gtest/gtest.h"

namespace flashckpt::testing {

namespace fs = std::filesystem;

class ScratchDirs {
 public:
  ScratchDirs() {
    static std::atomic<int> n{0};
    std::string tag = std::to_string(getpid()) + "-" + std::to_string(n++);
    root = fs::temp_directory_path() / ("flashckpt-test-" + tag);
    shm = fs::path("/dev/shm") / ("flashckpt-test-" + tag);
    fs::create_directories(root);
    fs::create_directories(shm);
    ckpt = (root / "ckpt").string();
  }
  ~ScratchDirs() {
    std::error_code ec;
    fs::remove_all(root, ec);
    fs::remove_all(shm, ec);
  }
  CheckpointerOptions Options(int rank = 0, int world = 1) const {
    CheckpointerOptions o;
    o.directory = ckpt;
    o.shm_dir = shm.string();
    o.rank = rank;
    o.world_size = world;
    o.io_chunk_bytes = 1 << 20;
    o.commit_timeout = std::chrono::seconds(30);
    return o;
  }
  fs::path root, shm;
  std::string ckpt;
};

// A rank's state for one step: a few float tensors of mixed sizes whose bytes
// depend on (step, key), plus a blob.
struct FakeState {
  std::vector<std::string> keys;
  std::vector<std::vector<float>> data;
  std::string blob;

  static FakeState ForStep(int64_t step, size_t scale = 1) {
    FakeState s;
    const size_t sizes[] = {1, 1000, 4096 * scale, 250000 * scale, 3 * scale, 0};
    int i = 0;
    for (size_t n : sizes) {
      std::string key = "layer" + std::to_string(i++) + ".weight";
      std::vector<float> v(n);
      std::mt19937 rng(static_cast<uint32_t>(step * 131 + i));
      for (auto& x : v) x = std::uniform_real_distribution<float>(-1, 1)(rng);
      s.keys.push_back(key);
      s.data.push_back(std::move(v));
    }
    s.blob = "optimizer-settings-of-step-" + std::to_string(step);
    return s;
  }
  std::vector<TensorRef> Refs() const {
    std::vector<TensorRef> refs;
    for (size_t i = 0; i < keys.size(); ++i) {
      TensorRef r;
      r.key = keys[i];
      r.data = data[i].data();
      r.nbytes = data[i].size() * sizeof(float);
      r.dtype = "torch.float32";
      r.shape = {static_cast<int64_t>(data[i].size())};
      r.element_size = 4;
      refs.push_back(r);
    }
    return refs;
  }
  std::vector<BlobRef> Blobs() const { return {{"extra", blob}}; }
  // Empty string when `snap` holds exactly this state.
  std::string Diff(const LoadedSnapshot& snap) const {
    for (size_t i = 0; i < keys.size(); ++i) {
      const TensorInfo* t = snap.find(keys[i]);
      if (!t) return "missing " + keys[i];
      if (t->nbytes != data[i].size() * sizeof(float)) return "size of " + keys[i];
      if (t->nbytes && std::memcmp(t->data, data[i].data(), t->nbytes) != 0) return "bytes of " + keys[i];
      if (t->shape != std::vector<int64_t>{static_cast<int64_t>(data[i].size())}) return "shape of " + keys[i];
    }
    auto it = snap.blobs().find("extra");
    if (it == snap.blobs().end() || it->second != blob) return "blob";
    return "";
  }
};

// Holds every persist in rank_durable until Release(): a persist the test
// controls, with a deadline.
class HeldBarrier : public CommitBarrier {
 public:
  void rank_durable(int64_t step, int, const std::string& record) override {
    std::unique_lock<std::mutex> l(mu_);
    entered_ = true;
    cv_.notify_all();
    if (!cv_.wait_for(l, std::chrono::seconds(30), [&] { return released_; })) {
      timed_out_ = true;
      throw Error(ErrorCode::kDeadlineExceeded, "test barrier never released");
    }
    records_[step] = record;
  }
  std::vector<std::string> wait_all(int64_t step, int, std::chrono::milliseconds) override {
    std::lock_guard<std::mutex> l(mu_);
    return {records_[step]};
  }
  bool WaitEntered() {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(30), [&] { return entered_; });
  }
  void Release() {
    std::lock_guard<std::mutex> l(mu_);
    released_ = true;
    cv_.notify_all();
  }
  // A persist is inside rank_durable, held, right now.
  bool holding() {
    std::lock_guard<std::mutex> l(mu_);
    return entered_ && !released_ && !timed_out_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false, released_ = false, timed_out_ = false;
  std::map<int64_t, std::string> records_;
};

}  // namespace flashckpt::testing
