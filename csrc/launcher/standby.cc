#include "launcher/standby.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace flashckpt::launcher {

std::optional<StandbyPlan> PlanStandby(const std::vector<std::string>& command) {
  // [python, -u, script, args...] or [python, -u, -m, module, args...]
  if (command.size() < 3 || command[1] != "-u") return std::nullopt;
  StandbyPlan p;
  p.interpreter = {command[0], command[1]};
  size_t i = 2;
  if (command[i] == "-m") {
    if (command.size() < 4) return std::nullopt;
    p.module = true;
    ++i;
  } else if (command[i].empty() || command[i][0] == '-') {
    return std::nullopt;  // -c and other interpreter options: start fresh
  }
  p.target = command[i++];
  p.args.assign(command.begin() + static_cast<std::ptrdiff_t>(i), command.end());
  return p;
}

// Runs with `python -u -c <this> <imports>`; fd 3 is the agent's socket.
// It imports, says "R", and then reads frames (u32 length, little endian, then
// NUL-separated fields): "flashrun-prepare-1", bytes (make a load buffer
// ready), any number of times; then "flashrun-standby-1" with the worker's
// launch, its stdout and stderr as SCM_RIGHTS.
const char* StandbyBootstrap() {
  return R"PY(import os, socket, struct, sys, time
def _flashrun_standby():
    ctl = socket.socket(fileno=3)
    t0 = time.time()
    for name in filter(None, sys.argv[1].split(",")):
        try:
            __import__(name)
        except BaseException as e:
            print("flashrun standby: cannot import %s: %r" % (name, e), file=sys.stderr, flush=True)
    print("flashrun standby pid %d: ready (imported %s in %.2f s)" % (os.getpid(), sys.argv[1] or "nothing",
                                                                      time.time() - t0), file=sys.stderr, flush=True)
    ctl.sendall(b"R")
    prepared = 0
    while True:  # frames: u32 length, then NUL-separated fields
        head, fds = b"", []
        while len(head) < 4:
            data, got, _, _ = socket.recv_fds(ctl, 4 - len(head), 2)
            if not data:
                os._exit(0)  # the agent is done with this standby
            head += data
            fds += got
        size = struct.unpack("<I", head)[0]
        body = b""
        while len(body) < size:
            chunk = ctl.recv(size - len(body))
            if not chunk:
                os._exit(0)
            body += chunk
        fields = body.decode("utf-8", "surrogateescape").split("\0")
        if fields[0] != "flashrun-prepare-1":
            break
        # The rank's snapshot size: map and touch a load buffer now, so the
        # load after a hand-over takes no page faults.
        try:
            from flashckpt import _native
            _native.load().prepare_load_buffer(int(fields[1]))
            prepared = int(fields[1])
            print("flashrun standby pid %d: load buffer of %.2f GiB prepared" % (os.getpid(), prepared / 2**30),
                  file=sys.stderr, flush=True)
        except Exception as e:
            print("flashrun standby: cannot prepare a load buffer: %r" % (e,), file=sys.stderr, flush=True)
    ctl.close()
    it = iter(fields)
    if next(it) != "flashrun-standby-1":
        os._exit(70)
    kind, target = next(it), next(it)
    args = [next(it) for _ in range(int(next(it)))]
    env = [next(it) for _ in range(int(next(it)))]
    cwd = next(it)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    for kv in env:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    os.environ["FLASHRUN_STANDBY_ACTIVATED_AT"] = "%.6f" % time.time()
    os.chdir(cwd)
    if prepared and not os.environ.get("FLASHCKPT_RESTORE_STEP"):
        from flashckpt import _native
        _native.load().prepare_load_buffer(0)  # nothing to load: give the memory back
    try:  # the other ranks wait for rank 0's store to listen (no 1 s retry)
        from flashckpt import _worker_rdzv
        _worker_rdzv.install()
    except Exception:
        pass
    import runpy
    sys.argv = [target] + args
    if kind == "module":
        sys.path[0] = cwd
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")
_flashrun_standby()
)PY";
}

namespace {
int OpenPidfd(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
}  // namespace

absl::StatusOr<std::unique_ptr<Standby>> Standby::Spawn(const StandbyPlan& plan, const std::string& imports,
                                                        const std::vector<std::string>& env, const std::string& log,
                                                        const std::string& key) {
  std::unique_ptr<Standby> s(new Standby());
  s->plan_ = plan;
  s->key_ = key;
  std::vector<std::string> args = plan.interpreter;
  args.push_back("-c");
  args.push_back(StandbyBootstrap());
  args.push_back(imports);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const std::string& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return absl::InternalError(absl::StrFormat("socketpair for a standby: %s", std::strerror(errno)));
  const int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    ::close(sv[0]);
    ::close(sv[1]);
    return absl::InternalError(absl::StrFormat("cannot create standby log %s: %s", log, std::strerror(errno)));
  }
  const pid_t agent_pid = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(sv[0]);
    ::close(sv[1]);
    ::close(log_fd);
    return absl::InternalError(absl::StrFormat("fork for a standby: %s", std::strerror(errno)));
  }
  if (pid == 0) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != agent_pid) ::_exit(137);
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    if (sv[1] == 3) {
      ::fcntl(3, F_SETFD, 0);
    } else {
      ::dup2(sv[1], 3);  // the copy is not close-on-exec
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  ::setpgid(pid, pid);
  ::close(sv[1]);
  ::close(log_fd);
  s->pid_ = pid;
  s->pidfd_ = OpenPidfd(pid);
  s->control_fd_ = sv[0];
  return s;
}

Standby::~Standby() { Kill(); }

void Standby::Kill() {
  if (control_fd_ >= 0) ::close(control_fd_);
  control_fd_ = -1;
  if (!activated_ && pid_ > 0) {
    ::kill(-pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }
  pid_ = -1;
  if (pidfd_ >= 0) ::close(pidfd_);
  pidfd_ = -1;
}

bool Standby::Alive() {
  if (pid_ <= 0) return false;
  siginfo_t info{};
  return !(::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid_);
}

bool Standby::Ready() {
  if (ready_ || control_fd_ < 0) return ready_;
  pollfd p{control_fd_, POLLIN, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  char c = 0;
  if (::recv(control_fd_, &c, 1, MSG_DONTWAIT) == 1 && c == 'R') ready_ = true;
  return ready_;
}

namespace {
// u32 length (little endian), then the body.
std::string Frame(const std::string& body) {
  std::string message(4, '\0');
  const uint32_t size = static_cast<uint32_t>(body.size());
  for (int i = 0; i < 4; ++i) message[i] = static_cast<char>((size >> (8 * i)) & 0xff);
  return message + body;
}
}  // namespace

bool Standby::Prepare(uint64_t bytes) {
  if (prepared_bytes_ == bytes) return true;
  if (!Ready() || !Alive()) return false;
  std::string body = "flashrun-prepare-1";
  body.push_back('\0');
  body += std::to_string(bytes);
  const std::string message = Frame(body);
  size_t sent = 0;
  while (sent < message.size()) {
    // Non-blocking while nothing went out (a full socket: try again later);
    // a frame once started is finished.
    ssize_t n = ::send(control_fd_, message.data() + sent, message.size() - sent,
                       MSG_NOSIGNAL | (sent == 0 ? MSG_DONTWAIT : 0));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  prepared_bytes_ = bytes;
  return true;
}

absl::Status Standby::Activate(const std::vector<std::string>& env, int stdout_fd, int stderr_fd) {
  if (!Ready() || !Alive()) return absl::FailedPreconditionError("the standby is not ready");
  std::string body = "flashrun-standby-1";
  auto add = [&](const std::string& field) {
    body.push_back('\0');
    body += field;
  };
  add(plan_.module ? "module" : "script");
  add(plan_.target);
  add(std::to_string(plan_.args.size()));
  for (const auto& a : plan_.args) add(a);
  add(std::to_string(env.size()));
  for (const auto& e : env) add(e);
  char cwd[4096];
  add(::getcwd(cwd, sizeof(cwd)) ? cwd : ".");
  std::string message = Frame(body);

  int fds[2] = {stdout_fd, stderr_fd};
  char control[CMSG_SPACE(sizeof(fds))] = {};
  iovec iov{message.data(), message.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(fds));
  std::memcpy(CMSG_DATA(c), fds, sizeof(fds));
  size_t sent = 0;
  while (sent < message.size()) {
    ssize_t n = sent == 0 ? ::sendmsg(control_fd_, &msg, MSG_NOSIGNAL)
                          : ::send(control_fd_, message.data() + sent, message.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    // Nothing or part of the launch went out: this standby is of no use (the destructor kills it).
    if (n <= 0)
      return absl::UnavailableError(absl::StrFormat("hand-over to standby pid %d: %s", pid_, std::strerror(errno)));
    sent += static_cast<size_t>(n);
  }
  activated_ = true;
  ::close(control_fd_);
  control_fd_ = -1;
  if (pidfd_ >= 0) ::close(pidfd_);
  pidfd_ = -1;
  return absl::OkStatus();
}

}  // namespace flashckpt::launcher
