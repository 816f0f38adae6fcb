// flashckpt C++ API: snapshot tensors into shared memory, persist them in the
// background, commit atomically, load from memory or storage.
//
//   flashckpt::CheckpointerOptions opt;
//   opt.directory = "/ckpt/run1";
//   flashckpt::Checkpointer ckpt(opt);
//   auto h = ckpt.save(step, {{"w", w.data(), w.size()*4, "float32", {n}}}, {});
//   h.wait_snapshot();            // bytes are in shared memory: safe to mutate w
//   h.wait_durable();             // data and COMMIT are on disk
//   auto snap = ckpt.load();      // newest committed (or newer in-memory) step
//
// Thread-safety: one Checkpointer per rank; its methods may be called from one
// thread at a time. Handles may be waited on from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "flashckpt/errors.h"
#include "flashckpt/types.h"

namespace flashckpt {

class SaveState;  // shared between a handle and the background persister

// Returned by save(). Copyable; all copies observe the same save.
class SaveHandle {
 public:
  SaveHandle() = default;
  explicit SaveHandle(std::shared_ptr<SaveState> s) : state_(std::move(s)) {}
  int64_t step() const;
  // Blocks until the bytes are in shared memory (for non-blocking device
  // saves: until the device-to-host copies completed). Throws on failure, and
  // Error(kDeadlineExceeded) after CheckpointerOptions::wait_timeout.
  void wait_snapshot() const;
  // Blocks until data and COMMIT are durable (or persisting was skipped for this
  // step by persist_every, which returns at once). Throws on failure, and
  // Error(kDeadlineExceeded) after CheckpointerOptions::wait_timeout.
  void wait_durable() const;
  bool wait_durable_for(std::chrono::milliseconds timeout) const;  // true when done
  bool persisted() const;  // true once durable; false if skipped or pending

 private:
  std::shared_ptr<SaveState> state_;
};

// How ranks agree a step is complete. The default writes a rank-<r>.durable
// record per rank into the step directory and rank 0 waits for all of them
// (works on any shared file system); flashrun's agents with the c10d
// rendezvous use their key-value store instead. COMMIT itself is always a
// file, written by rank 0: the barrier only coordinates.
class CommitBarrier {
 public:
  virtual ~CommitBarrier() = default;
  // Every rank calls this once its files of `step` are durable; `record` is
  // the serialized RankRecord (file names, sizes, crc32c).
  virtual void rank_durable(int64_t step, int rank, const std::string& record) = 0;
  // The committing rank (0) calls this: returns the records of all
  // `world_size` ranks, or throws Error(kDeadlineExceeded) naming the missing
  // ranks, or Error(kUnavailable) when a rank reported that it will not
  // persist the step (report_failure).
  virtual std::vector<std::string> wait_all(int64_t step, int world_size,
                                            std::chrono::milliseconds timeout) = 0;

  // The defaults of the three below are the file protocol in the step
  // directory under `directory` (the checkpoint root being written).

  // Best effort, never throws: `rank` will not persist `step` (it failed, or
  // a newer step superseded it in its queue), so that the others stop
  // waiting for it; from rank 0 it also says that no COMMIT will come.
  // Default: a rank-<r>.failed marker.
  virtual void report_failure(const std::string& directory, int64_t step, int rank, const std::string& why);
  // Rank 0, once COMMIT of `step` is durable. Default: nothing (the others read COMMIT).
  virtual void committed(const std::string& directory, int64_t step);
  // Every other rank, after rank_durable: true once `step` is committed;
  // false (with the reason in *why) when it was given up (rank 0 reported a
  // failure, or `cancelled` says so); throws Error(kDeadlineExceeded) after
  // `timeout`, and other errors when the barrier cannot tell (rank 0 may
  // still commit: the rank's files must stay). Default: polls COMMIT and
  // rank 0's failure marker.
  virtual bool wait_committed(const std::string& directory, int64_t step, std::chrono::milliseconds timeout,
                              const std::function<bool()>& cancelled, std::string* why);
};

struct CheckpointerOptions {
  std::string directory;                 // storage root; created if missing
  int rank = 0;
  int world_size = 1;
  std::string run_id;                    // names the shared-memory segment; default $FLASHCKPT_RUN_ID, $TORCHELASTIC_RUN_ID or "local"
  std::string shm_dir = "/dev/shm";      // "/dev/shm" means: $FLASHCKPT_SHM_DIR if set, else /dev/shm
  // Snapshots kept in memory per rank (>= 2). 0: 3 under flashrun (one being
  // persisted, the newest, one being written: saves never wait for the disk),
  // else 2.
  int num_slots = 0;
  uint64_t reserve_bytes = 0;            // > 0: size and touch the slots at construction
  bool reserve_in_background = true;     // touch slots on a background thread
  int copy_threads = 0;                  // 0: one per core
  bool persist = true;                   // run the background persister
  int persist_every = 1;                 // persist every N-th snapshot
  int keep_last = 3;                     // committed steps kept on storage (0: all)
  bool use_io_uring = true;
  bool use_direct_io = true;
  uint32_t io_chunk_bytes = 8u << 20;    // 1..8 MiB writes
  int io_queue_depth = 8;                // writes in flight
  std::chrono::milliseconds commit_timeout{600000};  // rank 0 waits this long for other ranks
  // The longest wait_snapshot(), wait_durable(), wait_all() (and a save that
  // must wait for a slot or for pending persists) block. 0: 2 x commit_timeout
  // + 5 minutes (one persist ahead in the queue, the commit, the data write).
  std::chrono::milliseconds wait_timeout{0};
  bool unlink_memory_on_close = true;    // only when the newest snapshot is durable
  bool reuse_memory = true;              // open the segment a crashed process left behind
  std::shared_ptr<CommitBarrier> commit_barrier;  // default: rank records in the step directory
  // Under flashrun: the node agent's Unix socket (default: $FLASHCKPT_AGENT_SOCKET).
  // The agent then persists and commits the snapshots; this process does no disk I/O.
  std::string agent_socket;
  bool use_agent = true;                 // false: persist in-process even under flashrun
  // The step the job agreed to restore (under flashrun: the agents, during
  // the rendezvous; default $FLASHCKPT_RESTORE_STEP). Only the first load()
  // or load_into() without a step takes it; later ones take the newest step.
  std::optional<int64_t> restore_step;
  // The constructor fills what is unset here from the environment, once
  // (WithEnvironment below); false: the environment is not read at all.
  bool from_environment = true;
};

// `options` with what flashrun and torchrun say in the environment filled in
// where unset: agent_socket ($FLASHCKPT_AGENT_SOCKET, when use_agent), run_id
// ($FLASHCKPT_RUN_ID, else $TORCHELASTIC_RUN_ID, else "local"), shm_dir
// ($FLASHCKPT_SHM_DIR, when left at "/dev/shm"), restore_step
// ($FLASHCKPT_RESTORE_STEP). The only place the library reads these.
CheckpointerOptions WithEnvironment(CheckpointerOptions options);

class Checkpointer {
 public:
  explicit Checkpointer(CheckpointerOptions options);
  ~Checkpointer();  // waits for pending persists (as close())
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Copies tensors and blobs into a free shared-memory slot and returns once
  // they are there (blocking=true) or once device copies are queued
  // (blocking=false: call handle.wait_snapshot() before changing the tensors).
  SaveHandle save(int64_t step, const std::vector<TensorRef>& tensors,
                  const std::vector<BlobRef>& blobs, bool blocking = true);

  std::unique_ptr<LoadedSnapshot> load(const LoadOptions& options = {});
  // The manifest of `options.step` (default: the newest step, as load() picks
  // it, without taking the restore step): from the memory slot when it holds
  // the step and prefer_memory, else from committed storage. Reads no tensor
  // bytes; a front end plans a load_into() with it.
  StepDescription describe(const LoadOptions& options = {});
  // Loads into caller buffers; every key must match in shape, dtype and size
  // (checked before a byte is written). From the memory slot, else from
  // storage straight into the buffers. Returns the step; `source` (optional)
  // says where it came from.
  int64_t load_into(const std::map<std::string, MutableTensorRef>& dest,
                    std::map<std::string, std::string>* blobs = nullptr,
                    const LoadOptions& options = {}, Source* source = nullptr);

  // The restore step (CheckpointerOptions::restore_step), once: later calls
  // return nullopt. For a front end that picks the step itself.
  std::optional<int64_t> take_restore_step();
  std::optional<int64_t> latest_step();       // newest committed step on storage
  std::optional<int64_t> latest_memory_step(); // newest complete step in shared memory
  std::vector<StepInfo> steps();
  // Every started persist finished (up to wait_timeout). A persist that
  // failed since the last report raises here (and at the next save(), which
  // then snapshots nothing, and at close()) unless its handle's
  // wait_durable() raised it already: no failed persist goes unnoticed.
  void wait_all();
  // The same with its own deadline: Error(kDeadlineExceeded) naming what is
  // still in flight and queued.
  void wait_all(std::chrono::milliseconds timeout);
  // Persists what is pending and releases the directory; raises an
  // unreported persist failure after releasing everything.
  void close();
  uint64_t persist_failures() const;          // persists that failed since open
  const CheckpointerOptions& options() const;
  std::string memory_segment_path() const;
  void unlink_memory();                       // drop the shared-memory segment now

  class Impl;
 private:
  std::unique_ptr<Impl> impl_;
};

// Reads committed `step` of `rank` from `directory` for a job of `world_size`
// ranks without opening the directory for writing: no lock, no FORMAT file,
// no clean-up of leftovers, no shared memory. It works on a read-only
// directory and beside a running job; for inspection tools (`flashckpt
// verify`, `export`). Errors as load()'s (kNotFound without a COMMIT).
std::unique_ptr<LoadedSnapshot> ReadCommittedStep(const std::string& directory, int64_t step, int rank,
                                                  int world_size, bool verify = true);
// The manifest of committed `step` of `rank` (its tensor entries and blobs),
// no tensor bytes read; read-only as ReadCommittedStep.
StepDescription DescribeCommittedStep(const std::string& directory, int64_t step, int rank, int world_size);

// Global view of committed `step`: every tensor of every rank that saved it,
// with the rank holding it (TensorInfo::held_by, -1 for replicated tensors,
// listed once), and rank 0's blobs. No tensor bytes read, nothing written.
StepDescription DescribeGlobalStep(const std::string& directory, int64_t step);
// Fills `dest` from whichever rank's files of committed `step` hold each key,
// whatever world the caller is in now: state partitioned over the ranks
// (ZeroRedundancyOptimizer's, say) re-partitioned to another world size.
// Every key is checked (found, held by one rank or replicated, same shape and
// dtype) before a byte is written, and every tensor's crc32c after.
void ReadGlobalInto(const std::string& directory, int64_t step, const std::map<std::string, MutableTensorRef>& dest,
                    bool verify = true);

// Loads a device backend plugin (include/flashckpt/device_plugin.h) from
// `path`; tensors whose device_type it serves can then be saved and loaded.
// Returns that device type. CUDA's backend is loaded on first use.
std::string LoadDevicePlugin(const std::string& path);
// Device types with a loaded backend.
std::vector<std::string> DeviceTypes();
// True when tensors of `device_type` have a backend (loading CUDA's on first use).
bool HasDeviceBackend(const std::string& device_type);

}  // namespace flashckpt
