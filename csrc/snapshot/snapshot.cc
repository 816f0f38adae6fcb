#include "snapshot/snapshot.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "shm/segment.h"

namespace flashckpt {

const TensorInfo* LoadedSnapshot::find(const std::string& key) const {
  for (const auto& t : tensors_)
    if (t.key == key) return &t;
  return nullptr;
}

LoadedSnapshot::LoadedSnapshot(Init&& init)
    : step_(init.step), rank_(init.rank), world_size_(init.world_size), source_(init.source),
      tensors_(std::move(init.tensors)), blobs_(std::move(init.blobs)), data_bytes_(init.data_bytes),
      buffer_(std::move(init.buffer)) {}

ReplicaSlice ReplicaSliceOf(uint64_t replicated_bytes, int world_size, int rank) {
  if (world_size <= 0 || rank < 0 || rank >= world_size) return {};
  const uint64_t units = AlignUp(replicated_bytes, kReplicaAlign) / kReplicaAlign;
  auto start = [&](int r) {
    return std::min(replicated_bytes, units * static_cast<uint64_t>(r) / static_cast<uint64_t>(world_size) * kReplicaAlign);
  };
  ReplicaSlice s;
  s.offset = start(rank);
  s.length = start(rank + 1) - s.offset;
  return s;
}

absl::Status CheckShard(const TensorRef& t) {
  auto dims = [](const std::vector<int64_t>& v) { return absl::StrCat("[", absl::StrJoin(v, ","), "]"); };
  const std::string what = absl::StrCat("tensor '", t.key, "' (a shard of global shape ", dims(t.global_shape),
                                        " at offsets ", dims(t.global_offset), ", local shape ", dims(t.shape), "): ");
  if (t.global_shape.size() != t.shape.size() || t.global_offset.size() != t.shape.size())
    return absl::InvalidArgumentError(absl::StrCat(what, "the global shape and the offsets need one entry per "
                                                   "dimension of the local tensor"));
  for (size_t d = 0; d < t.shape.size(); ++d)
    if (t.global_offset[d] < 0 || t.shape[d] < 0 || t.global_offset[d] + t.shape[d] > t.global_shape[d])
      return absl::InvalidArgumentError(absl::StrCat(what, "dimension ", d, " runs past the global shape (",
                                                     t.global_offset[d], " + ", t.shape[d], " > ",
                                                     t.global_shape[d], ")"));
  if (t.replicated || !t.storage_key.empty() || !t.strides.empty())
    return absl::InvalidArgumentError(absl::StrCat(what, "a shard is saved contiguous, on its own: not replicated, "
                                                   "not a view, no strides"));
  uint64_t elems = 1;
  for (int64_t d : t.shape) elems *= static_cast<uint64_t>(d);
  if (elems * t.element_size != t.nbytes)
    return absl::InvalidArgumentError(absl::StrCat(what, t.nbytes, " bytes for ", elems, " elements of ",
                                                   t.element_size, " bytes"));
  return absl::OkStatus();
}

absl::StatusOr<SavePlan> PlanSave(const std::vector<TensorRef>& tensors,
                                  const std::vector<BlobRef>& blobs, uint32_t alignment) {
  SavePlan plan;
  std::set<std::string> keys;
  plan.offsets.resize(tensors.size(), 0);
  uint64_t off = 0;
  bool any_replicated = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorRef& t = tensors[i];
    if (t.key.empty()) return absl::InvalidArgumentError(absl::StrCat("tensor #", i, " has an empty key"));
    if (!keys.insert(t.key).second)
      return absl::InvalidArgumentError(absl::StrCat("tensor key '", t.key, "' appears twice"));
    if (!t.storage_key.empty()) continue;
    if (t.nbytes > 0 && t.data == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.key, "' has ", t.nbytes, " bytes but no data pointer"));
    if (!t.global_shape.empty() || !t.global_offset.empty()) FCK_RETURN_IF_ERROR(CheckShard(t));
    if (!t.replicated) continue;
    any_replicated = true;
    plan.offsets[i] = off;
    off = AlignUp(off + t.nbytes, alignment);
  }
  if (any_replicated) {
    off = AlignUp(std::max<uint64_t>(off, 1), kReplicaAlign);
    plan.replicated_bytes = off;
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorRef& t = tensors[i];
    if (!t.storage_key.empty() || t.replicated) continue;
    plan.offsets[i] = off;
    off = AlignUp(off + t.nbytes, alignment);
  }
  for (const auto& t : tensors) {
    if (!t.storage_key.empty() && (!keys.count(t.storage_key) || t.storage_key == t.key))
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.key, "' is a view of '", t.storage_key,
                                                     "', which is not among the saved tensors"));
  }
  std::set<std::string> blob_keys;
  uint64_t bound = 4096;
  for (const auto& b : blobs) {
    if (!blob_keys.insert(b.key).second)
      return absl::InvalidArgumentError(absl::StrCat("blob key '", b.key, "' appears twice"));
    bound += b.key.size() + b.data.size() + 32;
  }
  for (const auto& t : tensors)
    bound += t.key.size() + t.dtype.size() + t.storage_key.size() +
             11 * (t.shape.size() + t.strides.size() + t.global_shape.size() + t.global_offset.size()) + 96;
  plan.data_bytes = off;
  plan.manifest_bound = AlignUp(bound, alignment);
  return plan;
}

pb::Manifest BuildManifest(int64_t step, int rank, int world_size, uint32_t alignment,
                           const std::vector<TensorRef>& tensors, const std::vector<BlobRef>& blobs,
                           const SavePlan& plan, const std::vector<uint32_t>& crcs) {
  pb::Manifest m;
  m.set_format_version(kFormatVersion);
  m.set_step(step);
  m.set_rank(rank);
  m.set_world_size(world_size);
  m.set_alignment(alignment);
  m.set_data_bytes(plan.data_bytes);
  if (plan.replicated_bytes > 0) {
    const ReplicaSlice mine = ReplicaSliceOf(plan.replicated_bytes, world_size, rank);
    m.set_replicated_bytes(plan.replicated_bytes);
    m.set_replica_offset(mine.offset);
    m.set_replica_length(mine.length);
  }
  m.set_created_unix_ns(std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::system_clock::now().time_since_epoch()).count());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorRef& t = tensors[i];
    pb::TensorEntry* e = m.add_tensors();
    e->set_key(t.key);
    e->set_dtype(t.dtype);
    for (int64_t d : t.shape) e->add_shape(d);
    for (int64_t s : t.strides) e->add_strides(s);
    e->set_storage_offset(t.storage_offset);
    e->set_element_size(t.element_size);
    if (t.storage_key.empty()) {
      e->set_offset(plan.offsets[i]);
      e->set_length(t.nbytes);
      e->set_crc32c(crcs[i]);
      e->set_replicated(t.replicated);
      for (int64_t d : t.global_shape) e->add_global_shape(d);
      for (int64_t d : t.global_offset) e->add_global_offset(d);
    } else {
      e->set_storage_key(t.storage_key);
    }
  }
  for (const auto& b : blobs) {
    pb::BlobEntry* e = m.add_blobs();
    e->set_key(b.key);
    e->set_data(b.data);
    e->set_crc32c(0);
  }
  return m;
}

TensorInfo TensorInfoOf(const pb::TensorEntry& e) {
  TensorInfo t;
  t.key = e.key();
  t.dtype = e.dtype();
  t.shape.assign(e.shape().begin(), e.shape().end());
  t.strides.assign(e.strides().begin(), e.strides().end());
  t.storage_offset = e.storage_offset();
  t.storage_key = e.storage_key();
  t.element_size = e.element_size();
  t.nbytes = e.length();
  t.crc32c = e.crc32c();
  t.replicated = e.replicated();
  t.global_shape.assign(e.global_shape().begin(), e.global_shape().end());
  t.global_offset.assign(e.global_offset().begin(), e.global_offset().end());
  return t;
}

absl::StatusOr<std::unique_ptr<LoadedSnapshot>> MakeLoadedSnapshot(
    const pb::Manifest& m, std::shared_ptr<void> buffer, uint64_t buffer_bytes, Source source,
    bool verify, std::vector<uint32_t> crcs, CopyPool* pool, const std::string& where) {
  if (m.format_version() > kFormatVersion)
    return absl::FailedPreconditionError(absl::StrCat(where, ": written by a newer flashckpt (format ",
                                                      m.format_version(), ")"));
  const auto* base = static_cast<const uint8_t*>(buffer.get());
  for (const auto& e : m.tensors()) {
    if (!e.storage_key().empty()) continue;
    if (e.offset() + e.length() > buffer_bytes || e.offset() + e.length() < e.offset())
      return absl::DataLossError(absl::StrCat(where, ": tensor '", e.key(), "' (offset ", e.offset(), ", ",
                                              e.length(), " bytes) lies past the end of the data (",
                                              buffer_bytes, " bytes): the file is truncated"));
  }
  if (verify && crcs.empty()) {
    std::vector<CopyTask> tasks;
    for (const auto& e : m.tensors())
      tasks.push_back({nullptr, base + (e.storage_key().empty() ? e.offset() : 0),
                       e.storage_key().empty() ? e.length() : 0});
    pool->CopyAndChecksum(tasks, &crcs);
  }
  LoadedSnapshot::Init init;
  init.step = m.step();
  init.rank = m.rank();
  init.world_size = m.world_size();
  init.source = source;
  init.data_bytes = m.data_bytes();
  for (int i = 0; i < m.tensors_size(); ++i) {
    const auto& e = m.tensors(i);
    if (verify && e.storage_key().empty() && crcs[i] != e.crc32c())
      return absl::DataLossError(absl::StrCat(where, ": tensor '", e.key(), "' (offset ", e.offset(), ", ",
                                              e.length(), " bytes) fails its crc32c check (stored ",
                                              absl::Hex(e.crc32c()), ", computed ", absl::Hex(crcs[i]),
                                              "): the data is corrupted"));
    TensorInfo t = TensorInfoOf(e);
    t.data = e.storage_key().empty() ? base + e.offset() : nullptr;
    init.tensors.push_back(std::move(t));
  }
  for (const auto& b : m.blobs()) init.blobs[b.key()] = b.data();
  init.buffer = std::move(buffer);
  return std::make_unique<LoadedSnapshot>(std::move(init));
}

}  // namespace flashckpt
