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
  return absl::StrCat("v1;mem=", absl::StrJoin(s.memory, ","), ";committed=", absl::StrJoin(s.committed, ","),
                      ";world=", s.world, ";ranks=", absl::StrJoin(s.ranks, ","));
}

NodeSteps DecodeNodeSteps(const std::string& payload) {
  NodeSteps s;
  if (payload.rfind("v1;", 0) != 0) return s;
  s.known = true;
  for (absl::string_view part : absl::StrSplit(payload.substr(3), ';')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (kv.first == "world") {
      if (!absl::SimpleAtoi(kv.second, &s.world) || s.world < 0) s.world = 0;
      continue;
    }
    if (kv.first == "ranks") {
      for (absl::string_view v : absl::StrSplit(kv.second, ',', absl::SkipEmpty())) {
        int r;
        if (absl::SimpleAtoi(v, &r) && r >= 0) s.ranks.insert(r);
      }
      continue;
    }
    std::set<int64_t>* into = kv.first == "mem" ? &s.memory : kv.first == "committed" ? &s.committed : nullptr;
    if (!into) continue;
    for (absl::string_view v : absl::StrSplit(kv.second, ',', absl::SkipEmpty())) {
      int64_t step;
      if (absl::SimpleAtoi(v, &step)) into->insert(step);
    }
  }
  return s;
}

RoundLayout LayoutOf(const RoundAssignment& round) {
  RoundLayout l;
  l.world = round.world_size;
  // The dynamic rendezvous lists every node (ranks follow in that order); the
  // static one only this node, whose first rank is its offset.
  const bool all = static_cast<int>(round.nodes.size()) == round.group_world_size;
  int first = all ? 0 : round.rank_offset;
  for (const auto& n : round.nodes) {
    std::set<int> ranks;
    for (int r = 0; r < n.local_world_size; ++r) ranks.insert(first + r);
    first += n.local_world_size;
    l.ranks.push_back(std::move(ranks));
  }
  return l;
}

bool MemoryRestores(const NodeSteps& node, const RoundLayout& layout, size_t i) {
  return node.known && node.world > 0 && node.world == layout.world && i < layout.ranks.size() &&
         node.ranks == layout.ranks[i];
}

std::optional<int64_t> AgreeRestoreStep(const std::vector<NodeSteps>& nodes, const RoundLayout& layout) {
  bool any_known = false;
  std::set<int64_t> committed;  // storage is shared: what any node sees committed
  for (const auto& n : nodes) {
    any_known |= n.known;
    committed.insert(n.committed.begin(), n.committed.end());
  }
  if (!any_known) return std::nullopt;
  std::optional<std::set<int64_t>> common;
  for (size_t i = 0; i < nodes.size(); ++i) {
    std::set<int64_t> avail = committed;
    if (MemoryRestores(nodes[i], layout, i)) avail.insert(nodes[i].memory.begin(), nodes[i].memory.end());
    if (!common) {
      common = avail;
    } else {
      std::erase_if(*common, [&](int64_t s) { return !avail.count(s); });
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

void CheckpointHooks::BeforeRejoin() {
  // The payload's committed steps decide the restore step of a world of
  // another size. A persist of the ended round that commits after the payload
  // was taken would leave the new world restoring an older step, and its save
  // of the newer step number refused (committed with other contents).
  if (service_) service_->AbandonAll("abandoned: the workers stopped for a new rendezvous round");
}

std::string CheckpointHooks::NodePayload() {
  NodeSteps s;
  if (!service_) return "";
  std::string dir = service_->Directory();
  if (dir.empty()) return "";  // no worker ever registered here
  s.known = true;
  s.memory = service_->CommonMemorySteps();
  service_->MemoryLayout(&s.world, &s.ranks);
  if (!dir.empty())
    for (int64_t c : CommittedSteps(dir)) s.committed.insert(c);
  return EncodeNodeSteps(s);
}

absl::Status CheckpointHooks::BeforeWorkersStart(int restart_count, const RoundAssignment& round) {
  round_ = Clock::now();
  std::vector<NodeSteps> nodes;
  for (const auto& n : round.nodes) nodes.push_back(DecodeNodeSteps(n.payload));
  const RoundLayout layout = LayoutOf(round);
  std::optional<int64_t> step = AgreeRestoreStep(nodes, layout);
  restore_step_ = step ? std::to_string(*step) : "";
  std::vector<std::string> moved;  // nodes whose snapshots were taken by other ranks or another world
  for (size_t i = 0; i < nodes.size(); ++i)
    if (nodes[i].known && !MemoryRestores(nodes[i], layout, i))
      moved.push_back(absl::StrCat(round.nodes[i].node_id, " held ranks ", absl::StrJoin(nodes[i].ranks, ","),
                                   " of ", nodes[i].world));
  if (!moved.empty())
    Say(absl::StrCat("the world is now ", layout.world, " ranks (", absl::StrJoin(moved, "; "),
                     "): only committed steps restore it"));
  if (step) {
    int from_memory = 0;
    for (size_t i = 0; i < nodes.size(); ++i)
      from_memory += MemoryRestores(nodes[i], layout, i) && nodes[i].memory.count(*step) ? 1 : 0;
    const int all = static_cast<int>(nodes.size());
    Say(absl::StrCat("restore step ", *step, ": ",
                     from_memory == all ? absl::StrCat("in memory on ", all == 1 ? "this node" : "every node")
                     : from_memory == 0 ? std::string("from storage")
                                        : absl::StrCat("in memory on ", from_memory, "/", all,
                                                       " nodes, the others load it from storage")));
  } else if (restart_count > 0) {
    Say("no step is available on every node: workers start from what they find");
  }
  // The commit runs across nodes through the rendezvous store (or etcd),
  // under this round's keys (the round is the same on every node).
  if (service_ && round.store) {
    CommitStoreOptions so;
    so.host = round.store->host;
    so.port = round.store->port;
    so.token = round.store->token;
    so.run_id = round.store->run_id;
    so.etcd = round.store->etcd;
    so.key_root = round.store->key_prefix;
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
  // Ranks this node no longer runs (a world that shrank or grew renumbered
  // them): their persisters stop and their segments go; the old world can no
  // longer commit what only they hold.
  const size_t me = layout.ranks.size() == 1 ? 0 : static_cast<size_t>(round.group_rank);
  if (service_ && me < layout.ranks.size()) service_->RetireRanksOutside(layout.ranks[me]);
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
