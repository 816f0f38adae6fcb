// The restore-step agreement of flashrun's checkpoint hooks: what a node reports
// in the rendezvous payload and the step all nodes agree to restore.
#include "launcher/checkpoint_hooks.h"

#include <gtest/gtest.h>

namespace flashckpt::launcher {
namespace {

NodeSteps Steps(std::set<int64_t> memory, std::set<int64_t> committed) {
  NodeSteps s;
  s.known = true;
  s.memory = std::move(memory);
  s.committed = std::move(committed);
  return s;
}

// `n` nodes of 2 ranks each, ranks in node order.
RoundLayout TwoRanksPerNode(size_t n) {
  RoundLayout l;
  l.world = static_cast<int>(2 * n);
  for (size_t i = 0; i < n; ++i) l.ranks.push_back({static_cast<int>(2 * i), static_cast<int>(2 * i + 1)});
  return l;
}

// The agreement of a round whose layout is the one every known node's snapshots were taken in.
std::optional<int64_t> AgreeRestoreStep(std::vector<NodeSteps> nodes) {
  RoundLayout l = TwoRanksPerNode(nodes.size());
  for (size_t i = 0; i < nodes.size(); ++i) {
    nodes[i].world = l.world;
    nodes[i].ranks = l.ranks[i];
  }
  return launcher::AgreeRestoreStep(nodes, l);
}

TEST(NodeSteps, EncodeFormat) {
  EXPECT_EQ(EncodeNodeSteps(Steps({10, 15}, {5, 10})), "v1;mem=10,15;committed=5,10;world=0;ranks=");
  NodeSteps s = Steps({}, {});
  s.world = 4;
  s.ranks = {2, 3};
  EXPECT_EQ(EncodeNodeSteps(s), "v1;mem=;committed=;world=4;ranks=2,3");
  EXPECT_EQ(EncodeNodeSteps(NodeSteps{}), "");  // unknown: no worker ever registered
}

TEST(NodeSteps, RoundTrip) {
  NodeSteps laid = Steps({7}, {5});
  laid.world = 6;
  laid.ranks = {4, 5};
  for (const NodeSteps& s : {Steps({15, 20}, {10}), Steps({}, {5, 10, 1LL << 40}), Steps({7}, {}), Steps({}, {}), laid}) {
    NodeSteps d = DecodeNodeSteps(EncodeNodeSteps(s));
    EXPECT_TRUE(d.known);
    EXPECT_EQ(d.memory, s.memory);
    EXPECT_EQ(d.committed, s.committed);
    EXPECT_EQ(d.world, s.world);
    EXPECT_EQ(d.ranks, s.ranks);
  }
  EXPECT_FALSE(DecodeNodeSteps(EncodeNodeSteps(NodeSteps{})).known);
}

TEST(NodeSteps, DecodeToleratesJunk) {
  EXPECT_FALSE(DecodeNodeSteps("").known);
  EXPECT_FALSE(DecodeNodeSteps("v2;mem=1").known);
  EXPECT_FALSE(DecodeNodeSteps("mem=1;committed=2").known);
  NodeSteps d = DecodeNodeSteps("v1;mem=1,x,,3;committed=;other=9;noequals;mem2=4");
  EXPECT_TRUE(d.known);
  EXPECT_EQ(d.memory, (std::set<int64_t>{1, 3}));
  EXPECT_TRUE(d.committed.empty());
  d = DecodeNodeSteps("v1;committed=20,5");  // order of fields and values does not matter
  EXPECT_EQ(d.committed, (std::set<int64_t>{5, 20}));
  EXPECT_TRUE(d.memory.empty());
  d = DecodeNodeSteps("v1;world=-2;ranks=1,-1,x,0");
  EXPECT_EQ(d.world, 0);
  EXPECT_EQ(d.ranks, (std::set<int>{0, 1}));
}

TEST(RoundLayout, RanksFollowTheNodeOrder) {
  RoundAssignment round;
  round.world_size = 5;
  round.group_world_size = 2;
  round.nodes = {NodeInRound{"a", "", 3, ""}, NodeInRound{"b", "", 2, ""}};
  RoundLayout l = LayoutOf(round);
  EXPECT_EQ(l.world, 5);
  ASSERT_EQ(l.ranks.size(), 2u);
  EXPECT_EQ(l.ranks[0], (std::set<int>{0, 1, 2}));
  EXPECT_EQ(l.ranks[1], (std::set<int>{3, 4}));
  // The static rendezvous lists only this node: its ranks start at its offset.
  RoundAssignment fixed;
  fixed.world_size = 4;
  fixed.group_world_size = 2;
  fixed.rank_offset = 2;
  fixed.nodes = {NodeInRound{"static", "", 2, ""}};
  l = LayoutOf(fixed);
  ASSERT_EQ(l.ranks.size(), 1u);
  EXPECT_EQ(l.ranks[0], (std::set<int>{2, 3}));
}

// An elastic change: memory snapshots taken by other ranks, or in a world of
// another size, do not restore the new world; committed steps do.
TEST(AgreeRestoreStep, WorldThatShrankRestoresOnlyCommittedSteps) {
  NodeSteps a = Steps({20, 25}, {15});  // node a ran ranks 0,1 of 4; node b is lost for good
  a.world = 4;
  a.ranks = {0, 1};
  RoundLayout two = TwoRanksPerNode(1);
  EXPECT_FALSE(MemoryRestores(a, two, 0));
  EXPECT_EQ(launcher::AgreeRestoreStep({a}, two), 15);
  // The same node in the old world's layout: its memory counts.
  EXPECT_TRUE(MemoryRestores(a, TwoRanksPerNode(2), 0));
  // Nothing committed: no step restores the smaller world.
  a.committed.clear();
  EXPECT_EQ(launcher::AgreeRestoreStep({a}, two), std::nullopt);
}

TEST(AgreeRestoreStep, WorldThatGrewRestoresOnlyCommittedSteps) {
  NodeSteps a = Steps({20, 25}, {15, 20});  // ranks 0,1 of a world of 2; node c joins, empty
  a.world = 2;
  a.ranks = {0, 1};
  EXPECT_EQ(launcher::AgreeRestoreStep({a, NodeSteps{}}, TwoRanksPerNode(2)), 20);
}

TEST(AgreeRestoreStep, RenumberedRanksDoNotRestoreFromMemory) {
  // Three nodes of 2, node b lost: node c's ranks 4,5 become 2,3 in a world of 4.
  NodeSteps a = Steps({30}, {25}), c = Steps({30}, {25});
  a.world = c.world = 6;
  a.ranks = {0, 1};
  c.ranks = {4, 5};
  RoundLayout four = TwoRanksPerNode(2);
  EXPECT_FALSE(MemoryRestores(a, four, 0));  // same ranks, another world size
  EXPECT_FALSE(MemoryRestores(c, four, 1));
  EXPECT_EQ(launcher::AgreeRestoreStep({a, c}, four), 25);
  // A payload that says nothing of its layout (world 0): its memory does not count.
  NodeSteps old = Steps({30}, {25});
  EXPECT_EQ(launcher::AgreeRestoreStep({old}, TwoRanksPerNode(1)), 25);
}

TEST(AgreeRestoreStep, NothingKnown) {
  EXPECT_EQ(AgreeRestoreStep({}), std::nullopt);
  EXPECT_EQ(AgreeRestoreStep({NodeSteps{}, NodeSteps{}}), std::nullopt);
}

TEST(AgreeRestoreStep, NewestCommonMemoryStep) {
  // Every node holds 15 in memory: restore it, newer than anything committed.
  EXPECT_EQ(AgreeRestoreStep({Steps({10, 15}, {5}), Steps({10, 15}, {5})}), 15);
  // One node got further (20) than the other: the newest common one.
  EXPECT_EQ(AgreeRestoreStep({Steps({15, 20}, {5}), Steps({10, 15}, {5})}), 15);
}

TEST(AgreeRestoreStep, CommittedStorageIsShared) {
  // Node b only sees 10 committed, node a holds 10 in memory: 10 is available to both.
  EXPECT_EQ(AgreeRestoreStep({Steps({15}, {}), Steps({}, {10})}), 10);
  // A memory step newer than the newest commit on one node only does not count.
  EXPECT_EQ(AgreeRestoreStep({Steps({25}, {20}), Steps({}, {20})}), 20);
}

TEST(AgreeRestoreStep, ReplacedNodeWithEmptyMemory) {
  // The replacement has registered nothing (unknown, empty payload): the newest committed step.
  EXPECT_EQ(AgreeRestoreStep({Steps({20, 25}, {5, 15}), NodeSteps{}}), 15);
  EXPECT_EQ(AgreeRestoreStep({NodeSteps{}, Steps({20, 25}, {5, 15})}), 15);
  // Nothing committed and one node has empty memory: no step every node can restore.
  EXPECT_EQ(AgreeRestoreStep({Steps({20, 25}, {}), NodeSteps{}}), std::nullopt);
}

TEST(AgreeRestoreStep, NoCommonStep) {
  EXPECT_EQ(AgreeRestoreStep({Steps({10}, {}), Steps({15}, {})}), std::nullopt);
  EXPECT_EQ(AgreeRestoreStep({Steps({}, {}), Steps({}, {})}), std::nullopt);
}

TEST(AgreeRestoreStep, ThreeNodes) {
  EXPECT_EQ(AgreeRestoreStep({Steps({30, 35}, {25}), Steps({30, 35}, {25}), Steps({35}, {25})}), 35);
  EXPECT_EQ(AgreeRestoreStep({Steps({30, 35}, {25}), Steps({30}, {}), Steps({}, {})}), 25);
}

TEST(AgreeRestoreStep, SingleNode) {
  EXPECT_EQ(AgreeRestoreStep({Steps({15, 20}, {10})}), 20);
  EXPECT_EQ(AgreeRestoreStep({Steps({}, {10})}), 10);
}

}  // namespace
}  // namespace flashckpt::launcher
