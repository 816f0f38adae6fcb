#include "rendezvous/key_store.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace flashckpt::rendezvous {
namespace {

using Clock = std::chrono::steady_clock;

// The built-in store: the rendezvous server's, one connection.
class RendezvousKeyStore : public KeyStore {
 public:
  explicit RendezvousKeyStore(const KeyStoreAddress& a) : client_(a.host, a.port, a.token, a.run_id) {}

  absl::Status Set(const std::string& key, const std::string& value, Deadline deadline) override {
    return client_.StoreSet(key, value, deadline);
  }
  absl::StatusOr<std::optional<std::string>> Wait(const std::string& key, std::chrono::milliseconds wait,
                                                  Deadline deadline) override {
    return client_.StoreWait(key, wait, deadline);
  }
  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta, Deadline deadline) override {
    return client_.StoreAdd(key, delta, deadline);
  }
  absl::StatusOr<int64_t> DeleteRange(const std::string& key, const std::string& range_end,
                                      Deadline deadline) override {
    return client_.StoreDelete(key, range_end, deadline);
  }
  void Interrupt() override { client_.Interrupt(); }
  std::string Describe() const override { return absl::StrCat("the rendezvous store at ", client_.endpoint()); }

 private:
  RendezvousClient client_;
};

// etcd through its JSON gateway. A request that cannot reach etcd (or gets
// no answer) is tried again until the call's deadline, so that a restarting
// member or a leader election is ridden out as the built-in client rides out
// a reconnect. A request whose answer was lost may have been applied: Add
// may then count twice (the commit barrier tolerates a count that overshoots).
class EtcdKeyStore : public KeyStore {
 public:
  explicit EtcdKeyStore(EtcdOptions options) : options_(std::move(options)) {}

  absl::Status Set(const std::string& key, const std::string& value, Deadline deadline) override {
    return Retry<etcd::PutResponse>("putting", key, deadline, [&](EtcdClient& c) { return c.Put(key, value); })
        .status();
  }

  // A Get, and while the key is missing a watch from the revision that Get
  // saw (so that no put in between is missed), until `wait` has passed.
  absl::StatusOr<std::optional<std::string>> Wait(const std::string& key, std::chrono::milliseconds wait,
                                                  Deadline deadline) override {
    const auto wait_until = std::min(Clock::now() + wait, deadline);
    for (;;) {
      absl::StatusOr<etcd::RangeResponse> got =
          Retry<etcd::RangeResponse>("reading", key, deadline, [&](EtcdClient& c) { return c.Get(key); });
      if (!got.ok()) return got.status();
      if (got->kvs_size() > 0) return std::optional<std::string>(got->kvs(0).value());
      if (Clock::now() >= wait_until) return std::optional<std::string>();
      int64_t from = got->header().revision() + 1;
      for (;;) {
        absl::StatusOr<std::vector<etcd::Event>> events =
            client_->Watch(key, /*prefix=*/false, from, wait_until, [this] { return interrupted_.load(); });
        if (interrupted_) return Interrupted("waiting for", key);
        // A broken watch (etcd went away, the revision was compacted, the
        // stream ended): the next Get says whether etcd is still there.
        if (!events.ok()) break;
        if (events->empty()) {
          if (Clock::now() >= wait_until) return std::optional<std::string>();
          break;
        }
        std::optional<std::string> value;
        for (const etcd::Event& e : *events) {
          from = std::max(from, e.kv().mod_revision() + 1);
          if (e.type() == etcd::Event::PUT) value = e.kv().value();
          else value.reset();
        }
        if (value) return value;
      }
      if (!Pause(std::chrono::milliseconds(50))) return Interrupted("waiting for", key);
    }
  }

  // Compare-and-swap on the key's mod_revision (0: missing), again on a conflict.
  absl::StatusOr<int64_t> Add(const std::string& key, int64_t delta, Deadline deadline) override {
    absl::StatusOr<etcd::RangeResponse> current =
        Retry<etcd::RangeResponse>("reading the counter", key, deadline, [&](EtcdClient& c) { return c.Get(key); });
    if (!current.ok()) return current.status();
    for (;;) {
      int64_t value = 0, revision = 0;
      if (current->kvs_size() > 0) {
        const etcd::KeyValue& kv = current->kvs(0);
        if (!absl::SimpleAtoi(kv.value(), &value))
          return absl::FailedPreconditionError(absl::StrCat(Describe(), ": adding ", delta, " to the counter '", key,
                                                            "': its value '", kv.value().substr(0, 40),
                                                            "' is not a decimal number"));
        revision = kv.mod_revision();
      }
      const int64_t sum = value + delta;
      etcd::TxnRequest txn;
      etcd::Compare* cmp = txn.add_compare();
      cmp->set_key(key);
      cmp->set_target(etcd::Compare::MOD);
      cmp->set_result(etcd::Compare::EQUAL);
      cmp->set_mod_revision(revision);
      etcd::PutRequest* put = txn.add_success()->mutable_request_put();
      put->set_key(key);
      put->set_value(std::to_string(sum));
      txn.add_failure()->mutable_request_range()->set_key(key);
      absl::StatusOr<etcd::TxnResponse> done =
          Retry<etcd::TxnResponse>("adding to the counter", key, deadline, [&](EtcdClient& c) { return c.Txn(txn); });
      if (!done.ok()) return done.status();
      if (done->succeeded()) return sum;
      // Another client added first: its value, from the failure branch.
      if (done->responses_size() != 1 || !done->responses(0).has_response_range())
        return absl::DataLossError(absl::StrCat(Describe(), ": adding to the counter '", key,
                                                "': the transaction's answer has no read of the key"));
      *current = done->responses(0).response_range();
      if (Clock::now() >= deadline)
        return absl::DeadlineExceededError(
            absl::StrCat(Describe(), ": adding to the counter '", key, "': every try conflicted until the deadline"));
    }
  }

  absl::StatusOr<int64_t> DeleteRange(const std::string& key, const std::string& range_end,
                                      Deadline deadline) override {
    etcd::TxnRequest txn;  // no comparison: always the success branch
    etcd::DeleteRangeRequest* del = txn.add_success()->mutable_request_delete_range();
    del->set_key(key);
    del->set_range_end(range_end);
    absl::StatusOr<etcd::TxnResponse> done =
        Retry<etcd::TxnResponse>("deleting", key, deadline, [&](EtcdClient& c) { return c.Txn(txn); });
    if (!done.ok()) return done.status();
    if (done->responses_size() != 1)
      return absl::DataLossError(absl::StrCat(Describe(), ": deleting '", key, "': the answer has no deletion"));
    return done->responses(0).response_delete_range().deleted();
  }

  void Interrupt() override {
    std::lock_guard<std::mutex> l(mu_);
    interrupted_ = true;
    wake_.notify_all();
  }

  std::string Describe() const override { return absl::StrCat("etcd at ", EtcdEndpointNames(options_.endpoints)); }

 private:
  // Runs `op` on the client (connecting first) until it is answered, while
  // etcd cannot be reached, up to the deadline.
  template <typename T, typename F>
  absl::StatusOr<T> Retry(const char* doing, const std::string& key, Deadline deadline, F&& op) {
    const auto started = Clock::now();
    auto backoff = std::chrono::milliseconds(20);
    for (int attempts = 1;; ++attempts) {
      if (interrupted_) return Interrupted(doing, key);
      absl::Status failed;
      if (!client_) {
        absl::StatusOr<std::unique_ptr<EtcdClient>> c = EtcdClient::Connect(options_);
        if (c.ok()) client_ = std::move(*c);
        else failed = c.status();
      }
      if (client_) {
        absl::StatusOr<T> r = op(*client_);
        if (r.ok()) return r;
        failed = r.status();
      }
      const bool transient = failed.code() == absl::StatusCode::kUnavailable ||
                             failed.code() == absl::StatusCode::kDeadlineExceeded;
      if (!transient)
        return absl::Status(failed.code(), absl::StrCat(Describe(), ": ", doing, " '", key, "': ", failed.message()));
      const auto now = Clock::now();
      if (now >= deadline)
        return absl::UnavailableError(
            absl::StrFormat("%s: %s '%s': no answer after %d attempts over %.1f s (last error: %s)", Describe(), doing,
                            key, attempts, std::chrono::duration<double>(now - started).count(), failed.message()));
      if (!Pause(std::min<Clock::duration>(backoff, deadline - now))) return Interrupted(doing, key);
      backoff = std::min(backoff * 2, std::chrono::milliseconds(500));
    }
  }

  // Sleeps unless interrupted; false when interrupted.
  bool Pause(Clock::duration d) {
    std::unique_lock<std::mutex> l(mu_);
    return !wake_.wait_for(l, d, [this] { return interrupted_.load(); });
  }

  absl::Status Interrupted(const char* doing, const std::string& key) const {
    return absl::CancelledError(absl::StrCat(Describe(), ": ", doing, " '", key, "' interrupted"));
  }

  const EtcdOptions options_;
  std::unique_ptr<EtcdClient> client_;  // the calling thread's only
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<bool> interrupted_{false};
};

}  // namespace

std::unique_ptr<KeyStore> OpenKeyStore(const KeyStoreAddress& address) {
  if (address.etcd) return std::make_unique<EtcdKeyStore>(*address.etcd);
  return std::make_unique<RendezvousKeyStore>(address);
}

std::string DescribeKeyStore(const KeyStoreAddress& address) {
  if (address.etcd) return absl::StrCat("etcd at ", EtcdEndpointNames(address.etcd->endpoints));
  return absl::StrCat("the rendezvous store at ", FormatEndpoint(address.host, address.port));
}

std::string KeyStoreEndpoint(const KeyStoreAddress& address) {
  return address.etcd ? EtcdEndpointNames(address.etcd->endpoints) : FormatEndpoint(address.host, address.port);
}

}  // namespace flashckpt::rendezvous
