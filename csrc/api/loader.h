// The loader role of a Checkpointer: reads one rank's snapshot of a step from
// shared memory (the newest slot holding it) or from storage (checked against
// COMMIT), into a new buffer or straight into caller buffers, checksumming as
// the bytes pass. It holds no state of its own beyond where to look: the
// segment is passed in (it may be replaced by a growing save).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/parallel_copy.h"
#include "flashckpt.pb.h"
#include "flashckpt/types.h"
#include "api/device_backend.h"
#include "shm/segment.h"
#include "storage/uring_io.h"

namespace flashckpt {

struct LoaderContext {
  std::string root;       // the checkpoint directory
  std::string shm_path;   // the rank's segment, for messages
  int rank = 0;
  int world_size = 1;
  IoOptions io;           // storage reads
  CopyPool* pool = nullptr;
  // Registers the segment's mapping with a device backend (once; the
  // Checkpointer keeps it registered for its saves). Device loads from memory
  // copy host-to-device straight from the slot, so it must be page-locked.
  std::function<absl::Status(DeviceBackend*)> register_segment;
};

class Loader {
 public:
  explicit Loader(LoaderContext c) : c_(std::move(c)) {}

  // The newest slot of `seg` with `step`, copied into a new buffer.
  // kNotFound when memory lacks the step (seg may be null).
  absl::StatusOr<std::unique_ptr<LoadedSnapshot>> FromMemory(const SharedSegment* seg, int64_t step,
                                                             bool verify) const;
  // The committed step from storage.
  absl::StatusOr<std::unique_ptr<LoadedSnapshot>> FromStorage(int64_t step, bool verify) const;
  // The step load() takes when none is given: the highest of memory and
  // storage (memory only when prefer_memory). kNotFound when there is none.
  absl::StatusOr<int64_t> NewestStep(const SharedSegment* seg, bool prefer_memory) const;
  // The manifest of `step` (memory first when prefer_memory), no tensor bytes read.
  absl::StatusOr<StepDescription> Describe(const SharedSegment* seg, int64_t step, bool prefer_memory) const;
  // Copies the newest (or lo.step) in-memory step straight into `dest`,
  // checksumming as it copies. kNotFound when memory lacks it (or, without a
  // step, storage is newer); kInvalidArgument listing every key problem
  // before anything is written.
  absl::StatusOr<int64_t> IntoFromMemory(const SharedSegment* seg, const std::map<std::string, MutableTensorRef>& dest,
                                         std::map<std::string, std::string>* blobs, const LoadOptions& lo) const;
  // Reads committed `step` from storage straight into `dest` (a few chunk
  // buffers in between, no buffer of the state's size), checksumming as it
  // copies; the same checks first, before anything is written.
  absl::StatusOr<int64_t> IntoFromStorage(int64_t step, const std::map<std::string, MutableTensorRef>& dest,
                                          std::map<std::string, std::string>* blobs, bool verify) const;
  // Every tensor of committed `step` over all the ranks that saved it, each
  // with the rank that holds it (TensorInfo::held_by; -1: replicated, listed
  // once); rank 0's blobs. No tensor bytes read.
  absl::StatusOr<StepDescription> DescribeGlobal(int64_t step) const;
  // Fills `dest` from whichever rank's files of committed `step` hold each
  // key (replicated keys from the replica shares), whatever this loader's
  // rank and world size: a partitioned optimizer's state re-partitioned to
  // another world. Every key checked (found, held by one rank, same shape and
  // dtype) before a byte is written; crc32c of every tensor.
  absl::Status IntoFromGlobal(int64_t step, const std::map<std::string, MutableTensorRef>& dest, bool verify) const;
  // Every device destination has a backend (else an error naming key and type).
  absl::Status CheckDevices(const std::map<std::string, MutableTensorRef>& dest) const;
  // Every step of storage and memory, ascending.
  std::vector<StepInfo> Steps(const SharedSegment* seg) const;

 private:
  // A file of the step that holds part of the rank's data region, at
  // [region_offset, region_offset + size): every rank's replica slice of the
  // replicated region, then the rank's own private part (rank-<r>.data).
  struct StorageFile {
    std::string path;
    uint64_t size = 0;           // from COMMIT
    uint64_t region_offset = 0;
  };
  struct StorageManifest {
    pb::Manifest manifest;
    std::string dir;
    std::vector<StorageFile> files;  // ascending region_offset, covering [0, data_bytes)
    // The files holding [off, off + len) of the region, for messages.
    std::string FilesOf(uint64_t off, uint64_t len) const;
  };
  // OK when this rank may take a snapshot with manifest `m` from memory: its
  // own (same rank and world size), or all of it replicated. Else kNotFound
  // saying why (the load goes to storage).
  absl::Status UsableHere(const pb::Manifest& m) const;
  // UsableHere of slot v's manifest (false when it cannot be read).
  bool UsableFromMemory(const SharedSegment& seg, const SlotView& v) const;
  struct Piece;
  // key -> (holding rank or -1 for replicated, entry), over every rank's manifest.
  using GlobalIndex = std::map<std::string, std::vector<std::pair<int, const pb::TensorEntry*>>>;
  // The storage manifests of every rank of committed `step`.
  absl::StatusOr<std::vector<StorageManifest>> EveryRankOf(int64_t step) const;
  static GlobalIndex IndexOf(const std::vector<StorageManifest>& ranks);
  // Reads the files of `sm` in region order (up to the last piece) into the
  // pieces, crc32c as the bytes pass, device pieces host-to-device.
  absl::StatusOr<IoResult> StreamPieces(const StorageManifest& sm, std::vector<Piece>& pieces,
                                        const std::set<DeviceBackend*>& backends, int64_t step, bool verify) const;
  // The rank's manifest of committed `step`, checked against COMMIT, and the
  // files its data region is read from. Saved by another world size: only a
  // rank whose state is all replicated (rank r reads rank r's manifest, or
  // rank 0's when the saved world had no rank r) loads; else a clear error.
  absl::StatusOr<StorageManifest> ReadStorageManifest(int64_t step) const;
  // Rank `source`'s manifest and files of committed `step` (COMMIT read
  // already), checked against COMMIT; `resized`: the loading world differs.
  absl::StatusOr<StorageManifest> ManifestOfRank(const pb::CommitRecord& commit, int64_t step, int source,
                                                 bool resized) const;
  // ReadStorageManifest, and the files' sizes checked against COMMIT.
  absl::StatusOr<StorageManifest> ReadStorageManifestAndSize(int64_t step) const;
  absl::Status CheckSizes(const StorageManifest& sm) const;
  // Copies tasks out of slot v with their crcs: through the mapping when this
  // process touched the slot, else through the segment's file (no page faults).
  absl::Status CopyOut(const SharedSegment& seg, const SlotView& v, const std::vector<CopyTask>& tasks,
                       std::vector<uint32_t>* crcs) const;

  LoaderContext c_;
};

}  // namespace flashckpt
