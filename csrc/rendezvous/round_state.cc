#include "rendezvous/round_state.h"

#include <algorithm>

namespace flashckpt::rendezvous {

bool RoundState::IsParticipant(const std::string& node_id) const {
  return std::any_of(participants_.begin(), participants_.end(),
                     [&](const NodeDescriptor& n) { return n.node_id() == node_id; });
}

void RoundState::Touch(const std::string& node_id, SteadyTime now) { last_heard_[node_id] = now; }

void RoundState::Join(const NodeDescriptor& node, SteadyTime now) {
  Touch(node.node_id(), now);
  auto it = waiting_.find(node.node_id());
  if (it != waiting_.end()) {
    it->second.node = node;  // a retry: keep its place in line
  } else {
    waiting_[node.node_id()] = Waiting{node, next_join_order_++};
  }
  BreakForNewcomer(node.node_id());
  ++version_;
  MaybeComplete(now);
}

void RoundState::BreakForNewcomer(const std::string& node_id) {
  if (round_ > 0 && !round_broken_) {
    // A member joining again means its workers stopped: the round is over for all.
    // A newcomer breaks the round only when there is room for it.
    if (IsParticipant(node_id) || participants_.size() < settings_.max_nodes) {
      round_broken_ = true;
    }
  }
}

void RoundState::Leave(const std::string& node_id, SteadyTime now) {
  (void)now;
  waiting_.erase(node_id);
  last_heard_.erase(node_id);
  if (IsParticipant(node_id)) {
    participant_alive_[node_id] = false;
    round_broken_ = true;
  }
  ++version_;
  MaybeComplete(now);
}

void RoundState::KeepAlive(const std::string& node_id, SteadyTime now) {
  if (IsParticipant(node_id) || waiting_.count(node_id)) Touch(node_id, now);
}

void RoundState::MaybeComplete(SteadyTime now) {
  // A healthy round keeps going; nodes in line wait until it breaks (a full
  // round is not broken by a newcomer).
  if (round_ > 0 && !round_broken_) {
    last_call_deadline_.reset();
    return;
  }
  if (waiting_.size() < settings_.min_nodes) {
    last_call_deadline_.reset();
    return;
  }
  if (waiting_.size() >= settings_.max_nodes) {
    Complete(now);
    return;
  }
  // Every live member of the broken round is back (a restart, or a dead member
  // dropped): no reason to wait for the last call.
  if (round_ > 0 && round_broken_) {
    bool all_members_back = true;
    for (const NodeDescriptor& n : participants_) {
      if (participant_alive_[n.node_id()] && !waiting_.count(n.node_id())) all_members_back = false;
    }
    if (all_members_back) {
      Complete(now);
      return;
    }
  }
  if (!last_call_deadline_) last_call_deadline_ = now + settings_.last_call_timeout;
  if (now >= *last_call_deadline_) Complete(now);
}

void RoundState::Complete(SteadyTime now) {
  // Deterministic ranks: members of the previous round keep their order (so the
  // rank-0 node stays put), newcomers follow in join order.
  std::vector<const Waiting*> order;
  for (const auto& [id, w] : waiting_) order.push_back(&w);
  std::map<std::string, size_t> previous_rank;
  for (size_t i = 0; i < participants_.size(); ++i) previous_rank[participants_[i].node_id()] = i;
  std::sort(order.begin(), order.end(), [&](const Waiting* a, const Waiting* b) {
    auto ra = previous_rank.find(a->node.node_id());
    auto rb = previous_rank.find(b->node.node_id());
    const size_t ka = ra == previous_rank.end() ? SIZE_MAX : ra->second;
    const size_t kb = rb == previous_rank.end() ? SIZE_MAX : rb->second;
    if (ka != kb) return ka < kb;
    return a->join_order < b->join_order;
  });
  if (order.size() > settings_.max_nodes) order.resize(settings_.max_nodes);

  std::vector<NodeDescriptor> members;
  for (const Waiting* w : order) members.push_back(w->node);
  for (const NodeDescriptor& n : members) waiting_.erase(n.node_id());
  participants_ = std::move(members);
  participant_alive_.clear();
  for (const NodeDescriptor& n : participants_) {
    participant_alive_[n.node_id()] = true;
    Touch(n.node_id(), now);
  }
  ++round_;
  round_broken_ = false;
  last_call_deadline_.reset();
  ++version_;
}

void RoundState::Advance(SteadyTime now) {
  bool changed = false;
  for (auto it = last_heard_.begin(); it != last_heard_.end();) {
    if (now - it->second <= settings_.node_expiry) {
      ++it;
      continue;
    }
    const std::string id = it->first;
    it = last_heard_.erase(it);
    waiting_.erase(id);
    if (IsParticipant(id) && participant_alive_[id]) {
      participant_alive_[id] = false;
      round_broken_ = true;
    }
    changed = true;
  }
  if (changed) ++version_;
  if (changed || last_call_deadline_) {
    const uint64_t before = version_;
    MaybeComplete(now);
    if (version_ != before) changed = true;
  }
}

std::optional<SteadyTime> RoundState::NextDeadline() const {
  std::optional<SteadyTime> next = last_call_deadline_;
  for (const auto& [id, heard] : last_heard_) {
    const SteadyTime expiry = heard + settings_.node_expiry + std::chrono::milliseconds(1);
    if (!next || expiry < *next) next = expiry;
  }
  return next;
}

RoundView RoundState::ViewFor(const std::string& node_id) const {
  RoundView view;
  view.set_round(round_);
  view.set_my_group_rank(-1);
  for (size_t i = 0; i < participants_.size(); ++i) {
    *view.add_participants() = participants_[i];
    if (participants_[i].node_id() == node_id) view.set_my_group_rank(static_cast<int32_t>(i));
  }
  view.set_must_rejoin(round_broken_ && view.my_group_rank() >= 0);
  view.set_nodes_waiting(static_cast<uint32_t>(waiting_.size()));
  view.set_min_nodes(settings_.min_nodes);
  view.set_max_nodes(settings_.max_nodes);
  view.set_waiting(waiting_.count(node_id) > 0);
  return view;
}

bool RoundState::HasNewsFor(const std::string& node_id, uint64_t known_round) const {
  // A node in line for the next round hears nothing until that round completes
  // (which takes it out of the line).
  if (waiting_.count(node_id)) return false;
  const bool member = IsParticipant(node_id);
  if (!member) return true;  // neither in line nor in the round: it must join (again)
  return round_ > known_round || round_broken_;
}

// Stored rounds run on a clock of unix milliseconds (the same on every agent
// to within NTP): a steady time point that many milliseconds after zero.
namespace {
SteadyTime AtUnixMs(int64_t ms) { return SteadyTime{} + std::chrono::milliseconds(ms); }
int64_t UnixMsOf(SteadyTime t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t - SteadyTime{}).count();
}
}  // namespace

RoundState RoundState::FromStored(const RoundSettings& settings, const StoredRound& stored) {
  RoundState s(settings);
  const RoundRecord& r = stored.record;
  s.round_ = r.round();
  s.participants_.assign(r.participants().begin(), r.participants().end());
  const std::set<std::string> dead(r.dead().begin(), r.dead().end());
  for (const NodeDescriptor& n : s.participants_) s.participant_alive_[n.node_id()] = !dead.count(n.node_id());
  s.round_broken_ = r.broken();
  if (r.last_call_deadline_unix_ms() > 0) s.last_call_deadline_ = AtUnixMs(r.last_call_deadline_unix_ms());
  for (const NodeDescriptor& n : stored.in_line) s.waiting_[n.node_id()] = Waiting{n, s.next_join_order_++};
  return s;
}

RoundRecord RoundState::AdvanceStored(const RoundSettings& settings, const StoredRound& stored,
                                      const std::set<std::string>& alive, int64_t now_unix_ms) {
  RoundState s = FromStored(settings, stored);
  const SteadyTime now = AtUnixMs(now_unix_ms);
  for (const NodeDescriptor& n : s.participants_) {
    bool& live = s.participant_alive_[n.node_id()];
    if (live && !alive.count(n.node_id())) {
      live = false;
      if (s.round_ > 0) s.round_broken_ = true;
    }
  }
  for (const NodeDescriptor& n : stored.in_line) s.BreakForNewcomer(n.node_id());
  s.MaybeComplete(now);

  RoundRecord out;
  out.set_round(s.round_);
  for (const NodeDescriptor& n : s.participants_) {
    *out.add_participants() = n;
    if (!s.participant_alive_[n.node_id()]) out.add_dead(n.node_id());
  }
  out.set_broken(s.round_broken_);
  if (s.last_call_deadline_) out.set_last_call_deadline_unix_ms(UnixMsOf(*s.last_call_deadline_));
  return out;
}

RoundView RoundState::ViewOfStored(const RoundSettings& settings, const StoredRound& stored,
                                   const std::string& node_id) {
  return FromStored(settings, stored).ViewFor(node_id);
}

}  // namespace flashckpt::rendezvous
