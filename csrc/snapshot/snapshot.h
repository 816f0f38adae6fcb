// Snapshot layout and loading: where each tensor goes in a slot (and in the
// rank's data file, which is the slot's data region verbatim), the manifest
// that describes it, and turning bytes plus manifest back into a verified
// LoadedSnapshot.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/parallel_copy.h"
#include "flashckpt.pb.h"
#include "flashckpt/types.h"

namespace flashckpt {

struct LoadedSnapshot::Init {
  int64_t step = -1;
  int rank = 0;
  int world_size = 1;
  Source source = Source::kStorage;
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> blobs;
  uint64_t data_bytes = 0;
  std::shared_ptr<void> buffer;
};

struct SavePlan {
  std::vector<uint64_t> offsets;   // per tensor; views have none (0)
  uint64_t data_bytes = 0;         // aligned end of the tensor region
  uint64_t replicated_bytes = 0;   // [0, this): the replicated tensors (aligned to kReplicaAlign)
  uint64_t manifest_bound = 0;     // upper bound of the serialized manifest
  uint64_t slot_bytes_needed() const { return data_bytes + manifest_bound; }
};

// The replicated region's boundaries (and so every rank's slice) are aligned
// to this, so that each slice can be written with O_DIRECT straight from the slot.
inline constexpr uint64_t kReplicaAlign = 4096;

// Rank `rank`'s share [offset, offset + length) of a replicated region of
// `replicated_bytes` over `world_size` ranks: contiguous, in rank order,
// kReplicaAlign-aligned, differing by at most kReplicaAlign.
struct ReplicaSlice {
  uint64_t offset = 0, length = 0;
};
ReplicaSlice ReplicaSliceOf(uint64_t replicated_bytes, int world_size, int rank);

// A shard's declaration (TensorRef::global_shape/global_offset) is
// consistent: one entry per dimension, the box inside the global shape, the
// bytes contiguous and on their own. InvalidArgument naming the key if not.
absl::Status CheckShard(const TensorRef& t);

// Validates keys (non-empty, unique, views pointing at saved keys) and
// places tensors at `alignment`-aligned offsets: the replicated ones first
// (in their order, so that equal states get equal layouts on every rank),
// then the others.
absl::StatusOr<SavePlan> PlanSave(const std::vector<TensorRef>& tensors,
                                  const std::vector<BlobRef>& blobs, uint32_t alignment);

pb::Manifest BuildManifest(int64_t step, int rank, int world_size, uint32_t alignment,
                           const std::vector<TensorRef>& tensors, const std::vector<BlobRef>& blobs,
                           const SavePlan& plan, const std::vector<uint32_t>& crcs);

// A manifest entry as the API describes it (data left null).
TensorInfo TensorInfoOf(const pb::TensorEntry& e);

// Wraps `buffer` (holding the data region) and the manifest into a
// LoadedSnapshot. `crcs` are the computed crcs of each manifest tensor in
// order (empty: compute them here with `pool` when verify is set).
// `where` names the origin in errors (file path or shared-memory segment).
absl::StatusOr<std::unique_ptr<LoadedSnapshot>> MakeLoadedSnapshot(
    const pb::Manifest& manifest, std::shared_ptr<void> buffer, uint64_t buffer_bytes,
    Source source, bool verify, std::vector<uint32_t> crcs, CopyPool* pool, const std::string& where);

}  // namespace flashckpt
