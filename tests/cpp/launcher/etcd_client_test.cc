// The etcd v3 client against a real etcd (Debian's etcd-server, started by
// each test on free ports with its own data directory): reads and writes,
// transactions, leases that expire unless kept alive, watches, failover to
// the next endpoint, errors that name the endpoints, authentication; and all
// that over TLS, with certificates the openssl CLI makes for each test, and
// errors that say which certificate or setting is wrong.
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
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <future>
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
using etcd_testing::EtcdTls;
using etcd_testing::FindProgram;
using etcd_testing::FreePort;
using etcd_testing::TestCertificates;

#define REQUIRE_CERTIFICATES(certs) \
  if (!(certs).ok()) GTEST_SKIP() << (certs).error()

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

// Cancelled while its connection is being made: the connect (or the resolve
// of a host name) has completed by the time the predicate answers, and the
// watch must not go on from there (it would watch on, with nothing to end it,
// past every deadline).
void CheckACancelledWatchDoesNotConnect(EtcdClient& c, const std::string& dir, int64_t rev) {
  std::promise<absl::StatusOr<std::vector<etcd::Event>>> late;
  auto answer = late.get_future();
  std::thread watcher([&] {
    late.set_value(c.Watch(dir, true, rev + 10, Clock::now() + seconds(30), [] {
      std::this_thread::sleep_for(milliseconds(100));
      return true;
    }));
  });
  if (answer.wait_for(seconds(10)) != std::future_status::ready) {
    std::fprintf(stderr, "FAILED: a watch cancelled while connecting did not return within 10 s\n");
    std::_Exit(1);  // the watch thread cannot be stopped
  }
  watcher.join();
  auto early = answer.get();
  ASSERT_TRUE(early.ok()) << early.status();
  EXPECT_TRUE(early->empty());
  // The client is still usable.
  EXPECT_TRUE(c.Get(dir + "after").ok());
}

// What a watch does, over plain HTTP or TLS: `c` watches under `dir`, `writer` puts.
void CheckWatches(EtcdClient& c, EtcdClient& writer, const std::string& dir) {
  auto p = c.Put(dir + "before", "0");
  ASSERT_TRUE(p.ok()) << p.status();
  const int64_t rev = p->header().revision();
  // Nothing after rev yet: the watch waits, and ends empty at its deadline.
  const auto t0 = Clock::now();
  auto none = c.Watch(dir, true, rev + 1, Clock::now() + milliseconds(400));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  EXPECT_GE(Clock::now() - t0, milliseconds(350));
  std::thread put([&] {
    std::this_thread::sleep_for(milliseconds(300));
    EXPECT_TRUE(writer.Put(dir + "after", "1").ok());
  });
  auto events = c.Watch(dir, true, rev + 1, Clock::now() + seconds(10));
  put.join();
  ASSERT_TRUE(events.ok()) << events.status();
  ASSERT_EQ(events->size(), 1u);
  EXPECT_EQ((*events)[0].kv().key(), dir + "after");
  EXPECT_EQ((*events)[0].type(), etcd::Event::PUT);
  // From an old revision, history comes back at once (nothing missed between watches).
  auto history = c.Watch(dir, true, rev, Clock::now() + seconds(5));
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ(history->size(), 2u);
  // A cancelled watch returns soon.
  std::atomic<bool> stop{false};
  std::thread canceller([&] {
    std::this_thread::sleep_for(milliseconds(200));
    stop = true;
  });
  const auto t1 = Clock::now();
  auto cancelled = c.Watch(dir, true, rev + 10, Clock::now() + seconds(30), [&] { return stop.load(); });
  canceller.join();
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_TRUE(cancelled->empty());
  EXPECT_LT(Clock::now() - t1, seconds(5));
  CheckACancelledWatchDoesNotConnect(c, dir, rev);
}

TEST(EtcdClient, AWatchReturnsWhatChangedFromItsRevision) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  auto writer = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c && writer);
  CheckWatches(*c, *writer, "/w/");
  // By host name: through the resolver.
  std::string by_name = etcd.endpoint();
  ASSERT_EQ(by_name.rfind("127.0.0.1:", 0), 0u) << by_name;
  auto named = ClientOf({"localhost:" + by_name.substr(by_name.find(':') + 1)});
  ASSERT_TRUE(named);
  auto p = named->Put("/w/named", "1");
  ASSERT_TRUE(p.ok()) << p.status();
  CheckACancelledWatchDoesNotConnect(*named, "/w/", p->header().revision());
}

// Sockets on this host (any state, TIME_WAIT included) that a client opened to
// 127.0.0.1:`port`: each a connection that was made, whether still open or not.
int ConnectionsMadeTo(int port) {
  std::ifstream tcp("/proc/net/tcp");
  std::string line;
  std::getline(tcp, line);  // the header
  char remote[16];
  std::snprintf(remote, sizeof(remote), "0100007F:%04X", port);
  int n = 0;
  while (std::getline(tcp, line)) {
    std::istringstream fields(line);
    std::string slot, local, rem;
    fields >> slot >> local >> rem;
    if (rem == remote) ++n;
  }
  return n;
}

TEST(EtcdClient, CallsShareOneConnectionAndOneThatEtcdDroppedIsReplacedUnseen) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c);
  const int port = std::stoi(etcd.endpoint().substr(etcd.endpoint().rfind(':') + 1));
  const int before = ConnectionsMadeTo(port);  // etcd's own gateway, the probes, this client's first
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(c->Put("/k" + std::to_string(i), "v").ok());
  auto lease = c->GrantLease(5);
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(c->KeepAlive(*lease).ok());
  auto got = c->Get("/k", /*prefix=*/true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->kvs_size(), 40);
  // 43 calls: on a connection per call they would leave 43 (closed by this
  // side, each stays in TIME_WAIT for a minute).
  EXPECT_LE(ConnectionsMadeTo(port) - before, 1);
  // etcd restarted: the connection this client keeps is dead; the next call
  // finds that out and goes again on a new one, with no error for the caller.
  ASSERT_TRUE(etcd.Restart());
  auto after = c->Get("/k7");
  ASSERT_TRUE(after.ok()) << after.status();
  ASSERT_EQ(after->kvs_size(), 1);
  EXPECT_EQ(after->kvs(0).value(), "v");
  EXPECT_TRUE(c->Put("/k7", "w").ok());
}

TEST(EtcdClient, AWatchStreamStaysOpenAcrossTheCallersTimedLooksAndEndsWhenALookSaysSo) {
  EtcdServer etcd;
  REQUIRE_ETCD(etcd);
  auto c = ClientOf({etcd.endpoint()});
  auto writer = ClientOf({etcd.endpoint()});
  ASSERT_TRUE(c && writer);
  auto start = writer->Put("/l/0", "x");
  ASSERT_TRUE(start.ok()) << start.status();
  const int port = std::stoi(etcd.endpoint().substr(etcd.endpoint().rfind(':') + 1));
  const int before = ConnectionsMadeTo(port);
  std::atomic<bool> done{false};
  std::thread writes([&] {
    for (int i = 1; i <= 5 && !done; ++i) {
      std::this_thread::sleep_for(milliseconds(100));
      EXPECT_TRUE(writer->Put("/l/" + std::to_string(i), "x").ok());
    }
  });
  int looks = 0, seen = 0;
  const auto t0 = Clock::now();
  absl::Status s = c->WatchEach(
      "/l/", /*prefix=*/true, start->header().revision() + 1, Clock::now() + seconds(10), [] { return false; },
      [&](std::vector<etcd::Event>& events) {
        seen += static_cast<int>(events.size());
        return true;
      },
      [&]() -> std::optional<Clock::time_point> {
        ++looks;
        if (seen >= 5 && Clock::now() - t0 >= milliseconds(800)) return std::nullopt;  // the caller is done
        return Clock::now() + milliseconds(50);
      });
  done = true;
  writes.join();
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(seen, 5);
  EXPECT_LT(Clock::now() - t0, seconds(5));  // ended by the look, not the deadline
  EXPECT_GE(looks, 10);                      // every 50 ms (and after each batch), for 0.8 s at least
  // The writer's calls share its kept connection, the watch has one: two at most.
  EXPECT_LE(ConnectionsMadeTo(port) - before, 2);
}

// A member that goes away while a watch streams (after its 200 header): the
// watch ends with a connection error naming the member, not an "HTTP 200"
// gateway status, and the next watch goes to the other member at once.
TEST(EtcdClient, AWatchCutMidStreamIsAConnectionErrorAndTheNextWatchGoesToAnotherMember) {
  EtcdServer first, second;
  REQUIRE_ETCD(first);
  REQUIRE_ETCD(second);
  auto c = ClientOf({first.endpoint(), second.endpoint()});
  auto writer = ClientOf({first.endpoint()});
  ASSERT_TRUE(c && writer);
  auto start = writer->Put("/w/0", "x");
  ASSERT_TRUE(start.ok()) << start.status();
  std::atomic<int> seen{0};
  std::thread stop([&] {
    const auto until = Clock::now() + seconds(10);
    while (seen == 0 && Clock::now() < until) std::this_thread::sleep_for(milliseconds(10));
    first.Stop();
  });
  std::thread put([&] {
    std::this_thread::sleep_for(milliseconds(200));
    EXPECT_TRUE(writer->Put("/w/1", "x").ok());
  });
  absl::Status s = c->WatchEach(
      "/w/", /*prefix=*/true, start->header().revision() + 1, Clock::now() + seconds(20), [] { return false; },
      [&](std::vector<etcd::Event>& events) {
        seen += static_cast<int>(events.size());
        return true;
      });
  put.join();
  stop.join();
  EXPECT_EQ(seen, 1);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  const std::string m(s.message());
  EXPECT_NE(m.find(first.endpoint() + ": watch: "), std::string::npos) << m;
  EXPECT_EQ(m.find("HTTP 200"), std::string::npos) << m;
  // The next watch is the other member's: it sees a put there, first time.
  auto there = ClientOf({second.endpoint()});
  ASSERT_TRUE(there);
  auto rev = there->Put("/w/2", "y");
  ASSERT_TRUE(rev.ok()) << rev.status();
  int got = 0;
  absl::Status again = c->WatchEach(
      "/w/", /*prefix=*/true, rev->header().revision(), Clock::now() + seconds(10), [] { return false; },
      [&](std::vector<etcd::Event>& events) {
        got += static_cast<int>(events.size());
        return false;  // one batch is enough
      });
  EXPECT_TRUE(again.ok()) << again;
  EXPECT_EQ(got, 1);
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
  EXPECT_EQ(*ok, (std::vector<std::string>{"10.0.0.1:2379", "http://etcd-1:2379"}));
  for (const char* bad : {"", "etcd-0", "etcd-0:port", "etcd-0:0", ":2379", "https://etcd-0"}) {
    auto r = ParseEtcdEndpoints(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  auto tls = ParseEtcdEndpoints("https://etcd-0:2379, etcd-1:2379");
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_EQ(*tls, (std::vector<std::string>{"https://etcd-0:2379", "etcd-1:2379"}));
  auto mixed = ParseEtcdEndpoints("http://etcd-0:2379,https://etcd-1:2379");
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(mixed.status().message()).find("mix plain HTTP (http://etcd-0:2379) and TLS (https://etcd-1:2379)"),
            std::string::npos)
      << mixed.status();
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

// Over TLS with the CA that signed etcd's certificate: reads and writes, a
// watch (events, its deadline, cancelled), a lease kept alive past its TTL.
TEST(EtcdClientTls, PutGetAWatchAndALeaseKeptAliveOverTls) {
  TestCertificates certs;
  REQUIRE_CERTIFICATES(certs);
  EtcdServer etcd(EtcdTls{&certs});
  REQUIRE_ETCD(etcd);
  EtcdOptions o = etcd.client_options();  // https://127.0.0.1:P, cacert: the test CA
  auto connected = EtcdClient::Connect(o);
  ASSERT_TRUE(connected.ok()) << connected.status();
  auto c = std::move(*connected);
  auto writer = EtcdClient::Connect(o);
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE(c->Put("/tls/a", "1").ok());
  auto got = c->Get("/tls/a");
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->kvs_size(), 1);
  EXPECT_EQ(got->kvs(0).value(), "1");
  // TLS asked for with the option, the endpoint without a scheme.
  EtcdOptions bare = o;
  bare.endpoints = {etcd.endpoint()};
  bare.tls = true;
  bare.ca_file = certs.ca();
  auto by_option = EtcdClient::Connect(bare);
  ASSERT_TRUE(by_option.ok()) << by_option.status();
  EXPECT_EQ((*by_option)->Get("/tls/a")->kvs_size(), 1);

  CheckWatches(*c, **writer, "/tls/w/");

  auto lease = c->GrantLease(1);
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(c->Put("/tls/leased", "x", *lease).ok());
  for (const auto until = Clock::now() + milliseconds(2500); Clock::now() < until;) {
    auto ttl = c->KeepAlive(*lease);
    ASSERT_TRUE(ttl.ok()) << ttl.status();
    EXPECT_GT(*ttl, 0);
    std::this_thread::sleep_for(milliseconds(300));
  }
  EXPECT_EQ(c->Get("/tls/leased")->kvs_size(), 1) << "a lease kept alive over TLS lost its key";
  EXPECT_TRUE(c->RevokeLease(*lease).ok());
}

// etcd's certificate from a CA the client was not given, or not for the host
// it was reached by: FailedPrecondition at once, naming the endpoint, what
// failed and what to check.
TEST(EtcdClientTls, ACertificateThatDoesNotVerifyIsAClearErrorWithinTheTimeout) {
  TestCertificates certs;
  REQUIRE_CERTIFICATES(certs);
  EtcdServer etcd(EtcdTls{&certs});
  REQUIRE_ETCD(etcd);
  EtcdOptions o = etcd.client_options();
  o.request_timeout = seconds(3);
  auto refused = [&](const EtcdOptions& options) {
    const auto t0 = Clock::now();
    auto c = EtcdClient::Connect(options);
    EXPECT_LT(Clock::now() - t0, milliseconds(3500));
    EXPECT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition) << c.status();
    return std::string(c.status().message());
  };
  o.ca_file = certs.other_ca();
  const std::string wrong_ca = refused(o);
  for (const std::string& says :
       {etcd.endpoint() + ": TLS handshake failed: certificate verify failed (unable to get local issuer certificate",
        "is --rdzv-conf cacert=" + certs.other_ca() + " the CA that signed etcd's certificate?"})
    EXPECT_NE(wrong_ca.find(says), std::string::npos) << wrong_ca;
  o.ca_file.clear();  // the system's store does not know the test CA either
  const std::string system_store = refused(o);
  EXPECT_NE(system_store.find("certificate verify failed"), std::string::npos) << system_store;
  EXPECT_NE(system_store.find("the system's CA store does not trust it"), std::string::npos) << system_store;
  o.ca_file = certs.ca();
  const std::string port = etcd.endpoint().substr(etcd.endpoint().rfind(':') + 1);
  o.endpoints = {"https://localhost:" + port};  // the certificate is for IP 127.0.0.1 only
  const std::string wrong_host = refused(o);
  EXPECT_NE(wrong_host.find("hostname mismatch; etcd's certificate is not for localhost"), std::string::npos)
      << wrong_host;
}

TEST(EtcdClientTls, AClientCertificateIsSentAndEtcdThatWantsOneRefusesAClientWithout) {
  TestCertificates certs;
  REQUIRE_CERTIFICATES(certs);
  EtcdServer etcd(EtcdTls{&certs, /*client_cert_auth=*/true});
  REQUIRE_ETCD(etcd);
  EtcdOptions o = etcd.client_options();  // with the client certificate
  auto good = EtcdClient::Connect(o);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE((*good)->Put("/mtls", "1").ok());
  o.cert_file.clear();
  o.key_file.clear();
  o.request_timeout = seconds(3);
  const auto t0 = Clock::now();
  auto without = EtcdClient::Connect(o);
  EXPECT_LT(Clock::now() - t0, milliseconds(3500));
  ASSERT_FALSE(without.ok());
  EXPECT_EQ(without.status().code(), absl::StatusCode::kFailedPrecondition) << without.status();
  const std::string m(without.status().message());
  EXPECT_NE(m.find(etcd.endpoint() + ": etcd refused the TLS connection: "), std::string::npos) << m;
  EXPECT_NE(m.find("etcd asks for a client certificate: give --rdzv-conf cert=...,key=..."), std::string::npos) << m;
}

// The wrong protocol either way round fails at once, saying which to use.
TEST(EtcdClientTls, TlsToAPlainEtcdAndPlainHttpToATlsEtcdAreClearErrorsNotHangs) {
  TestCertificates certs;
  REQUIRE_CERTIFICATES(certs);
  EtcdServer plain;
  REQUIRE_ETCD(plain);
  EtcdOptions o;
  o.endpoints = {"https://" + plain.endpoint()};
  o.ca_file = certs.ca();
  o.request_timeout = seconds(3);
  auto t0 = Clock::now();
  auto to_plain = EtcdClient::Connect(o);
  EXPECT_LT(Clock::now() - t0, milliseconds(3500));
  ASSERT_FALSE(to_plain.ok());
  std::string m(to_plain.status().message());
  EXPECT_NE(m.find(plain.endpoint() + ": TLS handshake: "), std::string::npos) << m;
  // etcd 3.4 hangs up on a ClientHello; a server that answers in plain text is "wrong version number".
  EXPECT_TRUE(m.find("if it serves plain HTTP, use http:// or --rdzv-conf protocol=http") != std::string::npos ||
              m.find("does not answer in TLS: is it plain HTTP? then use http:// or --rdzv-conf protocol=http") !=
                  std::string::npos)
      << m;

  EtcdServer secure(EtcdTls{&certs});
  REQUIRE_ETCD(secure);
  o = EtcdOptions{};
  o.endpoints = {secure.endpoint()};
  o.request_timeout = seconds(3);
  t0 = Clock::now();
  auto to_secure = EtcdClient::Connect(o);
  EXPECT_LT(Clock::now() - t0, milliseconds(3500));
  ASSERT_FALSE(to_secure.ok());
  m = std::string(to_secure.status().message());
  EXPECT_NE(m.find(secure.endpoint()), std::string::npos) << m;
  // etcd 3.4 hangs up on plain HTTP; Go's own HTTPS server answers 400 "Client sent an HTTP request to an HTTPS server".
  EXPECT_TRUE(m.find("if it serves TLS, use https:// or --rdzv-conf protocol=https,cacert=...") != std::string::npos ||
              m.find("etcd there speaks TLS: use https:// or --rdzv-conf protocol=https,cacert=...") != std::string::npos)
      << m;
}

// Set-up errors are found before any connection, and name the file or endpoint.
TEST(EtcdClientTls, UnusableFilesAndMixedProtocolsAreErrorsThatNameThem) {
  TestCertificates certs;
  REQUIRE_CERTIFICATES(certs);
  struct Case {
    std::vector<std::string> endpoints;
    std::string ca, cert, key;
    bool tls;
    std::string says;
  };
  const std::string missing = certs.path("missing.pem");
  for (const Case& k : std::vector<Case>{
           {{"https://127.0.0.1:1"}, missing, "", "", false,
            "the CA certificate (cacert) file " + missing + " cannot be read: No such file or directory"},
           {{"https://127.0.0.1:1"}, certs.path("server.ext"), "", "", false,
            "the CA certificate (cacert) file " + certs.path("server.ext") + " cannot be loaded: no certificate or crl found"},
           {{"127.0.0.1:1"}, certs.ca(), missing, "", true,
            "the client certificate (cert) file " + missing + " cannot be read"},
           {{"127.0.0.1:1"}, certs.ca(), certs.client_cert(), missing, true,
            "the client key (key) file " + missing + " cannot be read"},
           {{"127.0.0.1:1"}, certs.ca(), certs.client_cert(), certs.server_key(), true,
            "the client key (key) file " + certs.server_key() + " cannot be loaded: key values mismatch"},
           {{"127.0.0.1:1"}, certs.ca(), "", certs.client_key(), true,
            "a client key (key=" + certs.client_key() + ") without its certificate"},
           {{"http://127.0.0.1:1", "https://127.0.0.1:2"}, "", "", "", false,
            "mix plain HTTP (http://127.0.0.1:1) and TLS (https://127.0.0.1:2)"},
           {{"http://127.0.0.1:1"}, certs.ca(), "", "", false,
            "etcd endpoint http://127.0.0.1:1 is plain HTTP, but TLS is asked for"},
       }) {
    EtcdOptions o;
    o.endpoints = k.endpoints;
    o.ca_file = k.ca;
    o.cert_file = k.cert;
    o.key_file = k.key;
    o.tls = k.tls;
    o.request_timeout = seconds(2);
    const auto t0 = Clock::now();
    auto c = EtcdClient::Connect(o);
    EXPECT_LT(Clock::now() - t0, milliseconds(500)) << k.says;  // no connection tried
    ASSERT_FALSE(c.ok()) << k.says;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
    EXPECT_NE(std::string(c.status().message()).find(k.says), std::string::npos) << c.status();
  }
}

}  // namespace
}  // namespace flashckpt::rendezvous
