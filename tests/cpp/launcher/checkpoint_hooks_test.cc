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

TEST(NodeSteps, EncodeFormat) {
  EXPECT_EQ(EncodeNodeSteps(Steps({10, 15}, {5, 10})), "v1;mem=10,15;committed=5,10");
  EXPECT_EQ(EncodeNodeSteps(Steps({}, {})), "v1;mem=;committed=");
  EXPECT_EQ(EncodeNodeSteps(NodeSteps{}), "");  // unknown: no worker ever registered
}

TEST(NodeSteps, RoundTrip) {
  for (const NodeSteps& s : {Steps({15, 20}, {10}), Steps({}, {5, 10, 1LL << 40}), Steps({7}, {}), Steps({}, {})}) {
    NodeSteps d = DecodeNodeSteps(EncodeNodeSteps(s));
    EXPECT_TRUE(d.known);
    EXPECT_EQ(d.memory, s.memory);
    EXPECT_EQ(d.committed, s.committed);
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
