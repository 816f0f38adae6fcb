#include "rendezvous/round_state.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

namespace flashckpt::rendezvous {
namespace {

using std::chrono::milliseconds;

NodeDescriptor Node(const std::string& id) {
  NodeDescriptor n;
  n.set_node_id(id);
  n.set_local_world_size(2);
  return n;
}

RoundSettings Settings(uint32_t min_nodes, uint32_t max_nodes) {
  RoundSettings s;
  s.min_nodes = min_nodes;
  s.max_nodes = max_nodes;
  s.last_call_timeout = milliseconds(1000);
  s.node_expiry = milliseconds(3000);
  return s;
}

TEST(RoundState, CompletesAtMaxWithDeterministicRanks) {
  RoundState state(Settings(2, 2));
  const SteadyTime t0{};
  state.Join(Node("b"), t0);
  EXPECT_EQ(state.round(), 0u);
  state.Join(Node("a"), t0);
  EXPECT_EQ(state.round(), 1u);
  EXPECT_EQ(state.ViewFor("b").my_group_rank(), 0);  // join order
  EXPECT_EQ(state.ViewFor("a").my_group_rank(), 1);
  // A restart keeps the ranks of the previous round.
  state.Join(Node("a"), t0 + milliseconds(10));
  EXPECT_TRUE(state.ViewFor("b").must_rejoin());
  state.Join(Node("b"), t0 + milliseconds(20));
  EXPECT_EQ(state.round(), 2u);
  EXPECT_EQ(state.ViewFor("b").my_group_rank(), 0);
  EXPECT_FALSE(state.ViewFor("a").must_rejoin());
}

TEST(RoundState, LastCallCompletesBetweenMinAndMax) {
  RoundState state(Settings(1, 3));
  const SteadyTime t0{};
  state.Join(Node("a"), t0);
  state.Advance(t0 + milliseconds(500));
  EXPECT_EQ(state.round(), 0u);
  state.Advance(t0 + milliseconds(1001));
  EXPECT_EQ(state.round(), 1u);
  EXPECT_EQ(state.ViewFor("a").participants_size(), 1);
}

TEST(RoundState, DeadNodeBreaksRoundAndSurvivorsGoOnWithFewer) {
  RoundState state(Settings(1, 2));
  const SteadyTime t0{};
  state.Join(Node("a"), t0);
  state.Join(Node("b"), t0);
  ASSERT_EQ(state.round(), 1u);
  state.KeepAlive("a", t0 + milliseconds(2500));
  state.Advance(t0 + milliseconds(3500));  // b silent for 3.5 s > 3 s
  EXPECT_TRUE(state.ViewFor("a").must_rejoin());
  EXPECT_TRUE(state.HasNewsFor("a", 1));
  state.Join(Node("a"), t0 + milliseconds(3600));  // every live member is back: no last call
  EXPECT_EQ(state.round(), 2u);
  EXPECT_EQ(state.ViewFor("a").participants_size(), 1);
}

TEST(RoundState, NewcomerBreaksRoundOnlyWhenThereIsRoom) {
  RoundState full(Settings(1, 1));
  full.Join(Node("a"), SteadyTime{});
  full.Join(Node("late"), SteadyTime{});
  EXPECT_FALSE(full.ViewFor("a").must_rejoin());
  EXPECT_TRUE(full.ViewFor("late").waiting());

  RoundState room(Settings(1, 2));
  room.Join(Node("a"), SteadyTime{});
  room.Advance(SteadyTime{} + milliseconds(1001));
  ASSERT_EQ(room.round(), 1u);
  room.Join(Node("b"), SteadyTime{} + milliseconds(1100));
  EXPECT_TRUE(room.ViewFor("a").must_rejoin());
  room.Join(Node("a"), SteadyTime{} + milliseconds(1200));
  EXPECT_EQ(room.round(), 2u);
  EXPECT_EQ(room.ViewFor("b").participants_size(), 2);
}

TEST(RoundState, WaitingNodeHearsNothingUntilRoundCompletes) {
  RoundState state(Settings(2, 2));
  state.Join(Node("a"), SteadyTime{});
  EXPECT_FALSE(state.HasNewsFor("a", 0));
  state.Join(Node("b"), SteadyTime{});
  EXPECT_TRUE(state.HasNewsFor("a", 0));
  EXPECT_FALSE(state.HasNewsFor("a", 1));
}

// The stored round (etcd): the same rules over a record and a line of nodes.
namespace stored {

StoredRound Line(const RoundRecord& record, std::vector<std::string> ids) {
  StoredRound s;
  s.record = record;
  for (const std::string& id : ids) s.in_line.push_back(Node(id));
  return s;
}

std::set<std::string> Alive(std::vector<std::string> ids) { return {ids.begin(), ids.end()}; }

TEST(StoredRound, CompletesAtMaxInJoinOrderAndKeepsRanksOnARestart) {
  const RoundSettings s = Settings(2, 2);
  RoundRecord r = RoundState::AdvanceStored(s, Line({}, {"b"}), Alive({"b"}), 1000);
  EXPECT_EQ(r.round(), 0u);
  r = RoundState::AdvanceStored(s, Line(r, {"b", "a"}), Alive({"a", "b"}), 1001);
  ASSERT_EQ(r.round(), 1u);
  ASSERT_EQ(r.participants_size(), 2);
  EXPECT_EQ(r.participants(0).node_id(), "b");
  EXPECT_FALSE(r.broken());
  EXPECT_EQ(RoundState::ViewOfStored(s, Line(r, {}), "a").my_group_rank(), 1);
  // a restarts: it is in line again, which breaks the round for b too.
  r = RoundState::AdvanceStored(s, Line(r, {"a"}), Alive({"a", "b"}), 1002);
  EXPECT_TRUE(r.broken());
  EXPECT_TRUE(RoundState::ViewOfStored(s, Line(r, {"a"}), "b").must_rejoin());
  EXPECT_TRUE(RoundState::ViewOfStored(s, Line(r, {"a"}), "a").waiting());
  r = RoundState::AdvanceStored(s, Line(r, {"a", "b"}), Alive({"a", "b"}), 1003);
  EXPECT_EQ(r.round(), 2u);
  EXPECT_EQ(r.participants(0).node_id(), "b");  // the rank-0 node stays put
  EXPECT_FALSE(r.broken());
}

TEST(StoredRound, AMemberWithoutALeaseIsDeadAndTheSurvivorsGoOnWithoutWaitingForTheLastCall) {
  const RoundSettings s = Settings(1, 3);
  RoundRecord r = RoundState::AdvanceStored(s, Line({}, {"a", "b", "c"}), Alive({"a", "b", "c"}), 0);
  ASSERT_EQ(r.round(), 1u);
  r = RoundState::AdvanceStored(s, Line(r, {}), Alive({"a", "c"}), 10);
  EXPECT_TRUE(r.broken());
  ASSERT_EQ(r.dead_size(), 1);
  EXPECT_EQ(r.dead(0), "b");
  // Every live member is back: the round completes at once (no last call).
  r = RoundState::AdvanceStored(s, Line(r, {"c", "a"}), Alive({"a", "c"}), 20);
  ASSERT_EQ(r.round(), 2u);
  ASSERT_EQ(r.participants_size(), 2);
  EXPECT_EQ(r.participants(0).node_id(), "a");
  EXPECT_EQ(r.dead_size(), 0);
}

TEST(StoredRound, TheLastCallRunsOnTheRecordedDeadline) {
  const RoundSettings s = Settings(1, 3);  // last call: 1000 ms
  RoundRecord r = RoundState::AdvanceStored(s, Line({}, {"a"}), Alive({"a"}), 5000);
  EXPECT_EQ(r.round(), 0u);
  EXPECT_EQ(r.last_call_deadline_unix_ms(), 6000);
  // Another agent (the next leader) applies the rules later: the deadline holds.
  r = RoundState::AdvanceStored(s, Line(r, {"a", "b"}), Alive({"a", "b"}), 5999);
  EXPECT_EQ(r.round(), 0u);
  EXPECT_EQ(r.last_call_deadline_unix_ms(), 6000);
  r = RoundState::AdvanceStored(s, Line(r, {"a", "b"}), Alive({"a", "b"}), 6000);
  EXPECT_EQ(r.round(), 1u);
  EXPECT_EQ(r.participants_size(), 2);
  EXPECT_EQ(r.last_call_deadline_unix_ms(), 0);
}

TEST(StoredRound, ANewcomerBreaksTheRoundOnlyWhenThereIsRoom) {
  RoundRecord full = RoundState::AdvanceStored(Settings(2, 2), Line({}, {"a", "b"}), Alive({"a", "b"}), 0);
  ASSERT_EQ(full.round(), 1u);
  RoundRecord r = RoundState::AdvanceStored(Settings(2, 2), Line(full, {"c"}), Alive({"a", "b", "c"}), 1);
  EXPECT_FALSE(r.broken());
  const RoundView c = RoundState::ViewOfStored(Settings(2, 2), Line(r, {"c"}), "c");
  EXPECT_TRUE(c.waiting());
  EXPECT_EQ(c.my_group_rank(), -1);
  r = RoundState::AdvanceStored(Settings(2, 3), Line(full, {"c"}), Alive({"a", "b", "c"}), 1);
  EXPECT_TRUE(r.broken());
}

}  // namespace stored

}  // namespace
}  // namespace flashckpt::rendezvous
