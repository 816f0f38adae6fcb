// Checkpointer: the facade over its roles. The snapshot writer
// (api/snapshot_writer.h) holds the segment and writes slots; persisting is
// the Persister's (storage/persister.h), loading the Loader's (api/loader.h).
// Here: options and the directory lock, save order (the finisher of
// non-blocking saves), persist failures, the restore step and close.
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
#include "api/snapshot_writer.h"
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
  SharedSegment* Segment() { return writer_ ? writer_->segment() : nullptr; }
  // After the first load, of `step` from memory: if the step was agreed
  // (given, or the restore step) and an earlier process left it in memory
  // only, it is persisted now, as every other rank restoring the same step
  // does, so that it gets its COMMIT. Only the first load looks.
  void Restored(int64_t step, bool agreed);

  CheckpointerOptions opt;
  std::string root;
  std::string shm_path;
  bool closed = false;

 private:
  std::optional<int64_t> restore_pending_;  // opt.restore_step until a load takes it
  // Steps an earlier process left in memory, not durable (until the first load).
  std::set<int64_t> inherited_;
  // Finishes non-blocking snapshots in save order (device copies waited for,
  // checksummed, published), then hands them to the persister.
  void FinisherLoop();
  // A published snapshot: to the persister, or (not persisted) done.
  void Submit(PendingSnapshot p);
  // Waits until the finisher and the persister are idle.
  absl::Status WaitIdle(std::chrono::milliseconds timeout);
  absl::StatusOr<PersistStats> Persist(int64_t step, int slot);
  absl::Status PersistViaAgent(int64_t step, int slot);
  // The step load() takes when none is given: the newest of memory and storage.
  int64_t NewestStep(bool prefer_memory) { return ValueOrThrow(loader_->NewestStep(Segment(), prefer_memory)); }
 private:
  // Slots of the first load are mapped in the background after it (see SnapshotWriter::AfterLoad).
  struct AfterLoad {
    Impl* i;
    ~AfterLoad() {
      if (i->writer_) i->writer_->AfterLoad();
    }
  };
  void Init();  // the part of construction that may throw after the locks are taken

  CopyPool pool_;
  std::unique_ptr<SnapshotWriter> writer_;  // the snapshot writer role (segment, slots, copy, publish)
  std::unique_ptr<Loader> loader_;  // the loader role (memory and storage)
  std::shared_ptr<core::CommitBarrier> barrier_;
  std::unique_ptr<BulkIo> persist_io_;
  int dir_lock_fd_ = -1;
  std::thread dir_lock_taker_;  // takes the lock from a predecessor on its way out
  std::unique_ptr<AgentClient> agent_;  // flashrun's checkpoint service, when it persists
  bool agent_mode_ = false;  // the agent persists (even while reconnecting)
  std::string open_key_;
  uint64_t saves_ = 0;
  std::mutex fin_mu_;
  std::condition_variable fin_cv_;
  std::deque<PendingSnapshot> finishing_;
  bool fin_busy_ = false, fin_stop_ = false;
  std::thread finisher_;
  std::unique_ptr<Persister> persister_;
  std::mutex fail_mu_;
  std::vector<std::pair<std::shared_ptr<SaveState>, absl::Status>> unreported_;
  uint64_t persist_failures_ = 0;
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

  writer_ = std::make_unique<SnapshotWriter>(
      SnapshotWriterOptions{shm_path, root, opt.num_slots, opt.rank, opt.world_size, opt.commit_timeout, &pool_});
  const bool reopened = opt.reuse_memory && writer_->Reopen();
  SharedSegment* seg = writer_->published_segment();
  if (opt.reserve_bytes > 0 && (!seg || seg->slot_capacity() < opt.reserve_bytes)) {
    ThrowIfError(writer_->Reserve(opt.reserve_bytes, opt.reserve_in_background));
  } else if (reopened && opt.reserve_in_background) {
    // A segment left by an earlier process: its slots are mapped in the
    // background only after the restore (load) is done, so that mapping them
    // does not compete with the load on the restart's critical path.
    writer_->PrefaultAfterFirstLoad();
  }

  IoOptions io;
  io.use_io_uring = opt.use_io_uring;
  io.use_direct_io = opt.use_direct_io;
  io.chunk_bytes = opt.io_chunk_bytes;
  io.queue_depth = opt.io_queue_depth;
  persist_io_ = std::make_unique<BulkIo>(io);
  loader_ = std::make_unique<Loader>(LoaderContext{root, shm_path, opt.rank, opt.world_size, io, &pool_,
                                                   [this](DeviceBackend* b) { return writer_->RegisterWith(b); }});

  if (!opt.agent_socket.empty() && opt.use_agent && opt.persist) {
    agent_ = std::make_unique<AgentClient>(AgentHello{opt.agent_socket, opt.rank, opt.world_size, root, shm_path,
                                                      opt.keep_last, opt.commit_timeout, io});
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
  // (Not even looked at while the reserve thread may be replacing it.)
  seg = writer_->creating_in_background() ? nullptr : writer_->published_segment();
  if (seg && opt.persist && !agent_mode_) {
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
  SharedSegment* seg = writer_->published_segment();
  if (!inherited || !seg || !seg->Newest(&v, step) || v.durable || ReadCommit(root, step).ok()) return;
  FCK_LOG(kInfo, "persisting step ", step, " left in shared memory by an earlier process");
  auto st = std::make_shared<SaveState>(step, opt.wait_timeout);
  st->SnapshotDone(absl::OkStatus());
  writer_->Pin(v.index);
  Submit(PendingSnapshot{v.index, step, true, st, {}, {}});
}

Checkpointer::Impl::~Impl() {
  absl::Status st = Close();
  if (!st.ok()) FCK_LOG(kError, "checkpointer on ", root, " closed with a failed persist: ", st.message());
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
  const std::string what = absl::StrCat("save of step ", step);
  ThrowIfError(Annotate(writer_->EnsureCapacity(plan.slot_bytes_needed(), [this] { return WaitIdle(opt.wait_timeout); }),
                        what));
  for (DeviceBackend* b : backend_of)
    if (b) ThrowIfError(Annotate(writer_->RegisterWith(b), what));
  absl::StatusOr<SnapshotWriter::Written> written = writer_->Write(step, tensors, blobs, backend_of, plan);
  if (!written.ok()) ThrowStatus(Annotate(written.status(), what));
  SnapshotWriter::Written& w = *written;
  auto state = std::make_shared<SaveState>(step, opt.wait_timeout);
  const bool persist = opt.persist && (saves_++ % static_cast<uint64_t>(opt.persist_every) == 0);
  PendingSnapshot pending{w.slot, step, persist, state, w.device_events, nullptr};
  if (w.device_events.empty() || blocking) {
    // Published now: the device copies waited for, the slot finished.
    absl::Status st;
    for (auto [b, e] : w.device_events) {
      absl::Status waited = b->Wait(e);
      if (st.ok()) st = waited;
    }
    pending.device_events.clear();
    if (st.ok()) st = w.finish();
    if (!st.ok()) {
      writer_->Unpin(w.slot);
      ThrowStatus(Annotate(st, what));
    }
    state->SnapshotDone(absl::OkStatus());
  } else {
    pending.finish_snapshot = std::move(w.finish);  // on the finisher thread, in save order
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

void Checkpointer::Impl::Submit(PendingSnapshot p) {
  if (!p.persist) {
    // Kept in memory only.
    p.state->DurableDone(absl::OkStatus(), false);
    writer_->Unpin(p.slot);
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
    writer_->Unpin(slot);
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
      writer_->Unpin(p.slot);
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
  if (!writer_->published_segment()->ReadSlot(slot, &v) || v.step != step)
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
  return PersistSlot(*writer_->published_segment(), slot, step, ctx);
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
  SharedSegment* seg = Segment();
  AfterLoad after{this};
  const int64_t step = lo.step ? *lo.step : NewestStep(lo.prefer_memory);
  if (lo.prefer_memory) {
    auto r = loader_->FromMemory(seg, step, lo.verify);
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
  if (writer_) writer_->segment();  // a segment still being created in the background
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
  if (SharedSegment* seg = writer_ ? writer_->published_segment() : nullptr) {
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
  }
  if (writer_) writer_->Close();
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

std::unique_ptr<LoadedSnapshot> ReadCommittedStep(const std::string& directory, int64_t step, int rank,
                                                  int world_size, bool verify) {
  if (world_size < 1 || rank < 0 || rank >= world_size)
    ThrowStatus(absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is not within world size ", world_size)));
  CopyPool pool(0);
  Loader loader(LoaderContext{AbsolutePath(directory), "", rank, world_size, IoOptions{}, &pool, nullptr});
  return ValueOrThrow(loader.FromStorage(step, verify));
}

StepDescription DescribeCommittedStep(const std::string& directory, int64_t step, int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size)
    ThrowStatus(absl::InvalidArgumentError(absl::StrCat("rank ", rank, " is not within world size ", world_size)));
  Loader loader(LoaderContext{AbsolutePath(directory), "", rank, world_size, IoOptions{}, nullptr, nullptr});
  return ValueOrThrow(loader.Describe(nullptr, step, /*prefer_memory=*/false));
}

StepDescription DescribeGlobalStep(const std::string& directory, int64_t step) {
  Loader loader(LoaderContext{AbsolutePath(directory), "", 0, 1, IoOptions{}, nullptr, nullptr});
  return ValueOrThrow(loader.DescribeGlobal(step));
}

void ReadGlobalInto(const std::string& directory, int64_t step, const std::map<std::string, MutableTensorRef>& dest,
                    bool verify) {
  Loader loader(LoaderContext{AbsolutePath(directory), "", 0, 1, IoOptions{}, nullptr, nullptr});
  ThrowIfError(loader.IntoFromGlobal(step, dest, verify));
}

std::optional<int64_t> Checkpointer::take_restore_step() { return impl_->TakeRestoreStep(); }
Checkpointer::~Checkpointer() = default;

SaveHandle Checkpointer::save(int64_t step, const std::vector<TensorRef>& tensors,
                              const std::vector<BlobRef>& blobs, bool blocking) {
  return impl_->Save(step, tensors, blobs, blocking);
}

std::unique_ptr<LoadedSnapshot> Checkpointer::load(const LoadOptions& options) { return impl_->Load(options); }

StepDescription Checkpointer::describe(const LoadOptions& options) { return impl_->Describe(options); }

StepDescription Checkpointer::Impl::Describe(const LoadOptions& lo) {
  return ValueOrThrow(loader_->Describe(Segment(), lo.step ? *lo.step : NewestStep(lo.prefer_memory), lo.prefer_memory));
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
    absl::StatusOr<int64_t> r;
    {
      AfterLoad after{this};
      r = loader_->IntoFromMemory(Segment(), dest, blobs, lo);
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
