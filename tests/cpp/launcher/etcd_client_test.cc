// The etcd v3 client against a real etcd (Debian's etcd-server, started by
// each test on free ports with its own data directory): reads and writes,
// transactions, leases that expire unless kept alive, watches, failover to
// the next endpoint, errors that name the endpoints, authentication.
#include "rendezvous/etcd_client.h"

#include "etcd_test_server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>

namespace flashckpt::rendezvous {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

using etcd_testing::EtcdServer;
using etcd_testing::FindProgram;
using etcd_testing::FreePort;

std::unique_ptr<EtcdClient> ClientOf(const std::vector<std::string>& endpoints, milliseconds timeout = seconds(5)) {
  EtcdOptions o;
  o.endpoints = endpoints;
  o.request_timeout = timeout;
  auto c = EtcdClient::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

TEST(EtcdClient, PutGetDeleteAndPrefixes) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c);
  ASSERT_TRUE(c->Put("/run/a", "1").ok());
  ASSERT_TRUE(c->Put("/run/b", std::string("\0\xff binary", 9)).ok());
  ASSERT_TRUE(c->Put("/runner", "other").ok());
  auto one = c->Get("/run/b");
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->kvs_size(), 1);
  EXPECT_EQ(one->kvs(0).value(), std::string("\0\xff binary", 9));
  auto all = c->Get("/run/", /*prefix=*/true);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->kvs_size(), 2);
  EXPECT_EQ(all->kvs(0).key(), "/run/a");
  EXPECT_GT(all->header().revision(), 0);
  auto gone = c->Delete("/run/", true);
  ASSERT_TRUE(gone.ok());
  EXPECT_EQ(gone->deleted(), 2);
  EXPECT_EQ(c->Get("/run/a")->kvs_size(), 0);
  EXPECT_EQ(c->Get("/runner")->kvs_size(), 1);
}

TEST(EtcdClient, ATransactionCreatesAKeyOnlyOnce) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c);
  auto create = [&](const std::string& value) {
    etcd::TxnRequest t;
    auto* cmp = t.add_compare();
    cmp->set_key("/round");
    cmp->set_target(etcd::Compare::CREATE);
    cmp->set_result(etcd::Compare::EQUAL);
    cmp->set_create_revision(0);  // absent
    auto* put = t.add_success()->mutable_request_put();
    put->set_key("/round");
    put->set_value(value);
    t.add_failure()->mutable_request_range()->set_key("/round");
    return c->Txn(t);
  };
  auto first = create("node-a");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->succeeded());
  auto second = create("node-b");
  ASSERT_TRUE(second.ok());
  EXPECT_FALSE(second->succeeded());
  ASSERT_EQ(second->responses_size(), 1);
  EXPECT_EQ(second->responses(0).response_range().kvs(0).value(), "node-a");
}

TEST(EtcdClient, ALeaseKeptAliveHoldsItsKeyAndOneLeftToExpireTakesItAway) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c);
  auto kept = c->GrantLease(2);
  auto dropped = c->GrantLease(2);
  ASSERT_TRUE(kept.ok() && dropped.ok()) << kept.status() << dropped.status();
  ASSERT_TRUE(c->Put("/alive/kept", "x", *kept).ok());
  ASSERT_TRUE(c->Put("/alive/dropped", "x", *dropped).ok());
  const auto until = Clock::now() + seconds(5);
  while (Clock::now() < until) {
    auto ttl = c->KeepAlive(*kept);
    ASSERT_TRUE(ttl.ok()) << ttl.status();
    EXPECT_GT(*ttl, 0);
    std::this_thread::sleep_for(milliseconds(500));
  }
  EXPECT_EQ(c->Get("/alive/kept")->kvs_size(), 1);
  EXPECT_EQ(c->Get("/alive/dropped")->kvs_size(), 0) << "a lease not kept alive for 5 s (TTL 2 s) still holds its key";
  auto expired = c->KeepAlive(*dropped);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kNotFound) << expired.status();
  EXPECT_TRUE(c->RevokeLease(*kept).ok());
  EXPECT_EQ(c->Get("/alive/kept")->kvs_size(), 0);
}

TEST(EtcdClient, AWatchReturnsWhatChangedFromItsRevision) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  auto writer = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c && writer);
  auto p = c->Put("/w/before", "0");
  ASSERT_TRUE(p.ok());
  const int64_t rev = p->header().revision();
  // Nothing after rev yet: the watch waits, and ends empty at its deadline.
  const auto t0 = Clock::now();
  auto none = c->Watch("/w/", true, rev + 1, Clock::now() + milliseconds(400));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  EXPECT_GE(Clock::now() - t0, milliseconds(350));
  std::thread put([&] {
    std::this_thread::sleep_for(milliseconds(300));
    EXPECT_TRUE(writer->Put("/w/after", "1").ok());
  });
  auto events = c->Watch("/w/", true, rev + 1, Clock::now() + seconds(10));
  put.join();
  ASSERT_TRUE(events.ok()) << events.status();
  ASSERT_EQ(events->size(), 1u);
  EXPECT_EQ((*events)[0].kv().key(), "/w/after");
  EXPECT_EQ((*events)[0].type(), etcd::Event::PUT);
  // From an old revision, history comes back at once (nothing missed between watches).
  auto history = c->Watch("/w/", true, rev, Clock::now() + seconds(5));
  ASSERT_TRUE(history.ok());
  EXPECT_EQ(history->size(), 2u);
  // A cancelled watch returns soon.
  std::atomic<bool> stop{false};
  std::thread canceller([&] {
    std::this_thread::sleep_for(milliseconds(200));
    stop = true;
  });
  const auto t1 = Clock::now();
  auto cancelled = c->Watch("/w/", true, rev + 10, Clock::now() + seconds(30), [&] { return stop.load(); });
  canceller.join();
  ASSERT_TRUE(cancelled.ok());
  EXPECT_TRUE(cancelled->empty());
  EXPECT_LT(Clock::now() - t1, seconds(5));
}

TEST(EtcdClient, AMemberThatIsDownIsPassedOverAndAllDownNamesEveryEndpoint) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  const std::string dead = "127.0.0.1:" + std::to_string(FreePort());  // nothing listens there
  auto c = ClientOf({dead, etcd.endpoint()});
  ASSERT_TRUE(c);
  EXPECT_TRUE(c->Put("/k", "v").ok());
  EXPECT_EQ(c->Describe(), "etcd at " + dead + ", " + etcd.endpoint());
  etcd.Stop();
  const auto t0 = Clock::now();
  auto r = c->Get("/k");
  EXPECT_LT(Clock::now() - t0, seconds(7));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  const std::string m(r.status().message());
  EXPECT_NE(m.find(dead), std::string::npos) << m;
  EXPECT_NE(m.find(etcd.endpoint()), std::string::npos) << m;
  EXPECT_NE(m.find("/v3/kv/range"), std::string::npos) << m;
  // Connect fails the same way, within its timeout.
  EtcdOptions o;
  o.endpoints = {dead};
  o.request_timeout = seconds(2);
  auto none = EtcdClient::Connect(o);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find(dead), std::string::npos) << none.status();
}

TEST(EtcdClient, EndpointListsAreCheckedAndNamed) {
  auto ok = ParseEtcdEndpoints("10.0.0.1:2379, http://etcd-1:2379/");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, (std::vector<std::string>{"10.0.0.1:2379", "etcd-1:2379"}));
  for (const char* bad : {"", "etcd-0", "etcd-0:port", "etcd-0:0", ":2379"}) {
    auto r = ParseEtcdEndpoints(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  auto tls = ParseEtcdEndpoints("https://etcd-0:2379");
  EXPECT_EQ(tls.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(std::string(tls.status().message()).find("https://etcd-0:2379"), std::string::npos);
  EXPECT_EQ(EtcdClient::PrefixEnd("/a/"), "/a0");
  EXPECT_EQ(EtcdClient::PrefixEnd(std::string("a\xff", 2)), "b");
}

TEST(EtcdClient, AuthenticationWithTheRightPasswordWorksAndAWrongOneIsAClearError) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto ctl = FindProgram("etcdctl");
  if (!ctl) GTEST_SKIP() << "no etcdctl (apt install etcd-client)";
  const std::string ep = "--endpoints=" + etcd.endpoint();
  auto run = [&](const std::string& args) {
    return std::system(("ETCDCTL_API=3 " + *ctl + " " + ep + " " + args + " > /dev/null 2>&1").c_str());
  };
  ASSERT_EQ(run("user add root --new-user-password=s3cret"), 0);
  ASSERT_EQ(run("auth enable"), 0);
  EtcdOptions o;
  o.endpoints = {etcd.endpoint()};
  o.user = "root";
  o.password = "s3cret";
  auto good = EtcdClient::Connect(o);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE((*good)->Put("/secure", "1").ok());
  EXPECT_EQ((*good)->Get("/secure")->kvs_size(), 1);
  o.password = "wrong";
  const auto t0 = Clock::now();
  auto bad = EtcdClient::Connect(o);
  EXPECT_LT(Clock::now() - t0, seconds(6));
  ASSERT_FALSE(bad.ok());
  const std::string m(bad.status().message());
  EXPECT_NE(m.find("user 'root'"), std::string::npos) << m;
  EXPECT_NE(m.find(etcd.endpoint()), std::string::npos) << m;
  EXPECT_NE(m.find("authentication failed"), std::string::npos) << m;
  // Without credentials: refused, named.
  o.user.clear();
  auto anonymous = EtcdClient::Connect(o);
  ASSERT_FALSE(anonymous.ok());
  EXPECT_NE(std::string(anonymous.status().message()).find(etcd.endpoint()), std::string::npos) << anonymous.status();
}

}  // namespace
}  // namespace flashckpt::rendezvous
