// The etcd-v3 rendezvous against a real etcd (started per test): agents are
// threads running the real agent-side code (StartEtcdRendezvous), and a
// crashed agent is a forked child killed with SIGKILL, so that its lease
// lapses as a dead node's would.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "etcd_test_server.h"
#include "launcher/node_rendezvous.h"

namespace flashckpt::launcher {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;
using rendezvous::etcd_testing::EtcdServer;

EtcdRendezvousOptions Options(const EtcdServer& etcd, const std::string& id, int min_nodes, int max_nodes) {
  EtcdRendezvousOptions o;
  o.etcd.endpoints = {etcd.endpoint()};
  o.rendezvous.run_id = "job";
  o.rendezvous.node_id = id;
  o.rendezvous.node_address = "127.0.0.1";
  o.rendezvous.local_world_size = 2;
  o.rendezvous.min_nodes = min_nodes;
  o.rendezvous.max_nodes = max_nodes;
  o.rendezvous.join_timeout = seconds(20);
  o.rendezvous.last_call_timeout = milliseconds(500);
  o.rendezvous.keep_alive_interval = milliseconds(500);
  o.rendezvous.keep_alive_max_attempt = 4;  // a 2 s lease
  return o;
}

std::unique_ptr<NodeRendezvous> Start(EtcdRendezvousOptions o) {
  auto r = StartEtcdRendezvous(std::move(o));
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

const auto kNever = [] { return false; };

// Whether fd turns readable within `within`.
bool Readable(int fd, milliseconds within) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(within.count())) == 1;
}

std::future<absl::StatusOr<RoundAssignment>> JoinAsync(NodeRendezvous* r, std::string payload = "p") {
  return std::async(std::launch::async, [r, payload] { return r->NextRound(payload, 0, kNever); });
}

// node-a and node-b, --nnodes 2:2.
std::pair<std::unique_ptr<NodeRendezvous>, std::unique_ptr<NodeRendezvous>> StartTwo(const EtcdServer& etcd) {
  return {Start(Options(etcd, "node-a", 2, 2)), Start(Options(etcd, "node-b", 2, 2))};
}

// a joins first (so it gets group rank 0), then b; true when both hold round 1.
bool FormRound(NodeRendezvous* a, NodeRendezvous* b) {
  auto fa = JoinAsync(a);
  std::this_thread::sleep_for(milliseconds(200));
  auto fb = JoinAsync(b);
  absl::StatusOr<RoundAssignment> ra = fa.get(), rb = fb.get();
  EXPECT_TRUE(ra.ok()) << ra.status();
  EXPECT_TRUE(rb.ok()) << rb.status();
  return ra.ok() && rb.ok() && ra->round == 1 && rb->round == 1;
}

TEST(EtcdRendezvous, TwoNodesFormARoundWithRanksInJoinOrderAndTheStoreIsEtcd) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto a = Start(Options(etcd, "node-a", 2, 2));
  auto b = Start(Options(etcd, "node-b", 2, 2));
  ASSERT_TRUE(a && b);
  auto fa = JoinAsync(a.get(), "from-a");
  std::this_thread::sleep_for(milliseconds(200));  // a joins first: it gets group rank 0
  auto fb = JoinAsync(b.get(), "from-b");
  ASSERT_EQ(fa.wait_for(seconds(15)), std::future_status::ready);
  ASSERT_EQ(fb.wait_for(seconds(15)), std::future_status::ready);
  absl::StatusOr<RoundAssignment> ra = fa.get(), rb = fb.get();
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(ra->round, 1u);
  EXPECT_EQ(rb->round, 1u);
  EXPECT_EQ(ra->group_rank, 0);
  EXPECT_EQ(rb->group_rank, 1);
  EXPECT_EQ(rb->rank_offset, 2);
  EXPECT_EQ(ra->world_size, 4);
  EXPECT_EQ(ra->master_port, rb->master_port);
  ASSERT_EQ(rb->nodes.size(), 2u);
  EXPECT_EQ(rb->nodes[0].payload, "from-a");
  ASSERT_TRUE(ra->store && ra->store->etcd);
  EXPECT_EQ(ra->store->etcd->endpoints, std::vector<std::string>{etcd.endpoint()});
  EXPECT_EQ(ra->store->key_prefix, "/flashrun/");
  EXPECT_NE(a->Describe().find(etcd.endpoint()), std::string::npos) << a->Describe();

  // The exit barrier: both arrive; then a lone arrival times out, naming what it waited for.
  auto ba = std::async(std::launch::async, [&] { return a->Barrier("exited", Clock::now() + seconds(10), kNever); });
  EXPECT_TRUE(b->Barrier("exited", Clock::now() + seconds(10), kNever).ok());
  EXPECT_TRUE(ba.get().ok());
  absl::Status alone = a->Barrier("again", Clock::now() + milliseconds(600), kNever);
  EXPECT_EQ(alone.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(std::string(alone.message()).find("1/2 nodes"), std::string::npos) << alone;
  EXPECT_NE(std::string(alone.message()).find(etcd.endpoint()), std::string::npos) << alone;
}

TEST(EtcdRendezvous, ARestartingMemberBreaksTheRoundForAllAndTheRanksStay) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto [a, b] = StartTwo(etcd);
  ASSERT_TRUE(a && b && FormRound(a.get(), b.get()));
  EXPECT_FALSE(Readable(a->RejoinNotifier(), milliseconds(300)));
  // b's workers failed: b joins again, and a hears that its round is over.
  auto again_b = JoinAsync(b.get());
  ASSERT_TRUE(Readable(a->RejoinNotifier(), milliseconds(5000)));
  auto again_a = JoinAsync(a.get());
  absl::StatusOr<RoundAssignment> ra = again_a.get(), rb = again_b.get();
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(ra->round, 2u);
  EXPECT_EQ(ra->group_rank, 0);
  EXPECT_EQ(rb->group_rank, 1);
}

TEST(EtcdRendezvous, ANodeJoiningBelowMaxStartsANewRoundWithIt) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto a = Start(Options(etcd, "node-a", 1, 2));
  ASSERT_TRUE(a);
  absl::StatusOr<RoundAssignment> first = a->NextRound("p", 0, kNever);  // alone, after the last call
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->group_world_size, 1);
  auto b = Start(Options(etcd, "node-b", 1, 2));
  ASSERT_TRUE(b);
  auto fb = JoinAsync(b.get());
  ASSERT_TRUE(Readable(a->RejoinNotifier(), milliseconds(5000)));
  absl::StatusOr<RoundAssignment> ra = a->NextRound("p", 1, kNever);
  absl::StatusOr<RoundAssignment> rb = fb.get();
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_TRUE(rb.ok()) << rb.status();
  EXPECT_EQ(ra->round, first->round + 1);
  EXPECT_EQ(ra->group_world_size, 2);
  EXPECT_EQ(ra->restart_count, 1);  // the highest of the nodes'
  EXPECT_EQ(rb->group_rank, 1);
}

// A forked child process, SIGKILLed (and reaped) when the test ends however it ends.
struct Child {
  pid_t pid = -1;
  void Kill() {
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    int status;
    ::waitpid(pid, &status, 0);
    pid = -1;
  }
  ~Child() { Kill(); }
};

TEST(EtcdRendezvous, ACrashedNodesLeaseLapsesAndTheSurvivorGoesOnWithoutIt) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  // The node that crashes is a child process (forked before this test starts threads).
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  Child child;
  child.pid = ::fork();
  if (child.pid == 0) {
    ::close(ready[0]);
    auto r = StartEtcdRendezvous(Options(etcd, "node-b", 2, 2));
    if (!r.ok()) _exit(2);
    auto round = (*r)->NextRound("p", 0, kNever);
    const char ok = round.ok() && round->group_world_size == 2 ? 'y' : 'n';
    (void)!::write(ready[1], &ok, 1);
    ::pause();
    _exit(0);
  }
  ::close(ready[1]);
  EtcdRendezvousOptions survivor = Options(etcd, "node-a", 1, 2);
  // Whichever node leads the first round, it waits for both (a round at max
  // completes at once); the next round needs no last call either: every live
  // member is back.
  survivor.rendezvous.last_call_timeout = seconds(10);
  auto a = Start(survivor);
  ASSERT_TRUE(a);
  absl::StatusOr<RoundAssignment> ra = a->NextRound("p", 0, kNever);
  ASSERT_TRUE(Readable(ready[0], milliseconds(20000)));
  char ok = 0;
  ASSERT_EQ(::read(ready[0], &ok, 1), 1);
  ::close(ready[0]);
  EXPECT_EQ(ok, 'y');
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_EQ(ra->group_world_size, 2);
  const auto killed = Clock::now();
  child.Kill();
  // The 2 s lease lapses; the new leader marks node-b dead and a's round over.
  ASSERT_TRUE(Readable(a->RejoinNotifier(), milliseconds(8000)));
  const double detected = std::chrono::duration<double>(Clock::now() - killed).count();
  EXPECT_GE(detected, 1.0);  // not before the lease could lapse
  absl::StatusOr<RoundAssignment> next = a->NextRound("p", 1, kNever);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->group_world_size, 1);
  EXPECT_EQ(next->nodes[0].node_id, "node-a");
}

TEST(EtcdRendezvous, AnAgentRestartedUnderTheSameNodeIdWaitsForANewRoundInsteadOfTakingTheOldOne) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto [a, b] = StartTwo(etcd);
  ASSERT_TRUE(a && b && FormRound(a.get(), b.get()));
  // A new agent for node-b (a replacement node given the same --node-name)
  // writes its entry before the old one's lease has lapsed.
  auto b2 = Start(Options(etcd, "node-b", 2, 2));
  ASSERT_TRUE(b2);
  auto f2 = JoinAsync(b2.get());
  EXPECT_NE(f2.wait_for(milliseconds(1500)), std::future_status::ready) << "took round 1, which it never ran";
  ASSERT_TRUE(Readable(a->RejoinNotifier(), milliseconds(5000)));
  absl::StatusOr<RoundAssignment> ra = a->NextRound("p", 1, kNever);
  ASSERT_EQ(f2.wait_for(seconds(10)), std::future_status::ready);
  absl::StatusOr<RoundAssignment> r2 = f2.get();
  ASSERT_TRUE(ra.ok()) << ra.status();
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(ra->round, 2u);
  EXPECT_EQ(r2->round, 2u);
  EXPECT_EQ(r2->master_port, ra->master_port);
}

// etcd's count of lease renewals (its /metrics page, over plain HTTP/1.0).
int64_t LeaseRenewals(const EtcdServer& etcd) {
  const std::string ep = etcd.endpoint();
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(ep.substr(ep.rfind(':') + 1))));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string page;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    const std::string req = "GET /metrics HTTP/1.0\r\n\r\n";
    (void)!::write(fd, req.data(), req.size());
    char buf[65536];
    for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) page.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const std::string name = "\netcd_debugging_lease_renewed_total ";
  const size_t at = page.find(name);
  return at == std::string::npos ? -1 : std::stoll(page.substr(at + name.size()));
}

TEST(EtcdRendezvous, AnIdleAgentRenewsItsLeaseEveryKeepAliveIntervalNotInALoop) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto a = Start(Options(etcd, "node-a", 1, 1));  // keep-alives every 0.5 s, a 2 s lease
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->NextRound("p", 0, kNever).ok());
  const int64_t before = LeaseRenewals(etcd);
  ASSERT_GE(before, 0) << "no etcd_debugging_lease_renewed_total on " << etcd.endpoint() << "/metrics";
  std::this_thread::sleep_for(seconds(3));
  const int64_t renewed = LeaseRenewals(etcd) - before;
  EXPECT_GE(renewed, 3);   // about 6: the lease is kept
  EXPECT_LE(renewed, 12);  // and not renewed in a busy loop
}

TEST(EtcdRendezvous, AGarbledRoundRecordIsReplacedNotObeyed) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  rendezvous::EtcdOptions o;
  o.endpoints = {etcd.endpoint()};
  auto client = rendezvous::EtcdClient::Connect(o);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->Put("/flashrun/job/rdzv/round", "\xff\xff not a RoundRecord").ok());
  auto [a, b] = StartTwo(etcd);
  ASSERT_TRUE(a && b && FormRound(a.get(), b.get()));
}

TEST(EtcdRendezvous, AJoinThatCannotCompleteSaysHowFarItGotAndWhere) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  EtcdRendezvousOptions o = Options(etcd, "node-a", 2, 2);
  o.rendezvous.join_timeout = milliseconds(1500);
  auto a = Start(o);
  ASSERT_TRUE(a);
  const auto t0 = Clock::now();
  absl::StatusOr<RoundAssignment> r = a->NextRound("p", 0, kNever);
  EXPECT_LT(Clock::now() - t0, seconds(5));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  const std::string m(r.status().message());
  EXPECT_NE(m.find("1/2 nodes joined"), std::string::npos) << m;
  EXPECT_NE(m.find(etcd.endpoint()), std::string::npos) << m;
  EXPECT_NE(m.find("--nnodes 2:2"), std::string::npos) << m;
}

TEST(EtcdRendezvous, NoEtcdAtTheEndpointIsAClearErrorAtOnce) {
  EtcdRendezvousOptions o;
  o.etcd.endpoints = {"127.0.0.1:" + std::to_string(rendezvous::etcd_testing::FreePort())};
  o.etcd.request_timeout = milliseconds(1000);
  o.rendezvous.run_id = "job";
  o.rendezvous.node_id = "a";
  const auto t0 = Clock::now();
  auto r = StartEtcdRendezvous(o);
  EXPECT_LT(Clock::now() - t0, seconds(5));
  ASSERT_FALSE(r.ok());
  const std::string m(r.status().message());
  EXPECT_NE(m.find(o.etcd.endpoints[0]), std::string::npos) << m;
  EXPECT_NE(m.find("rendezvous 'job'"), std::string::npos) << m;
}

TEST(EtcdRendezvous, AnAgentThatLosesEtcdStopsItsWorkersAndItsJoinFailsNamingTheEndpoints) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  EtcdRendezvousOptions o = Options(etcd, "node-a", 1, 1);
  o.etcd.request_timeout = milliseconds(1000);
  o.rendezvous.join_timeout = seconds(3);
  auto a = Start(o);
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->NextRound("p", 0, kNever).ok());
  etcd.Stop();
  // The lease cannot be renewed for a whole TTL (2 s): the agent is told its round is over.
  ASSERT_TRUE(Readable(a->RejoinNotifier(), milliseconds(8000)));
  const auto t0 = Clock::now();
  absl::StatusOr<RoundAssignment> r = a->NextRound("p", 1, kNever);
  EXPECT_LT(Clock::now() - t0, seconds(10));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(std::string(r.status().message()).find(etcd.endpoint()), std::string::npos) << r.status();
}

}  // namespace
}  // namespace flashckpt::launcher
