#include "storage/persister.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/crash_point.h"
#include "common/crc32c.h"
#include "common/log.h"
#include "common/status.h"
#include "flashckpt.pb.h"
#include "storage/commit.h"
#include "storage/file_ops.h"
#include "storage/layout.h"

namespace flashckpt {
namespace fs = std::filesystem;

absl::StatusOr<PersistStats> PersistSlot(SharedSegment& seg_ref, int slot, int64_t step, const PersistContext& ctx) {
  SharedSegment* seg = &seg_ref;
  struct { int slot; int64_t step; } job{slot, step};
  struct { int rank, world_size, keep_last; std::chrono::milliseconds commit_timeout; } opt{ctx.rank, ctx.world_size, ctx.keep_last, ctx.commit_timeout};
  const std::string& root = ctx.root;
  const std::string& shm_path = ctx.where;
  BulkIo* persist_io_ = ctx.io;
  core::CommitBarrier* barrier_ = ctx.barrier;
  auto t0 = std::chrono::steady_clock::now();
  SlotView v;
  if (!seg->ReadSlot(job.slot, &v) || v.step != job.step) {
    absl::Status s = absl::InternalError(absl::StrCat("slot ", job.slot, " of ", shm_path, " no longer holds step ",
                                                      job.step, " (overwritten by a newer snapshot before it was persisted)"));
    barrier_->ReportFailure(job.step, opt.rank, std::string(s.message()));
    return s;
  }
  SlotHeader* h = seg->slot(job.slot);
  h->pin_pid.store(static_cast<uint32_t>(getpid()));
  CrashPoint("persist: pinned");
  struct Unpin { SlotHeader* h; ~Unpin() { h->pin_pid.store(0); } } unpin{h};

  // Committed already: nothing to write, and that COMMIT must stay. Either
  // this very snapshot (the agent persisting again a snapshot whose COMMIT it
  // did not wait for, when a restart cut the wait short: the manifest bytes
  // match COMMIT's entry), or the same state saved again (the manifests differ
  // only in their creation time). Any other contents are refused: a committed
  // step is never overwritten, since its COMMIT would have to go before the new
  // data is durable and a failure in between (a full disk, a power loss) would
  // lose both. The refused snapshot leaves memory too, so that no load or
  // restart takes bytes for the step other than the committed ones.
  const std::string dir = StepDir(root, job.step);
  if (auto committed = ReadCommit(root, job.step); committed.ok()) {
    absl::StatusOr<std::string> framed = seg->ManifestBytes(v);
    bool same = false;
    for (const auto& f : committed->files())
      same = same || (framed.ok() && f.name() == RankManifestName(opt.rank) && f.size() == framed->size() &&
                      f.crc32c() == Crc32c(framed->data(), framed->size()));
    if (!same && framed.ok()) {
      pb::Manifest mine;
      absl::StatusOr<pb::Manifest> theirs = ReadManifest(root, job.step, opt.rank);
      if (theirs.ok() && ParseRecord(*framed, RecordKind::kManifest, shm_path, &mine).ok()) {
        mine.clear_created_unix_ns();
        theirs->clear_created_unix_ns();
        same = mine.SerializeAsString() == theirs->SerializeAsString();
      }
    }
    if (!same) {
      seg->Retract(v);
      return absl::FailedPreconditionError(absl::StrCat(
          "persist step ", job.step, " refused: ", dir, " is committed with other contents and is kept (a committed "
          "step is never overwritten, so that a failure while writing a replacement cannot lose it; saving the same "
          "state again is fine). Save under a new step number, or remove ", dir, " first to replace it"));
    }
    h->durable.store(1, std::memory_order_release);
    FCK_LOG(kInfo, "step ", job.step, " of rank ", opt.rank, " is committed already in ", root);
    PersistStats stats;
    stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return stats;
  }
  if (fileops::MakeDirs(dir) != 0)
    return Annotate(ErrnoStatus("create step directory", dir, errno), absl::StrCat("persist step ", job.step));
  const std::string data_path = absl::StrCat(dir, "/", RankDataName(opt.rank));
  const std::string manifest_path = absl::StrCat(dir, "/", RankManifestName(opt.rank));
  const std::string durable_path = absl::StrCat(dir, "/", RankDurableName(opt.rank));
  const std::string replica_path = absl::StrCat(dir, "/", RankReplicaName(opt.rank));
  // A step saved again replaces its earlier, uncommitted attempt (a COMMIT
  // here is torn or foreign: ReadCommit found none valid).
  fileops::Unlink(absl::StrCat(dir, "/", kCommitName));
  fileops::Unlink(durable_path);

  ClearPersistFailure(root, job.step, opt.rank);
  auto cleanup = [&](const absl::Status& s) {
    // A persist abandoned because a restart made the step obsolete is not a
    // failure the other ranks must hear of: after the restart they persist
    // (again) only the agreed step, and a marker would fail its commit.
    if (!(ctx.cancelled && ctx.cancelled())) barrier_->ReportFailure(job.step, opt.rank, std::string(s.message()));
    if (!ReadCommit(root, job.step).ok()) {
      fileops::Unlink(durable_path);  // first: rank 0 must never take the record without the files
      fileops::Unlink(data_path);
      fileops::Unlink(replica_path);
      fileops::Unlink(manifest_path);
      std::error_code e2;
      if (fs::is_empty(dir, e2)) fileops::RemoveAll(dir);
    }
    return Annotate(s, absl::StrCat("persist step ", job.step));
  };

  absl::StatusOr<std::string> manifest_or = seg->ManifestBytes(v);
  if (!manifest_or.ok()) return cleanup(manifest_or.status());
  const std::string& manifest = *manifest_or;
  // The replicated region [0, R) is stored once over the world: this rank
  // writes its slice of it to rank-<r>.replica and its private part
  // [R, data_bytes) to rank-<r>.data (R = 0: the whole region, as before).
  pb::Manifest parsed;
  if (absl::Status p = ParseRecord(manifest, RecordKind::kManifest, shm_path, &parsed); !p.ok()) return cleanup(p);
  const uint64_t replicated = parsed.replicated_bytes();
  // A snapshot of another rank or world (left in memory before an elastic
  // restart renumbered the ranks) is never persisted as this rank's.
  if (replicated > v.data_bytes || parsed.replica_offset() + parsed.replica_length() > replicated ||
      parsed.rank() != opt.rank || parsed.world_size() != opt.world_size)
    return cleanup(absl::InvalidArgumentError(absl::StrCat(
        shm_path, " step ", job.step, ": the snapshot was saved by rank ", parsed.rank(), " of a world of ",
        parsed.world_size(), " (replicated region ", replicated, " bytes); it cannot be persisted as rank ", opt.rank,
        " of ", opt.world_size)));
  persist_io_->RegisterRegion(seg->header(), seg->mapped_bytes());
  uint64_t written = 0;
  absl::StatusOr<IoResult> replica_wr;
  if (replicated > 0) {
    replica_wr = persist_io_->WriteFile(replica_path, seg->slot_data(job.slot) + parsed.replica_offset(),
                                        parsed.replica_length());
    if (!replica_wr.ok()) return cleanup(replica_wr.status());
    written += parsed.replica_length();
  }
  auto wr = persist_io_->WriteFile(data_path, seg->slot_data(job.slot) + replicated, v.data_bytes - replicated);
  if (!wr.ok()) return cleanup(wr.status());
  written += v.data_bytes - replicated;
  CrashPoint("persist: before manifest");
  absl::Status s = WriteFileAtomic(manifest_path, manifest);
  if (!s.ok()) return cleanup(s);
  CrashPoint("persist: before rank record");

  pb::RankRecord rec;
  rec.set_format_version(kFormatVersion);
  rec.set_step(job.step);
  rec.set_rank(opt.rank);
  rec.set_world_size(opt.world_size);
  rec.set_sharded(std::any_of(parsed.tensors().begin(), parsed.tensors().end(),
                              [](const pb::TensorEntry& e) { return e.global_shape_size() > 0; }));
  auto* f1 = rec.add_files();
  f1->set_name(RankDataName(opt.rank));
  f1->set_size(v.data_bytes - replicated);
  f1->set_crc32c(wr->crc32c);
  if (replicated > 0) {
    auto* f3 = rec.add_files();
    f3->set_name(RankReplicaName(opt.rank));
    f3->set_size(parsed.replica_length());
    f3->set_crc32c(replica_wr->crc32c);
  }
  auto* f2 = rec.add_files();
  f2->set_name(RankManifestName(opt.rank));
  f2->set_size(manifest.size());
  f2->set_crc32c(Crc32c(manifest.data(), manifest.size()));
  if (ctx.cancelled && ctx.cancelled())
    return cleanup(absl::CancelledError(absl::StrCat("step ", job.step, " abandoned: a restart made it obsolete")));
  s = barrier_->RankDurable(job.step, opt.rank, FrameRecord(RecordKind::kRankRecord, rec));
  if (!s.ok()) return cleanup(s);
  CrashPoint("persist: rank durable");
  if (opt.rank == 0) {
    absl::StatusOr<std::vector<std::string>> records = barrier_->WaitAll(job.step, opt.world_size, opt.commit_timeout);
    if (!records.ok()) return cleanup(records.status());
    s = CheckAcrossRanks(root, job.step, parsed, *records);
    if (!s.ok()) return cleanup(s);
    s = WriteCommit(root, job.step, opt.world_size, *records);
    if (!s.ok()) return cleanup(s);
    barrier_->Committed(job.step);
    CrashPoint("commit: before retention");
    // Retention (deleting older steps) is left to the caller, after it has
    // reported this step durable: it is housekeeping, not durability.
  } else {
    s = barrier_->WaitCommitted(job.step, opt.commit_timeout, ctx.cancelled);
    // Abandoned here after this rank's record went out: rank 0 (on another
    // node, whose agent may abandon later) can still commit with it, so the
    // files stay; what never commits goes at the next round's Restart() or by
    // retention.
    if (core::GivenUp(s) && ctx.cancelled && ctx.cancelled()) return Annotate(s, absl::StrCat("persist step ", job.step));
    // Rank 0 gave the step up: no COMMIT will come.
    if (core::GivenUp(s)) return cleanup(s);
    // After a timeout, or with the barrier unreachable, rank 0 may still
    // commit: the files stay.
    if (!s.ok()) return Annotate(s, absl::StrCat("persist step ", job.step));
  }
  h->durable.store(1, std::memory_order_release);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (written >= (64u << 20) || LogEnabled(LogLevel::kDebug)) FCK_LOG(kInfo, "step ", job.step, " durable: ", absl::StrFormat("%.1f MiB in %.2f s (%.2f GB/s)%s",
          written / 1048576.0, secs, written / secs / 1e9,
          wr->used_io_uring ? (wr->used_direct_io ? ", io_uring O_DIRECT" : ", io_uring") : ", pwrite"));
  PersistStats stats;
  stats.bytes = written;
  stats.seconds = secs;
  stats.io_uring = wr->used_io_uring;
  stats.direct_io = wr->used_direct_io;
  return stats;
}

Persister::Persister(Options options) : options_(std::move(options)) {
  thread_ = std::thread([this] { Loop(); });
}

Persister::~Persister() { Stop(/*abandon=*/false); }

void Persister::Drop(std::vector<Job>& dropped, const std::string& why, bool superseded) {
  for (Job& j : dropped) {
    PersistOutcome o;
    o.step = j.step;
    o.slot = j.slot;
    o.superseded = superseded;
    o.status = absl::CancelledError(absl::StrCat("step ", j.step, " ", why));
    j.done(o);
  }
}

void Persister::Enqueue(int64_t step, int slot, DoneFn done) {
  std::vector<Job> dropped, late;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (it->step <= step) {
        FCK_LOG(kInfo, options_.name.empty() ? "" : options_.name + ": ", "step ", it->step, " superseded by step ",
                step, " before it was persisted");
        if (options_.report_superseded) superseded_.emplace_back(it->step, step);
        dropped.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    // Stopped: nothing will persist it.
    if (stop_) {
      late.push_back(Job{step, slot, std::move(done)});
    } else {
      queue_.push_back(Job{step, slot, std::move(done)});
    }
  }
  cv_.notify_all();
  Drop(dropped, "superseded by a newer step before it was persisted", /*superseded=*/true);
  Drop(late, "dropped: the persister stopped", /*superseded=*/false);
}

void Persister::Abandon(const std::string& why) {
  std::vector<Job> dropped;
  {
    std::lock_guard<std::mutex> l(mu_);
    ++epoch_;
    for (Job& j : queue_) dropped.push_back(std::move(j));
    queue_.clear();
  }
  cv_.notify_all();
  Drop(dropped, why, /*superseded=*/false);
}

std::string Persister::DescribeLocked() const {
  std::vector<int64_t> queued;
  for (const Job& j : queue_) queued.push_back(j.step);
  std::string s = in_flight_ ? absl::StrFormat("step %d in flight for %.1f s", *in_flight_,
                                              std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                                            in_flight_since_).count())
                             : std::string("nothing in flight");
  absl::StrAppend(&s, ", ", queued.empty() ? std::string("none queued")
                                             : absl::StrCat("queued: ", absl::StrJoin(queued, ", ")));
  return s;
}

absl::Status Persister::Drain(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  if (cv_.wait_for(l, timeout, [&] { return queue_.empty() && !in_flight_ && superseded_.empty(); }))
    return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrCat(options_.name.empty() ? "" : options_.name + ": ",
                                                  "persists not finished after ",
                                                  absl::StrFormat("%.1f", timeout.count() / 1000.0), " s (",
                                                  DescribeLocked(), ")"));
}

void Persister::Stop(bool abandon) {
  std::vector<Job> dropped;
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
    if (abandon) {
      abandon_all_ = true;
      ++epoch_;
      for (Job& j : queue_) dropped.push_back(std::move(j));
      queue_.clear();
    }
  }
  cv_.notify_all();
  Drop(dropped, "dropped: the persister stopped", /*superseded=*/false);
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

size_t Persister::Queued() {
  std::lock_guard<std::mutex> l(mu_);
  return queue_.size();
}

std::vector<int64_t> Persister::Pending() {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<int64_t> out;
  if (in_flight_) out.push_back(*in_flight_);
  for (const Job& j : queue_) out.push_back(j.step);
  return out;
}

void Persister::Loop() {
  for (;;) {
    std::vector<std::pair<int64_t, int64_t>> superseded;
    std::optional<Job> job;
    uint64_t epoch = 0;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty() || !superseded_.empty(); });
      superseded.swap(superseded_);
      if (!queue_.empty()) {
        job = std::move(queue_.front());
        queue_.pop_front();
        in_flight_ = job->step;
        in_flight_since_ = std::chrono::steady_clock::now();
        epoch = epoch_;
      } else if (superseded.empty() && stop_) {
        return;
      }
    }
    // Off the caller's thread: a record per dropped step (a small durable
    // file, or a key in the rendezvous store).
    for (auto [step, by] : superseded) options_.report_superseded(step, by);
    if (!job) {
      cv_.notify_all();
      continue;
    }
    auto cancelled = [this, epoch] {
      std::lock_guard<std::mutex> l(mu_);
      return abandon_all_ || epoch_ != epoch;
    };
    PersistOutcome o;
    o.step = job->step;
    o.slot = job->slot;
    absl::StatusOr<PersistStats> r = options_.persist(job->step, job->slot, cancelled);
    if (r.ok()) {
      o.stats = *r;
    } else {
      // A persist abandoned by a restart or a stop is not a failure.
      o.status = cancelled() && r.status().code() != absl::StatusCode::kCancelled
                     ? absl::CancelledError(r.status().message())
                     : r.status();
    }
    job->done(o);
    if (o.durable() && options_.after_durable) options_.after_durable(o.step);
    {
      std::lock_guard<std::mutex> l(mu_);
      in_flight_.reset();
    }
    cv_.notify_all();
  }
}

}  // namespace flashckpt
