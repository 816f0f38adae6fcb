// The node agent's checkpoint service. Workers started by flashrun publish
// snapshots into their shared-memory slots and tell the service over a Unix
// socket; the service persists them from its own process (workers do no disk
// I/O), runs the commit, and — because it outlives every worker — persists the
// newest snapshot left behind by a crashed worker before the restart.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "agent.pb.h"
#include "shm/segment.h"
#include "storage/commit_barrier.h"
#include "storage/persister.h"
#include "storage/uring_io.h"

namespace flashckpt {

struct CheckpointServiceOptions {
  std::string socket_path;        // Unix socket the workers connect to
  std::string status_file;        // JSON status, rewritten after each event ("" = none)
  int metrics_port = -1;          // Prometheus text on 127.0.0.1:<port>; -1 none, 0 any free port
  IoOptions io;
  std::string node;               // host name shown in status and metrics
};

// How the service's persists agree with the other ranks on a COMMIT. Without
// one (static rendezvous, tests), FileCommitBarrier: records in the step
// directory. flashrun's c10d rendezvous plugs in its store (StoreCommits).
class CommitCoordinator {
 public:
  virtual ~CommitCoordinator() = default;
  // The barrier of one persist; `cancelled` as PersistContext::cancelled.
  virtual std::unique_ptr<core::CommitBarrier> Barrier(const std::string& directory, std::function<bool()> cancelled) = 0;
  // Wakes the waits of every barrier made so far and still alive, so that
  // they look at their `cancelled` at once (a restart).
  virtual void WakeAll() {}
  virtual std::string Describe() const = 0;
};

struct RecoveryTiming {
  int restart = 0;
  std::map<std::string, double> phases_s;  // detect, stop, persist, rendezvous, spawn, ...
};

class CheckpointService {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointService>> Start(CheckpointServiceOptions options);
  ~CheckpointService();
  CheckpointService(const CheckpointService&) = delete;
  CheckpointService& operator=(const CheckpointService&) = delete;

  const std::string& socket_path() const { return options_.socket_path; }
  int metrics_port() const { return metrics_port_; }

  // Persists the newest step every registered rank holds in memory, where it
  // is not durable yet (on a graceful stop, or when restarts run out), and
  // waits for it.
  absl::Status PersistNewest(std::chrono::milliseconds timeout);
  // Queues `step` for every registered rank that holds it in memory, not yet
  // durable (after a crash: the restore step), and returns at once.
  void PersistStepAsync(int64_t step);
  // After a restart agreed on `restore_step`: every persist of another step
  // that is queued or in flight is abandoned (its commit could only mix the
  // dead timeline with the new one), this node's files of uncommitted other
  // steps are removed, and `restore_step` is persisted if only memory holds it.
  void Restart(int64_t restore_step);
  // Every queued and in-flight persist of every registered rank is abandoned
  // (`why` says so in their logs); returns once none runs, so that no step
  // commits through this node after it returns.
  void AbandonAll(const std::string& why);
  // From now on, persists commit through `commits` (nullptr: the file barrier).
  // Persists already in flight keep theirs; Restart() wakes them.
  void UseCommits(std::shared_ptr<CommitCoordinator> commits);
  // Waits until every queued persist finished; kDeadlineExceeded after
  // `timeout`, naming each rank's step in flight and queue.
  absl::Status Drain(std::chrono::milliseconds timeout);
  // The steps each registered rank holds, whole, in shared memory.
  std::map<int, std::vector<int64_t>> MemorySteps();
  // By rank: the data size of its newest complete snapshot in memory.
  std::map<int, uint64_t> NewestSnapshotBytes();
  // Snapshots the workers published since the service started.
  uint64_t SnapshotsTaken() const { return snapshots_.load(); }
  // The steps every registered rank holds in memory.
  std::set<int64_t> CommonMemorySteps();
  // The world size the registered ranks' snapshots were taken in (0 when they
  // disagree or none registered) and those ranks.
  void MemoryLayout(int* world, std::set<int>* ranks);
  // After an elastic change: every registered rank outside `keep` is
  // forgotten (its queued and in-flight persists abandoned, its shared-memory
  // segment removed; what it committed stays in storage). A rank kept keeps
  // its segment, also when its snapshots were taken in a world of another size:
  // its worker in the new world may read a committed step from it.
  void RetireRanksOutside(const std::set<int>& keep);
  // The checkpoint directory the workers use ("" before any registered).
  std::string Directory();
  void RecordRecovery(RecoveryTiming timing);
  // At the end of the job: removes every registered rank's shared-memory
  // segment whose newest snapshot is durable (the others stay, and are named).
  void ReleaseMemory();
  // At the end of the job: an error naming each rank whose newest persist
  // failed with nothing newer durable (flashrun then exits non-zero), after
  // removing the step directories those failures left (failure markers only).
  absl::Status CheckDurableAtEnd();
  std::string MetricsText();
  void WriteStatus();

 private:
  explicit CheckpointService(CheckpointServiceOptions o) : options_(std::move(o)) {}
  // A worker connection replies go to; `open` turns false when it closes.
  struct Connection {
    int fd = -1;
    bool open = true;  // under reply_mu_
  };
  struct Rank {
    pb::WorkerHello hello;
    std::unique_ptr<SharedSegment> seg;
    ino_t ino = 0;
    std::unique_ptr<BulkIo> io;
    int64_t newest_durable = -1;
    int64_t newest_failed = -1;  // newest step whose persist failed (not superseded)
    std::shared_ptr<CommitCoordinator> commits_in_flight;  // of the persist in flight (null: files)
    std::unique_ptr<Persister> persister;  // last member: its thread uses the others
  };

  void AcceptLoop();
  void ServeConnection(int fd);
  absl::StatusOr<PersistStats> PersistRank(int rank, int64_t step, int slot, const std::function<bool()>& cancelled);
  void PersistDone(int rank, const PersistOutcome& o, const std::shared_ptr<Connection>& reply_to);
  absl::Status OpenSegment(Rank& r);
  // Pins the slot for the service, then queues it on the rank's persister.
  // Call without mu_ held (superseded steps are answered at once).
  void Enqueue(int rank, int64_t step, int slot, std::shared_ptr<Connection> reply_to);
  void Unpin(Rank& r, int slot);
  // Abandons every queued and in-flight persist of `ranks` (`why` is their
  // outcome), wakes those blocked on the store, and waits up to 60 s for
  // them to stop; one still running is logged, with `if_late` appended.
  void AbandonPersists(const std::vector<int>& ranks, const std::string& why, const std::string& if_late);
  static std::unique_ptr<core::CommitBarrier> MakeBarrier(const std::shared_ptr<CommitCoordinator>& commits,
                                                    const std::string& directory, std::function<bool()> cancelled);
  void MetricsLoop();

  CheckpointServiceOptions options_;
  int listen_fd_ = -1;
  int metrics_fd_ = -1;
  int metrics_port_ = -1;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_, metrics_thread_;
  std::mutex conn_mu_;
  std::vector<std::thread> conn_threads_;
  std::vector<int> conn_fds_;

  std::mutex mu_;
  std::map<int, std::unique_ptr<Rank>> ranks_;
  std::shared_ptr<CommitCoordinator> commits_;
  std::mutex reply_mu_;

  // Counters for status and metrics.
  std::atomic<uint64_t> snapshots_{0}, dropped_{0}, persisted_{0}, persist_failures_{0}, persisted_bytes_{0};
  std::atomic<double> persist_seconds_{0};
  std::vector<RecoveryTiming> recoveries_;
  std::string last_error_;
};

}  // namespace flashckpt
