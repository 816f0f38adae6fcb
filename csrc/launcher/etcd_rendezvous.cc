// The etcd-v3 rendezvous. Keys, under P = key_prefix + run_id + "/":
//   P rdzv/round          the RoundRecord (the newest round, who is in it, broken or not)
//   P rdzv/nodes/<id>     a NodeEntry per agent, bound to that agent's lease
//   P barrier/r<round>/<name>/<id>   one key per node that reached a barrier
//   P commit/...          the checkpoint service's cross-node commit (StoreCommitBarrier)
//
// Every agent watches P rdzv/ and keeps a copy of it. The agent whose entry is
// oldest (the lowest create revision) is the leader: it applies the round
// rules (RoundState::AdvanceStored) to what the copy holds and writes the new
// record in a transaction on the record's mod revision, so that a former
// leader that lags behind cannot overwrite a newer decision. Joining is a Put
// of one's own entry: N agents joining cost N writes that do not contend,
// plus the leader's record writes. A node whose lease lapses (a crash, a
// partition) loses its entry, the leader marks it dead and the round broken,
// and the agents that can still reach etcd join the next one; the agent that
// cannot renew its lease stops its workers instead of training on alone.
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launcher/node_rendezvous.h"
#include "rendezvous/round_state.h"

namespace flashckpt::launcher {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
namespace rdzv = flashckpt::rendezvous;

int64_t UnixMsNow() {
  return std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double SecondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// What an agent's copy of P rdzv/ says, decoded.
struct RoundSnapshot {
  rdzv::StoredRound stored;
  int64_t record_revision = 0;  // the record's mod revision; 0: no record yet
  std::set<std::string> alive;  // the nodes with an entry (a live lease)
  std::string leader;           // the node whose entry is oldest
  int64_t revision = 0;         // the etcd revision the copy is at
};

class EtcdRendezvous : public NodeRendezvous {
 public:
  explicit EtcdRendezvous(EtcdRendezvousOptions options) : options_(std::move(options)) {
    const DynamicRendezvousOptions& o = options_.rendezvous;
    prefix_ = absl::StrCat(options_.key_prefix, o.run_id, "/");
    rdzv_prefix_ = prefix_ + "rdzv/";
    round_key_ = rdzv_prefix_ + "round";
    nodes_prefix_ = rdzv_prefix_ + "nodes/";
    my_key_ = nodes_prefix_ + o.node_id;
    settings_.min_nodes = static_cast<uint32_t>(o.min_nodes);
    settings_.max_nodes = static_cast<uint32_t>(o.max_nodes);
    settings_.last_call_timeout = o.last_call_timeout;
    settings_.node_expiry = o.keep_alive_interval * o.keep_alive_max_attempt;
    const int64_t expiry_ms = std::chrono::duration_cast<milliseconds>(settings_.node_expiry).count();
    // etcd counts leases in whole seconds (and will not go below its own minimum).
    ttl_s_ = std::max<int64_t>(2, (expiry_ms + 999) / 1000);
    rejoin_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    std::random_device random;
    incarnation_ = (static_cast<uint64_t>(random()) << 32) ^ random() ^ static_cast<uint64_t>(::getpid());
  }

  ~EtcdRendezvous() override {
    Shutdown();
    if (rejoin_fd_ >= 0) ::close(rejoin_fd_);
  }

  absl::Status Init() {
    // One client per thread that talks to etcd: an EtcdClient runs one call at a time.
    rdzv::EtcdOptions quick = options_.etcd;
    quick.request_timeout = std::min(quick.request_timeout, std::max(milliseconds(1000), options_.rendezvous.keep_alive_interval));
    const std::pair<std::unique_ptr<rdzv::EtcdClient>*, const rdzv::EtcdOptions*> clients[] = {
        {&client_, &options_.etcd},
        {&watch_client_, &options_.etcd},
        {&lead_client_, &options_.etcd},
        {&lease_client_, &quick}};
    for (const auto& [client, opts] : clients) {
      absl::StatusOr<std::unique_ptr<rdzv::EtcdClient>> c = rdzv::EtcdClient::Connect(*opts);
      if (!c.ok())
        return absl::Status(c.status().code(), absl::StrCat("rendezvous '", options_.rendezvous.run_id,
                                                            "': cannot use etcd: ", c.status().message()));
      *client = std::move(*c);
    }
    etcd_name_ = client_->Describe();
    session_ = std::thread([this] { SessionLoop(); });
    return absl::OkStatus();
  }

  absl::StatusOr<RoundAssignment> NextRound(const std::string& payload, int restart_count,
                                            const std::function<bool()>& stop_requested) override {
    const DynamicRendezvousOptions& o = options_.rendezvous;
    {
      std::lock_guard<std::mutex> l(mu_);
      watching_round_ = 0;
    }
    uint64_t drained;
    (void)!::read(rejoin_fd_, &drained, sizeof(drained));
    const Clock::time_point started = Clock::now();
    const Clock::time_point deadline = started + o.join_timeout;

    rdzv::NodeEntry entry;
    *entry.mutable_node() = DescribeThisNode(o, payload, restart_count);
    entry.mutable_node()->set_incarnation(incarnation_);
    entry.set_after_round(last_round_);
    const std::string value = entry.SerializeAsString();

    absl::Status last_error = absl::OkStatus();
    int64_t joined_at = 0;  // the revision of our entry; 0 while not written
    int64_t lease_of_entry = 0;
    uint64_t viewed = 0;  // the decode of the copy that was last looked at here
    while (Clock::now() < deadline) {
      if (stop_requested()) return absl::CancelledError("rendezvous abandoned: the agent was asked to stop");
      const int64_t lease = LeaseFor(&last_error);
      if (lease != 0 && lease != lease_of_entry) {
        // (Again) after a lapsed lease took the entry away.
        absl::StatusOr<etcd::PutResponse> put = client_->Put(my_key_, value, lease);
        if (put.ok()) {
          joined_at = put->header().revision();
          lease_of_entry = lease;
        } else {
          last_error = put.status();
          if (IsFatal(last_error)) return Named(last_error, "writing this node's entry");
        }
      }
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait_for(l, milliseconds(100));
      // A view of the copy as decoded last (not again for a copy unchanged since).
      if (joined_at > 0 && snapshot_.revision >= joined_at && decoded_ != viewed) {
        viewed = decoded_;
        const rdzv::RoundView view = rdzv::RoundState::ViewOfStored(settings_, snapshot_.stored, o.node_id);
        if (view.my_group_rank() >= 0 && !view.waiting() && view.round() > last_round_) {
          last_round_ = view.round();
          group_world_size_ = view.participants_size();
          watching_round_ = last_round_;
          rejoin_signalled_ = false;
          RoundAssignment a = AssignmentFromView(view);
          a.store = RendezvousStore{};
          a.store->run_id = o.run_id;
          a.store->etcd = options_.etcd;
          a.store->key_prefix = options_.key_prefix;
          return a;
        }
      }
      if (!session_error_.ok()) last_error = session_error_;
    }
    std::string progress;
    {
      std::lock_guard<std::mutex> l(mu_);
      progress = joined_at > 0 ? absl::StrFormat("%d/%d nodes joined", snapshot_.stored.in_line.size(), o.min_nodes)
                               : "this node could not join";
    }
    return absl::DeadlineExceededError(absl::StrFormat(
        "rendezvous '%s' at %s: %s after %.1f s (join_timeout %.0f s; --nnodes %d:%d)%s", o.run_id, etcd_name_,
        progress, SecondsSince(started), std::chrono::duration<double>(o.join_timeout).count(), o.min_nodes,
        o.max_nodes, last_error.ok() ? "" : absl::StrCat("; last error: ", last_error.message())));
  }

  int RejoinNotifier() const override { return rejoin_fd_; }

  absl::Status Barrier(const std::string& name, Clock::time_point deadline,
                       const std::function<bool()>& stop_requested) override {
    const Clock::time_point started = Clock::now();
    const std::string dir = absl::StrFormat("%sbarrier/r%020d/%s/", prefix_, last_round_, name);
    const std::string doing = absl::StrCat("barrier '", name, "'");
    int64_t lease;
    {
      std::lock_guard<std::mutex> l(mu_);
      lease = lease_;
    }
    absl::StatusOr<etcd::PutResponse> put = client_->Put(dir + options_.rendezvous.node_id, "1", lease);
    if (!put.ok()) return Named(put.status(), doing);
    int64_t arrived = 0;
    while (true) {
      absl::StatusOr<etcd::RangeResponse> got = client_->Get(dir, /*prefix=*/true);
      if (!got.ok()) return Named(got.status(), doing);
      arrived = got->kvs_size();
      if (arrived >= group_world_size_) return absl::OkStatus();
      if (Clock::now() >= deadline) break;
      if (absl::Status s = BarrierInterrupted(rejoin_fd_, stop_requested); !s.ok()) return s;
      absl::StatusOr<std::vector<etcd::Event>> events =
          client_->Watch(dir, /*prefix=*/true, got->header().revision() + 1,
                         std::min(deadline, Clock::now() + milliseconds(500)), stop_requested);
      if (!events.ok()) return Named(events.status(), doing);
    }
    return absl::DeadlineExceededError(absl::StrFormat("barrier '%s' at %s: %d/%d nodes arrived after %.1f s", name,
                                                       etcd_name_, arrived, group_world_size_, SecondsSince(started)));
  }

  void Leave() override {
    StopLease(/*revoke=*/true);
    (void)client_->Delete(my_key_);
  }

  void Shutdown() override {
    if (stopping_.exchange(true)) return;
    cv_.notify_all();
    if (session_.joinable()) session_.join();
    StopLease(/*revoke=*/true);
  }

  std::string Describe() const override {
    return absl::StrFormat("etcd-v3 rendezvous '%s' at %s (keys under %s)", options_.rendezvous.run_id, etcd_name_,
                           prefix_);
  }

 private:
  static bool IsFatal(const absl::Status& s) {
    return s.code() == absl::StatusCode::kUnauthenticated || s.code() == absl::StatusCode::kPermissionDenied ||
           s.code() == absl::StatusCode::kInvalidArgument;
  }

  absl::Status Named(const absl::Status& s, const std::string& doing) const {
    return absl::Status(s.code(), absl::StrCat("rendezvous '", options_.rendezvous.run_id, "': ", doing, " at ",
                                               etcd_name_, " failed: ", s.message()));
  }

  // The lease this node's keys hang on; granted (and kept alive) on first use
  // and again after it lapsed. 0 when etcd could not grant one just now.
  int64_t LeaseFor(absl::Status* error) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (lease_ != 0 && !lease_lost_) return lease_;
    }
    StopLease(/*revoke=*/false);
    absl::StatusOr<int64_t> lease = client_->GrantLease(ttl_s_);
    if (!lease.ok()) {
      *error = lease.status();
      return 0;
    }
    std::lock_guard<std::mutex> l(mu_);
    lease_ = *lease;
    lease_lost_ = false;
    lease_stop_ = false;
    keeper_ = std::thread([this, id = *lease] { KeepLeaseAlive(id); });
    return lease_;
  }

  void KeepLeaseAlive(int64_t lease) {
    const auto interval = options_.rendezvous.keep_alive_interval;
    const milliseconds ttl(ttl_s_ * 1000);
    Clock::time_point renewed = Clock::now();
    absl::Status last = absl::OkStatus();
    std::unique_lock<std::mutex> l(mu_);
    while (!lease_stop_) {
      // Renew at a third of the TTL at most, so that one slow answer does not lose it.
      cv_.wait_for(l, std::min(interval, ttl / 3), [&] { return lease_stop_; });
      if (lease_stop_) return;
      l.unlock();
      absl::StatusOr<int64_t> left = lease_client_->KeepAlive(lease);
      l.lock();
      if (lease_stop_) return;
      if (left.ok()) {
        renewed = Clock::now();
        continue;
      }
      last = left.status();
      // Expired, or unrenewed for a whole TTL: etcd has dropped (or is about
      // to drop) this node's entry, and the others go on without it.
      if (left.status().code() == absl::StatusCode::kNotFound || Clock::now() - renewed >= ttl) break;
    }
    if (lease_stop_) return;
    lease_lost_ = true;
    std::fprintf(stderr,
                 "[flashrun] lost this node's etcd lease (%lld s TTL): %s; the other nodes go on without it, "
                 "so this node stops its workers\n",
                 static_cast<long long>(ttl_s_), std::string(last.message()).c_str());
    SignalRejoinLocked();
  }

  void StopLease(bool revoke) {
    int64_t lease;
    {
      std::lock_guard<std::mutex> l(mu_);
      lease_stop_ = true;
      lease = lease_;
    }
    cv_.notify_all();
    if (keeper_.joinable()) keeper_.join();
    if (!revoke) return;
    bool lost;
    {
      std::lock_guard<std::mutex> l(mu_);
      lost = lease_lost_;
      lease_ = 0;
    }
    // Its keys go at once, rather than when the TTL runs out.
    if (lease != 0 && !lost) (void)lease_client_->RevokeLease(lease);
  }

  void SignalRejoinLocked() {
    if (watching_round_ == 0 || rejoin_signalled_) return;
    rejoin_signalled_ = true;
    const uint64_t one = 1;
    (void)!::write(rejoin_fd_, &one, sizeof(one));
  }

  // A key of the copy of P rdzv/, with its node entry parsed once, when it
  // arrives (not on every look at the copy).
  struct Held {
    etcd::KeyValue kv;
    std::optional<rdzv::NodeEntry> node;  // for a key under nodes/ that parses
  };
  struct Copy {
    std::map<std::string, Held> keys;
    std::set<std::pair<int64_t, std::string>> entries;  // (create revision, key) of the node entries: the first leads

    void Put(const etcd::KeyValue& kv, const std::string& nodes_prefix) {
      Held& h = keys[kv.key()];
      if (h.node) entries.erase({h.kv.create_revision(), kv.key()});
      h.kv = kv;
      h.node.reset();
      if (kv.key().rfind(nodes_prefix, 0) != 0) return;
      if (!h.node.emplace().ParseFromString(kv.value())) h.node.reset();
      else entries.insert({kv.create_revision(), kv.key()});
    }
    void Erase(const std::string& key) {
      auto it = keys.find(key);
      if (it == keys.end()) return;
      if (it->second.node) entries.erase({it->second.kv.create_revision(), key});
      keys.erase(it);
    }
    void Clear() {
      keys.clear();
      entries.clear();
    }
    const std::string& LeaderKey() const {
      static const std::string none;
      return entries.empty() ? none : entries.begin()->second;
    }
  };

  // The session thread: keeps the copy of P rdzv/ current through one watch
  // stream, does the leader's work, and tells the agent when its round is
  // over. With N agents joining, each would decode its copy of N entries N
  // times (N^3 work on a host of simulated agents); instead, events that come
  // close together are looked at together (at most kCoalesce after the
  // first), and an agent that does not lead decodes only for events that can
  // change what it does: the round record, its own entry, or who leads. The
  // others only move its copy's revision on (and the timed look decodes all).
  void SessionLoop() {
    constexpr milliseconds kCoalesce(20);
    Copy copy;
    int64_t revision = 0;
    bool need_snapshot = true;
    bool unseen = false;                  // events came that can change what this node does, not decoded yet
    Clock::time_point looked = Clock::now();
    std::string leader_key;               // the leader's entry when last decoded
    std::optional<Clock::time_point> timer;  // the running last call's deadline
    // The copy changed (or time passed): lead where this node is the leader, and publish.
    auto act = [&] {
      NoteSessionError(absl::OkStatus());
      looked = Clock::now();
      unseen = false;
      leader_key = copy.LeaderKey();
      RoundSnapshot snap = Decode(copy, revision);
      if (snap.leader == options_.rendezvous.node_id) Lead(snap);
      timer.reset();
      if (const int64_t d = snap.stored.record.last_call_deadline_unix_ms(); d > 0)
        timer = Clock::now() + milliseconds(std::max<int64_t>(0, d - UnixMsNow()));
      Publish(std::move(snap));
    };
    // The next look: events put off, a running last call's deadline, else a
    // second after the last (a lease may have lapsed, a last call ended).
    auto next_look = [&] {
      Clock::time_point t = looked + milliseconds(1000);
      if (timer) t = std::min(t, *timer + milliseconds(5));
      if (unseen) t = std::min(t, looked + kCoalesce);
      return t;
    };
    while (!stopping_) {
      if (need_snapshot) {
        absl::StatusOr<etcd::RangeResponse> all = watch_client_->Get(rdzv_prefix_, /*prefix=*/true);
        if (!all.ok()) {
          NoteSessionError(all.status());
          Pause(milliseconds(200));
          continue;
        }
        copy.Clear();
        for (const auto& kv : all->kvs()) copy.Put(kv, nodes_prefix_);
        revision = all->header().revision();
        need_snapshot = false;
        act();
        continue;
      }
      // One stream, kept open (no reconnect per event or per look, which with
      // N agents would cost etcd N connections a second); the deadline only
      // bounds how long one stream lives.
      absl::Status watched = watch_client_->WatchEach(
          rdzv_prefix_, /*prefix=*/true, revision + 1, Clock::now() + std::chrono::minutes(1),
          [this] { return stopping_.load(); },
          [&](std::vector<etcd::Event>& events) {
            for (const etcd::Event& e : events) {
              const std::string& key = e.kv().key();
              if (e.type() == etcd::Event::DELETE) copy.Erase(key);
              else copy.Put(e.kv(), nodes_prefix_);
              revision = std::max(revision, e.kv().mod_revision());
              unseen = unseen || key == round_key_ || key == my_key_;
            }
            const std::string& leads = copy.LeaderKey();
            unseen = unseen || leads != leader_key || leads == my_key_;
            if (!unseen) PublishRevision(revision);
            return !stopping_.load();  // the look that follows each batch decodes, when it is due
          },
          [&]() -> std::optional<Clock::time_point> {
            if (stopping_) return std::nullopt;
            if (Clock::now() >= next_look()) act();
            return next_look();
          });
      if (stopping_) return;
      if (!watched.ok()) {
        NoteSessionError(watched);
        need_snapshot = true;  // compacted, or a member went away: read it whole again
        Pause(milliseconds(200));
        continue;
      }
      act();  // the stream ended: look once before the next
    }
  }

  RoundSnapshot Decode(const Copy& copy, int64_t revision) const {
    RoundSnapshot snap;
    snap.revision = revision;
    if (auto it = copy.keys.find(round_key_); it != copy.keys.end()) {
      // A record that does not parse counts as none, and the leader's next write replaces it.
      if (!snap.stored.record.ParseFromString(it->second.kv.value())) snap.stored.record.Clear();
      snap.record_revision = it->second.kv.mod_revision();
    }
    std::map<std::string, uint64_t> members;  // node id -> the incarnation in the round
    for (const auto& n : snap.stored.record.participants()) members[n.node_id()] = n.incarnation();
    for (const auto& [rev, key] : copy.entries) {
      const rdzv::NodeEntry* e = &*copy.keys.at(key).node;
      const std::string& id = e->node().node_id();
      snap.alive.insert(id);
      if (snap.leader.empty()) snap.leader = id;
      // In line: not in the round, a new agent under a member's id (it never
      // ran that round), or a member that wants a newer round.
      auto member = members.find(id);
      if (member == members.end() || member->second != e->node().incarnation() ||
          e->after_round() >= snap.stored.record.round())
        snap.stored.in_line.push_back(e->node());
    }
    return snap;
  }

  // The leader's work: the rules applied to the copy, written only when they
  // change the record, and only over the record they were applied to.
  void Lead(RoundSnapshot& snap) {
    rdzv::RoundRecord next = rdzv::RoundState::AdvanceStored(settings_, snap.stored, snap.alive, UnixMsNow());
    if (next.SerializeAsString() == snap.stored.record.SerializeAsString()) return;
    etcd::TxnRequest txn;
    etcd::Compare* same = txn.add_compare();
    same->set_key(round_key_);
    same->set_target(etcd::Compare::MOD);
    same->set_result(etcd::Compare::EQUAL);
    same->set_mod_revision(snap.record_revision);
    etcd::PutRequest* put = txn.add_success()->mutable_request_put();
    put->set_key(round_key_);
    put->set_value(next.SerializeAsString());
    // Not watch_client_: Lead runs inside its watch, which holds that client.
    absl::StatusOr<etcd::TxnResponse> done = lead_client_->Txn(txn);
    if (!done.ok()) NoteSessionError(done.status());
    // Written or not, the watch brings the record that is now in etcd.
  }

  void Publish(RoundSnapshot snap) {
    std::lock_guard<std::mutex> l(mu_);
    snapshot_ = std::move(snap);
    ++decoded_;
    if (watching_round_ != 0) {
      const rdzv::RoundView v = rdzv::RoundState::ViewOfStored(settings_, snapshot_.stored, options_.rendezvous.node_id);
      if (v.must_rejoin() || v.round() != watching_round_ || v.my_group_rank() < 0) SignalRejoinLocked();
    }
    cv_.notify_all();
  }

  // Events that change nothing this node does: the copy is at `revision`,
  // and what was decoded last still holds.
  void PublishRevision(int64_t revision) {
    std::lock_guard<std::mutex> l(mu_);
    snapshot_.revision = revision;
  }

  void NoteSessionError(const absl::Status& s) {
    std::lock_guard<std::mutex> l(mu_);
    session_error_ = s;
  }

  void Pause(milliseconds d) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, d, [&] { return stopping_.load(); });
  }

  EtcdRendezvousOptions options_;
  rdzv::RoundSettings settings_;
  std::string prefix_, rdzv_prefix_, round_key_, nodes_prefix_, my_key_;
  std::string etcd_name_;
  int64_t ttl_s_ = 15;
  uint64_t incarnation_ = 0;
  std::unique_ptr<rdzv::EtcdClient> client_;        // the agent thread: joins, barriers
  std::unique_ptr<rdzv::EtcdClient> watch_client_;  // the session thread's watch and snapshot
  std::unique_ptr<rdzv::EtcdClient> lead_client_;   // the session thread's writes as the leader
  std::unique_ptr<rdzv::EtcdClient> lease_client_;  // the keep-alive thread
  std::thread session_, keeper_;
  std::atomic<bool> stopping_{false};
  int rejoin_fd_ = -1;
  uint64_t last_round_ = 0;
  int group_world_size_ = 1;

  std::mutex mu_;
  std::condition_variable cv_;
  RoundSnapshot snapshot_;
  uint64_t decoded_ = 0;  // snapshot_ was decoded anew this many times
  absl::Status session_error_;
  int64_t lease_ = 0;
  bool lease_lost_ = false;
  bool lease_stop_ = false;
  uint64_t watching_round_ = 0;  // the round the agent's workers run in; 0 while joining
  bool rejoin_signalled_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NodeRendezvous>> StartEtcdRendezvous(EtcdRendezvousOptions options) {
  auto rendezvous = std::make_unique<EtcdRendezvous>(std::move(options));
  if (absl::Status s = rendezvous->Init(); !s.ok()) return s;
  return std::unique_ptr<NodeRendezvous>(std::move(rendezvous));
}

}  // namespace flashckpt::launcher
