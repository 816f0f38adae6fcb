// The cross-node commit through the agents' key-value store (the built-in
// rendezvous server's with the c10d rendezvous, etcd with etcd-v3): ranks
// report their records there instead of polling small files on a shared
// file system. COMMIT stays a file, written by rank 0 once every rank is
// durable; the store only coordinates.
//
// Keys, all under "<key_root><run_id>/commit/r<round>/s<step>" (numbers
// zero-padded to 20 digits, so that a range delete can drop older steps and
// rounds):
//   /rank/<r>  rank r's framed RankRecord
//   /count     how many ranks reported (a counter)
//   /wake      set when the count reaches the world size, or by a failure:
//              the one key rank 0 blocks on
//   /failed    "rank <r> did not persist it: <why>"
//   /commit    rank 0's decision: "committed" or "abandoned: <why>"; what the
//              other ranks block on
// The round (the rendezvous round, the same on every node) keeps a dead
// timeline's keys from being taken for a new one's.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "agent/checkpoint_service.h"
#include "storage/commit_barrier.h"
#include "rendezvous/etcd_client.h"
#include "rendezvous/key_store.h"

namespace flashckpt {

struct CommitStoreOptions {
  std::string host;
  uint16_t port = 0;
  std::string token;
  std::string run_id;
  uint64_t round = 0;
  // Set: the store is etcd (host, port and token are not used), every key
  // under key_root (e.g. "/flashrun/"); "" for the built-in store.
  std::optional<rendezvous::EtcdOptions> etcd;
  std::string key_root;
  // A store that does not answer for this long fails the persist, naming
  // host:port (the agent hosting the rendezvous is gone) or etcd's endpoints.
  std::chrono::milliseconds unreachable_timeout{10000};
  // One blocking wait on the store lasts at most this long before
  // `cancelled` is looked at again (Wake() ends it at once).
  std::chrono::milliseconds poll{500};

  // "host:port", or etcd's endpoints "a:1, b:2"
  std::string endpoint() const;
  // "the rendezvous store at host:port" or "etcd at a:1, b:2"
  std::string Describe() const;
  // The store a barrier opens; an etcd request's timeout is capped at
  // unreachable_timeout, so that one hung request cannot outlast it.
  rendezvous::KeyStoreAddress address() const;
  // key_root + "<run_id>/commit/r<round>"
  std::string round_prefix() const;
  // round_prefix() + "/s<step>"
  std::string step_prefix(int64_t step) const;
};

class StoreCommitBarrier : public core::CommitBarrier {
 public:
  // `directory` is the checkpoint root (for the rank-<r>.durable file that
  // `flashckpt ls` shows, and the COMMIT file a rank reads when the store
  // went away after rank 0 committed).
  StoreCommitBarrier(CommitStoreOptions options, std::string directory, std::function<bool()> cancelled);
  ~StoreCommitBarrier() override;

  absl::Status RankDurable(int64_t step, int rank, const std::string& record) override;
  absl::StatusOr<std::vector<std::string>> WaitAll(int64_t step, int world_size,
                                                   std::chrono::milliseconds timeout) override;
  void ReportFailure(int64_t step, int rank, const std::string& why) override;
  // Also removes the step's other keys, older steps' and older rounds' keys.
  void Committed(int64_t step) override;
  absl::Status WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                             const std::function<bool()>& cancelled) override;
  std::string Describe() const override;

  // Any thread: a blocked store call returns at once, and the wait looks at
  // `cancelled` (a restart made the step obsolete).
  void Wake();

 private:
  // The connection; after a Wake() every call on it fails at once (kCancelled)
  // until Rearm() drops it.
  rendezvous::KeyStore& Store();
  void Rearm();
  // `cancelled_` says the step is obsolete.
  bool Abandoned() const;
  // Runs a store call until it is answered; kCancelled once the step is
  // abandoned (`cancelled_`); kUnavailable (Unreachable) when the store does
  // not answer.
  template <typename T, typename F>
  absl::StatusOr<T> Run(int64_t step, const char* doing, F&& call);
  // The error for a call that got no answer: names the store's host:port
  // (or etcd's endpoints).
  absl::Status Unreachable(int64_t step, const char* doing, const absl::Status& s) const;
  // Blocks up to poll (or until `until`) on key. nullopt: not set yet, or
  // woken (then cancelled() is looked at by the caller).
  absl::StatusOr<std::optional<std::string>> WaitKey(int64_t step, const std::string& key,
                                                     std::chrono::steady_clock::time_point until);
  absl::StatusOr<std::optional<std::string>> GetNow(int64_t step, const std::string& key);
  absl::Status Set(int64_t step, const std::string& key, const std::string& value);
  // Deletes the step's keys other than /commit (best effort).
  void DropStepKeys(int64_t step);

  CommitStoreOptions options_;
  std::string directory_;
  std::function<bool()> cancelled_;
  std::mutex mu_;  // store_ against Wake()
  std::unique_ptr<rendezvous::KeyStore> store_;
  bool woken_ = false;
};

// The checkpoint service's commits through one store and round: makes a
// StoreCommitBarrier per persist and wakes the ones in flight on a restart.
class StoreCommits : public CommitCoordinator {
 public:
  explicit StoreCommits(CommitStoreOptions options) : options_(std::move(options)) {}
  std::unique_ptr<core::CommitBarrier> Barrier(const std::string& directory, std::function<bool()> cancelled) override;
  void WakeAll() override;
  std::string Describe() const override;

 private:
  struct Live {
    std::mutex mu;
    std::set<StoreCommitBarrier*> barriers;
  };
  class Tracked;
  CommitStoreOptions options_;
  std::shared_ptr<Live> live_ = std::make_shared<Live>();
};

}  // namespace flashckpt
