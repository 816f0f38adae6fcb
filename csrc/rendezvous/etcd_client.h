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
// One call runs at a time per client (a Watch holds it until it returns): keep
// a lease alive from a client of its own while another one watches.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "etcd_gateway.pb.h"

namespace flashckpt::rendezvous {

struct EtcdOptions {
  std::vector<std::string> endpoints;  // host:port or http://host:port
  std::string user;                    // etcd authentication; empty: none
  std::string password;
  std::chrono::milliseconds request_timeout{5000};  // each call, across the endpoints it tries
};

// "a:1,b:2" or "http://a:1,http://b:2" -> endpoints; an error names a bad one.
absl::StatusOr<std::vector<std::string>> ParseEtcdEndpoints(const std::string& text);

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
