// A small key-value store with a deadline on every call (after c10d's Store),
// over the built-in rendezvous server or over etcd, so that what coordinates
// through it (the cross-node commit) does not care which one flashrun runs
// with. Keys are bytes; a caller that shares etcd with others puts its own
// prefix in front of them.
//
// Not thread-safe, like the clients under it (one store per thread), except
// Interrupt().
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "rendezvous/etcd_client.h"
#include "rendezvous/rendezvous_client.h"

namespace flashckpt::rendezvous {

class KeyStore {
 public:
  virtual ~KeyStore() = default;

  virtual absl::Status Set(const std::string& key, const std::string& value, Deadline deadline) = 0;
  // The key's value, or nullopt when it was not set within `wait` (0: look
  // only). An error only when the store did not answer by the deadline or
  // refused the request.
  virtual absl::StatusOr<std::optional<std::string>> Wait(const std::string& key, std::chrono::milliseconds wait,
                                                          Deadline deadline) = 0;
  // Adds delta to the counter at key (decimal text; missing counts as 0) and
  // returns the sum.
  virtual absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta, Deadline deadline) = 0;
  // Deletes key, or with a non-empty range_end every key in [key, range_end);
  // returns how many.
  virtual absl::StatusOr<int64_t> DeleteRange(const std::string& key, const std::string& range_end,
                                              Deadline deadline) = 0;
  // Any thread: a blocked call returns kCancelled soon, and every later call
  // fails with kCancelled; drop the store to use it again.
  virtual void Interrupt() = 0;
  // "the rendezvous store at host:port" or "etcd at a:1, b:2"
  virtual std::string Describe() const = 0;
};

// Where the store is.
struct KeyStoreAddress {
  // The built-in rendezvous server.
  std::string host;
  uint16_t port = 0;
  std::string token;
  std::string run_id;
  // Set: etcd instead (host, port and token are not used).
  std::optional<EtcdOptions> etcd;
};

// Connects on the first call (and again after a lost connection, up to that
// call's deadline). On etcd a single request may overrun a deadline by up to
// etcd->request_timeout when etcd stops answering in the middle of it.
std::unique_ptr<KeyStore> OpenKeyStore(const KeyStoreAddress& address);

// What Describe() of that store says, without connecting.
std::string DescribeKeyStore(const KeyStoreAddress& address);
// "host:port", or etcd's endpoints: "a:1, b:2".
std::string KeyStoreEndpoint(const KeyStoreAddress& address);

}  // namespace flashckpt::rendezvous
