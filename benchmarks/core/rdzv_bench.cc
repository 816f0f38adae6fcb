// The built-in rendezvous at scale: N simulated agents (threads, each running
// the real agent-side rendezvous code, StartDynamicRendezvous, against one
// server hosted by agent 0), no workers. For each N: the time for the first
// round to complete (from every agent calling NextRound to the last one
// holding its assignment), and after one agent is lost (its client gone
// without a goodbye, as in a crash), the time until every survivor holds the
// next round, split into detection (keep-alives lapsing: keep_alive_interval x
// keep_alive_max_attempt) and the round itself.
//
//   rdzv_bench --agents 8,64,256 --reps 3 --out benchmarks/results/rdzv_builtin.json
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <poll.h>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
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

Result OneRun(int n, int rep) {
  Result res;
  const int port = PickFreePort();
  const std::string run_id = absl::StrCat("bench-", n, "-", rep, "-", ::getpid());
  auto options = [&](int i) {
    DynamicRendezvousOptions o;
    o.run_id = run_id;
    o.endpoint_host = "127.0.0.1";
    o.endpoint_port = static_cast<uint16_t>(port);
    o.is_host = i == 0;
    o.node_id = absl::StrCat("agent-", i);
    o.node_address = "127.0.0.1";
    o.local_world_size = 1;
    o.min_nodes = 1;
    o.max_nodes = n;
    o.join_timeout = std::chrono::seconds(120);
    o.last_call_timeout = std::chrono::milliseconds(500);
    o.keep_alive_interval = std::chrono::milliseconds(500);
    o.keep_alive_max_attempt = 2;
    return o;
  };
  std::vector<std::unique_ptr<NodeRendezvous>> agents(n);
  for (int i = 0; i < n; ++i) {
    auto r = StartDynamicRendezvous(options(i));
    if (!r.ok()) {
      res.ok = false;
      res.error = std::string(r.status().message());
      return res;
    }
    agents[i] = std::move(*r);
  }
  auto never = [] { return false; };
  // Round 1: everyone at once; complete at max nodes.
  std::vector<double> done(n, 0);
  std::atomic<int> failed{0};
  const auto t0 = Clock::now();
  {
    std::vector<std::thread> ts;
    for (int i = 0; i < n; ++i)
      ts.emplace_back([&, i] {
        auto a = agents[i]->NextRound("", 0, never);
        if (!a.ok() || a->world_size != n) ++failed;
        done[i] = Secs(Clock::now() - t0);
      });
    for (auto& t : ts) t.join();
  }
  res.round_s = *std::max_element(done.begin(), done.end());
  if (failed) {
    res.ok = false;
    res.error = absl::StrCat(failed.load(), " agents did not get a round of ", n);
    return res;
  }
  // The last agent is lost: its client goes away without leaving.
  const auto lost = Clock::now();
  agents[n - 1].reset();
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
  std::string out = "benchmarks/results/rdzv_builtin.json";
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
    } else {
      std::fprintf(stderr, "usage: rdzv_bench [--agents 8,64,256] [--reps 3] [--out FILE]\n");
      return 2;
    }
  }
  std::string json = absl::StrCat("{\n \"backend\": \"built-in (c10d)\", \"cpus\": ", std::thread::hardware_concurrency(),
                                  ",\n \"keep_alive_interval_s\": 0.5, \"keep_alive_max_attempt\": 2,\n \"runs\": [\n");
  for (size_t k = 0; k < sizes.size(); ++k) {
    const int n = sizes[k];
    std::vector<double> round, detect, reround;
    for (int r = 0; r < reps; ++r) {
      Result res = OneRun(n, r);
      if (!res.ok) {
        std::fprintf(stderr, "%d agents, run %d: %s\n", n, r, res.error.c_str());
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
  return 0;
}
