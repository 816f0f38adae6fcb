#include "rendezvous/rendezvous_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <thread>

#include "rendezvous/rendezvous_client.h"

namespace flashckpt::rendezvous {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::unique_ptr<RendezvousServer> StartServer(uint32_t min_nodes, uint32_t max_nodes) {
  RendezvousServerOptions options;
  options.token = "secret";
  options.run_id = "run";
  options.round.min_nodes = min_nodes;
  options.round.max_nodes = max_nodes;
  options.round.last_call_timeout = milliseconds(200);
  options.max_frame_bytes = 4096;
  options.read_timeout = milliseconds(500);
  auto server = RendezvousServer::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return std::move(*server);
}

// Sends raw bytes on a fresh connection, returns what came back before the server closed it.
std::string SendRaw(uint16_t port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  (void)!::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  std::string reply;
  char buffer[4096];
  ssize_t n;
  while ((n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) reply.append(buffer, static_cast<size_t>(n));
  ::close(fd);
  return reply;
}

Response DecodeReply(const std::string& reply) {
  FrameDecoder decoder;
  decoder.Append(reply);
  auto body = decoder.NextFrame();
  Response response;
  if (body.ok() && body->has_value()) response.ParseFromString(**body);
  return response;
}

TEST(RendezvousServer, TwoClientsFormARoundAndShareTheStore) {
  auto server = StartServer(2, 2);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  RendezvousClient a("127.0.0.1", server->port(), "secret", "run");
  RendezvousClient b("127.0.0.1", server->port(), "secret", "run");
  NodeDescriptor na, nb;
  na.set_node_id("a");
  na.set_local_world_size(2);
  na.set_payload("steps:10,20");
  nb.set_node_id("b");
  nb.set_local_world_size(2);
  ASSERT_TRUE(a.Join(na, deadline).ok());
  std::thread joiner([&] { ASSERT_TRUE(b.Join(nb, deadline).ok()); });
  auto view = a.Sync("a", 0, milliseconds(5000), deadline);  // long poll, answered when b joins
  joiner.join();
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->round(), 1u);
  ASSERT_EQ(view->participants_size(), 2);
  EXPECT_EQ(view->participants(0).payload(), "steps:10,20");  // every agent sees the payloads

  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(100));
    ASSERT_TRUE(b.StoreSet("k", "v", deadline).ok());
  });
  auto value = a.StoreGet("k", deadline);  // waits for the set
  setter.join();
  ASSERT_TRUE(value.ok()) << value.status();
  EXPECT_EQ(*value, "v");
  EXPECT_EQ(*a.StoreAdd("n", 2, deadline), 2);
  EXPECT_EQ(*b.StoreAdd("n", 3, deadline), 5);
  auto missing = a.StoreGet("never", Clock::now() + milliseconds(300));
  EXPECT_FALSE(missing.ok());
}

TEST(RendezvousServer, RejectsBadFramesAndKeepsServing) {
  auto server = StartServer(1, 1);
  // Malformed body.
  Response r = DecodeReply(SendRaw(server->port(), std::string("\x00\x00\x00\x05hello", 9)));
  EXPECT_EQ(r.code(), Response::BAD_REQUEST);
  // Oversized: rejected from the header, before any allocation.
  r = DecodeReply(SendRaw(server->port(), std::string("\x7f\xff\xff\xff", 4)));
  EXPECT_EQ(r.code(), Response::BAD_REQUEST);
  EXPECT_NE(r.error().find("exceeds the cap"), std::string::npos);
  // A frame started and never finished is dropped after the read timeout.
  EXPECT_EQ(SendRaw(server->port(), std::string("\x00\x00\x01\x00partial", 11)), "");
  // Wrong token: refused, no store access.
  RendezvousClient intruder("127.0.0.1", server->port(), "guess", "run");
  auto stolen = intruder.StoreGet("k", Clock::now() + std::chrono::seconds(2));
  ASSERT_FALSE(stolen.ok());
  EXPECT_EQ(stolen.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(stolen.status().message().find("127.0.0.1:"), std::string::npos);
  // Wrong run.
  RendezvousClient other_run("127.0.0.1", server->port(), "secret", "other");
  EXPECT_FALSE(other_run.StoreAdd("n", 1, Clock::now() + std::chrono::seconds(2)).ok());
  EXPECT_GE(server->counters().frames_rejected.load(), 5u);

  // Still serving.
  RendezvousClient good("127.0.0.1", server->port(), "secret", "run");
  NodeDescriptor n;
  n.set_node_id("a");
  auto view = good.Join(n, Clock::now() + std::chrono::seconds(5));
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->round(), 1u);
}

TEST(RendezvousClient, UnreachableEndpointNamesAddressAndTime) {
  RendezvousClient client("127.0.0.1", 1, "", "run");  // nothing listens on port 1
  auto result = client.StoreAdd("k", 1, Clock::now() + milliseconds(300));
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.status().message().find("127.0.0.1:1"), std::string::npos) << result.status();
  EXPECT_NE(result.status().message().find(" s ("), std::string::npos) << result.status();
}

TEST(RendezvousServer, BindsOnlyTheAddressAskedFor) {
  auto server = StartServer(1, 1);
  EXPECT_EQ(server->host(), "127.0.0.1");
  RendezvousServerOptions busy;
  busy.port = server->port();
  auto second = RendezvousServer::Start(busy);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find("127.0.0.1:" + std::to_string(server->port())), std::string::npos);
}

}  // namespace
}  // namespace flashckpt::rendezvous
