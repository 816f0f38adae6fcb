// The rendezvous at scale: N simulated agents, each running the real
// agent-side rendezvous code, no workers.
//   --backend builtin: StartDynamicRendezvous in N threads, against one
//     server hosted by agent 0; the lost agent's client goes away without a
//     goodbye (as in a crash).
//   --backend etcd: StartEtcdRendezvous against an etcd member the benchmark
//     starts (Debian's etcd-server, data directory on /dev/shm, so that the
//     figures are the rendezvous' and not the disk's fsyncs); N-1 agents are
//     threads here, the lost one runs in a forked child that is SIGKILLed
//     (its lease lapses, as after a crashed node).
// For each N: the time for the first round to complete (from every agent
// calling NextRound to the last one holding its assignment), and after one
// agent is lost, the time until every survivor holds the next round, split
// into detection (built-in: keep-alives lapsing, keep_alive_interval x
// keep_alive_max_attempt; etcd: the lease's TTL, at least 2 s) and the round
// itself.
//
//   rdzv_bench --agents 8,64,256 --reps 3 --out benchmarks/results/rdzv_builtin.json
//   rdzv_bench --backend etcd --agents 8,64,256 --reps 3 --out benchmarks/results/rdzv_etcd.json
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "etcd_process.h"
#include "launcher/node_rendezvous.h"

using namespace flashckpt::launcher;
using Clock = std::chrono::steady_clock;

namespace {

double Secs(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Result {
  double round_s = 0;      // first round, all N
  double detect_s = 0;     // loss -> every survivor notified
  double reround_s = 0;    // notified -> every survivor holds the next round
  bool ok = true;
  std::string error;
};

std::optional<flashckpt::rendezvous::etcd_testing::EtcdServer> etcd;  // --backend etcd

absl::StatusOr<std::unique_ptr<NodeRendezvous>> StartAgent(const DynamicRendezvousOptions& o) {
  if (!etcd) return StartDynamicRendezvous(o);
  EtcdRendezvousOptions e;
  e.rendezvous = o;
  e.etcd = etcd->client_options();
  return StartEtcdRendezvous(e);
}

// The lost agent of an etcd run, in a child process: joins round 1, writes the
// steady-clock time it held its assignment (or -1) to `fd`, then waits to be killed.
pid_t ForkLostAgent(const DynamicRendezvousOptions& o, int n, int fd) {
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  double at = -1;
  auto r = StartAgent(o);
  if (r.ok()) {
    auto a = (*r)->NextRound("", 0, [] { return false; });
    if (a.ok() && a->world_size == n) at = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
  }
  if (::write(fd, &at, sizeof(at)) != sizeof(at)) _exit(1);
  for (;;) ::pause();
}

Result OneRun(int n, int rep) {
  Result res;
  const int port = PickFreePort();
  const std::string run_id = absl::StrCat("bench-", n, "-", rep, "-", ::getpid());
  auto options = [&](int i) {
    DynamicRendezvousOptions o;
    o.run_id = run_id;
    o.endpoint_host = "127.0.0.1";
    o.endpoint_port = static_cast<uint16_t>(port);
    o.is_host = i == 0 && !etcd;
    o.node_id = absl::StrCat("agent-", i);
    o.node_address = "127.0.0.1";
    o.local_world_size = 1;
    // The round forms at max nodes, whenever the last one joins: a short last
    // call would end it early with whoever had joined (and time the last call,
    // not the rendezvous). After a loss, the survivors' round forms when all
    // of them are back (no last call either).
    o.min_nodes = std::max(1, n - 1);
    o.max_nodes = n;
    o.join_timeout = std::chrono::seconds(120);
    o.last_call_timeout = std::chrono::seconds(30);
    o.keep_alive_interval = std::chrono::milliseconds(500);
    o.keep_alive_max_attempt = 2;
    return o;
  };
  // etcd: the lost agent is a child process, forked before this process has any thread.
  int pipe_fds[2] = {-1, -1};
  pid_t child = -1;
  if (etcd) {
    if (::pipe(pipe_fds) != 0) {
      res.ok = false;
      res.error = "pipe failed";
      return res;
    }
    child = ForkLostAgent(options(n - 1), n, pipe_fds[1]);
  }
  const int here = etcd ? n - 1 : n;
  std::vector<std::unique_ptr<NodeRendezvous>> agents(here);
  for (int i = 0; i < here; ++i) {
    auto r = StartAgent(options(i));
    if (!r.ok()) {
      res.ok = false;
      res.error = std::string(r.status().message());
      if (child > 0) ::kill(child, SIGKILL), ::waitpid(child, nullptr, 0);
      return res;
    }
    agents[i] = std::move(*r);
  }
  auto never = [] { return false; };
  // Round 1: everyone at once (the agents above are up: their clients
  // connected, their copies read); complete at max nodes.
  const auto t0 = Clock::now();
  std::vector<double> done(here, 0);
  std::atomic<int> failed{0};
  std::mutex why_mu;
  std::string why;  // the first failure
  {
    std::vector<std::thread> ts;
    for (int i = 0; i < here; ++i)
      ts.emplace_back([&, i] {
        auto a = agents[i]->NextRound("", 0, never);
        if (!a.ok() || a->world_size != n) {
          ++failed;
          std::lock_guard<std::mutex> l(why_mu);
          if (why.empty()) why = a.ok() ? absl::StrCat("one got a world of ", a->world_size) : a.status().ToString();
        }
        done[i] = Secs(Clock::now() - t0);
      });
    for (auto& t : ts) t.join();
  }
  res.round_s = *std::max_element(done.begin(), done.end());
  if (child > 0) {
    double at = -1;
    pollfd p{pipe_fds[0], POLLIN, 0};
    if (::poll(&p, 1, 60000) != 1 || ::read(pipe_fds[0], &at, sizeof(at)) != sizeof(at) || at < 0) ++failed;
    else res.round_s = std::max(res.round_s, at - std::chrono::duration<double>(t0.time_since_epoch()).count());
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
  }
  if (failed) {
    res.ok = false;
    res.error = absl::StrCat(failed.load(), " agents did not get a round of ", n, why.empty() ? "" : " (", why,
                             why.empty() ? "" : ")");
    if (child > 0) ::kill(child, SIGKILL), ::waitpid(child, nullptr, 0);
    return res;
  }
  // The last agent is lost: its process is killed (etcd), or its client goes
  // away without leaving (built-in).
  const auto lost = Clock::now();
  if (child > 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
  } else {
    agents[n - 1].reset();
  }
  std::vector<double> notified(n - 1, 0), rejoined(n - 1, 0);
  {
    std::vector<std::thread> ts;
    for (int i = 0; i < n - 1; ++i)
      ts.emplace_back([&, i] {
        pollfd p{agents[i]->RejoinNotifier(), POLLIN, 0};
        if (::poll(&p, 1, 60000) != 1) {
          ++failed;
          return;
        }
        notified[i] = Secs(Clock::now() - lost);
        auto a = agents[i]->NextRound("", 0, never);
        if (!a.ok() || a->world_size != n - 1) ++failed;
        rejoined[i] = Secs(Clock::now() - lost);
      });
    for (auto& t : ts) t.join();
  }
  if (failed) {
    res.ok = false;
    res.error = absl::StrCat(failed.load(), " survivors did not get a round of ", n - 1);
  }
  res.detect_s = *std::max_element(notified.begin(), notified.end());
  res.reround_s = *std::max_element(rejoined.begin(), rejoined.end()) - res.detect_s;
  for (int i = n - 2; i >= 0; --i) {  // clients first, the host last
    agents[i]->Leave();
    agents[i]->Shutdown();
  }
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> sizes = {8, 64, 256};
  int reps = 3;
  std::string out;
  std::string backend = "builtin";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--agents") {
      sizes.clear();
      for (auto p : absl::StrSplit(next(), ',')) {
        int v;
        if (absl::SimpleAtoi(p, &v) && v >= 2) sizes.push_back(v);
      }
    } else if (a == "--reps") {
      reps = std::max(1, std::atoi(next().c_str()));
    } else if (a == "--out") {
      out = next();
    } else if (a == "--backend") {
      backend = next();
      if (backend != "builtin" && backend != "etcd") {
        std::fprintf(stderr, "rdzv_bench: --backend is builtin or etcd, not '%s'\n", backend.c_str());
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: rdzv_bench [--backend builtin|etcd] [--agents 8,64,256] [--reps 3] [--out FILE]\n");
      return 2;
    }
  }
  if (out.empty()) out = absl::StrCat("benchmarks/results/rdzv_", backend, ".json");
  // Each agent holds a few connections (etcd: three): 256 agents need more than 1024 descriptors.
  rlimit nofile;
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
    nofile.rlim_cur = nofile.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &nofile);
  }
  if (backend == "etcd") {
    ::setenv("TMPDIR", "/dev/shm", 1);  // the member's data directory (removed at the end)
    etcd.emplace();
    if (!etcd->up()) {
      std::fprintf(stderr, "rdzv_bench: etcd did not come up (is etcd-server installed? apt install etcd-server)\n");
      return 1;
    }
  }
  std::string json = absl::StrCat("{\n \"backend\": \"", backend == "etcd" ? "etcd-v3 (one member, data on tmpfs)" : "built-in (c10d)", "\", \"cpus\": ", std::thread::hardware_concurrency(),
                                  ",\n \"min_nodes\": \"N-1\", \"max_nodes\": \"N\", \"last_call_timeout_s\": 30,\n \"keep_alive_interval_s\": 0.5, \"keep_alive_max_attempt\": 2,\n \"runs\": [\n");
  for (size_t k = 0; k < sizes.size(); ++k) {
    const int n = sizes[k];
    std::vector<double> round, detect, reround;
    for (int r = 0; r < reps; ++r) {
      Result res = OneRun(n, r);
      if (!res.ok) {
        std::fprintf(stderr, "%d agents, run %d: %s\n", n, r, res.error.c_str());
        etcd.reset();
        return 1;
      }
      round.push_back(res.round_s);
      detect.push_back(res.detect_s);
      reround.push_back(res.reround_s);
    }
    std::printf("%3d agents: round %.3f s, after a loss: detected %.3f s + next round %.3f s (medians of %d)\n", n,
                Median(round), Median(detect), Median(reround), reps);
    std::fflush(stdout);
    absl::StrAppend(&json, "  {\"agents\": ", n, ", \"round_s_median\": ", Median(round),
                    ", \"loss_detected_s_median\": ", Median(detect), ", \"next_round_s_median\": ", Median(reround),
                    ", \"round_s\": [", absl::StrJoin(round, ", "), "], \"loss_detected_s\": [",
                    absl::StrJoin(detect, ", "), "], \"next_round_s\": [", absl::StrJoin(reround, ", "), "]}",
                    k + 1 < sizes.size() ? ",\n" : "\n");
  }
  json += " ]\n}\n";
  std::ofstream(out) << json;
  etcd.reset();
  return 0;
}
