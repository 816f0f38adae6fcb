// Checkpointer: the facade over its roles. The save path (slot choice, copy,
// publish) and the segment's lifecycle live here; persisting is the
// Persister's (storage/persister.h), loading the Loader's (api/loader.h).
#include "flashckpt/checkpointer.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "api/agent_client.h"
#include "api/device_backend.h"
#include "api/save_state.h"
#include "api/loader.h"
#include "api/public_commit_barrier.h"
#include "common/crash_point.h"
#include "common/crc32c.h"
#include "common/log.h"
#include "common/parallel_copy.h"
#include "common/status.h"
#include "shm/segment.h"
#include "snapshot/snapshot.h"
#include "storage/commit.h"
#include "common/process_lock.h"
#include "storage/layout.h"
#include "storage/persister.h"
#include "storage/uring_io.h"

namespace flashckpt {
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------

namespace {

std::string AbsolutePath(const std::string& p) {
  std::error_code ec;
  fs::path a = fs::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

std::string SegmentName(const std::string& root, const std::string& run_id, int rank) {
  return absl::StrFormat("flashckpt-%s-%08x-r%d", run_id, Crc32c(root.data(), root.size()), rank);
}

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

// The device type whose backend copies `t`; "" for host memory (and for
// views and empty tensors, which copy nothing).
std::string DeviceTypeOf(const TensorRef& t) {
  if (!t.storage_key.empty() || t.nbytes == 0) return "";
  if (t.device_type.empty()) return t.device >= 0 ? "cuda" : "";
  return t.device_type == "cpu" ? "" : t.device_type;
}

std::mutex g_open_mu;
std::set<std::string> g_open;  // "<root>#<rank>" open in this process

}  // namespace

// A snapshot whose bytes are in its slot (or on their way from a device):
// finished and published in save order, then handed to the persister.
struct PendingSnapshot {
  int slot = -1;
  int64_t step = -1;
  bool persist = true;
  std::shared_ptr<SaveState> state;
  // Device copies still in flight (non-blocking save): waited for, checksummed
  // and published by the finisher thread. Empty when already published.
  std::vector<std::pair<DeviceBackend*, void*>> device_events;
  std::function<absl::Status()> finish_snapshot;
};

class Checkpointer::Impl {
 public:
  explicit Impl(CheckpointerOptions o);
  ~Impl();

  SaveHandle Save(int64_t step, const std::vector<TensorRef>& tensors, const std::vector<BlobRef>& blobs,
                  bool blocking);
  std::unique_ptr<LoadedSnapshot> Load(const LoadOptions& lo);
  int64_t LoadInto(const std::map<std::string, MutableTensorRef>& dest, std::map<std::string, std::string>* blobs, Source* source,
                   const LoadOptions& lo);
  StepDescription Describe(const LoadOptions& lo);
  std::vector<StepInfo> Steps() { return loader_->Steps(Segment()); }
  void WaitAll(std::chrono::milliseconds timeout);
  // Persists and closes; the persist failures nobody was told of yet.
  absl::Status Close();
  // A persist failure no wait_durable() raised yet, cleared by taking it
  // (OK when none): save(), wait_all() and close() raise it, so no failed
  // persist goes unnoticed by the training script.
  absl::Status TakePersistFailure();
  uint64_t persist_failures() {
    std::lock_guard<std::mutex> l(fail_mu_);
    return persist_failures_;
  }
  std::optional<int64_t> TakeRestoreStep();
  // The segment, once a background creation of it (reserve_bytes) is done;
  // null when there is none. Every reader of `seg` outside the save path.
  SharedSegment* Segment() {
    JoinReserveForLoad();
    return seg.get();
  }
  // After the first load, of `step` from memory: if the step was agreed
  // (given, or the restore step) and an earlier process left it in memory
  // only, it is persisted now, as every other rank restoring the same step
  // does, so that it gets its COMMIT. Only the first load looks.
  void Restored(int64_t step, bool agreed);

  CheckpointerOptions opt;
  std::string root;
  std::string shm_path;
  std::unique_ptr<SharedSegment> seg;
  bool closed = false;

 private:
  std::optional<int64_t> restore_pending_;  // opt.restore_step until a load takes it
  // Steps an earlier process left in memory, not durable (until the first load).
  std::set<int64_t> inherited_;
  absl::Status EnsureSegment(uint64_t needed);
  // all_slots: allocate every slot now (reserve); else only slot 0, the
  // others on the reserve thread, so a first save pays for one slot only.
  absl::Status CreateSegment(uint64_t capacity, bool all_slots = true);
  int ChooseSlot(std::unique_lock<std::mutex>& l);
  // Finishes non-blocking snapshots in save order (device copies waited for,
  // checksummed, published), then hands them to the persister.
  void FinisherLoop();
  // A published snapshot: to the persister, or (not persisted) done.
  void Submit(PendingSnapshot p);
  // Waits until the finisher and the persister are idle.
  absl::Status WaitIdle(std::chrono::milliseconds timeout);
  void Pin(int slot);
  void Unpin(int slot);
  absl::StatusOr<PersistStats> Persist(int64_t step, int slot);
  absl::Status PersistViaAgent(int64_t step, int slot);
  // The step load() takes when none is given: the newest of memory and storage.
  int64_t NewestStep(bool prefer_memory) { return ValueOrThrow(loader_->NewestStep(seg.get(), prefer_memory)); }
 private:
  void JoinReserve();
  // Loads read only published slots; they wait for the reserve thread only
  // when it is still creating the segment itself.
  void JoinReserveForLoad() {
    if (reserve_creates_segment_) JoinReserve();
  }
  void PrefaultAfterLoad() {
    if (!prefault_after_load_ || !seg) return;
    prefault_after_load_ = false;
    JoinReserve();
    SharedSegment* s = seg.get();
    const int threads = pool_.threads();
    reserve_thread_ = std::thread([this, s, threads] { reserve_status_ = s->AllocateAll(threads); });
  }
  bool reserve_creates_segment_ = false;
  bool prefault_after_load_ = false;
  void Init();  // the part of construction that may throw after the locks are taken

  CopyPool pool_;
  std::unique_ptr<Loader> loader_;  // the loader role (memory and storage)
  std::shared_ptr<core::CommitBarrier> barrier_;
  std::unique_ptr<BulkIo> persist_io_;
  int dir_lock_fd_ = -1;
  std::thread dir_lock_taker_;  // takes the lock from a predecessor on its way out
  std::unique_ptr<AgentClient> agent_;  // flashrun's checkpoint service, when it persists
  bool agent_mode_ = false;  // the agent persists (even while reconnecting)
  std::string open_key_;
  uint64_t generation_ = 0;
  uint64_t saves_ = 0;
  std::thread reserve_thread_;
  absl::Status reserve_status_;

  // Slot choice waits on this for a pin to go (pins live in the segment).
  std::mutex slot_mu_;
  std::condition_variable slot_cv_;
  std::mutex fin_mu_;
  std::condition_variable fin_cv_;
  std::deque<PendingSnapshot> finishing_;
  bool fin_busy_ = false, fin_stop_ = false;
  std::thread finisher_;
  std::unique_ptr<Persister> persister_;
  std::mutex fail_mu_;
  std::vector<std::pair<std::shared_ptr<SaveState>, absl::Status>> unreported_;
  uint64_t persist_failures_ = 0;
  // Backends the segment is registered with (page-locked for their DMA).
  std::set<DeviceBackend*> registered_;
  void UnregisterDevices();
  // Page-locks the segment for backend b, once per segment.
  absl::Status RegisterSegment(DeviceBackend* b);
};

Checkpointer::Impl::Impl(CheckpointerOptions o) : opt(std::move(o)), pool_(o.copy_threads) {
  if (opt.directory.empty()) throw Error(ErrorCode::kInvalidArgument, "CheckpointerOptions.directory is empty");
  if (opt.world_size < 1 || opt.rank < 0 || opt.rank >= opt.world_size)
    throw Error(ErrorCode::kInvalidArgument,
                absl::StrCat("rank ", opt.rank, " is not within world size ", opt.world_size));
  if (opt.num_slots == 0) opt.num_slots = opt.use_agent && opt.persist && !opt.agent_socket.empty() ? 3 : 2;
  if (opt.num_slots < 2 || opt.num_slots > 64)
    throw Error(ErrorCode::kInvalidArgument, absl::StrCat("num_slots must be within 2..64, got ", opt.num_slots));
  if (opt.persist_every < 1) throw Error(ErrorCode::kInvalidArgument, "persist_every must be at least 1");
  if (opt.wait_timeout.count() <= 0) opt.wait_timeout = 2 * opt.commit_timeout + std::chrono::minutes(5);
  if (opt.run_id.empty()) opt.run_id = "local";
  for (char& c : opt.run_id)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  restore_pending_ = opt.restore_step;
  root = AbsolutePath(opt.directory);
  ThrowIfError(PrepareDirectory(root));

  open_key_ = absl::StrCat(root, "#", opt.rank);
  {
    std::lock_guard<std::mutex> l(g_open_mu);
    if (!g_open.insert(open_key_).second)
      throw Error(ErrorCode::kFailedPrecondition,
                  absl::StrCat("checkpoint directory ", root, " is already open by another Checkpointer for rank ",
                               opt.rank, " in this process; close() it first"));
  }
  std::string lock_path = absl::StrCat(root, "/.rank-", opt.rank, ".lock");
  dir_lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  // The lock file names its holder, so that a predecessor still on its way out
  // (a killed worker freeing its memory) is taken over, not refused as a rival.
  pid_t holder = 0;
  absl::StatusOr<std::thread> locked =
      dir_lock_fd_ < 0 ? absl::StatusOr<std::thread>(ErrnoStatus("open", lock_path, errno))
                       : LockOrTakeOverFromExitingOwner(dir_lock_fd_, [this] {
                           char buf[32] = {};
                           ssize_t n = ::pread(dir_lock_fd_, buf, sizeof(buf) - 1, 0);
                           return n > 0 ? static_cast<pid_t>(std::atoi(buf)) : 0;
                         }, lock_path, &holder);
  if (!locked.ok()) {
    { std::lock_guard<std::mutex> l(g_open_mu); g_open.erase(open_key_); }
    if (dir_lock_fd_ >= 0) ::close(dir_lock_fd_);
    if (locked.status().code() == absl::StatusCode::kFailedPrecondition)
      throw Error(ErrorCode::kFailedPrecondition,
                  absl::StrCat("checkpoint directory ", root, " is in use by another process for rank ", opt.rank,
                               holder > 0 ? absl::StrCat(" (pid ", holder, ")") : std::string(), " (lock ", lock_path,
                               ")"));
    ThrowStatus(Annotate(locked.status(), "lock"));
  }
  dir_lock_taker_ = std::move(*locked);
  {
    std::string me = absl::StrCat(::getpid(), "\n");
    if (::ftruncate(dir_lock_fd_, 0) != 0 || ::pwrite(dir_lock_fd_, me.data(), me.size(), 0) < 0)
      FCK_LOG(kDebug, "cannot record the holder in ", lock_path);
  }
  try {
    Init();
  } catch (...) {
    Close().IgnoreError();  // releases the directory lock and the in-process registration
    throw;
  }
}

void Checkpointer::Impl::Init() {
  if (opt.rank == 0) CleanLeftovers(root);

  barrier_ = opt.commit_barrier ? std::shared_ptr<core::CommitBarrier>(std::make_shared<PublicCommitBarrier>(opt.commit_barrier, root))
                               : std::make_shared<FileCommitBarrier>(root);
  shm_path = absl::StrCat(opt.shm_dir, "/", SegmentName(root, opt.run_id, opt.rank));

  if (opt.reuse_memory && ::access(shm_path.c_str(), F_OK) == 0) {
    auto s = SharedSegment::Open(shm_path);
    if (s.ok() && static_cast<int>((*s)->num_slots()) == opt.num_slots && (*s)->LockForWriting().ok()) {
      seg = std::move(*s);
      for (int i = 0; i < seg->num_slots(); ++i) {
        SlotView v;
        if (seg->ReadSlot(i, &v)) generation_ = std::max(generation_, v.generation);
      }
      SlotView newest;
      if (seg->Newest(&newest))
        FCK_LOG(kInfo, "found shared-memory snapshot of step ", newest.step, " in ", shm_path,
                newest.durable ? " (persisted)" : " (not yet persisted)");
    } else if (!s.ok()) {
      FCK_LOG(kWarn, "ignoring shared-memory segment ", shm_path, ": ", s.status().message());
    }
  }
  if (opt.reserve_bytes > 0 && (!seg || seg->slot_capacity() < opt.reserve_bytes)) {
    if (opt.reserve_in_background) {
      reserve_creates_segment_ = true;
      reserve_thread_ = std::thread([this] { reserve_status_ = CreateSegment(opt.reserve_bytes); });
    } else {
      ThrowIfError(CreateSegment(opt.reserve_bytes));
    }
  } else if (seg && opt.reserve_in_background) {
    // A segment left by an earlier process: its slots are mapped in the
    // background only after the restore (load) is done, so that mapping them
    // does not compete with the load on the restart's critical path.
    prefault_after_load_ = true;
  }

  IoOptions io;
  io.use_io_uring = opt.use_io_uring;
  io.use_direct_io = opt.use_direct_io;
  io.chunk_bytes = opt.io_chunk_bytes;
  io.queue_depth = opt.io_queue_depth;
  persist_io_ = std::make_unique<BulkIo>(io);
  loader_ = std::make_unique<Loader>(LoaderContext{root, shm_path, opt.rank, opt.world_size, io, &pool_,
                                                   [this](DeviceBackend* b) { return RegisterSegment(b); }});

  if (!opt.agent_socket.empty() && opt.use_agent && opt.persist) {
    agent_ = std::make_unique<AgentClient>(AgentHello{opt.agent_socket, opt.rank, opt.world_size, root, shm_path,
                                                      opt.keep_last, opt.commit_timeout});
    absl::Status c = agent_->Connect();
    if (!c.ok())
      throw Error(ErrorCode::kUnavailable,
                  absl::StrCat(c.message(), ": the flashrun agent is not reachable; "
                               "unset FLASHCKPT_AGENT_SOCKET (or pass use_agent=false) to persist in this process"));
    agent_mode_ = true;
    FCK_LOG(kDebug, "snapshots of rank ", opt.rank, " are persisted by the flashrun agent at ", opt.agent_socket);
  }
  // A standalone job restarted (by torchrun, say) may save a step its earlier
  // incarnation left uncommitted: that one's record must not be taken for
  // this one's. Under flashrun the agent does this at the restart (and may be
  // persisting the restore step for this rank right now); a Checkpointer that
  // does not persist touches nothing.
  if (opt.persist && !agent_mode_) ForgetUncommittedRecords(root, opt.rank);
  Persister::Options po;
  po.name = absl::StrCat("rank ", opt.rank);
  po.persist = [this](int64_t step, int slot, const std::function<bool()>&) { return Persist(step, slot); };
  if (opt.world_size > 1)
    po.report_superseded = [this](int64_t step, int64_t by) {
      barrier_->ReportFailure(step, opt.rank, absl::StrCat("superseded by step ", by, " before it was persisted"));
    };
  if (opt.rank == 0 && !agent_mode_)
    po.after_durable = [this](int64_t) { ApplyRetention(root, opt.keep_last); };
  persister_ = std::make_unique<Persister>(std::move(po));
  finisher_ = std::thread([this] { FinisherLoop(); });

  // Snapshots a crashed process left in memory, newer than storage: persisted
  // (under flashrun the agent already did). One rank alone persists its
  // newest at once; in a larger world every rank must persist the same step,
  // so it waits for the step the job agrees to restore (the first load with
  // a step, see Restored).
  // (A segment being created in the background holds nothing yet.)
  if (!reserve_creates_segment_ && seg && opt.persist && !agent_mode_) {
    auto committed = LatestCommitted(root);
    for (int i = 0; i < seg->num_slots(); ++i) {
      SlotView v;
      if (seg->ReadSlot(i, &v) && !v.durable && (!committed || v.step > *committed)) inherited_.insert(v.step);
    }
    SlotView newest;
    if (opt.world_size == 1 && seg->Newest(&newest) && inherited_.count(newest.step)) Restored(newest.step, true);
  }
}

void Checkpointer::Impl::Restored(int64_t step, bool agreed) {
  const bool inherited = agreed && inherited_.count(step) > 0;
  inherited_.clear();  // once: the first load decides
  SlotView v;
  if (!inherited || !seg || !seg->Newest(&v, step) || v.durable || ReadCommit(root, step).ok()) return;
  FCK_LOG(kInfo, "persisting step ", step, " left in shared memory by an earlier process");
  auto st = std::make_shared<SaveState>(step, opt.wait_timeout);
  st->SnapshotDone(absl::OkStatus());
  Pin(v.index);
  Submit(PendingSnapshot{v.index, step, true, st, {}, {}});
}

Checkpointer::Impl::~Impl() {
  absl::Status st = Close();
  if (!st.ok()) FCK_LOG(kError, "checkpointer on ", root, " closed with a failed persist: ", st.message());
}

void Checkpointer::Impl::JoinReserve() {
  if (reserve_thread_.joinable()) reserve_thread_.join();
}

absl::Status Checkpointer::Impl::CreateSegment(uint64_t capacity, bool all_slots) {
  // Room to grow a little without re-creating the segment.
  capacity = AlignUp(capacity + capacity / 64 + (1u << 20), 2u << 20);
  // Growing: a snapshot the old slots hold in memory only (not durable) is
  // kept until the new slots exist, so a save that cannot grow them (too
  // little shared memory) leaves it loadable. Durable ones make room first.
  int64_t only_in_memory = -1;
  if (seg) {
    for (int i = 0; i < seg->num_slots(); ++i) {
      SlotView v;
      if (seg->ReadSlot(i, &v) && !v.durable) only_in_memory = std::max(only_in_memory, v.step);
    }
    if (only_in_memory < 0) {
      FCK_LOG(kInfo, "growing shared-memory slots of ", shm_path, " from ", seg->slot_capacity() >> 20, " MiB to ",
              capacity >> 20, " MiB; the older in-memory snapshots are on storage");
      UnregisterDevices();
      seg.reset();
      SharedSegment::Unlink(shm_path).IgnoreError();
    }
  }
  const bool beside = seg != nullptr;
  auto t0 = std::chrono::steady_clock::now();
  auto created = SharedSegment::Create(shm_path, opt.num_slots, capacity, opt.rank, root, /*staged=*/beside);
  if (!created.ok() && beside)
    return Annotate(created.status(), absl::StrCat("growing the slots to ", HumanBytes(capacity), " each while step ",
                                                   only_in_memory, ", in memory only (persist=False or not yet "
                                                   "durable), is kept: nothing was dropped"));
  FCK_RETURN_IF_ERROR(created.status());
  std::unique_ptr<SharedSegment> s = std::move(*created);
  FCK_RETURN_IF_ERROR(s->LockForWriting());
  const int threads = pool_.threads();
  absl::Status allocated = all_slots ? s->AllocateAll(threads) : s->AllocateSlot(0, threads);
  if (!allocated.ok() && beside)
    return Annotate(allocated, absl::StrCat("growing the slots while step ", only_in_memory,
                                            " (in memory only) is kept: nothing was dropped"));
  FCK_RETURN_IF_ERROR(allocated);
  if (beside) {
    FCK_LOG(kInfo, "grew shared-memory slots of ", shm_path, " from ", seg->slot_capacity() >> 20, " MiB to ",
            capacity >> 20, " MiB; older in-memory snapshots (newest: step ", only_in_memory, ") are dropped");
    UnregisterDevices();
    seg.reset();
  }
  FCK_RETURN_IF_ERROR(s->Install());
  FCK_LOG(kDebug, "allocated ", all_slots ? opt.num_slots : 1, " slots of ", capacity >> 20, " MiB in ", shm_path,
          " in ", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), " s");
  seg = std::move(s);
  if (!all_slots) {
    SharedSegment* raw = seg.get();
    reserve_thread_ = std::thread([this, raw, threads] { reserve_status_ = raw->AllocateAll(threads); });
  }
  return absl::OkStatus();
}

absl::Status Checkpointer::Impl::EnsureSegment(uint64_t needed) {
  JoinReserve();
  if (seg && !seg->StillLinked()) {
    // Someone removed our segment: its snapshots are invisible to the agent
    // and to a restarted worker. A new one takes the next save.
    FCK_LOG(kError, "shared-memory segment ", shm_path, " was removed by another process while in use (systemd-logind "
            "does this with RemoveIPC=yes when the user's last session ends: set RemoveIPC=no in "
            "/etc/systemd/logind.conf, or run as a system user); its in-memory snapshots are lost. Creating it again");
    UnregisterDevices();
    seg.reset();
  }
  if (!reserve_status_.ok()) {
    absl::Status s = reserve_status_;
    reserve_status_ = absl::OkStatus();
    if (!seg) return s;
  }
  if (seg && seg->slot_capacity() >= needed) return absl::OkStatus();
  // Growing replaces the segment: wait until nothing reads the old one.
  FCK_RETURN_IF_ERROR(Annotate(WaitIdle(opt.wait_timeout),
                               absl::StrCat("growing the shared-memory slots of ", shm_path, " to ", needed >> 20,
                                            " MiB must wait for the pending persists")));
  return CreateSegment(needed, /*all_slots=*/false);
}

int Checkpointer::Impl::ChooseSlot(std::unique_lock<std::mutex>& l) {
  const auto start = std::chrono::steady_clock::now();
  auto last_log = start - std::chrono::hours(1);
  for (;;) {
    SlotView newest;
    int newest_index = seg->Newest(&newest) ? newest.index : -1;
    int best = -1;
    uint64_t best_gen = UINT64_MAX;
    for (int i = 0; i < seg->num_slots(); ++i) {
      if (i == newest_index || PinHeld(seg->slot(i))) continue;
      SlotView v;
      uint64_t gen = seg->ReadSlot(i, &v) ? v.generation : 0;
      if (gen < best_gen) { best = i; best_gen = gen; }
    }
    if (best >= 0) return best;
    // Every other slot is being persisted: the disk is slower than the save rate.
    auto now = std::chrono::steady_clock::now();
    if (now - start > opt.commit_timeout) return -1;
    if (now - last_log > std::chrono::seconds(10)) {
      FCK_LOG(kWarn, "all ", seg->num_slots(), " snapshot slots are busy (persisting is slower than saving); "
              "waiting. More slots (num_slots) or a larger persist_every avoid this wait");
      last_log = now;
    }
    slot_cv_.wait_for(l, std::chrono::milliseconds(20));
  }
}

SaveHandle Checkpointer::Impl::Save(int64_t step, const std::vector<TensorRef>& tensors,
                                    const std::vector<BlobRef>& blobs, bool blocking) {
  if (closed) throw Error(ErrorCode::kFailedPrecondition, "save() on a closed Checkpointer");
  if (step < 0) throw Error(ErrorCode::kInvalidArgument, absl::StrCat("step must be >= 0, got ", step));
  // An earlier persist that failed unnoticed fails this save, before it
  // snapshots anything (a retry of the save goes ahead).
  ThrowIfError(Annotate(TakePersistFailure(), absl::StrCat("save of step ", step, " not taken")));
  // Every device tensor's backend first: a type with none fails the save
  // here, naming the key, before anything is allocated.
  std::vector<DeviceBackend*> backend_of(tensors.size(), nullptr);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string type = DeviceTypeOf(tensors[i]);
    if (type.empty()) continue;
    absl::StatusOr<DeviceBackend*> b = DeviceBackend::For(type);
    if (!b.ok()) ThrowStatus(Annotate(b.status(), absl::StrCat("save of step ", step, ": tensor '", tensors[i].key, "'")));
    backend_of[i] = *b;
  }
  SavePlan plan = ValueOrThrow(PlanSave(tensors, blobs, kSlotAlignment));
  ThrowIfError(Annotate(EnsureSegment(plan.slot_bytes_needed()), absl::StrCat("save of step ", step)));
  for (DeviceBackend* b : backend_of)
    if (b) ThrowIfError(Annotate(RegisterSegment(b), absl::StrCat("save of step ", step)));



  int slot;
  {
    std::unique_lock<std::mutex> l(slot_mu_);
    slot = ChooseSlot(l);
    if (slot < 0)
      throw Error(ErrorCode::kDeadlineExceeded,
                  absl::StrCat("save of step ", step, ": no free snapshot slot in ", shm_path, " for ",
                               std::chrono::duration_cast<std::chrono::seconds>(opt.commit_timeout).count(),
                               " s: every other slot is still being persisted (is the disk or another rank stuck?)"));
    Pin(slot);
  }
  if (!seg->slot_allocated(slot)) {
    // Still being allocated in the background (or a segment reopened after a crash).
    JoinReserve();
    absl::Status st = seg->AllocateSlot(slot, pool_.threads());
    if (!st.ok()) {
      Unpin(slot);
      ThrowStatus(Annotate(st, absl::StrCat("save of step ", step)));
    }
  }
  auto state = std::make_shared<SaveState>(step, opt.wait_timeout);
  uint8_t* data = seg->slot_data(slot);
  seg->BeginWrite(slot);
  CrashPoint("save: slot open");

  // Device copies first (they run on the device's copy engine meanwhile),
  // one batch per (backend, device).
  std::vector<std::pair<DeviceBackend*, void*>> events;
  std::map<std::pair<DeviceBackend*, int>, std::vector<DeviceBackend::Copy>> by_device;
  std::map<std::pair<DeviceBackend*, int>, void*> stream_of;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!backend_of[i]) continue;
    const auto& t = tensors[i];
    by_device[{backend_of[i], t.device}].push_back({data + plan.offsets[i], t.data, t.nbytes});
    stream_of[{backend_of[i], t.device}] = t.cuda_stream;
  }
  auto fail = [&](const absl::Status& s) {
    Unpin(slot);
    ThrowStatus(Annotate(s, absl::StrCat("save of step ", step)));
  };
  for (auto& [where, copies] : by_device) {
    auto ev = where.first->CopyToHostAsync(where.second, stream_of[where], copies);
    if (!ev.ok()) {
      for (auto [b, e] : events) b->Wait(e).IgnoreError();
      fail(ev.status());
    }
    events.emplace_back(where.first, *ev);
  }
  // Host tensors: parallel copy with crc as the bytes pass.
  std::vector<CopyTask> tasks(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (backend_of[i] || !t.storage_key.empty()) continue;
    tasks[i] = {data + plan.offsets[i], t.data, t.nbytes};
  }
  std::vector<uint32_t> crcs;
  pool_.CopyAndChecksum(tasks, &crcs);

  const uint64_t gen = ++generation_;
  const int rank = opt.rank, world = opt.world_size;
  SharedSegment* s = seg.get();
  // Checksums device bytes, writes the manifest, publishes the slot.
  auto finish = [s, slot, data, step, gen, rank, world, tensors, blobs, plan, crcs, backend_of,
                 this]() mutable -> absl::Status {
    std::vector<CopyTask> dev_tasks;
    std::vector<size_t> dev_index;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!backend_of[i]) continue;
      dev_tasks.push_back({nullptr, data + plan.offsets[i], tensors[i].nbytes});
      dev_index.push_back(i);
    }
    if (!dev_tasks.empty()) {
      std::vector<uint32_t> dev_crcs;
      pool_.CopyAndChecksum(dev_tasks, &dev_crcs);
      for (size_t k = 0; k < dev_index.size(); ++k) crcs[dev_index[k]] = dev_crcs[k];
    }
    pb::Manifest m = BuildManifest(step, rank, world, kSlotAlignment, tensors, blobs, plan, crcs);
    std::string bytes = FrameRecord(RecordKind::kManifest, m);
    if (plan.data_bytes + bytes.size() > s->slot_capacity())
      return absl::InternalError(absl::StrCat("manifest of ", bytes.size(), " bytes exceeds the slot"));
    std::memcpy(data + plan.data_bytes, bytes.data(), bytes.size());
    CrashPoint("save: before publish");
    s->Publish(slot, step, gen, plan.data_bytes, plan.data_bytes, bytes.size(),
               Crc32c(bytes.data(), bytes.size()));
    return absl::OkStatus();
  };

  const bool persist = opt.persist && (saves_++ % static_cast<uint64_t>(opt.persist_every) == 0);
  PendingSnapshot pending{slot, step, persist, state, events, nullptr};
  if (events.empty() || blocking) {
    absl::Status waited;
    for (auto [b, e] : events) {
      absl::Status st = b->Wait(e);
      if (waited.ok()) waited = st;
    }
    if (!waited.ok()) fail(waited);
    pending.device_events.clear();
    absl::Status st = finish();
    if (!st.ok()) fail(st);
    state->SnapshotDone(absl::OkStatus());
  } else {
    pending.finish_snapshot = std::move(finish);
  }
  {
    // Published snapshots go to the persister in save order: behind any
    // non-blocking one still finishing.
    std::lock_guard<std::mutex> l(fin_mu_);
    if (pending.finish_snapshot || fin_busy_ || !finishing_.empty()) {
      finishing_.push_back(std::move(pending));
      fin_cv_.notify_all();
      return SaveHandle(state);
    }
  }
  Submit(std::move(pending));
  return SaveHandle(state);
}

absl::Status Checkpointer::Impl::RegisterSegment(DeviceBackend* b) {
  if (!seg) return absl::FailedPreconditionError("no shared-memory segment to register");
  if (!registered_.insert(b).second) return absl::OkStatus();
  absl::Status r = b->RegisterHost(seg->header(), seg->mapped_bytes());
  if (!r.ok()) {
    registered_.erase(b);
    return Annotate(r, absl::StrCat("registering ", shm_path, " with the ", b->device_type(), " backend"));
  }
  return absl::OkStatus();
}

void Checkpointer::Impl::UnregisterDevices() {
  for (DeviceBackend* b : registered_) b->UnregisterHost(seg->header()).IgnoreError();
  registered_.clear();
}

void Checkpointer::Impl::Pin(int slot) {
  seg->slot(slot)->pin_pid.store(static_cast<uint32_t>(::getpid()), std::memory_order_release);
}

void Checkpointer::Impl::Unpin(int slot) {
  // Only our own pin: the agent may hold the slot under its pid by now.
  uint32_t me = static_cast<uint32_t>(::getpid());
  if (seg) seg->slot(slot)->pin_pid.compare_exchange_strong(me, 0);
  std::lock_guard<std::mutex> l(slot_mu_);
  slot_cv_.notify_all();
}

void Checkpointer::Impl::Submit(PendingSnapshot p) {
  if (!p.persist) {
    // Kept in memory only.
    p.state->DurableDone(absl::OkStatus(), false);
    Unpin(p.slot);
    return;
  }
  const int slot = p.slot;
  std::shared_ptr<SaveState> state = p.state;
  persister_->Enqueue(p.step, slot, [this, slot, state](const PersistOutcome& o) {
    if (o.status.code() == absl::StatusCode::kCancelled) {
      state->DurableDone(absl::OkStatus(), false);  // superseded by a newer step
    } else {
      if (!o.durable()) {
        FCK_LOG(kError, "persisting step ", o.step, " failed: ", o.status.message());
        std::lock_guard<std::mutex> l(fail_mu_);
        ++persist_failures_;
        unreported_.emplace_back(state, o.status);
      }
      state->DurableDone(o.status, o.durable());
    }
    Unpin(slot);
  });
}

void Checkpointer::Impl::FinisherLoop() {
  for (;;) {
    PendingSnapshot p;
    {
      std::unique_lock<std::mutex> l(fin_mu_);
      fin_cv_.wait(l, [&] { return fin_stop_ || !finishing_.empty(); });
      if (finishing_.empty()) return;
      p = std::move(finishing_.front());
      finishing_.pop_front();
      fin_busy_ = true;
    }
    absl::Status st;
    for (auto [b, e] : p.device_events) {
      absl::Status w = b->Wait(e);
      if (st.ok()) st = w;
    }
    if (st.ok() && p.finish_snapshot) st = p.finish_snapshot();
    if (p.finish_snapshot) {
      p.state->SnapshotDone(Annotate(st, absl::StrCat("snapshot of step ", p.step)));
      p.finish_snapshot = nullptr;
    }
    if (st.ok()) {
      Submit(std::move(p));
    } else {
      p.state->DurableDone(st, false);
      Unpin(p.slot);
    }
    {
      std::lock_guard<std::mutex> l(fin_mu_);
      fin_busy_ = false;
    }
    fin_cv_.notify_all();
  }
}

absl::Status Checkpointer::Impl::WaitIdle(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  {
    std::unique_lock<std::mutex> l(fin_mu_);
    if (!fin_cv_.wait_until(l, deadline, [&] { return finishing_.empty() && !fin_busy_; }))
      return absl::DeadlineExceededError(absl::StrCat("rank ", opt.rank, ": ", finishing_.size() + (fin_busy_ ? 1 : 0),
                                                      " snapshot(s) still copying from the device after ",
                                                      timeout.count() / 1000.0, " s"));
  }
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return persister_->Drain(std::max(left, std::chrono::milliseconds(0)));
}

absl::Status Checkpointer::Impl::PersistViaAgent(int64_t step, int slot) {
  SlotView v;
  if (!seg->ReadSlot(slot, &v) || v.step != step)
    return absl::InternalError(absl::StrCat("slot ", slot, " no longer holds step ", step));
  return agent_->Persist(step, slot, v.generation);
}

absl::StatusOr<PersistStats> Checkpointer::Impl::Persist(int64_t step, int slot) {
  if (agent_mode_) {
    absl::Status s = PersistViaAgent(step, slot);
    if (!s.ok() && s.code() != absl::StatusCode::kCancelled)
      ReportPersistFailure(root, step, opt.rank, std::string(s.message()));
    if (!s.ok()) return s;
    return PersistStats{};
  }
  PersistContext ctx{root, opt.rank, opt.world_size, opt.keep_last, barrier_.get(), opt.commit_timeout,
                     persist_io_.get(), shm_path, nullptr};
  return PersistSlot(*seg, slot, step, ctx);
}

std::optional<int64_t> Checkpointer::Impl::TakeRestoreStep() {
  std::optional<int64_t> s = restore_pending_;
  restore_pending_.reset();
  return s;
}

std::unique_ptr<LoadedSnapshot> Checkpointer::Impl::Load(const LoadOptions& options) {
  // The step the job agreed on (every rank can get it) applies to the first load only.
  LoadOptions lo = options;
  if (!lo.step) lo.step = TakeRestoreStep();
  JoinReserveForLoad();
  struct After { Impl* i; ~After() { i->PrefaultAfterLoad(); } } after{this};
  const int64_t step = lo.step ? *lo.step : NewestStep(lo.prefer_memory);
  if (lo.prefer_memory) {
    auto r = loader_->FromMemory(seg.get(), step, lo.verify);
    if (r.ok()) {
      FCK_LOG(kInfo, "loaded step ", step, " from shared memory");
      Restored(step, /*agreed=*/lo.step.has_value());
      return std::move(*r);
    }
    if (r.status().code() != absl::StatusCode::kNotFound)
      FCK_LOG(kWarn, "loading step ", step, " from memory failed (", r.status().message(), "); trying storage");
  }
  auto r = loader_->FromStorage(step, lo.verify);
  inherited_.clear();  // committed already, or not restorable from memory
  if (r.ok()) {
    FCK_LOG(kInfo, "loaded step ", step, " from ", root);
    return std::move(*r);
  }
  if (lo.allow_fallback) {
    for (int64_t older : CommittedSteps(root)) {
      if (older >= step) continue;
      FCK_LOG(kWarn, "step ", step, " unusable (", r.status().message(), "); falling back to step ", older);
      auto o = loader_->FromStorage(older, lo.verify);
      if (o.ok()) return std::move(*o);
    }
  }
  ThrowStatus(r.status());
}

void Checkpointer::Impl::WaitAll(std::chrono::milliseconds timeout) {
  ThrowIfError(WaitIdle(timeout));
  ThrowIfError(TakePersistFailure());
}

absl::Status Checkpointer::Impl::TakePersistFailure() {
  std::lock_guard<std::mutex> l(fail_mu_);
  std::vector<std::pair<int64_t, absl::Status>> open;
  for (auto& [state, status] : unreported_)
    if (!state->error_seen()) open.emplace_back(state->step(), status);
  unreported_.clear();
  if (open.empty()) return absl::OkStatus();
  const absl::Status& first = open.front().second;
  std::string steps;
  for (const auto& f : open) absl::StrAppend(&steps, steps.empty() ? "" : ", ", f.first);
  return absl::Status(first.code(),
                      absl::StrCat(open.size() == 1 ? "persisting step " : "persisting steps ", steps,
                                   " failed (not durable; the newest committed step is ",
                                   LatestCommitted(root).value_or(-1), "): ", first.message()));
}

absl::Status Checkpointer::Impl::Close() {
  if (closed) return absl::OkStatus();
  closed = true;
  JoinReserve();
  {
    std::lock_guard<std::mutex> l(fin_mu_);
    fin_stop_ = true;
  }
  fin_cv_.notify_all();
  if (finisher_.joinable()) finisher_.join();
  if (persister_) persister_->Stop(/*abandon=*/false);
  if (!agent_mode_ && opt.persist && opt.world_size == 1) {
    // What failed persists left (step directories with failure markers only).
    // Alone only: another rank may still wait on a marker to give its step up
    // (flashrun removes them at the end of the job).
    std::vector<int64_t> removed = RemoveFailedSteps(root);
    if (!removed.empty())
      FCK_LOG(kInfo, "removed ", removed.size(), " step directories of failed persists from ", root);
  }
  if (seg) {
    UnregisterDevices();
    SlotView v;
    bool newest_durable = !seg->Newest(&v) || v.durable;
    if (!newest_durable) {
      auto committed = LatestCommitted(root);
      newest_durable = committed && *committed >= v.step;
    }
    if (agent_mode_) {
      // Under flashrun the agent keeps the snapshots for the next worker and
      // removes the segment when the job ends.
    } else if (opt.unlink_memory_on_close && newest_durable) {
      SharedSegment::Unlink(shm_path).IgnoreError();
    } else if (!newest_durable) {
      FCK_LOG(kInfo, "keeping ", shm_path, ": its step ", v.step, " is not persisted yet");
    }
    seg.reset();
  }
  if (dir_lock_taker_.joinable()) dir_lock_taker_.join();
  if (dir_lock_fd_ >= 0) { ::close(dir_lock_fd_); dir_lock_fd_ = -1; }
  if (agent_) agent_->Close();
  {
    std::lock_guard<std::mutex> l(g_open_mu);
    g_open.erase(open_key_);
  }
  return TakePersistFailure();
}

// ---------------------------------------------------------------------------

Checkpointer::Checkpointer(CheckpointerOptions options)
    : impl_(std::make_unique<Impl>(options.from_environment ? WithEnvironment(std::move(options)) : std::move(options))) {}

std::optional<int64_t> Checkpointer::take_restore_step() { return impl_->TakeRestoreStep(); }
Checkpointer::~Checkpointer() = default;

SaveHandle Checkpointer::save(int64_t step, const std::vector<TensorRef>& tensors,
                              const std::vector<BlobRef>& blobs, bool blocking) {
  return impl_->Save(step, tensors, blobs, blocking);
}

std::unique_ptr<LoadedSnapshot> Checkpointer::load(const LoadOptions& options) { return impl_->Load(options); }

StepDescription Checkpointer::describe(const LoadOptions& options) { return impl_->Describe(options); }

StepDescription Checkpointer::Impl::Describe(const LoadOptions& lo) {
  JoinReserveForLoad();
  return ValueOrThrow(loader_->Describe(seg.get(), lo.step ? *lo.step : NewestStep(lo.prefer_memory), lo.prefer_memory));
}

int64_t Checkpointer::Impl::LoadInto(const std::map<std::string, MutableTensorRef>& dest,
                                     std::map<std::string, std::string>* blobs, Source* source,
                                     const LoadOptions& options) {
  Source ignored;
  if (!source) source = &ignored;
  ThrowIfError(loader_->CheckDevices(dest));
  LoadOptions lo = options;
  if (!lo.step) lo.step = TakeRestoreStep();
  if (lo.prefer_memory) {
    JoinReserveForLoad();
    absl::StatusOr<int64_t> r;
    {
      struct After { Impl* i; ~After() { i->PrefaultAfterLoad(); } } after{this};
      r = loader_->IntoFromMemory(seg.get(), dest, blobs, lo);
    }
    if (r.ok()) {
      Restored(*r, /*agreed=*/lo.step.has_value());
      *source = Source::kMemory;
      return *r;
    }
    if (r.status().code() == absl::StatusCode::kInvalidArgument) ThrowStatus(r.status());
    if (r.status().code() != absl::StatusCode::kNotFound)
      FCK_LOG(kWarn, "loading from memory failed (", r.status().message(), "); trying storage");
  }
  // From storage straight into the buffers: no buffer of the state's size.
  const int64_t step = lo.step ? *lo.step : ValueOrThrow(loader_->NewestStep(nullptr, /*prefer_memory=*/false));
  auto r = loader_->IntoFromStorage(step, dest, blobs, lo.verify);
  if (!r.ok() && lo.allow_fallback && r.status().code() == absl::StatusCode::kDataLoss) {
    for (int64_t older : CommittedSteps(root)) {
      if (older >= step) continue;
      FCK_LOG(kWarn, "step ", step, " unusable (", r.status().message(), "); falling back to step ", older);
      auto o = loader_->IntoFromStorage(older, dest, blobs, lo.verify);
      if (o.ok() || o.status().code() != absl::StatusCode::kDataLoss) {
        r = o;
        break;
      }
    }
  }
  ThrowIfError(r.status());
  inherited_.clear();  // committed already, or not restorable from memory
  *source = Source::kStorage;
  return *r;
}

int64_t Checkpointer::load_into(const std::map<std::string, MutableTensorRef>& dest,
                                std::map<std::string, std::string>* blobs, const LoadOptions& options,
                                Source* source) {
  return impl_->LoadInto(dest, blobs, source, options);
}

std::optional<int64_t> Checkpointer::latest_step() { return LatestCommitted(impl_->root); }

std::optional<int64_t> Checkpointer::latest_memory_step() {
  SlotView v;
  if (SharedSegment* seg = impl_->Segment(); seg && seg->Newest(&v)) return v.step;
  return std::nullopt;
}

std::vector<StepInfo> Checkpointer::steps() { return impl_->Steps(); }

void Checkpointer::wait_all() { impl_->WaitAll(impl_->opt.wait_timeout); }
void Checkpointer::wait_all(std::chrono::milliseconds timeout) { impl_->WaitAll(timeout); }
void Checkpointer::close() { ThrowIfError(impl_->Close()); }
uint64_t Checkpointer::persist_failures() const { return impl_->persist_failures(); }
const CheckpointerOptions& Checkpointer::options() const { return impl_->opt; }
std::string Checkpointer::memory_segment_path() const { return impl_->shm_path; }
void Checkpointer::unlink_memory() {
  ThrowIfError(SharedSegment::Unlink(impl_->shm_path));
}

std::string LoadDevicePlugin(const std::string& path) {
  return ValueOrThrow(DeviceBackend::Load(path))->device_type();
}

std::vector<std::string> DeviceTypes() { return DeviceBackend::Types(); }

bool HasDeviceBackend(const std::string& device_type) { return DeviceBackend::For(device_type).ok(); }

}  // namespace flashckpt
