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
  cv_.notify_all();
  for (auto& [rank, r] : ranks_)
    if (r->thread.joinable()) r->thread.join();
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
        r->io = std::make_unique<BulkIo>(options_.io);
        r->hello = req.hello();
        r->thread = std::thread([this, rank] { RankLoop(rank); });
      }
      if (r->hello.shm_path() != req.hello().shm_path()) r->seg.reset();
      r->hello = req.hello();
      FCK_LOG(kInfo, "agent: rank ", rank, " (pid ", req.hello().pid(), ") registered, snapshots in ",
              req.hello().shm_path());
    } else if (req.has_published() && rank >= 0) {
      snapshots_++;
      Enqueue(rank, Job{req.published().step(), req.published().slot(), fd, epoch_.load()});
    }
  }
  // Replies for this connection can no longer be delivered.
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [k, r] : ranks_)
    for (auto& j : r->queue)
      if (j.reply_fd == fd) j.reply_fd = -1;
  std::lock_guard<std::mutex> l2(reply_mu_);
  std::lock_guard<std::mutex> l3(conn_mu_);
  for (auto& c : conn_fds_)
    if (c == fd) c = -1;
  ::close(fd);
}

void CheckpointService::Enqueue(int rank, Job job) {
  std::vector<int64_t> dropped;
  std::string dir;
  int world_size = 1;
  std::shared_ptr<CommitCoordinator> commits;
  {
    std::lock_guard<std::mutex> l(mu_);
    Rank& r = *ranks_[rank];
    dir = r.hello.directory();
    world_size = r.hello.world_size();
    commits = commits_;
    for (auto& old : r.queue)
      if (old.step < job.step) dropped.push_back(old.step);
    EnqueueLocked(rank, r, job);
  }
  // The other ranks may have persisted a dropped step: tell them not to wait for its COMMIT.
  if (world_size > 1 && !dropped.empty()) {
    auto barrier = MakeBarrier(commits, dir, nullptr);
    for (int64_t step : dropped)
      barrier->ReportFailure(step, rank, absl::StrCat("superseded by step ", job.step, " before it was persisted"));
  }
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

void CheckpointService::EnqueueLocked(int rank, Rank& r, const Job& job) {
  // Persisting is slower than snapshotting: the older queued one is dropped.
  for (auto& old : r.queue) {
    if (old.step < job.step) {
      dropped_++;
      FCK_LOG(kInfo, "agent: rank ", rank, " step ", old.step, " superseded by step ", job.step, " before persisting");
      if (old.reply_fd >= 0) {
        pb::AgentReply rep;
        rep.set_step(old.step);
        rep.set_ok(true);
        rep.set_persisted(false);
        std::lock_guard<std::mutex> lr(reply_mu_);
        WriteFrame(old.reply_fd, rep).IgnoreError();
      }
    }
  }
  for (auto& old : r.queue)
    if (old.step < job.step) Unpin(r, old.slot);
  std::erase_if(r.queue, [&](const Job& j) { return j.step < job.step; });
  // Pinned from now on, so that no worker (a restarted one knows nothing of
  // this queue) overwrites the slot before it is persisted.
  if (OpenSegment(r).ok()) r.seg->slot(job.slot)->pin_pid.store(static_cast<uint32_t>(::getpid()));
  r.queue.push_back(job);
  cv_.notify_all();
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

void CheckpointService::RankLoop(int rank) {
  for (;;) {
    Job job;
    Rank* r;
    {
      std::unique_lock<std::mutex> l(mu_);
      r = ranks_[rank].get();
      cv_.wait(l, [&] { return stop_ || !r->queue.empty(); });
      if (r->queue.empty()) return;
      job = r->queue.front();
      r->queue.pop_front();
      r->busy = true;
      r->commits_in_flight = commits_;
    }
    absl::Status st = OpenSegment(*r);
    absl::StatusOr<PersistStats> stats = absl::UnknownError("not persisted");
    if (!st.ok()) {
      stats = st;
    } else {
      const uint64_t epoch = job.epoch;
      auto cancelled = [this, epoch] { return stop_.load() || epoch_.load() != epoch; };
      std::unique_ptr<core::CommitBarrier> barrier = MakeBarrier(r->commits_in_flight, r->hello.directory(), cancelled);
      PersistContext ctx{r->hello.directory(), r->hello.rank(), r->hello.world_size(), r->hello.keep_last(),
                         barrier.get(), std::chrono::milliseconds(r->hello.commit_timeout_ms()), r->io.get(),
                         r->hello.shm_path(), cancelled};
      r->io->RegisterRegion(r->seg->header(), r->seg->mapped_bytes());
      stats = PersistSlot(*r->seg, job.slot, job.step, ctx);
    }
    if (stats.ok()) {
      persisted_++;
      persisted_bytes_ += stats->bytes;
      persist_seconds_ = persist_seconds_ + stats->seconds;
    } else {
      persist_failures_++;
      if (job.epoch != epoch_.load())  // a restart made it obsolete: expected, not an error
        FCK_LOG(kInfo, "agent: rank ", rank, " step ", job.step, ": ", stats.status().message());
      else
        FCK_LOG(kError, "agent: rank ", rank, " step ", job.step, ": ", stats.status().message());
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      Unpin(*r, job.slot);
      if (stats.ok()) r->newest_durable = std::max(r->newest_durable, job.step);
      else last_error_ = std::string(stats.status().message());
      r->busy = false;
      r->commits_in_flight.reset();
    }
    if (job.reply_fd >= 0) {
      pb::AgentReply rep;
      rep.set_step(job.step);
      rep.set_ok(stats.ok());
      rep.set_persisted(stats.ok());
      if (!stats.ok()) rep.set_error(std::string(stats.status().message()));
      std::lock_guard<std::mutex> lr(reply_mu_);
      WriteFrame(job.reply_fd, rep).IgnoreError();
    }
    if (stats.ok() && r->hello.rank() == 0) ApplyRetention(r->hello.directory(), r->hello.keep_last());
    cv_.notify_all();
    WriteStatus();
  }
}

void CheckpointService::Restart(int64_t restore_step) {
  epoch_++;
  std::vector<int> local_ranks;
  std::string dir;
  {
    std::unique_lock<std::mutex> l(mu_);
    for (auto& [rank, r] : ranks_) {
      for (auto& j : r->queue) {
        dropped_++;
        Unpin(*r, j.slot);
      }
      r->queue.clear();
      local_ranks.push_back(rank);
      dir = r->hello.directory();
      // A persist blocked on the store notices the new epoch now, not after its poll.
      if (r->busy && r->commits_in_flight) r->commits_in_flight->WakeAll();
    }
    // In-flight persists notice the new epoch within one barrier poll; a data
    // write in progress finishes first (about a second per GiB).
    cv_.wait_for(l, std::chrono::seconds(60), [&] {
      for (auto& [k, r] : ranks_)
        if (r->busy) return false;
      return true;
    });
  }
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
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [rank, r] : ranks_) {
    if (!OpenSegment(*r).ok()) continue;
    SlotView v;
    if (!r->seg->Newest(&v, step) || v.durable || step <= r->newest_durable) continue;
    bool queued = false;
    for (auto& j : r->queue) queued |= j.step >= step;
    if (queued) continue;
    FCK_LOG(kInfo, "agent: persisting rank ", rank, " step ", step, " (in memory only)");
    r->seg->slot(v.index)->pin_pid.store(static_cast<uint32_t>(::getpid()));
    r->queue.push_back(Job{step, v.index, -1, epoch_.load()});
  }
  cv_.notify_all();
}

absl::Status CheckpointService::PersistNewest(std::chrono::milliseconds timeout) {
  auto t0 = std::chrono::steady_clock::now();
  // The newest step every local rank holds: one COMMIT needs every rank's files.
  std::set<int64_t> both = CommonMemorySteps();
  std::optional<int64_t> common;
  if (!both.empty()) common = *both.rbegin();
  if (common) PersistStepAsync(*common);
  std::unique_lock<std::mutex> l(mu_);
  bool done = cv_.wait_until(l, t0 + timeout, [&] {
    for (auto& [k, r] : ranks_)
      if (!r->queue.empty() || r->busy) return false;
    return true;
  });
  if (!done)
    return absl::DeadlineExceededError(absl::StrCat("agent: persisting the newest snapshots took over ",
                                                    timeout.count(), " ms"));
  return absl::OkStatus();
}

void CheckpointService::Drain() {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] {
    for (auto& [k, r] : ranks_)
      if (!r->queue.empty() || r->busy) return false;
    return true;
  });
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
                      ", \"queued\": ", r->queue.size(), "}");
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
    ::close(fd);
  }
}

}  // namespace flashckpt
