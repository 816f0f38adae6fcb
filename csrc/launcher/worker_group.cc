#include "launcher/worker_group.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_format.h"

namespace flashckpt::launcher {
namespace {

using Clock = std::chrono::steady_clock;

int OpenPidfd(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

double WallSeconds(std::chrono::system_clock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

void WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a closed console must not stop the agent
    data += n;
    size -= static_cast<size_t>(n);
  }
}

}  // namespace

std::optional<int> ExitStatusIfExiting(pid_t pid);

// ---------------------------------------------------------------------------
OutputForwarder::OutputForwarder() { wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

OutputForwarder::~OutputForwarder() {
  Finish(Clock::now());
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

absl::Status OutputForwarder::Add(int pipe_fd, int file_fd, int console_fd, std::string prefix, bool prefix_console,
                                  std::vector<std::string> filters, const std::string& filtered_path) {
  int filtered_fd = -1;
  if (!filters.empty()) {
    auto it = filtered_fds_.find(filtered_path);
    if (it == filtered_fds_.end()) {
      const int fd = ::open(filtered_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (fd < 0) {
        ::close(pipe_fd);
        if (file_fd >= 0) ::close(file_fd);
        return absl::InternalError(absl::StrFormat("cannot create log file %s: %s", filtered_path, std::strerror(errno)));
      }
      it = filtered_fds_.emplace(filtered_path, fd).first;
    }
    filtered_fd = it->second;
  }
  streams_.push_back(
      Stream{pipe_fd, file_fd, console_fd, std::move(prefix), prefix_console, std::move(filters), filtered_fd, {}});
  return absl::OkStatus();
}

// The complete lines of stream.partial_line (all of it with `flush`) to the
// console, prefixed, and those that match a filter to the filtered log.
void OutputForwarder::Lines(Stream& stream, bool flush) {
  if (flush && !stream.partial_line.empty() && stream.partial_line.back() != '\n') stream.partial_line += '\n';
  std::string console, filtered;
  size_t start = 0;
  for (size_t nl; (nl = stream.partial_line.find('\n', start)) != std::string::npos; start = nl + 1) {
    const absl::string_view line(stream.partial_line.data() + start, nl + 1 - start);
    if (stream.console_fd >= 0) absl::StrAppend(&console, stream.prefix_console ? stream.prefix : "", line);
    for (const std::string& f : stream.filters) {
      if (line.find(f) != absl::string_view::npos) {
        absl::StrAppend(&filtered, stream.prefix, line);
        break;
      }
    }
  }
  stream.partial_line.erase(0, start);
  if (!console.empty()) WriteAll(stream.console_fd, console.data(), console.size());
  if (!filtered.empty()) WriteAll(stream.filtered_fd, filtered.data(), filtered.size());
}

void OutputForwarder::Start() {
  if (streams_.empty()) return;
  thread_ = std::thread([this] { Loop(); });
}

void OutputForwarder::Drain(Stream& stream, bool at_eof) {
  char buffer[65536];
  while (true) {
    const ssize_t n = ::read(stream.pipe_fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n > 0) {
      if (stream.file_fd >= 0) WriteAll(stream.file_fd, buffer, static_cast<size_t>(n));
      if (stream.console_fd >= 0 || !stream.filters.empty()) {
        stream.partial_line.append(buffer, static_cast<size_t>(n));
        Lines(stream, false);
      }
      if (!at_eof) return;  // one chunk per wake-up keeps streams fair
      continue;
    }
    // End of file (or an error, or no more data when draining at the end).
    if (n == 0 || (n < 0 && errno != EAGAIN) || at_eof) {
      Lines(stream, true);
      ::close(stream.pipe_fd);
      if (stream.file_fd >= 0) ::close(stream.file_fd);
      stream.pipe_fd = -1;
      stream.file_fd = -1;
    }
    return;
  }
}

void OutputForwarder::Loop() {
  while (true) {
    std::vector<pollfd> fds;
    std::vector<size_t> index;
    for (size_t i = 0; i < streams_.size(); ++i) {
      if (streams_[i].pipe_fd < 0) continue;
      fds.push_back(pollfd{streams_[i].pipe_fd, POLLIN, 0});
      index.push_back(i);
    }
    if (fds.empty()) return;
    fds.push_back(pollfd{wake_fd_, POLLIN, 0});
    const int ready = ::poll(fds.data(), fds.size(), 200);
    if (ready < 0 && errno != EINTR) return;
    for (size_t k = 0; k + 1 < fds.size(); ++k) {
      if (fds[k].revents & (POLLIN | POLLHUP | POLLERR)) Drain(streams_[index[k]], false);
    }
    if (stopping_.load()) {
      // Past the deadline: take what is buffered and close the rest (a
      // grandchild may still hold a pipe open).
      for (Stream& s : streams_) {
        if (s.pipe_fd >= 0) {
          ::fcntl(s.pipe_fd, F_SETFL, O_NONBLOCK);
          Drain(s, true);
        }
      }
      return;
    }
  }
}

void OutputForwarder::Finish(Clock::time_point deadline) {
  if (thread_.joinable()) {
    // Give the pipes until the deadline to reach end of file on their own.
    while (Clock::now() < deadline) {
      bool open = false;
      for (const Stream& s : streams_) open |= s.pipe_fd >= 0;  // read racily; only a hint
      if (!open) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    stopping_ = true;
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof(one));
    thread_.join();
  }
  for (Stream& s : streams_) {
    if (s.pipe_fd >= 0) ::close(s.pipe_fd);
    if (s.file_fd >= 0) ::close(s.file_fd);
    s.pipe_fd = s.file_fd = -1;
  }
  streams_.clear();
  for (auto& [path, fd] : filtered_fds_) ::close(fd);
  filtered_fds_.clear();
}

void BecomeSubreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 1); }

namespace {
std::vector<pid_t> ChildrenOfThisProcess() {
  std::vector<pid_t> children;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    std::ifstream in(task.path() / "children");
    pid_t pid;
    while (in >> pid) children.push_back(pid);
  }
  return children;
}
}  // namespace

int WorkerGroup::ReapOrphans() {
  int alive = 0;
  for (pid_t pid : ChildrenOfThisProcess()) {
    bool is_worker = false;
    for (const Worker& w : workers_) is_worker |= (w.pid == pid && !w.reaped);
    for (const Worker& w : draining_) is_worker |= (w.pid == pid && !w.reaped);
    for (const auto& [local_rank, s] : standbys_) is_worker |= (s->pid() == pid);
    if (is_worker) continue;
    int status;
    if (::waitpid(pid, &status, WNOHANG) == 0) ++alive;
  }
  return alive;
}

// ---------------------------------------------------------------------------
WorkerGroup::WorkerGroup() = default;

WorkerGroup::~WorkerGroup() { Stop(SIGKILL, std::chrono::seconds(0)); }

absl::Status WorkerGroup::Start(std::vector<WorkerLaunch> launches) {
  if (!workers_.empty()) StopForRestart(SIGKILL, std::chrono::seconds(0));
  workers_.clear();
  failures_.clear();
  standbys_used_ = 0;
  started_at_ = Clock::now();
  forwarder_ = std::make_unique<OutputForwarder>();
  const pid_t agent_pid = ::getpid();
  for (WorkerLaunch& launch : launches) {
    Worker worker;
    worker.launch = std::move(launch);
    const WorkerLaunch& l = worker.launch;

    // Everything the child needs is prepared before fork: after it, only
    // async-signal-safe calls.
    std::vector<char*> argv;
    for (const std::string& a : l.argv) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (const std::string& e : l.env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);

    int child_out = -1, child_err = -1;  // -1: inherit the agent's
    auto prepare_stream = [&](int stream_bit, const std::string& path, int console_fd,
                              const std::vector<std::string>& filters, const std::string& filtered_path,
                              int* child_fd) -> absl::Status {
      const bool tee = l.tee_streams & stream_bit;
      const bool redirect = (l.redirect_streams & stream_bit) || tee;
      if (!redirect && filters.empty()) return absl::OkStatus();
      int file_fd = -1;
      if (redirect) {
        file_fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (file_fd < 0) {
          return absl::InternalError(absl::StrFormat("cannot create log file %s: %s", path, std::strerror(errno)));
        }
      }
      if (!tee && filters.empty()) {
        *child_fd = file_fd;
        return absl::OkStatus();
      }
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0) {
        if (file_fd >= 0) ::close(file_fd);
        return absl::InternalError(absl::StrFormat("pipe for %s: %s", path, std::strerror(errno)));
      }
      // Teed: prefixed on the console; redirected only: not on it; neither
      // (only filtered): on the console as the worker wrote it.
      const bool to_console = tee || !redirect;
      if (absl::Status s = forwarder_->Add(p[0], file_fd, to_console ? console_fd : -1, l.console_prefix,
                                           /*prefix_console=*/tee, filters, filtered_path);
          !s.ok()) {
        ::close(p[1]);
        return s;
      }
      *child_fd = p[1];
      return absl::OkStatus();
    };
    if (absl::Status s = prepare_stream(kStdout, l.stdout_log, STDOUT_FILENO, l.stdout_filters,
                                        l.filtered_stdout_log, &child_out);
        !s.ok())
      return s;
    if (absl::Status s = prepare_stream(kStderr, l.stderr_log, STDERR_FILENO, l.stderr_filters,
                                        l.filtered_stderr_log, &child_err);
        !s.ok())
      return s;
    if (!l.heartbeat_file.empty()) {
      const int fd = ::open(l.heartbeat_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd >= 0) ::close(fd);
    }

    // A warm standby started for this very command takes the worker's place.
    if (auto it = standbys_.find(l.local_rank); it != standbys_.end()) {
      std::unique_ptr<Standby> standby = std::move(it->second);
      standbys_.erase(it);
      if (standby->key() == l.standby_key && standby->Ready() && standby->Alive() &&
          standby->Activate(l.env, child_out >= 0 ? child_out : STDOUT_FILENO,
                            child_err >= 0 ? child_err : STDERR_FILENO).ok()) {
        if (child_out >= 0) ::close(child_out);
        if (child_err >= 0) ::close(child_err);
        worker.pid = standby->pid();
        worker.pidfd = OpenPidfd(worker.pid);
        worker.started = Clock::now();
        worker.started_wall = std::chrono::system_clock::now();
        workers_.push_back(std::move(worker));
        ++standbys_used_;
        continue;
      }
      // Not ready, or started for another command: the destructor kills it, a fresh process starts.
    }

    const pid_t pid = ::fork();
    if (pid < 0) {
      return absl::InternalError(absl::StrFormat("fork for local rank %d: %s", l.local_rank, std::strerror(errno)));
    }
    if (pid == 0) {
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != agent_pid) ::_exit(137);  // the agent died before we got here
      if (child_out >= 0) ::dup2(child_out, STDOUT_FILENO);
      if (child_err >= 0) ::dup2(child_err, STDERR_FILENO);
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
      ::execve(argv[0], argv.data(), envp.data());
      const char* reason = std::strerror(errno);
      const char prefix[] = "flashrun: cannot execute ";
      (void)!::write(STDERR_FILENO, prefix, sizeof(prefix) - 1);
      (void)!::write(STDERR_FILENO, argv[0], std::strlen(argv[0]));
      (void)!::write(STDERR_FILENO, ": ", 2);
      (void)!::write(STDERR_FILENO, reason, std::strlen(reason));
      (void)!::write(STDERR_FILENO, "\n", 1);
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also here, so that a signal right after fork reaches the group
    if (child_out >= 0) ::close(child_out);
    if (child_err >= 0) ::close(child_err);
    worker.pid = pid;
    worker.pidfd = OpenPidfd(pid);
    worker.started = Clock::now();
    worker.started_wall = std::chrono::system_clock::now();
    workers_.push_back(std::move(worker));
  }
  forwarder_->Start();
  return absl::OkStatus();
}

std::vector<int> WorkerGroup::ExitNotifiers() const {
  std::vector<int> fds;
  for (const Worker& w : workers_) {
    if (!w.exited && w.pidfd >= 0) fds.push_back(w.pidfd);
  }
  for (const Worker& w : draining_) {
    if (!w.reaped && w.pidfd >= 0) fds.push_back(w.pidfd);
  }
  return fds;
}

std::vector<pid_t> WorkerGroup::pids() const {
  std::vector<pid_t> out;
  for (const Worker& w : workers_) out.push_back(w.pid);
  return out;
}

bool WorkerGroup::PeekExit(Worker& worker) {
  // (A draining worker's pidfd stays readable until it is reaped; Check reaps it.)
  if (worker.exited) return true;
  siginfo_t info{};
  if (::waitid(P_PID, static_cast<id_t>(worker.pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) return false;
  if (info.si_pid != worker.pid) return false;
  worker.exited = true;
  worker.exitcode = info.si_code == CLD_EXITED ? info.si_status : -info.si_status;
  return true;
}

void WorkerGroup::Reap(Worker& worker) {
  if (worker.reaped || worker.pid <= 0) return;
  int status = 0;
  while (::waitpid(worker.pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!worker.exited) {
    worker.exited = true;
    worker.exitcode = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  }
  worker.reaped = true;
  if (worker.pidfd >= 0) ::close(worker.pidfd);
  worker.pidfd = -1;
}

std::vector<pid_t> WorkerGroup::standby_pids() const {
  std::vector<pid_t> out;
  for (const auto& [local_rank, s] : standbys_) out.push_back(s->pid());
  return out;
}

int WorkerGroup::standbys_ready() {
  int n = 0;
  for (auto& [local_rank, s] : standbys_) n += s->Ready() && s->Alive();
  return n;
}

void WorkerGroup::PrepareStandbys(const std::map<int, uint64_t>& snapshot_bytes_by_rank) {
  if (!standby_ || !standby_->prepare_load_buffers) return;
  for (const Worker& w : workers_) {
    auto bytes = snapshot_bytes_by_rank.find(w.launch.global_rank);
    auto s = standbys_.find(w.launch.local_rank);
    if (bytes == snapshot_bytes_by_rank.end() || s == standbys_.end()) continue;
    s->second->Prepare(bytes->second);
  }
}

void WorkerGroup::MaintainStandbys() {
  if (!standby_ || standbys_held_ || workers_.empty() || Clock::now() - started_at_ < standby_->delay) return;
  for (const Worker& w : workers_)
    if (w.exited) return;  // the group is ending or failing: a standby now would be killed right away
  for (const Worker& w : workers_) {
    const int lr = w.launch.local_rank;
    if (w.launch.standby_key.empty() || standby_broken_[lr]) continue;
    if (auto it = standbys_.find(lr); it != standbys_.end()) {
      if (it->second->Alive()) continue;
      // It died before it was needed (a failed import, an out-of-memory kill): restarts start fresh.
      std::fprintf(stderr, "[flashrun] the warm standby of local rank %d exited (see %s); restarts of this rank "
                           "start a fresh interpreter\n", lr, w.launch.standby_log.c_str());
      standby_broken_[lr] = true;
      standbys_.erase(it);
      continue;
    }
    std::optional<StandbyPlan> plan = PlanStandby(w.launch.argv);
    if (!plan) continue;
    auto s = Standby::Spawn(*plan, standby_->imports, w.launch.env, w.launch.standby_log, w.launch.standby_key);
    if (!s.ok()) {
      std::fprintf(stderr, "[flashrun] cannot start a warm standby for local rank %d: %s\n", lr,
                   std::string(s.status().message()).c_str());
      standby_broken_[lr] = true;
      continue;
    }
    standbys_[lr] = std::move(*s);
  }
}

GroupState WorkerGroup::Check(std::chrono::duration<double> worker_timeout) {
  ReapDraining(/*block=*/false);
  MaintainStandbys();
  bool all_succeeded = true;
  const double now_wall = WallSeconds(std::chrono::system_clock::now());
  for (Worker& w : workers_) {
    const bool was_exited = w.exited;
    if (PeekExit(w)) {
      if (!was_exited && w.exitcode != 0) {
        WorkerFailure f;
        f.local_rank = w.launch.local_rank;
        f.global_rank = w.launch.global_rank;
        f.pid = w.pid;
        f.exitcode = w.exitcode;
        f.timestamp_s = now_wall;
        f.error_file = w.launch.error_file;
        ReadErrorFile(&f);
        failures_.push_back(std::move(f));
      }
      if (w.exitcode != 0) all_succeeded = false;
      continue;
    }
    all_succeeded = false;
    if (exit_probe_) {
      // A worker on its way out with a non-zero status has failed: no need to
      // wait for the kernel to tear it down. (A clean exit is not hurried.)
      if (std::optional<int> status = ExitStatusIfExiting(w.pid); status && *status != 0) {
        const int exitcode = WIFEXITED(*status) ? WEXITSTATUS(*status) : -WTERMSIG(*status);
        WorkerFailure f;
        f.local_rank = w.launch.local_rank;
        f.global_rank = w.launch.global_rank;
        f.pid = w.pid;
        f.exitcode = exitcode;
        f.timestamp_s = now_wall;
        f.error_file = w.launch.error_file;
        ReadErrorFile(&f);
        failures_.push_back(std::move(f));
        w.exited = true;
        w.exitcode = exitcode;
        continue;
      }
    }
    if (worker_timeout.count() > 0 && !w.launch.heartbeat_file.empty()) {
      struct stat st;
      auto last_beat = w.started_wall;
      if (::stat(w.launch.heartbeat_file.c_str(), &st) == 0) {
        const auto mtime = std::chrono::system_clock::time_point(
            std::chrono::duration_cast<std::chrono::system_clock::duration>(
                std::chrono::seconds(st.st_mtim.tv_sec) + std::chrono::nanoseconds(st.st_mtim.tv_nsec)));
        if (mtime > last_beat) last_beat = mtime;
      }
      const double silent_s =
          std::chrono::duration<double>(std::chrono::system_clock::now() - last_beat).count();
      if (silent_s > worker_timeout.count()) {
        WorkerFailure f;
        f.local_rank = w.launch.local_rank;
        f.global_rank = w.launch.global_rank;
        f.pid = w.pid;
        f.exitcode = -SIGKILL;
        f.timestamp_s = now_wall;
        f.error_file = "<N/A>";
        f.message = absl::StrFormat("no heartbeat for %.1f s (--worker-timeout %g s): treated as hung and stopped",
                                    silent_s, worker_timeout.count());
        failures_.push_back(std::move(f));
        w.exited = true;  // counted as failed; Stop kills and reaps it
        w.exitcode = -SIGKILL;
      }
    }
  }
  if (!failures_.empty()) return GroupState::kFailed;
  return all_succeeded ? GroupState::kSucceeded : GroupState::kRunning;
}

void WorkerGroup::Signal(int signal_number) {
  for (Worker& w : workers_) {
    if (!w.reaped && w.pid > 0) ::kill(-w.pid, signal_number);
  }
}

namespace {
bool LeaderExited(pid_t pid) {
  siginfo_t info{};
  return ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
}

}  // namespace

// The wait status of a process in the kernel's exit path (PF_EXITING), read from
// /proc/<pid>/stat (exit_code, field 52, is set before the kernel frees the
// process's memory, which for a large worker takes a quarter of a second).
std::optional<int> ExitStatusIfExiting(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream fields(stat.substr(paren + 1));
  std::vector<std::string> f;
  for (std::string field; fields >> field;) f.push_back(field);
  // f[0] is field 3 (state); flags is field 9, exit_code field 52.
  if (f.size() < 50) return std::nullopt;
  constexpr unsigned long kPfExiting = 0x4;
  const unsigned long flags = std::stoul(f[6]);
  if (f[0] != "Z" && f[0] != "X" && (flags & kPfExiting) == 0) return std::nullopt;
  return std::stoi(f[49]);
}

namespace {
// Exited, or in the kernel's exit path (PF_EXITING): it runs no user code any more.
bool LeaderExiting(pid_t pid) {
  if (LeaderExited(pid)) return true;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return true;  // gone
  std::istringstream fields(stat.substr(paren + 1));
  std::string state, ppid, pgrp, session, tty, tpgid;
  unsigned long flags = 0;
  fields >> state >> ppid >> pgrp >> session >> tty >> tpgid >> flags;
  constexpr unsigned long kPfExiting = 0x4;
  return state == "Z" || state == "X" || (flags & kPfExiting) != 0;
}
}  // namespace

template <typename Predicate>
void WorkerGroup::SignalUntil(int first_signal, std::chrono::duration<double> grace, Predicate done) {
  auto all_done = [&] {
    for (Worker& w : workers_) {
      if (!w.reaped && !done(w.pid)) return false;
    }
    return true;
  };
  // The leaders are not reaped yet, so their pids, and with them the process
  // group ids, cannot have been reused.
  Signal(first_signal);
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(grace);
  while (!all_done() && Clock::now() < deadline) {
    std::vector<pollfd> fds;
    for (Worker& w : workers_) {
      if (!w.reaped && w.pidfd >= 0 && !LeaderExited(w.pid)) fds.push_back(pollfd{w.pidfd, POLLIN, 0});
    }
    if (fds.empty()) break;
    // Exits wake the poll; the exiting state has no event, hence the short timeout.
    ::poll(fds.data(), fds.size(), 2);
  }
  if (all_done()) return;
  Signal(SIGKILL);
  const auto kill_deadline = Clock::now() + std::chrono::seconds(5);
  while (!all_done() && Clock::now() < kill_deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void WorkerGroup::StopForRestart(int first_signal, std::chrono::duration<double> grace) {
  SignalUntil(first_signal, grace, LeaderExiting);
  for (Worker& w : workers_) draining_.push_back(std::move(w));
  workers_.clear();
  if (forwarder_) draining_forwarders_.push_back(std::move(forwarder_));
}

void WorkerGroup::ReapDraining(bool block) {
  bool all_reaped = true;
  for (Worker& w : draining_) {
    if (w.reaped) continue;
    if (!block && !LeaderExited(w.pid)) {
      all_reaped = false;
      continue;
    }
    if (block && !LeaderExited(w.pid)) {
      ::kill(-w.pid, SIGKILL);
      pollfd p{w.pidfd, POLLIN, 0};
      ::poll(&p, 1, 10000);
    }
    ::kill(-w.pid, SIGKILL);  // stragglers of its process group, while the zombie reserves the id
    Reap(w);
  }
  if (all_reaped) {
    draining_.clear();
    for (auto& f : draining_forwarders_) f->Finish(Clock::now() + std::chrono::milliseconds(block ? 500 : 0));
    draining_forwarders_.clear();
  }
}

void WorkerGroup::Stop(int first_signal, std::chrono::duration<double> grace) {
  standbys_.clear();  // kills and reaps them: the group stops for good
  ReapDraining(/*block=*/true);
  if (workers_.empty()) {
    if (forwarder_) forwarder_->Finish(Clock::now());
    return;
  }
  SignalUntil(first_signal, grace, LeaderExited);
  // Whatever is left in the process groups (stragglers, grandchildren) is killed.
  Signal(SIGKILL);
  for (Worker& w : workers_) {
    Reap(w);
    if (w.pidfd >= 0) ::close(w.pidfd);
    w.pidfd = -1;
  }
  // Adopted grandchildren were SIGKILLed with their process group: reap them.
  const auto orphan_deadline = Clock::now() + std::chrono::seconds(2);
  while (ReapOrphans() > 0 && Clock::now() < orphan_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (forwarder_) forwarder_->Finish(Clock::now() + std::chrono::milliseconds(500));
}

}  // namespace flashckpt::launcher
