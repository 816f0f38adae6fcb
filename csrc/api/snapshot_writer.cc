#include "api/snapshot_writer.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/crash_point.h"
#include "common/crc32c.h"
#include "common/log.h"
#include "common/status.h"
#include "storage/layout.h"

namespace flashckpt {

namespace {

// A slot pinned by a persister (this process, or flashrun's agent) must not
// be overwritten; a pin left by a process that died is void.
bool PinHeld(SlotHeader* h) {
  uint32_t pid = h->pin_pid.load(std::memory_order_acquire);
  if (pid == 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
    h->pin_pid.compare_exchange_strong(pid, 0);
    return false;
  }
  return true;
}

}  // namespace

bool SnapshotWriter::Reopen() {
  if (::access(o_.shm_path.c_str(), F_OK) != 0) return false;
  auto s = SharedSegment::Open(o_.shm_path);
  if (!s.ok()) {
    FCK_LOG(kWarn, "ignoring shared-memory segment ", o_.shm_path, ": ", s.status().message());
    return false;
  }
  if (static_cast<int>((*s)->num_slots()) != o_.num_slots || !(*s)->LockForWriting().ok()) return false;
  seg_ = std::move(*s);
  for (int i = 0; i < seg_->num_slots(); ++i) {
    SlotView v;
    if (seg_->ReadSlot(i, &v)) generation_ = std::max(generation_, v.generation);
  }
  SlotView newest;
  if (seg_->Newest(&newest))
    FCK_LOG(kInfo, "found shared-memory snapshot of step ", newest.step, " in ", o_.shm_path,
            newest.durable ? " (persisted)" : " (not yet persisted)");
  return true;
}

absl::Status SnapshotWriter::Reserve(uint64_t capacity, bool background) {
  if (!background) return Create(capacity, /*all_slots=*/true);
  reserve_creates_segment_ = true;
  reserve_thread_ = std::thread([this, capacity] { reserve_status_ = Create(capacity, true); });
  return absl::OkStatus();
}

void SnapshotWriter::AfterLoad() {
  if (!prefault_after_load_ || !seg_) return;
  prefault_after_load_ = false;
  JoinReserve();
  SharedSegment* s = seg_.get();
  const int threads = o_.pool->threads();
  reserve_thread_ = std::thread([this, s, threads] { reserve_status_ = s->AllocateAll(threads); });
}

absl::Status SnapshotWriter::Create(uint64_t capacity, bool all_slots) {
  // Room to grow a little without re-creating the segment.
  capacity = AlignUp(capacity + capacity / 64 + (1u << 20), 2u << 20);
  // Growing: a snapshot the old slots hold in memory only (not durable) is
  // kept until the new slots exist, so a save that cannot grow them (too
  // little shared memory) leaves it loadable. Durable ones make room first.
  int64_t only_in_memory = -1;
  if (seg_) {
    for (int i = 0; i < seg_->num_slots(); ++i) {
      SlotView v;
      if (seg_->ReadSlot(i, &v) && !v.durable) only_in_memory = std::max(only_in_memory, v.step);
    }
    if (only_in_memory < 0) {
      FCK_LOG(kInfo, "growing shared-memory slots of ", o_.shm_path, " from ", seg_->slot_capacity() >> 20,
              " MiB to ", capacity >> 20, " MiB; the older in-memory snapshots are on storage");
      UnregisterAll();
      seg_.reset();
      SharedSegment::Unlink(o_.shm_path).IgnoreError();
    }
  }
  const bool beside = seg_ != nullptr;
  auto t0 = std::chrono::steady_clock::now();
  auto created = SharedSegment::Create(o_.shm_path, o_.num_slots, capacity, o_.rank, o_.root, /*staged=*/beside);
  if (!created.ok() && beside)
    return Annotate(created.status(), absl::StrCat("growing the slots to ", HumanBytes(capacity), " each while step ",
                                                   only_in_memory, ", in memory only (persist=False or not yet "
                                                   "durable), is kept: nothing was dropped"));
  FCK_RETURN_IF_ERROR(created.status());
  std::unique_ptr<SharedSegment> s = std::move(*created);
  FCK_RETURN_IF_ERROR(s->LockForWriting());
  const int threads = o_.pool->threads();
  absl::Status allocated = all_slots ? s->AllocateAll(threads) : s->AllocateSlot(0, threads);
  if (!allocated.ok() && beside)
    return Annotate(allocated, absl::StrCat("growing the slots while step ", only_in_memory,
                                            " (in memory only) is kept: nothing was dropped"));
  FCK_RETURN_IF_ERROR(allocated);
  if (beside) {
    FCK_LOG(kInfo, "grew shared-memory slots of ", o_.shm_path, " from ", seg_->slot_capacity() >> 20, " MiB to ",
            capacity >> 20, " MiB; older in-memory snapshots (newest: step ", only_in_memory, ") are dropped");
    UnregisterAll();
    seg_.reset();
  }
  FCK_RETURN_IF_ERROR(s->Install());
  FCK_LOG(kDebug, "allocated ", all_slots ? o_.num_slots : 1, " slots of ", capacity >> 20, " MiB in ", o_.shm_path,
          " in ", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), " s");
  seg_ = std::move(s);
  if (!all_slots) {
    SharedSegment* raw = seg_.get();
    reserve_thread_ = std::thread([this, raw, threads] { reserve_status_ = raw->AllocateAll(threads); });
  }
  return absl::OkStatus();
}

absl::Status SnapshotWriter::EnsureCapacity(uint64_t needed, const std::function<absl::Status()>& wait_idle) {
  JoinReserve();
  if (seg_ && !seg_->StillLinked()) {
    // Someone removed our segment: its snapshots are invisible to the agent
    // and to a restarted worker. A new one takes the next save.
    FCK_LOG(kError, "shared-memory segment ", o_.shm_path, " was removed by another process while in use "
            "(systemd-logind does this with RemoveIPC=yes when the user's last session ends: set RemoveIPC=no in "
            "/etc/systemd/logind.conf, or run as a system user); its in-memory snapshots are lost. Creating it again");
    UnregisterAll();
    seg_.reset();
  }
  if (!reserve_status_.ok()) {
    absl::Status s = reserve_status_;
    reserve_status_ = absl::OkStatus();
    if (!seg_) return s;
  }
  if (seg_ && seg_->slot_capacity() >= needed) return absl::OkStatus();
  // Growing replaces the segment: wait until nothing reads the old one.
  FCK_RETURN_IF_ERROR(Annotate(wait_idle(), absl::StrCat("growing the shared-memory slots of ", o_.shm_path, " to ",
                                                         needed >> 20, " MiB must wait for the pending persists")));
  return Create(needed, /*all_slots=*/false);
}

absl::Status SnapshotWriter::RegisterWith(DeviceBackend* b) {
  if (!seg_) return absl::FailedPreconditionError("no shared-memory segment to register");
  if (!registered_.insert(b).second) return absl::OkStatus();
  absl::Status r = b->RegisterHost(seg_->header(), seg_->mapped_bytes());
  if (!r.ok()) {
    registered_.erase(b);
    return Annotate(r, absl::StrCat("registering ", o_.shm_path, " with the ", b->device_type(), " backend"));
  }
  return absl::OkStatus();
}

void SnapshotWriter::UnregisterAll() {
  for (DeviceBackend* b : registered_) b->UnregisterHost(seg_->header()).IgnoreError();
  registered_.clear();
}

void SnapshotWriter::Close() {
  JoinReserve();
  if (seg_) UnregisterAll();
  seg_.reset();
}

void SnapshotWriter::Pin(int slot) {
  seg_->slot(slot)->pin_pid.store(static_cast<uint32_t>(::getpid()), std::memory_order_release);
}

void SnapshotWriter::Unpin(int slot) {
  // Only our own pin: the agent may hold the slot under its pid by now.
  uint32_t me = static_cast<uint32_t>(::getpid());
  if (seg_) seg_->slot(slot)->pin_pid.compare_exchange_strong(me, 0);
  std::lock_guard<std::mutex> l(slot_mu_);
  slot_cv_.notify_all();
}

int SnapshotWriter::ChooseSlot(std::unique_lock<std::mutex>& l) {
  const auto start = std::chrono::steady_clock::now();
  auto last_log = start - std::chrono::hours(1);
  for (;;) {
    SlotView newest;
    int newest_index = seg_->Newest(&newest) ? newest.index : -1;
    int best = -1;
    uint64_t best_gen = UINT64_MAX;
    for (int i = 0; i < seg_->num_slots(); ++i) {
      if (i == newest_index || PinHeld(seg_->slot(i))) continue;
      SlotView v;
      uint64_t gen = seg_->ReadSlot(i, &v) ? v.generation : 0;
      if (gen < best_gen) { best = i; best_gen = gen; }
    }
    if (best >= 0) return best;
    // Every other slot is being persisted: the disk is slower than the save rate.
    auto now = std::chrono::steady_clock::now();
    if (now - start > o_.slot_timeout) return -1;
    if (now - last_log > std::chrono::seconds(10)) {
      FCK_LOG(kWarn, "all ", seg_->num_slots(), " snapshot slots are busy (persisting is slower than saving); "
              "waiting. More slots (num_slots) or a larger persist_every avoid this wait");
      last_log = now;
    }
    slot_cv_.wait_for(l, std::chrono::milliseconds(20));
  }
}

absl::StatusOr<SnapshotWriter::Written> SnapshotWriter::Write(int64_t step, const std::vector<TensorRef>& tensors,
                                                              const std::vector<BlobRef>& blobs,
                                                              const std::vector<DeviceBackend*>& backend_of,
                                                              const SavePlan& plan) {
  Written w;
  {
    std::unique_lock<std::mutex> l(slot_mu_);
    w.slot = ChooseSlot(l);
    if (w.slot < 0)
      return absl::DeadlineExceededError(absl::StrCat(
          "no free snapshot slot in ", o_.shm_path, " for ",
          std::chrono::duration_cast<std::chrono::seconds>(o_.slot_timeout).count(),
          " s: every other slot is still being persisted (is the disk or another rank stuck?)"));
    Pin(w.slot);
  }
  const int slot = w.slot;
  if (!seg_->slot_allocated(slot)) {
    // Still being allocated in the background (or a segment reopened after a crash).
    JoinReserve();
    absl::Status st = seg_->AllocateSlot(slot, o_.pool->threads());
    if (!st.ok()) {
      Unpin(slot);
      return st;
    }
  }
  uint8_t* data = seg_->slot_data(slot);
  seg_->BeginWrite(slot);
  CrashPoint("save: slot open");

  // Device copies first (they run on the device's copy engine meanwhile),
  // one batch per (backend, device).
  std::map<std::pair<DeviceBackend*, int>, std::vector<DeviceBackend::Copy>> by_device;
  std::map<std::pair<DeviceBackend*, int>, void*> stream_of;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!backend_of[i]) continue;
    const auto& t = tensors[i];
    by_device[{backend_of[i], t.device}].push_back({data + plan.offsets[i], t.data, t.nbytes});
    stream_of[{backend_of[i], t.device}] = t.cuda_stream;
  }
  for (auto& [where, copies] : by_device) {
    auto ev = where.first->CopyToHostAsync(where.second, stream_of[where], copies);
    if (!ev.ok()) {
      for (auto [b, e] : w.device_events) b->Wait(e).IgnoreError();
      Unpin(slot);
      return ev.status();
    }
    w.device_events.emplace_back(where.first, *ev);
  }
  // Host tensors: parallel copy with crc as the bytes pass.
  std::vector<CopyTask> tasks(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (backend_of[i] || !t.storage_key.empty()) continue;
    tasks[i] = {data + plan.offsets[i], t.data, t.nbytes};
  }
  std::vector<uint32_t> crcs;
  o_.pool->CopyAndChecksum(tasks, &crcs);

  const uint64_t gen = ++generation_;
  SharedSegment* s = seg_.get();
  CopyPool* pool = o_.pool;
  const bool any_device = std::any_of(backend_of.begin(), backend_of.end(), [](DeviceBackend* b) { return b; });
  if (!any_device) {
    // Every crc is known: the manifest is built now, from the caller's
    // vectors (no copy of them for later, which costs ~1 us a tensor).
    std::string bytes = FrameRecord(RecordKind::kManifest, BuildManifest(step, o_.rank, o_.world_size, kSlotAlignment,
                                                                         tensors, blobs, plan, crcs));
    w.finish = [s, slot, data, step, gen, data_bytes = plan.data_bytes,
                bytes = std::move(bytes)]() -> absl::Status {
      if (data_bytes + bytes.size() > s->slot_capacity())
        return absl::InternalError(absl::StrCat("manifest of ", bytes.size(), " bytes exceeds the slot"));
      std::memcpy(data + data_bytes, bytes.data(), bytes.size());
      CrashPoint("save: before publish");
      s->Publish(slot, step, gen, data_bytes, data_bytes, bytes.size(), Crc32c(bytes.data(), bytes.size()));
      return absl::OkStatus();
    };
    return w;
  }
  // Checksums device bytes, writes the manifest, publishes the slot.
  w.finish = [s, pool, slot, data, step, gen, rank = o_.rank, world = o_.world_size, tensors, blobs, plan, crcs,
              backend_of]() mutable -> absl::Status {
    std::vector<CopyTask> dev_tasks;
    std::vector<size_t> dev_index;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!backend_of[i]) continue;
      dev_tasks.push_back({nullptr, data + plan.offsets[i], tensors[i].nbytes});
      dev_index.push_back(i);
    }
    if (!dev_tasks.empty()) {
      std::vector<uint32_t> dev_crcs;
      pool->CopyAndChecksum(dev_tasks, &dev_crcs);
      for (size_t k = 0; k < dev_index.size(); ++k) crcs[dev_index[k]] = dev_crcs[k];
    }
    pb::Manifest m = BuildManifest(step, rank, world, kSlotAlignment, tensors, blobs, plan, crcs);
    std::string bytes = FrameRecord(RecordKind::kManifest, m);
    if (plan.data_bytes + bytes.size() > s->slot_capacity())
      return absl::InternalError(absl::StrCat("manifest of ", bytes.size(), " bytes exceeds the slot"));
    std::memcpy(data + plan.data_bytes, bytes.data(), bytes.size());
    CrashPoint("save: before publish");
    s->Publish(slot, step, gen, plan.data_bytes, plan.data_bytes, bytes.size(), Crc32c(bytes.data(), bytes.size()));
    return absl::OkStatus();
  };
  return w;
}

}  // namespace flashckpt
