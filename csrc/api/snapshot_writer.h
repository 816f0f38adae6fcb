// The snapshot writer role: the rank's shared-memory segment (creation,
// growth, reuse after a crash, page-locking for device backends), the choice
// of a slot (pins live in the segment, so flashrun's agent and this process
// see the same ones), the copy of a save into it and its publication.
// Persisting is the Persister's (storage/persister.h), loading the Loader's
// (api/loader.h); the Checkpointer facade wires them.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "api/device_backend.h"
#include "common/parallel_copy.h"
#include "flashckpt/types.h"
#include "shm/segment.h"
#include "snapshot/snapshot.h"

namespace flashckpt {

struct SnapshotWriterOptions {
  std::string shm_path;  // the rank's segment
  std::string root;      // the checkpoint directory (recorded in the segment)
  int num_slots = 2;
  int rank = 0;
  int world_size = 1;
  // How long a save waits for a slot while every other one is being persisted.
  std::chrono::milliseconds slot_timeout{std::chrono::minutes(10)};
  CopyPool* pool = nullptr;
};

class SnapshotWriter {
 public:
  explicit SnapshotWriter(SnapshotWriterOptions o) : o_(std::move(o)) {}
  ~SnapshotWriter() { Close(); }
  SnapshotWriter(const SnapshotWriter&) = delete;
  SnapshotWriter& operator=(const SnapshotWriter&) = delete;

  // Takes over the segment an earlier process of this rank left (same slot
  // count), with the writer lock. False when there is none to take.
  bool Reopen();
  // Creates slots of at least `capacity` bytes, now or on a background thread.
  absl::Status Reserve(uint64_t capacity, bool background);
  // The segment was reopened: its slots are mapped in the background after the
  // first load (so that mapping does not compete with the restore).
  void PrefaultAfterFirstLoad() { prefault_after_load_ = true; }
  void AfterLoad();

  // The segment once a background creation of it is done; null when none.
  SharedSegment* segment() {
    if (reserve_creates_segment_) JoinReserve();
    return seg_.get();
  }
  bool creating_in_background() const { return reserve_creates_segment_; }
  // The segment without waiting for a background creation: for the persist
  // and finisher threads, which only see slots a save published.
  SharedSegment* published_segment() const { return seg_.get(); }

  // Slots of at least `needed` bytes; wait_idle() runs before the segment is
  // replaced (nothing may read the old one then).
  absl::Status EnsureCapacity(uint64_t needed, const std::function<absl::Status()>& wait_idle);
  // Page-locks the segment for backend b, once per segment.
  absl::Status RegisterWith(DeviceBackend* b);

  // One save in a slot: device copies queued (device_events), host tensors
  // copied with their crcs; finish() then checksums the device bytes, writes
  // the manifest and publishes the slot (at once for a blocking save, on the
  // finisher thread for a non-blocking one). The slot stays pinned until Unpin.
  struct Written {
    int slot = -1;
    std::vector<std::pair<DeviceBackend*, void*>> device_events;
    std::function<absl::Status()> finish;
  };
  absl::StatusOr<Written> Write(int64_t step, const std::vector<TensorRef>& tensors,
                                const std::vector<BlobRef>& blobs, const std::vector<DeviceBackend*>& backend_of,
                                const SavePlan& plan);
  void Pin(int slot);
  void Unpin(int slot);  // only this process's pin; wakes a save waiting for a slot

  // Unregisters the device backends and drops the mapping (the file stays).
  void Close();

 private:
  absl::Status Create(uint64_t capacity, bool all_slots);
  int ChooseSlot(std::unique_lock<std::mutex>& l);
  void JoinReserve() {
    if (reserve_thread_.joinable()) reserve_thread_.join();
  }
  void UnregisterAll();

  SnapshotWriterOptions o_;
  std::unique_ptr<SharedSegment> seg_;
  uint64_t generation_ = 0;
  std::thread reserve_thread_;
  absl::Status reserve_status_;
  bool reserve_creates_segment_ = false;
  bool prefault_after_load_ = false;
  std::mutex slot_mu_;
  std::condition_variable slot_cv_;
  std::set<DeviceBackend*> registered_;
};

}  // namespace flashckpt
