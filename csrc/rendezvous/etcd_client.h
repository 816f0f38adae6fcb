// A client of etcd's v3 API through its JSON gateway (POST /v3/...), over
// Boost.Beast HTTP/1.1: key-value reads and writes, transactions, leases with
// keep-alives, and watches. Why the gateway and not gRPC: Debian's etcd 3.4
// serves it on the client port by default, it needs no generated gRPC stubs
// (the messages are mapped with protobuf's JSON support, proto/etcd_gateway.proto),
// and Beast comes with Boost, which the built-in rendezvous already uses.
//
// Every call has a deadline. With several endpoints (an etcd cluster), a call
// that cannot reach one member goes on to the next (the one that answered is
// tried first next time); an error names every endpoint tried and what each
// said. With a user name, the client authenticates first and again when its
// token has expired.
//
// TLS (https): the server's certificate is checked against a CA file (or the
// system's store) and must name the host (or IP address) it was reached by; a
// client certificate goes with every connection when one is given. A TLS
// setup that cannot work (a certificate that does not verify, a server that
// wants a client certificate, a server that does not speak TLS) is
// FailedPrecondition, not Unavailable: trying again would not help.
//
// One call runs at a time per client (a Watch holds it until it returns): keep
// a lease alive from a client of its own while another one watches.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "etcd_gateway.pb.h"

namespace flashckpt::rendezvous {

struct EtcdOptions {
  // host:port, http://host:port or https://host:port (https implies `tls`);
  // one list may not mix http:// and https://.
  std::vector<std::string> endpoints;
  std::string user;                    // etcd authentication; empty: none
  std::string password;
  std::chrono::milliseconds request_timeout{5000};  // each call, across the endpoints it tries
  bool tls = false;       // also when an endpoint is https:// or a file below is given
  std::string ca_file;    // PEM CA certificate(s) etcd's certificate must chain to; empty: the system's store
  std::string cert_file;  // PEM client certificate (chain); empty: none
  std::string key_file;   // its PEM private key, unencrypted; empty: in cert_file
};

// "a:1,b:2", "http://a:1,http://b:2" or "https://a:1,https://b:2" -> endpoints
// (the scheme kept as given); an error names a bad one, or the two kinds mixed.
absl::StatusOr<std::vector<std::string>> ParseEtcdEndpoints(const std::string& text);
// "a:1, b:2": the endpoints as errors name them (no scheme); one that does
// not parse is shown as given.
std::string EtcdEndpointNames(const std::vector<std::string>& endpoints);

class EtcdClient {
 public:
  // Connects (and authenticates) to the first endpoint that answers.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Connect(EtcdOptions options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // The key, or every key that starts with it (`prefix`).
  absl::StatusOr<etcd::RangeResponse> Get(std::string_view key, bool prefix = false);
  absl::StatusOr<etcd::PutResponse> Put(std::string_view key, std::string_view value, int64_t lease = 0);
  absl::StatusOr<etcd::DeleteRangeResponse> Delete(std::string_view key, bool prefix = false);
  absl::StatusOr<etcd::TxnResponse> Txn(const etcd::TxnRequest& txn);

  // A lease of `ttl_s` seconds; returns its id.
  absl::StatusOr<int64_t> GrantLease(int64_t ttl_s);
  // Renews it; returns the TTL it has again. NotFound when it has expired
  // (its keys are gone).
  absl::StatusOr<int64_t> KeepAlive(int64_t lease);
  absl::Status RevokeLease(int64_t lease);

  // The events on `key` (or under it) from `start_revision` on, as soon as
  // there is one; an empty list at `deadline` or when `cancelled` turns true
  // (checked every 100 ms). OutOfRange when that revision was compacted away.
  absl::StatusOr<std::vector<etcd::Event>> Watch(std::string_view key, bool prefix, int64_t start_revision,
                                                 std::chrono::steady_clock::time_point deadline,
                                                 const std::function<bool()>& cancelled = {});
  // One watch stream kept open: `on_events` gets each batch of events as it
  // arrives (in revision order) and returns false to end the watch. OK when it
  // did, at `deadline`, when `cancelled` turned true, or when the server ended
  // the stream; errors as Watch. A caller that follows a prefix pays one
  // connection per call, not one per event.
  // `look`, when given, is the caller's timed work on the watch's thread (a
  // deadline of its own, work it put off to batch events): called when the
  // watch starts, after each batch, and at the time it returned last;
  // nullopt ends the watch (OK). The stream stays open across looks.
  absl::Status WatchEach(std::string_view key, bool prefix, int64_t start_revision,
                         std::chrono::steady_clock::time_point deadline, const std::function<bool()>& cancelled,
                         const std::function<bool(std::vector<etcd::Event>&)>& on_events,
                         const std::function<std::optional<std::chrono::steady_clock::time_point>()>& look = {});

  // "etcd at a:1, b:2"
  std::string Describe() const;

  // Helpers for requests: the end of the range of keys that start with `prefix`.
  static std::string PrefixEnd(std::string_view prefix);

 private:
  struct Impl;
  explicit EtcdClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace flashckpt::rendezvous
