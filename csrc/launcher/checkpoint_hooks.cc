#include "launcher/checkpoint_hooks.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "agent/store_commit_barrier.h"
#include "storage/layout.h"

namespace flashckpt::launcher {

std::string EncodeNodeSteps(const NodeSteps& s) {
  if (!s.known) return "";
  return absl::StrCat("v1;mem=", absl::StrJoin(s.memory, ","), ";committed=", absl::StrJoin(s.committed, ","));
}

NodeSteps DecodeNodeSteps(const std::string& payload) {
  NodeSteps s;
  if (payload.rfind("v1;", 0) != 0) return s;
  s.known = true;
  for (absl::string_view part : absl::StrSplit(payload.substr(3), ';')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    std::set<int64_t>* into = kv.first == "mem" ? &s.memory : kv.first == "committed" ? &s.committed : nullptr;
    if (!into) continue;
    for (absl::string_view v : absl::StrSplit(kv.second, ',', absl::SkipEmpty())) {
      int64_t step;
      if (absl::SimpleAtoi(v, &step)) into->insert(step);
    }
  }
  return s;
}

std::optional<int64_t> AgreeRestoreStep(const std::vector<NodeSteps>& nodes) {
  bool any_known = false;
  std::set<int64_t> committed;  // storage is shared: what any node sees committed
  for (const auto& n : nodes) {
    any_known |= n.known;
    committed.insert(n.committed.begin(), n.committed.end());
  }
  if (!any_known) return std::nullopt;
  std::optional<std::set<int64_t>> common;
  for (const auto& n : nodes) {
    std::set<int64_t> avail = committed;
    avail.insert(n.memory.begin(), n.memory.end());
    if (!common) {
      common = avail;
    } else {
      std::set<int64_t> x;
      for (int64_t s : *common)
        if (avail.count(s)) x.insert(s);
      common = x;
    }
  }
  if (!common || common->empty()) return std::nullopt;
  return *common->rbegin();
}

namespace {
void Say(const std::string& s) { std::fprintf(stderr, "[flashrun] %s\n", s.c_str()); }
double Secs(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

absl::Status CheckpointHooks::OnJobStart(const std::string& agent_socket, const std::string& run_log_dir,
                                         const std::string& node_name) {
  CheckpointServiceOptions so;
  so.socket_path = agent_socket;
  const char* status = std::getenv("FLASHRUN_STATUS_FILE");
  so.status_file = status && *status ? status : run_log_dir + "/status.json";
  if (const char* port = std::getenv("FLASHRUN_METRICS_PORT"); port && *port) {
    if (!absl::SimpleAtoi(port, &so.metrics_port) || so.metrics_port < 0 || so.metrics_port > 65535)
      return absl::InvalidArgumentError(absl::StrCat("FLASHRUN_METRICS_PORT=", port, " is not a port number"));
  }
  so.node = node_name;
  auto s = CheckpointService::Start(so);
  if (!s.ok()) return s.status();
  service_ = std::move(*s);
  if (service_->metrics_port() >= 0)
    Say(absl::StrCat("checkpoint metrics on http://127.0.0.1:", service_->metrics_port(), "/metrics; status in ",
                     so.status_file));
  return absl::OkStatus();
}

std::string CheckpointHooks::NodePayload() {
  NodeSteps s;
  if (!service_) return "";
  std::string dir = service_->Directory();
  if (dir.empty()) return "";  // no worker ever registered here
  s.known = true;
  s.memory = service_->CommonMemorySteps();
  if (!dir.empty())
    for (int64_t c : CommittedSteps(dir)) s.committed.insert(c);
  return EncodeNodeSteps(s);
}

absl::Status CheckpointHooks::BeforeWorkersStart(int restart_count, const RoundAssignment& round) {
  round_ = Clock::now();
  std::vector<NodeSteps> nodes;
  for (const auto& n : round.nodes) nodes.push_back(DecodeNodeSteps(n.payload));
  std::optional<int64_t> step = AgreeRestoreStep(nodes);
  restore_step_ = step ? std::to_string(*step) : "";
  if (step) {
    int from_memory = 0;
    for (const auto& n : nodes) from_memory += n.memory.count(*step) ? 1 : 0;
    Say(absl::StrCat("restore step ", *step, ": in memory on ", from_memory, "/", nodes.size(), " nodes",
                     from_memory == static_cast<int>(nodes.size()) ? "" : ", the others load it from storage"));
  } else if (restart_count > 0) {
    Say("no step is available on every node: workers start from what they find");
  }
  // The commit runs across nodes through the rendezvous store, under this
  // round's keys (the round is the same on every node).
  if (service_ && round.store) {
    CommitStoreOptions so;
    so.host = round.store->host;
    so.port = round.store->port;
    so.token = round.store->token;
    so.run_id = round.store->run_id;
    so.round = round.round;
    auto commits = std::make_shared<StoreCommits>(so);
    if (!announced_store_) Say(absl::StrCat("commit through ", commits->Describe()));
    announced_store_ = true;
    service_->UseCommits(std::move(commits));
  }
  // Persists of other steps belong to the dead timeline (every round after
  // the first follows a stop of the workers): abandon them (and their files),
  // then make the restore step durable in the background (its slot stays
  // pinned while the agent reads it).
  if (service_ && (rounds_++ > 0 || restart_count > 0)) service_->Restart(step.value_or(-1));
  return absl::OkStatus();
}

void CheckpointHooks::OnEvent(const char* what) {
  std::string w = what;
  auto now = Clock::now();
  if (w == "failure noticed") {
    noticed_ = now;
  } else if (w == "workers stopped") {
    stopped_ = now;
  } else if (w == "workers started" && noticed_ && stopped_ && round_ && service_) {
    RecoveryTiming t;
    t.restart = ++restarts_;
    t.phases_s["stop"] = Secs(*stopped_ - *noticed_);
    t.phases_s["rendezvous"] = Secs(*round_ - *stopped_);
    t.phases_s["spawn"] = Secs(now - *round_);
    t.phases_s["agent_total"] = Secs(now - *noticed_);
    service_->RecordRecovery(t);
    noticed_.reset();
    stopped_.reset();
  }
}

absl::Status CheckpointHooks::BeforeExit() {
  if (!service_) return absl::OkStatus();
  absl::Status s = service_->PersistNewest(std::chrono::seconds(120));
  if (!s.ok()) Say(absl::StrCat("warning: ", s.message()));
  if (absl::Status d = service_->Drain(std::chrono::seconds(60)); !d.ok()) Say(absl::StrCat("warning: ", d.message()));
  service_->ReleaseMemory();
  absl::Status end = service_->CheckDurableAtEnd();
  service_->WriteStatus();
  return end;
}

std::map<int, uint64_t> CheckpointHooks::SnapshotBytes() {
  if (!service_) return {};
  return service_->NewestSnapshotBytes();
}

}  // namespace flashckpt::launcher
