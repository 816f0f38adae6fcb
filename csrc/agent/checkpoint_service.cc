#include "agent/checkpoint_service.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "ipc/agent_protocol.h"
#include "common/log.h"
#include "common/status.h"
#include "shm/segment.h"
#include "storage/commit.h"
#include "storage/layout.h"
#include "storage/persister.h"

namespace flashckpt {
namespace {

// The worker's I/O options where its hello carries them (a Checkpointer sets
// them always), else the agent's.
IoOptions PersistIoOptions(const pb::WorkerHello& hello, const IoOptions& fallback) {
  if (!hello.has_io()) return fallback;
  IoOptions io;
  io.use_io_uring = hello.io().use_io_uring();
  io.use_direct_io = hello.io().use_direct_io();
  io.chunk_bytes = hello.io().chunk_bytes() ? hello.io().chunk_bytes() : fallback.chunk_bytes;
  io.queue_depth = hello.io().queue_depth() > 0 ? hello.io().queue_depth() : fallback.queue_depth;
  return io;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CheckpointService>> CheckpointService::Start(CheckpointServiceOptions o) {
  std::unique_ptr<CheckpointService> s(new CheckpointService(std::move(o)));
  const std::string& path = s->options_.socket_path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return absl::InvalidArgumentError(absl::StrCat("bad agent socket path '", path, "' (empty or over 107 bytes)"));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  ::unlink(path.c_str());
  s->listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->listen_fd_ < 0) return ErrnoStatus("socket", path, errno);
  if (::bind(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return ErrnoStatus("bind agent socket", path, errno);
  ::chmod(path.c_str(), 0600);
  if (::listen(s->listen_fd_, 64) != 0) return ErrnoStatus("listen", path, errno);
  if (s->options_.metrics_port >= 0) {
    s->metrics_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(s->metrics_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in in{};
    in.sin_family = AF_INET;
    in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    in.sin_port = htons(static_cast<uint16_t>(s->options_.metrics_port));
    if (::bind(s->metrics_fd_, reinterpret_cast<sockaddr*>(&in), sizeof(in)) != 0 || ::listen(s->metrics_fd_, 16) != 0)
      return ErrnoStatus("bind metrics endpoint", absl::StrCat("127.0.0.1:", s->options_.metrics_port), errno);
    socklen_t len = sizeof(in);
    ::getsockname(s->metrics_fd_, reinterpret_cast<sockaddr*>(&in), &len);
    s->metrics_port_ = ntohs(in.sin_port);
    CheckpointService* self = s.get();
    s->metrics_thread_ = std::thread([self] { self->MetricsLoop(); });
  }
  CheckpointService* self = s.get();
  s->accept_thread_ = std::thread([self] { self->AcceptLoop(); });
  s->WriteStatus();
  return s;
}

CheckpointService::~CheckpointService() {
  stop_ = true;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_)
      if (r->commits_in_flight) r->commits_in_flight->WakeAll();
  }
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  if (metrics_fd_ >= 0) ::shutdown(metrics_fd_, SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  if (metrics_thread_.joinable()) metrics_thread_.join();
  {
    std::lock_guard<std::mutex> l(conn_mu_);
    for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);
  }
  for (auto& t : conn_threads_) t.join();
  for (auto& [rank, r] : ranks_) r->persister->Stop(/*abandon=*/true);
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (metrics_fd_ >= 0) ::close(metrics_fd_);
  ::unlink(options_.socket_path.c_str());
  WriteStatus();
}

void CheckpointService::AcceptLoop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> l(conn_mu_);
    conn_fds_.push_back(fd);
    conn_threads_.emplace_back([this, fd] { ServeConnection(fd); });
  }
}

void CheckpointService::ServeConnection(int fd) {
  int rank = -1;
  auto conn = std::make_shared<Connection>();
  conn->fd = fd;
  while (!stop_) {
    pb::AgentRequest req;
    absl::Status s = ReadFrame(fd, &req, std::chrono::milliseconds(500));
    if (s.code() == absl::StatusCode::kDeadlineExceeded) continue;
    if (!s.ok()) break;  // worker gone (crash or exit): its slots stay in memory
    if (req.has_hello()) {
      rank = req.hello().rank();
      std::lock_guard<std::mutex> l(mu_);
      auto& r = ranks_[rank];
      if (!r) {
        r = std::make_unique<Rank>();
        r->io = std::make_unique<BulkIo>(PersistIoOptions(req.hello(), options_.io));
        r->hello = req.hello();
        Persister::Options po;
        po.name = absl::StrCat("agent: rank ", rank);
        po.persist = [this, rank](int64_t step, int slot, const std::function<bool()>& cancelled) {
          return PersistRank(rank, step, slot, cancelled);
        };
        po.report_superseded = [this, rank](int64_t step, int64_t by) {
          std::string dir;
          int world_size;
          std::shared_ptr<CommitCoordinator> commits;
          {
            // Also runs outside Drain()'s view (before the next step is taken): the rank may be retired.
            std::lock_guard<std::mutex> l2(mu_);
            auto it = ranks_.find(rank);
            if (it == ranks_.end() || !it->second) return;
            dir = it->second->hello.directory();
            world_size = it->second->hello.world_size();
            commits = commits_;
          }
          // The other ranks may have persisted it: tell them not to wait for its COMMIT.
          if (world_size > 1)
            MakeBarrier(commits, dir, nullptr)
                ->ReportFailure(step, rank, absl::StrCat("superseded by step ", by, " before it was persisted"));
        };
        po.after_durable = [this, rank](int64_t) {
          std::string dir;
          int keep_last;
          {
            std::lock_guard<std::mutex> l2(mu_);
            dir = ranks_[rank]->hello.directory();
            keep_last = ranks_[rank]->hello.keep_last();
          }
          if (rank == 0) ApplyRetention(dir, keep_last);
        };
        r->persister = std::make_unique<Persister>(std::move(po));
      }
      if (r->hello.shm_path() != req.hello().shm_path()) r->seg.reset();
      r->hello = req.hello();
      FCK_LOG(kInfo, "agent: rank ", rank, " (pid ", req.hello().pid(), ") registered, snapshots in ",
              req.hello().shm_path());
    } else if (req.has_published() && rank >= 0) {
      snapshots_++;
      Enqueue(rank, req.published().step(), req.published().slot(), conn);
    }
  }
  // Replies for this connection can no longer be delivered.
  std::lock_guard<std::mutex> l2(reply_mu_);
  conn->open = false;
  std::lock_guard<std::mutex> l3(conn_mu_);
  for (auto& c : conn_fds_)
    if (c == fd) c = -1;
  ::close(fd);
}

void CheckpointService::Enqueue(int rank, int64_t step, int slot, std::shared_ptr<Connection> reply_to) {
  Persister* persister;
  {
    std::lock_guard<std::mutex> l(mu_);
    Rank& r = *ranks_[rank];
    // Pinned from now on, so that no worker (a restarted one knows nothing of
    // this queue) overwrites the slot before it is persisted.
    if (OpenSegment(r).ok()) r.seg->slot(slot)->pin_pid.store(static_cast<uint32_t>(::getpid()));
    persister = r.persister.get();
  }
  persister->Enqueue(step, slot, [this, rank, reply_to](const PersistOutcome& o) { PersistDone(rank, o, reply_to); });
}

std::unique_ptr<core::CommitBarrier> CheckpointService::MakeBarrier(const std::shared_ptr<CommitCoordinator>& commits,
                                                              const std::string& directory,
                                                              std::function<bool()> cancelled) {
  if (commits) return commits->Barrier(directory, std::move(cancelled));
  return std::make_unique<FileCommitBarrier>(directory, std::move(cancelled));
}

void CheckpointService::UseCommits(std::shared_ptr<CommitCoordinator> commits) {
  std::lock_guard<std::mutex> l(mu_);
  commits_ = std::move(commits);
}

void CheckpointService::Unpin(Rank& r, int slot) {
  if (!r.seg) return;
  uint32_t me = static_cast<uint32_t>(::getpid());
  r.seg->slot(slot)->pin_pid.compare_exchange_strong(me, 0);
}

absl::Status CheckpointService::OpenSegment(Rank& r) {
  struct stat st;
  if (::stat(r.hello.shm_path().c_str(), &st) != 0) return ErrnoStatus("stat", r.hello.shm_path(), errno);
  if (r.seg && r.ino == st.st_ino) return absl::OkStatus();
  r.seg.reset();
  FCK_ASSIGN_OR_RETURN(r.seg, SharedSegment::Open(r.hello.shm_path()));
  r.ino = st.st_ino;
  return absl::OkStatus();
}

absl::StatusOr<PersistStats> CheckpointService::PersistRank(int rank, int64_t step, int slot,
                                                            const std::function<bool()>& cancelled) {
  Rank* r;
  pb::WorkerHello hello;
  std::shared_ptr<CommitCoordinator> commits;
  {
    std::lock_guard<std::mutex> l(mu_);
    r = ranks_[rank].get();
    absl::Status opened = OpenSegment(*r);
    if (!opened.ok()) {
      if (absl::IsNotFound(opened))
        opened = absl::NotFoundError(absl::StrCat(
            "rank ", rank, "'s shared-memory segment ", r->hello.shm_path(), " is gone: another process removed it "
            "(systemd-logind does with RemoveIPC=yes when the user's last session ends: set RemoveIPC=no in "
            "/etc/systemd/logind.conf). The worker creates it again at its next save"));
      // The other ranks must not wait for this rank's files until their timeout.
      MakeBarrier(commits_, r->hello.directory(), nullptr)
          ->ReportFailure(step, r->hello.rank(), std::string(opened.message()));
      return opened;
    }
    hello = r->hello;
    commits = r->commits_in_flight = commits_;
  }
  // The service stopping abandons it too (its destructor wakes the store waits).
  auto abandoned = [this, &cancelled] { return stop_.load() || cancelled(); };
  std::unique_ptr<core::CommitBarrier> barrier = MakeBarrier(commits, hello.directory(), abandoned);
  PersistContext ctx{hello.directory(), hello.rank(), hello.world_size(), hello.keep_last(), barrier.get(),
                     std::chrono::milliseconds(hello.commit_timeout_ms()), r->io.get(), hello.shm_path(), abandoned};
  absl::StatusOr<PersistStats> stats = PersistSlot(*r->seg, slot, step, ctx);  // registers the segment
  std::lock_guard<std::mutex> l(mu_);
  r->commits_in_flight.reset();
  return stats;
}

void CheckpointService::PersistDone(int rank, const PersistOutcome& o, const std::shared_ptr<Connection>& reply_to) {
  const bool dropped = o.status.code() == absl::StatusCode::kCancelled;
  if (o.durable()) {
    persisted_++;
    persisted_bytes_ += o.stats.bytes;
    persist_seconds_ = persist_seconds_ + o.stats.seconds;
  } else if (dropped) {
    dropped_++;  // superseded, or a restart made it obsolete: expected, not an error
    if (!o.superseded) FCK_LOG(kInfo, "agent: rank ", rank, " step ", o.step, ": ", o.status.message());
  } else {
    persist_failures_++;
    FCK_LOG(kError, "agent: rank ", rank, " step ", o.step, ": ", o.status.message());
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    Rank& r = *ranks_[rank];
    Unpin(r, o.slot);
    if (o.durable()) r.newest_durable = std::max(r.newest_durable, o.step);
    if (!o.durable() && !dropped) {
      last_error_ = std::string(o.status.message());
      r.newest_failed = std::max(r.newest_failed, o.step);
    }
  }
  if (reply_to) {
    pb::AgentReply rep;
    rep.set_step(o.step);
    rep.set_ok(o.durable() || dropped);
    rep.set_persisted(o.durable());
    if (!o.durable() && !dropped) rep.set_error(std::string(o.status.message()));
    std::lock_guard<std::mutex> lr(reply_mu_);
    if (reply_to->open) WriteFrame(reply_to->fd, rep).IgnoreError();
  }
  if (!o.superseded) WriteStatus();
}

void CheckpointService::AbandonPersists(const std::vector<int>& ranks, const std::string& why,
                                        const std::string& if_late) {
  std::vector<std::pair<int, Persister*>> persisters;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (int rank : ranks)
      if (auto it = ranks_.find(rank); it != ranks_.end()) persisters.emplace_back(rank, it->second->persister.get());
  }
  // Abandon() runs the dropped steps' callbacks, which take mu_.
  for (auto& [rank, p] : persisters) p->Abandon(why);
  {
    // A persist blocked on the store notices the abandon now, not after its poll.
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, p] : persisters)
      if (auto it = ranks_.find(rank); it != ranks_.end() && it->second->commits_in_flight)
        it->second->commits_in_flight->WakeAll();
  }
  // In-flight persists notice within one barrier poll; a data write in
  // progress finishes first (about a second per GiB).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (auto& [rank, p] : persisters) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    absl::Status s = p->Drain(std::max(left, std::chrono::milliseconds(0)));
    if (!s.ok())
      FCK_LOG(kError, "agent: rank ", rank, ": an abandoned persist still runs (", s.message(), ")", if_late);
  }
}

void CheckpointService::AbandonAll(const std::string& why) {
  std::vector<int> local_ranks;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_) local_ranks.push_back(rank);
  }
  AbandonPersists(local_ranks, why, "; a step it commits now is not in this node's rendezvous payload");
}

void CheckpointService::Restart(int64_t restore_step) {
  std::vector<int> local_ranks;
  std::string dir;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_) {
      local_ranks.push_back(rank);
      dir = r->hello.directory();
    }
  }
  AbandonPersists(local_ranks, "abandoned: a restart made it obsolete",
                  "; its files of the dead timeline may be left for the next restart or retention");
  if (!dir.empty()) {
    for (const auto& st : ListSteps(dir)) {
      if (st.committed) continue;
      if (st.step == restore_step) {
        // Persisted again below: a marker of the dead timeline must not fail its commit.
        for (int rank : local_ranks) ClearPersistFailure(dir, st.step, rank);
        continue;
      }
      for (int rank : local_ranks) {
        std::string base = absl::StrCat(StepDir(dir, st.step), "/rank-", rank);
        for (const char* ext : {".durable", ".data", ".manifest", ".failed"}) ::unlink((base + ext).c_str());
      }
      std::error_code ec;
      if (std::filesystem::is_empty(StepDir(dir, st.step), ec)) std::filesystem::remove(StepDir(dir, st.step), ec);
    }
  }
  if (restore_step >= 0) PersistStepAsync(restore_step);
}

void CheckpointService::PersistStepAsync(int64_t step) {
  std::vector<std::pair<int, int>> todo;  // (rank, slot)
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_) {
      if (!OpenSegment(*r).ok()) continue;
      SlotView v;
      if (!r->seg->Newest(&v, step) || v.durable || step <= r->newest_durable) continue;
      std::vector<int64_t> pending = r->persister->Pending();
      if (std::any_of(pending.begin(), pending.end(), [&](int64_t p) { return p >= step; })) continue;
      FCK_LOG(kInfo, "agent: persisting rank ", rank, " step ", step, " (in memory only)");
      todo.emplace_back(rank, v.index);
    }
  }
  for (auto [rank, slot] : todo) Enqueue(rank, step, slot, nullptr);
}

absl::Status CheckpointService::PersistNewest(std::chrono::milliseconds timeout) {
  auto t0 = std::chrono::steady_clock::now();
  // The newest step every local rank holds: one COMMIT needs every rank's files.
  std::set<int64_t> both = CommonMemorySteps();
  if (!both.empty()) PersistStepAsync(*both.rbegin());
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(t0 + timeout - std::chrono::steady_clock::now());
  return Annotate(Drain(std::max(left, std::chrono::milliseconds(0))), "agent: persisting the newest snapshots");
}

absl::Status CheckpointService::Drain(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<Persister*> persisters;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_) persisters.push_back(r->persister.get());
  }
  std::vector<std::string> late;
  for (Persister* p : persisters) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    absl::Status s = p->Drain(std::max(left, std::chrono::milliseconds(0)));
    if (!s.ok()) late.emplace_back(s.message());
  }
  if (late.empty()) return absl::OkStatus();
  return absl::DeadlineExceededError(absl::StrJoin(late, "; "));
}

std::map<int, uint64_t> CheckpointService::NewestSnapshotBytes() {
  std::map<int, uint64_t> out;
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [rank, r] : ranks_) {
    SlotView v;
    if (OpenSegment(*r).ok() && r->seg->Newest(&v)) out[rank] = v.data_bytes;
  }
  return out;
}

std::map<int, std::vector<int64_t>> CheckpointService::MemorySteps() {
  std::map<int, std::vector<int64_t>> out;
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [rank, r] : ranks_) {
    auto& steps = out[rank];
    if (!OpenSegment(*r).ok()) continue;
    for (int i = 0; i < r->seg->num_slots(); ++i) {
      SlotView v;
      if (r->seg->ReadSlot(i, &v)) steps.push_back(v.step);
    }
    std::sort(steps.begin(), steps.end());
  }
  return out;
}

void CheckpointService::ReleaseMemory() {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [rank, r] : ranks_) {
    if (!OpenSegment(*r).ok()) continue;
    SlotView v;
    bool durable = !r->seg->Newest(&v) || v.durable || v.step <= r->newest_durable;
    if (durable) {
      SharedSegment::Unlink(r->hello.shm_path()).IgnoreError();
    } else {
      FCK_LOG(kWarn, "agent: keeping ", r->hello.shm_path(), ": rank ", rank, " step ", v.step, " is not persisted");
    }
    r->seg.reset();
  }
}

absl::Status CheckpointService::CheckDurableAtEnd() {
  std::vector<std::string> lost;
  std::set<std::string> dirs;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_) {
      dirs.insert(r->hello.directory());
      if (r->newest_failed > r->newest_durable)
        lost.push_back(absl::StrCat("rank ", rank, ": step ", r->newest_failed, " (newest durable: ",
                                    r->newest_durable, ")"));
    }
  }
  for (const std::string& d : dirs) {
    if (d.empty()) continue;
    std::vector<int64_t> removed = RemoveFailedSteps(d);
    if (!removed.empty())
      FCK_LOG(kInfo, "agent: removed ", removed.size(), " step directories of failed persists from ", d,
              " (steps ", removed.front(), "..", removed.back(), ")");
  }
  if (lost.empty()) return absl::OkStatus();
  std::lock_guard<std::mutex> l(mu_);
  return absl::DataLossError(absl::StrCat("the newest snapshots could not be made durable (", absl::StrJoin(lost, "; "),
                                          "); ", persist_failures_.load(), " persists failed, the last with: ",
                                          last_error_));
}

std::set<int64_t> CheckpointService::CommonMemorySteps() {
  std::set<int64_t> common;
  bool first = true;
  for (auto& [rank, steps] : MemorySteps()) {
    std::set<int64_t> these(steps.begin(), steps.end());
    if (first) {
      common = std::move(these);
    } else {
      std::erase_if(common, [&](int64_t s) { return !these.count(s); });
    }
    first = false;
  }
  return common;
}

void CheckpointService::MemoryLayout(int* world, std::set<int>* ranks) {
  std::lock_guard<std::mutex> l(mu_);
  *world = 0;
  ranks->clear();
  for (auto& [rank, r] : ranks_) {
    const int w = static_cast<int>(r->hello.world_size());
    if (ranks->empty()) *world = w;
    if (w != *world) *world = 0;
    ranks->insert(rank);
  }
}

void CheckpointService::RetireRanksOutside(const std::set<int>& keep) {
  std::vector<int> retiring;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_)
      if (!keep.count(rank)) retiring.push_back(rank);
  }
  if (retiring.empty()) return;
  // Their callbacks look the rank up: it stays registered until they are idle.
  AbandonPersists(retiring, "abandoned: this node no longer runs the rank", "");
  std::vector<std::unique_ptr<Rank>> gone;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (int rank : retiring) {
      auto it = ranks_.find(rank);
      if (it == ranks_.end()) continue;
      gone.push_back(std::move(it->second));
      ranks_.erase(it);
    }
  }
  for (auto& r : gone) {
    r->persister.reset();  // its thread ends before the rest of the rank goes
    r->seg.reset();
    SharedSegment::Unlink(r->hello.shm_path()).IgnoreError();
    FCK_LOG(kInfo, "agent: rank ", r->hello.rank(), " of the old world (", r->hello.world_size(),
            " ranks) is not run here any more: its persists stopped and ", r->hello.shm_path(), " is removed");
  }
}

std::string CheckpointService::Directory() {
  std::lock_guard<std::mutex> l(mu_);
  return ranks_.empty() ? "" : ranks_.begin()->second->hello.directory();
}

void CheckpointService::RecordRecovery(RecoveryTiming timing) {
  {
    std::lock_guard<std::mutex> l(mu_);
    recoveries_.push_back(std::move(timing));
  }
  WriteStatus();
}

std::string CheckpointService::MetricsText() {
  std::string t;
  const std::string node = absl::StrCat("node=\"", options_.node, "\"");
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    absl::StrAppend(&t, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n", name, "{", node, "} ", v, "\n");
  };
  metric("flashckpt_snapshots_total", "counter", "Snapshots published by workers.", snapshots_.load());
  metric("flashckpt_snapshots_dropped_total", "counter", "Snapshots superseded before they were persisted.", dropped_.load());
  metric("flashckpt_persists_total", "counter", "Snapshots persisted and committed.", persisted_.load());
  metric("flashckpt_persist_failures_total", "counter", "Persists that failed.", persist_failures_.load());
  metric("flashckpt_persisted_bytes_total", "counter", "Bytes persisted.", static_cast<double>(persisted_bytes_.load()));
  double secs = persist_seconds_.load();
  metric("flashckpt_persist_throughput_bytes_per_second", "gauge", "Average persist throughput.",
         secs > 0 ? persisted_bytes_.load() / secs : 0);
  std::lock_guard<std::mutex> l(mu_);
  int64_t newest = -1;
  for (auto& [k, r] : ranks_) newest = newest < 0 ? r->newest_durable : std::min(newest, r->newest_durable);
  metric("flashckpt_newest_durable_step", "gauge", "Newest step durable for every local rank.", static_cast<double>(newest));
  metric("flashckpt_restarts_total", "counter", "Worker group restarts.", static_cast<double>(recoveries_.size()));
  if (!recoveries_.empty()) {
    absl::StrAppend(&t, "# HELP flashckpt_last_recovery_seconds Phases of the last recovery.\n"
                        "# TYPE flashckpt_last_recovery_seconds gauge\n");
    for (auto& [phase, v] : recoveries_.back().phases_s)
      absl::StrAppend(&t, "flashckpt_last_recovery_seconds{", node, ",phase=\"", phase, "\"} ", v, "\n");
  }
  return t;
}

void CheckpointService::WriteStatus() {
  if (options_.status_file.empty()) return;
  std::string j = "{\n";
  absl::StrAppend(&j, "  \"node\": \"", options_.node, "\",\n  \"socket\": \"", options_.socket_path, "\",\n");
  absl::StrAppend(&j, "  \"snapshots\": ", snapshots_.load(), ",\n  \"snapshots_dropped\": ", dropped_.load(),
                  ",\n  \"persisted\": ", persisted_.load(), ",\n  \"persist_failures\": ", persist_failures_.load(),
                  ",\n  \"persisted_bytes\": ", persisted_bytes_.load(), ",\n");
  double secs = persist_seconds_.load();
  absl::StrAppend(&j, "  \"persist_throughput_bytes_per_s\": ", secs > 0 ? persisted_bytes_.load() / secs : 0, ",\n");
  {
    std::lock_guard<std::mutex> l(mu_);
    absl::StrAppend(&j, "  \"ranks\": {");
    bool first = true;
    for (auto& [k, r] : ranks_) {
      absl::StrAppend(&j, first ? "" : ",", "\"", k, "\": {\"newest_durable_step\": ", r->newest_durable,
                      ", \"newest_failed_step\": ", r->newest_failed, ", \"queued\": ", r->persister->Queued(), "}");
      first = false;
    }
    absl::StrAppend(&j, "},\n  \"restarts\": ", recoveries_.size(), ",\n  \"recoveries\": [");
    for (size_t i = 0; i < recoveries_.size(); ++i) {
      absl::StrAppend(&j, i ? ", " : "", "{\"restart\": ", recoveries_[i].restart);
      for (auto& [p, v] : recoveries_[i].phases_s) absl::StrAppend(&j, ", \"", p, "_s\": ", absl::StrFormat("%.4f", v));
      absl::StrAppend(&j, "}");
    }
    absl::StrAppend(&j, "],\n  \"last_error\": \"");
    for (char c : last_error_) {
      if (c == '"' || c == '\\') j += '\\';
      j += (c == '\n' ? ' ' : c);
    }
    absl::StrAppend(&j, "\"\n}\n");
  }
  std::string tmp = options_.status_file + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << j;
  }
  ::rename(tmp.c_str(), options_.status_file.c_str());
}

void CheckpointService::MetricsLoop() {
  while (!stop_) {
    pollfd p{metrics_fd_, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    int fd = ::accept4(metrics_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    char buf[2048];
    pollfd q{fd, POLLIN, 0};
    if (::poll(&q, 1, 1000) > 0) (void)::recv(fd, buf, sizeof(buf), 0);
    std::string body = MetricsText();
    std::string resp = absl::StrCat("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: ",
                                    body.size(), "\r\nConnection: close\r\n\r\n", body);
    (void)::send(fd, resp.data(), resp.size(), MSG_NOSIGNAL);
    // Close gracefully: a close() with request bytes still unread sends a
    // reset, and the client may lose the response it had not read yet.
    ::shutdown(fd, SHUT_WR);
    for (int i = 0; i < 10 && ::poll(&q, 1, 100) > 0 && ::recv(fd, buf, sizeof(buf), 0) > 0; ++i) {
    }
    ::close(fd);
  }
}

}  // namespace flashckpt
