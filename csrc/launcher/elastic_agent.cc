#include "launcher/elastic_agent.h"

#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "launcher/events.h"
#include "launcher/failure_report.h"
#include "launcher/worker_environment.h"
#include "launcher/worker_group.h"

namespace flashckpt::launcher {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

void Say(const std::string& text) { std::fprintf(stderr, "[flashrun] %s\n", text.c_str()); }

// FLASHRUN_TRACE_RESTART=1: wall-clock marks of the restart phases, for benchmarks.
void TraceMark(const char* what) {
  static const bool enabled = std::getenv("FLASHRUN_TRACE_RESTART") != nullptr;
  if (!enabled) return;
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::fprintf(stderr, "[flashrun] trace %.6f %s\n", now, what);
}

std::string RandomRunId() {
  std::random_device device;
  std::mt19937_64 generator(device());
  const uint64_t a = generator(), b = generator();
  return absl::StrFormat("%08x-%04x-%04x-%04x-%012x", a >> 32, (a >> 16) & 0xffff, a & 0xffff, b >> 48,
                         b & 0xffffffffffffULL);
}

std::chrono::milliseconds ConfSeconds(const LaunchOptions& o, const std::string& key, double fallback_s) {
  double seconds = fallback_s;
  auto it = o.rdzv_conf.find(key);
  if (it != o.rdzv_conf.end()) absl::SimpleAtod(it->second, &seconds);
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

std::string PythonInterpreter(const std::map<std::string, std::string>& env) {
  for (const char* name : {"FLASHRUN_PYTHON_INTERPRETER", "PYTHON_EXEC"}) {
    auto it = env.find(name);
    if (it != env.end() && !it->second.empty()) return it->second;
  }
  return "/usr/bin/python3";
}

std::string FindOnPath(const std::string& program, const std::map<std::string, std::string>& env) {
  if (program.find('/') != std::string::npos) return program;
  auto it = env.find("PATH");
  const std::string path = it == env.end() ? "/usr/local/bin:/usr/bin:/bin" : it->second;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    const std::string candidate = path.substr(start, end - start) + "/" + program;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return program;  // exec fails and the worker reports it
}

struct Job {
  const LaunchOptions& options;
  std::string run_id;
  fs::path run_log_dir;
  std::map<std::string, std::string> agent_env;
  std::vector<std::string> command;  // interpreter, flags, script, args
  std::string title_name;            // for the failure summary
  std::string hostname;
  std::string agent_socket;          // the checkpoint service's Unix socket
};

std::vector<WorkerLaunch> PlanWorkers(const Job& job, const RoundAssignment& round, int restart_count,
                                      NodeHooks& hooks) {
  const LaunchOptions& o = job.options;
  const fs::path attempt_dir = job.run_log_dir / absl::StrCat("attempt_", restart_count);
  std::error_code ec;
  fs::remove_all(attempt_dir, ec);  // a membership change reuses the attempt number, as in torchrun
  fs::create_directories(attempt_dir, ec);
  std::vector<WorkerLaunch> launches;
  for (int local_rank = 0; local_rank < o.nproc_per_node; ++local_rank) {
    const fs::path rank_dir = attempt_dir / std::to_string(local_rank);
    fs::create_directories(rank_dir, ec);
    WorkerIdentity id;
    id.local_rank = local_rank;
    id.global_rank = round.rank_offset + local_rank;
    id.group_rank = round.group_rank;
    id.local_world_size = o.nproc_per_node;
    id.world_size = round.world_size;
    id.group_world_size = round.group_world_size;
    id.role = o.role;
    id.master_addr = round.master_addr;
    id.master_port = round.master_port;
    id.restart_count = restart_count;
    id.max_restarts = o.max_restarts;
    id.run_id = job.run_id;
    id.use_agent_store = false;  // the rank-0 worker hosts the torch store itself
    id.error_file = (rank_dir / "error.json").string();
    id.agent_socket = job.agent_socket;
    id.restore_step = hooks.RestoreStep();
    id.heartbeat_file = (rank_dir / "heartbeat").string();

    WorkerLaunch launch;
    launch.local_rank = local_rank;
    launch.global_rank = id.global_rank;
    launch.argv = job.command;
    id.virtual_local_rank = o.virtual_local_rank;
    launch.env = MergeEnvironment(job.agent_env, WorkerVariables(id, job.agent_env));
    launch.stdout_log = (rank_dir / "stdout.log").string();
    launch.stderr_log = (rank_dir / "stderr.log").string();
    launch.redirect_streams = o.redirects.ForLocalRank(local_rank);
    launch.tee_streams = o.tee.ForLocalRank(local_rank);
    if (o.local_ranks_filter) {
      const auto& keep = *o.local_ranks_filter;
      if (std::find(keep.begin(), keep.end(), local_rank) == keep.end()) {
        // Not shown on the console: what would have gone there goes to the log file only.
        launch.redirect_streams |= launch.tee_streams | kStdout | kStderr;
        launch.tee_streams = 0;
      }
    }
    launch.console_prefix = absl::StrFormat("[%s%d]:", o.role, local_rank);
    launch.stdout_filters = o.duplicate_stdout_filters;
    launch.stderr_filters = o.duplicate_stderr_filters;
    launch.filtered_stdout_log = (attempt_dir / "filtered_stdout.log").string();
    launch.filtered_stderr_log = (attempt_dir / "filtered_stderr.log").string();
    launch.error_file = id.error_file;
    launch.heartbeat_file = id.heartbeat_file;
    if (o.standby) {
      // A standby may replace this worker when it was started with the same
      // command and the same start-up environment (the agent's: PYTHONPATH and
      // such); the per-attempt variables (RANK, MASTER_PORT, ...) come at the hand-over.
      launch.standby_key = absl::StrJoin(job.command, "\x1f");
      for (const auto& [k, v] : job.agent_env) absl::StrAppend(&launch.standby_key, "\x1e", k, "=", v);
      launch.standby_log = (job.run_log_dir / absl::StrCat("standby_", local_rank, ".log")).string();
    }
    launches.push_back(std::move(launch));
  }
  return launches;
}

absl::StatusOr<std::unique_ptr<NodeRendezvous>> MakeRendezvous(const LaunchOptions& o, const Job& job) {
  if (o.rdzv_backend == "static" && !o.standalone) {
    StaticRendezvousOptions s;
    s.node_rank = o.node_rank;
    s.nnodes = o.max_nodes;
    s.local_world_size = o.nproc_per_node;
    s.master_addr = o.master_addr;
    s.master_port = o.master_port;
    return MakeStaticRendezvous(s);
  }
  DynamicRendezvousOptions d;
  d.run_id = job.run_id;
  const bool etcd = o.rdzv_backend == "etcd-v3" && !o.standalone;
  if (o.standalone) {
    d.endpoint_host = "127.0.0.1";
    d.endpoint_port = 0;  // a free port: a busy 29400 never fails a standalone job
    d.is_host = true;
  } else if (o.rdzv_endpoint.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat("--rdzv-backend %s needs --rdzv-endpoint %s", o.rdzv_backend,
                                                      etcd ? "host:port[,host:port...] (the etcd members)"
                                                           : "host[:port]"));
  } else if (!etcd) {
    std::string host = o.rdzv_endpoint;
    int port = 29400;
    if (host.front() == '[') {  // [v6]:port
      const size_t close = host.find(']');
      if (close != std::string::npos && close + 1 < host.size() && host[close + 1] == ':') {
        absl::SimpleAtoi(host.substr(close + 2), &port);
      }
      host = host.substr(1, close - 1);
    } else if (const size_t colon = host.rfind(':'); colon != std::string::npos && host.find(':') == colon) {
      if (!absl::SimpleAtoi(host.substr(colon + 1), &port) || port <= 0 || port > 65535) {
        return absl::InvalidArgumentError(absl::StrFormat("--rdzv-endpoint '%s': bad port", o.rdzv_endpoint));
      }
      host = host.substr(0, colon);
    }
    d.endpoint_host = host;
    d.endpoint_port = static_cast<uint16_t>(port);
    if (auto it = o.rdzv_conf.find("is_host"); it != o.rdzv_conf.end()) {
      const std::string v = absl::AsciiStrToLower(it->second);
      d.is_host = v == "1" || v == "true" || v == "yes";
    }
  }
  auto token_env = job.agent_env.find("FLASHRUN_RDZV_TOKEN");
  if (token_env != job.agent_env.end()) d.token = token_env->second;
  if (auto it = o.rdzv_conf.find("token_file"); it != o.rdzv_conf.end()) {
    std::ifstream in(it->second);
    if (!in) return absl::NotFoundError(absl::StrFormat("rendezvous token file %s cannot be read", it->second));
    std::string token((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    d.token = std::string(absl::StripAsciiWhitespace(token));
  }
  d.node_id = o.node_name.empty() ? absl::StrFormat("%s_%d", job.hostname, ::getpid()) : o.node_name;
  d.node_address = o.local_addr.empty() ? job.hostname : o.local_addr;
  d.local_world_size = o.nproc_per_node;
  d.min_nodes = o.standalone ? 1 : o.min_nodes;
  d.max_nodes = o.standalone ? 1 : o.max_nodes;
  d.join_timeout = ConfSeconds(o, "join_timeout", 600);
  if (o.rdzv_conf.count("timeout") && !o.rdzv_conf.count("join_timeout")) d.join_timeout = ConfSeconds(o, "timeout", 600);
  d.last_call_timeout = ConfSeconds(o, "last_call_timeout", 30);
  d.keep_alive_interval = ConfSeconds(o, "keep_alive_interval", 5);
  d.read_timeout = ConfSeconds(o, "read_timeout", 60);
  if (auto it = o.rdzv_conf.find("keep_alive_max_attempt"); it != o.rdzv_conf.end()) {
    absl::SimpleAtoi(it->second, &d.keep_alive_max_attempt);
    d.keep_alive_max_attempt = std::max(1, d.keep_alive_max_attempt);
  }
  if (!etcd) return StartDynamicRendezvous(std::move(d));

  EtcdRendezvousOptions e;
  e.rendezvous = std::move(d);
  absl::StatusOr<std::vector<std::string>> endpoints = rendezvous::ParseEtcdEndpoints(o.rdzv_endpoint);
  if (!endpoints.ok())
    return absl::InvalidArgumentError(absl::StrCat("--rdzv-endpoint: ", endpoints.status().message()));
  e.etcd.endpoints = *endpoints;
  if (auto it = o.rdzv_conf.find("user"); it != o.rdzv_conf.end()) e.etcd.user = it->second;
  if (auto env = job.agent_env.find("FLASHRUN_ETCD_PASSWORD"); env != job.agent_env.end()) e.etcd.password = env->second;
  if (auto it = o.rdzv_conf.find("password_file"); it != o.rdzv_conf.end()) {
    std::ifstream in(it->second);
    if (!in)
      return absl::NotFoundError(absl::StrFormat("--rdzv-conf password_file=%s cannot be read", it->second));
    std::string password((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    e.etcd.password = std::string(absl::StripTrailingAsciiWhitespace(password));
  }
  if (e.etcd.user.empty() && !e.etcd.password.empty())
    return absl::InvalidArgumentError("an etcd password was given (password_file or FLASHRUN_ETCD_PASSWORD) but no "
                                      "user: add --rdzv-conf user=NAME");
  if (auto it = o.rdzv_conf.find("key_prefix"); it != o.rdzv_conf.end()) e.key_prefix = it->second;
  if (e.key_prefix.empty() || e.key_prefix.back() != '/') e.key_prefix += '/';
  // TLS as torchrun's etcd backends take it: protocol=https, cacert, and cert (with key) for a client certificate.
  auto conf = [&](const char* key) {
    auto it = o.rdzv_conf.find(key);
    return it == o.rdzv_conf.end() ? std::string() : it->second;
  };
  e.etcd.ca_file = conf("cacert");
  e.etcd.cert_file = conf("cert");
  e.etcd.key_file = conf("key");
  const bool tls_files = !e.etcd.ca_file.empty() || !e.etcd.cert_file.empty() || !e.etcd.key_file.empty();
  bool https_endpoint = false;
  for (const std::string& ep : e.etcd.endpoints) https_endpoint = https_endpoint || ep.rfind("https://", 0) == 0;
  if (conf("protocol") == "http" && (tls_files || https_endpoint))
    return absl::InvalidArgumentError(absl::StrCat(
        "--rdzv-conf protocol=http does not go with ",
        tls_files ? "cacert, cert or key (they are for TLS)" : absl::StrCat("--rdzv-endpoint ", o.rdzv_endpoint),
        ": use protocol=https, or leave protocol out"));
  e.etcd.tls = conf("protocol") == "https" || tls_files || https_endpoint;
  return StartEtcdRendezvous(std::move(e));
}

std::string DescribeFailures(const std::vector<WorkerFailure>& failures) {
  std::string text;
  for (const WorkerFailure& f : failures) {
    if (!text.empty()) text += ", ";
    if (f.exitcode < 0) {
      text += absl::StrFormat("local rank %d (pid %d) %s", f.local_rank, f.pid,
                              f.error_file == "<N/A>" ? f.message : "got " + SignalName(-f.exitcode));
    } else {
      text += absl::StrFormat("local rank %d (pid %d) exited with %d", f.local_rank, f.pid, f.exitcode);
    }
  }
  return text;
}

}  // namespace

void BlockHandledSignals(const LaunchOptions& options) {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : options.signals_to_handle) sigaddset(&set, sig);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

int RunElasticAgent(const LaunchOptions& o, NodeHooks& hooks) {
  const auto job_started = Clock::now();
  auto mark = [&hooks](const char* what) {
    TraceMark(what);
    hooks.OnEvent(what);
  };
  Job job{o, o.standalone ? RandomRunId() : o.rdzv_id, {}, CurrentEnvironment(), {}, {}, FullyQualifiedHostName(), {}};

  if (!job.agent_env.count("OMP_NUM_THREADS") && o.nproc_per_node > 1) {
    std::fprintf(stderr,
                 "WARNING:flashrun:\n*****************************************\n"
                 "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your "
                 "system being overloaded, please further tune the variable for optimal performance in your "
                 "application as needed. \n*****************************************\n");
    job.agent_env["OMP_NUM_THREADS"] = "1";
  }

  // The worker command, as torchrun builds it.
  const std::string python = PythonInterpreter(job.agent_env);
  if (o.no_python && !o.run_path) {
    job.command.push_back(FindOnPath(o.training_script, job.agent_env));
    job.title_name = o.training_script;
  } else if (o.run_path) {
    job.command = {python, "-u", "-c",
                   "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                   o.training_script};
    job.title_name = o.training_script;
  } else if (o.module) {
    job.command = {python, "-u", "-m", o.training_script};
    job.title_name = o.training_script;
  } else {
    job.command = {python, "-u", o.training_script};
    job.title_name = o.training_script;
  }
  for (const std::string& a : o.training_script_args) job.command.push_back(a);

  // Logs: <log-dir>/<run_id>/attempt_<n>/<local_rank>/{stdout,stderr}.log
  std::error_code ec;
  fs::path base = o.log_dir;
  // Without --log-dir: a fresh directory under $TMPDIR (else /tmp), removed at
  // exit unless it holds worker logs the user asked for (-r / -t).
  struct RemoveAtExit {
    fs::path dir;
    ~RemoveAtExit() {
      std::error_code e;
      if (!dir.empty()) fs::remove_all(dir, e);
    }
  } remove_at_exit;
  if (base.empty()) {
    const char* tmpdir = std::getenv("TMPDIR");
    std::string pattern = absl::StrCat(tmpdir && *tmpdir ? tmpdir : "/tmp", "/flashrun_XXXXXX");
    const char* made = ::mkdtemp(pattern.data());
    if (!made) {
      Say(absl::StrFormat("cannot create a log directory %s: %s (set TMPDIR, or pass --log-dir)", pattern,
                          std::strerror(errno)));
      return 1;
    }
    base = made;
    const bool logs_asked_for = o.redirects.all_ranks.value_or(0) != 0 || !o.redirects.per_local_rank.empty() ||
                                o.tee.all_ranks.value_or(0) != 0 || !o.tee.per_local_rank.empty();
    if (!logs_asked_for) remove_at_exit.dir = base;
  }
  job.run_log_dir = base / job.run_id;
  fs::create_directories(job.run_log_dir, ec);
  if (ec) {
    Say(absl::StrFormat("cannot create the log directory %s: %s", job.run_log_dir.string(), ec.message()));
    return 1;
  }

  // A Unix socket path holds at most 107 bytes: a deep log directory gets one
  // in $TMPDIR (else /tmp), removed by the service at exit.
  job.agent_socket = (job.run_log_dir / "agent.sock").string();
  if (job.agent_socket.size() > 100) {
    const char* tmpdir = std::getenv("TMPDIR");
    const uint32_t tag = static_cast<uint32_t>(std::hash<std::string>{}(job.agent_socket));
    job.agent_socket = absl::StrFormat("%s/flashrun-%d-%08x.sock", tmpdir && *tmpdir ? tmpdir : "/tmp", ::getpid(), tag);
    if (job.agent_socket.size() > 100) job.agent_socket = absl::StrFormat("/tmp/flashrun-%d-%08x.sock", ::getpid(), tag);
  }
  if (absl::Status s = hooks.OnJobStart(job.agent_socket, job.run_log_dir.string(),
                                         o.node_name.empty() ? job.hostname : o.node_name);
      !s.ok()) {
    Say(absl::StrFormat("error: starting the checkpoint service: %s", s.message()));
    return 1;
  }

  sigset_t handled;
  sigemptyset(&handled);
  for (int sig : o.signals_to_handle) sigaddset(&handled, sig);
  const int signal_fd = ::signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);

  absl::StatusOr<std::unique_ptr<NodeRendezvous>> made = MakeRendezvous(o, job);
  if (!made.ok()) {
    Say(absl::StrFormat("error: %s", made.status().message()));
    return 1;
  }
  std::unique_ptr<NodeRendezvous> rendezvous = std::move(*made);
  Say(absl::StrFormat("%s; run '%s'; logs in %s%s", rendezvous->Describe(), job.run_id, job.run_log_dir.string(),
                      remove_at_exit.dir.empty() ? "" : " (removed at exit: --log-dir, -r or -t keeps them)"));

  const auto shutdown_grace = std::chrono::duration<double>(o.shutdown_timeout_s);
  const auto worker_timeout = std::chrono::duration<double>(o.worker_timeout_s);
  int remaining_restarts = o.max_restarts;
  // Rounds that ended by a membership change (they restart the workers
  // without counting against --max-restarts, as torchrun's): bounded, so that
  // flapping membership cannot restart the workers in a loop forever.
  std::deque<Clock::time_point> membership_rounds;
  constexpr size_t kMaxMembershipRounds = 30;
  constexpr auto kMembershipWindow = std::chrono::seconds(60);
  WorkerGroup group;
  // FLASHRUN_EXIT_PROBE_MS: how often to look for workers on their way out
  // (default 10 ms; 0 turns it off and leaves only exit notifications).
  int exit_probe_ms = 10;
  if (auto it = job.agent_env.find("FLASHRUN_EXIT_PROBE_MS"); it != job.agent_env.end()) {
    absl::SimpleAtoi(it->second, &exit_probe_ms);
  }
  group.set_exit_probe(exit_probe_ms > 0);
  if (o.standby) {
    StandbyOptions so;
    so.imports = o.standby_import;
    // FLASHRUN_STANDBY_DELAY: seconds after the workers' start before standbys start (default 5).
    if (auto it = job.agent_env.find("FLASHRUN_STANDBY_DELAY"); it != job.agent_env.end()) {
      double d;
      if (absl::SimpleAtod(it->second, &d) && d >= 0) so.delay = std::chrono::duration<double>(d);
    }
    // FLASHRUN_STANDBY_PREPARE_LOAD=0: standbys do not hold a load buffer ahead.
    if (auto it = job.agent_env.find("FLASHRUN_STANDBY_PREPARE_LOAD"); it != job.agent_env.end())
      so.prepare_load_buffers = it->second != "0";
    group.EnableStandby(so);
  }
  Clock::time_point standby_sizes_at{};
  // After a restart the replacement standbys wait until every local worker has
  // snapshotted once more (at most 60 s): their start (import torch, touch a
  // load buffer) would otherwise take the CPU from the recovery's first steps.
  bool standbys_held = false;
  uint64_t held_at_snapshots = 0;
  Clock::time_point hold_deadline{};
  int poll_ms = static_cast<int>(o.monitor_interval_s * 1000);
  if (exit_probe_ms > 0) poll_ms = std::min(poll_ms, exit_probe_ms);

  // A pending signal wins over everything else.
  auto take_signal = [&]() -> int {
    signalfd_siginfo info;
    if (::read(signal_fd, &info, sizeof(info)) == sizeof(info)) return static_cast<int>(info.ssi_signo);
    return 0;
  };
  // The hooks' last word before an exit that is not a success: said, not returned.
  auto before_exit = [&] {
    if (absl::Status d = hooks.BeforeExit(); !d.ok()) Say(absl::StrCat("error: ", d.message()));
  };
  auto exit_on_signal = [&](int sig) {
    Say(absl::StrFormat("received %s: stopping workers (SIGKILL after %.0f s)", SignalName(sig), o.shutdown_timeout_s));
    group.Stop(sig, shutdown_grace);
    before_exit();
    rendezvous->Leave();
    rendezvous->Shutdown();
    return 128 + sig;
  };

  // Peeks without consuming, so that the signal is then taken and handled above.
  auto signal_pending = [&]() {
    pollfd p{signal_fd, POLLIN, 0};
    return ::poll(&p, 1, 0) == 1;
  };

  bool first_round = true;
  while (true) {
    if (int sig = take_signal()) return exit_on_signal(sig);
    if (!first_round) hooks.BeforeRejoin();
    first_round = false;
    absl::StatusOr<RoundAssignment> round =
        rendezvous->NextRound(hooks.NodePayload(), o.max_restarts - remaining_restarts, signal_pending);
    if (!round.ok() && round.status().code() == absl::StatusCode::kCancelled) {
      if (int sig = take_signal()) return exit_on_signal(sig);
    }
    if (!round.ok()) {
      Say(absl::StrFormat("error: %s", round.status().message()));
      rendezvous->Shutdown();
      return 1;
    }
    // A restart anywhere counts for every node of the job.
    remaining_restarts = std::min(remaining_restarts, std::max(0, o.max_restarts - round->restart_count));
    const int restart_count = o.max_restarts - remaining_restarts;
    mark("round complete");
    if (absl::Status s = hooks.BeforeWorkersStart(restart_count, *round); !s.ok()) {
      Say(absl::StrFormat("error: before starting workers: %s", s.message()));
      rendezvous->Leave();
      rendezvous->Shutdown();
      return 1;
    }
    // A signal that came during the round or the hooks stops the job before any worker starts.
    if (int sig = take_signal()) return exit_on_signal(sig);
    if (absl::Status s = group.Start(PlanWorkers(job, *round, restart_count, hooks)); !s.ok()) {
      Say(absl::StrFormat("error: starting workers: %s", s.message()));
      group.Stop(SIGKILL, std::chrono::seconds(0));
      rendezvous->Leave();
      rendezvous->Shutdown();
      return 1;
    }
    mark("workers started");
    if (o.standby && restart_count > 0 && !hooks.SnapshotBytes().empty()) {
      standbys_held = true;
      held_at_snapshots = hooks.SnapshotsTaken();
      hold_deadline = Clock::now() + std::chrono::seconds(60);
      group.HoldStandbys(true);
    }
    Say(absl::StrFormat("round %d: node %d/%d, ranks %d-%d of %d, MASTER_ADDR=%s MASTER_PORT=%d, attempt %d%s",
                        round->round, round->group_rank, round->group_world_size, round->rank_offset,
                        round->rank_offset + o.nproc_per_node - 1, round->world_size, round->master_addr,
                        round->master_port, restart_count,
                        group.standbys_used() ? absl::StrFormat(", %d/%d workers from warm standbys",
                                                                group.standbys_used(), o.nproc_per_node)
                                              : std::string()));

    // Watch: exits wake the poll at once; the interval bounds heartbeat checks.
    bool membership_changed = false;
    GroupState state = GroupState::kRunning;
    while (true) {
      std::vector<pollfd> fds;
      fds.push_back(pollfd{signal_fd, POLLIN, 0});
      if (rendezvous->RejoinNotifier() >= 0) fds.push_back(pollfd{rendezvous->RejoinNotifier(), POLLIN, 0});
      for (int fd : group.ExitNotifiers()) fds.push_back(pollfd{fd, POLLIN, 0});
      ::poll(fds.data(), fds.size(), poll_ms);
      if (int sig = take_signal()) {
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP || sig == SIGQUIT) return exit_on_signal(sig);
        Say(absl::StrFormat("forwarding %s to the workers", SignalName(sig)));
        group.Signal(sig);
      }
      state = group.Check(worker_timeout);
      group.ReapOrphans();
      if (o.standby && Clock::now() - standby_sizes_at > std::chrono::seconds(1)) {
        standby_sizes_at = Clock::now();
        const bool snapshotted =
            standbys_held && hooks.SnapshotsTaken() >= held_at_snapshots + static_cast<uint64_t>(o.nproc_per_node);
        if (standbys_held && (snapshotted || Clock::now() > hold_deadline)) {
          standbys_held = false;
          group.HoldStandbys(false);
          Say(snapshotted ? "the restarted workers have snapshotted: warm standbys start again"
                          : "no snapshot from the restarted workers in 60 s: warm standbys start again");
        }
        group.PrepareStandbys(hooks.SnapshotBytes());
      }
      if (state != GroupState::kRunning) break;
      if (fds.size() > 1 && fds[1].fd == rendezvous->RejoinNotifier() && (fds[1].revents & POLLIN)) {
        membership_changed = true;
        break;
      }
    }

    // --event-log-handler: torchelastic's status events when the job ends, one
    // per worker of this node and one for the agent (after torchrun's agent).
    auto record_status = [&](const char* state, const std::vector<WorkerFailure>& failed, std::vector<pid_t> pids) {
      if (o.event_log_handler == "null") return;
      StatusEvent e;
      e.state = state;
      e.run_id = job.run_id;
      e.group_rank = round->group_rank;
      e.role = o.role;
      e.hostname = job.hostname;
      e.rdzv_backend = o.standalone ? "c10d" : o.rdzv_backend;
      e.agent_restarts = restart_count;
      e.group_world_size = round->group_world_size;
      e.role_world_size = round->world_size;
      e.entry_point = o.training_script;
      e.total_run_time_s = std::chrono::duration<double>(Clock::now() - job_started).count();
      for (int local_rank = 0; local_rank < o.nproc_per_node; ++local_rank) {
        StatusEvent w = e;
        w.source = "WORKER";
        w.local_rank = local_rank;
        w.global_rank = round->rank_offset + local_rank;
        w.pid = local_rank < static_cast<int>(pids.size()) ? pids[local_rank] : -1;
        w.state = "SUCCEEDED";
        for (const WorkerFailure& f : failed) {
          if (f.local_rank != local_rank) continue;
          w.state = "FAILED";
          w.pid = f.pid;
          w.raw_error = f.message.empty() ? absl::StrFormat("exitcode %d", f.exitcode) : f.message;
        }
        RecordStatusEvent(o.event_log_handler, w);
      }
      e.source = "AGENT";
      RecordStatusEvent(o.event_log_handler, e);
    };

    if (state == GroupState::kSucceeded) {
      const std::vector<pid_t> finished_pids = group.pids();
      group.Stop(SIGTERM, shutdown_grace);  // reaps; stragglers in the process groups are killed
      // Exit barrier: the rendezvous host must outlive the others' last calls.
      absl::Status barrier =
          rendezvous->Barrier("finished", Clock::now() + std::chrono::seconds(300), signal_pending);
      if (barrier.code() == absl::StatusCode::kCancelled) {
        if (int sig = take_signal()) return exit_on_signal(sig);
      }
      if (barrier.code() == absl::StatusCode::kAborted) {
        Say("another node restarted its workers after ours finished: joining the new round");
        continue;
      }
      if (!barrier.ok()) Say(absl::StrFormat("warning: exit barrier: %s", barrier.message()));
      // close_timeout (torchrun's rdzv-conf, default 30 s): how long the nodes wait for one another to leave
      // the rendezvous; the host keeps serving until every node has left or it runs out.
      const std::chrono::milliseconds close_timeout = ConfSeconds(o, "close_timeout", 30);
      absl::Status closed = rendezvous->Barrier("exited", Clock::now() + close_timeout, signal_pending);
      if (!closed.ok() && closed.code() != absl::StatusCode::kCancelled)
        Say(absl::StrFormat("warning: closing the rendezvous (close_timeout %.0f s): %s",
                            close_timeout.count() / 1000.0, closed.message()));
      absl::Status durable = hooks.BeforeExit();
      rendezvous->Shutdown();
      if (!durable.ok()) {
        Say(absl::StrCat("all workers finished, but ", durable.message()));
        Say(absl::StrFormat("exiting %d: the job's newest snapshots are not on storage", kExitNotDurable));
        return kExitNotDurable;
      }
      record_status("SUCCEEDED", {}, finished_pids);
      Say("all workers finished successfully");
      return 0;
    }
    if (membership_changed) {
      const auto now = Clock::now();
      membership_rounds.push_back(now);
      while (!membership_rounds.empty() && now - membership_rounds.front() > kMembershipWindow)
        membership_rounds.pop_front();
      if (membership_rounds.size() > kMaxMembershipRounds) {
        Say(absl::StrFormat("error: the rendezvous round ended %d times within %d s (nodes joining and leaving in a "
                            "loop: check the network and --rdzv-conf keep_alive_interval/keep_alive_max_attempt); "
                            "giving up", membership_rounds.size(), static_cast<int>(kMembershipWindow.count())));
        group.Stop(SIGTERM, shutdown_grace);
        before_exit();
        rendezvous->Leave();
        rendezvous->Shutdown();
        return 1;
      }
      Say("the rendezvous round ended (a node failed, left or joined): stopping workers to re-rendezvous");
      group.StopForRestart(SIGTERM, shutdown_grace);
      continue;
    }

    // Failed.
    std::vector<WorkerFailure> failures = group.failures();
    if (remaining_restarts > 0) {
      mark("failure noticed");
      group.StopForRestart(SIGTERM, shutdown_grace);
      mark("workers stopped");
      --remaining_restarts;
      Say(absl::StrFormat("worker group failed (%s); restarting (%d/%d)", DescribeFailures(failures),
                          o.max_restarts - remaining_restarts, o.max_restarts));
      continue;
    }
    const std::vector<pid_t> failed_pids = group.pids();
    group.Stop(SIGTERM, shutdown_grace);
    before_exit();
    record_status("FAILED", failures, failed_pids);
    Say(absl::StrFormat("worker group failed (%s); no restarts left (--max-restarts %d)", DescribeFailures(failures),
                        o.max_restarts));
    std::fprintf(stderr, "%s", FormatFailureSummary(job.title_name, job.hostname, failures).c_str());
    std::fflush(stderr);
    rendezvous->Leave();
    rendezvous->Shutdown();
    return 1;
  }
}

}  // namespace flashckpt::launcher
