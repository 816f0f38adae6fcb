#include "rendezvous/round_state.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace flashckpt::rendezvous
