#include "rendezvous/frame_codec.h"

#include <gtest/gtest.h>

namespace flashckpt::rendezvous {
namespace {

Request JoinRequestFor(const std::string& node_id) {
  Request request;
  request.set_token("t");
  request.mutable_join()->mutable_node()->set_node_id(node_id);
  return request;
}

TEST(FrameCodec, RoundTripsSplitAcrossReads) {
  const std::string frame = EncodeFrame(JoinRequestFor("node-a")) + EncodeFrame(JoinRequestFor("node-b"));
  FrameDecoder decoder;
  std::vector<std::string> bodies;
  for (char c : frame) {  // one byte at a time
    decoder.Append(std::string_view(&c, 1));
    auto next = decoder.NextFrame();
    ASSERT_TRUE(next.ok());
    if (next->has_value()) bodies.push_back(**next);
  }
  ASSERT_EQ(bodies.size(), 2u);
  auto parsed = ParseRequest(bodies[1]);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->join().node().node_id(), "node-b");
}

TEST(FrameCodec, RejectsOversizedFrameFromHeaderAlone) {
  FrameDecoder decoder(1024);
  decoder.Append(std::string("\x00\x10\x00\x00", 4));  // 1 MiB announced
  auto next = decoder.NextFrame();
  ASSERT_FALSE(next.ok());
  EXPECT_NE(next.status().message().find("exceeds the cap of 1024 bytes"), std::string::npos);
}

TEST(FrameCodec, RejectsMalformedAndEmptyRequests) {
  EXPECT_FALSE(ParseRequest("\xff\xff\xff garbage").ok());
  EXPECT_FALSE(ParseRequest("").ok());  // no body set
  Request join_without_id;
  join_without_id.mutable_join();
  EXPECT_FALSE(ParseRequest(join_without_id.SerializeAsString()).ok());
}

}  // namespace
}  // namespace flashckpt::rendezvous
