// flashckpt value types: what a save takes, what a load gives back, and the
// few process-wide load settings. No behaviour lives here, so every layer of
// the core (snapshot, storage, the agent) may include it; only the API layer
// includes flashckpt/checkpointer.h.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace flashckpt {

// 2: replicated state stored once (rank-<r>.replica); 1 is read as before.
inline constexpr uint32_t kFormatVersion = 2;

// A tensor to save: the core only sees bytes, a dtype name and a shape.
struct TensorRef {
  std::string key;
  const void* data = nullptr;
  uint64_t nbytes = 0;
  std::string dtype;               // e.g. "torch.float32"; stored, not interpreted
  std::vector<int64_t> shape;
  uint32_t element_size = 1;
  // Where the bytes are: device_type "" or "cpu" is host memory; any other
  // type ("cuda", "xpu", ...) is copied by that type's device backend
  // (include/flashckpt/device_plugin.h) from device ordinal `device`. An empty
  // device_type with device >= 0 means "cuda" (the API before backends).
  std::string device_type;
  int device = -1;
  void* cuda_stream = nullptr;     // caller's stream on that device; the copy is ordered after it
  std::vector<int64_t> strides;    // recorded only (empty: contiguous)
  int64_t storage_offset = 0;      // recorded only
  std::string storage_key;         // non-empty: no bytes saved, a view of that key's bytes
  // The same bytes on every rank of the world (data parallelism: the model,
  // a replicated optimizer): storage keeps one copy of all replicated
  // tensors, its bytes split evenly over the ranks, while each rank's memory
  // snapshot still holds all of them. Same keys, shapes and dtypes on every
  // rank, or the step's commit fails naming the key and ranks.
  bool replicated = false;
  // A shard of a larger tensor (tensor parallelism, a partitioned
  // optimizer): the bytes are the box [global_offset, global_offset + shape)
  // of a tensor of `global_shape`, row-major and contiguous (no strides, not
  // a view, not replicated). Ranks save their shards under the same key; at
  // commit, rank 0 checks that they agree on the global shape and dtype and
  // that no two boxes overlap (identical boxes with identical bytes are
  // copies, e.g. data-parallel replicas of one shard). A load into any world
  // size then fills any box of it from the chunks that cover it. Empty: not
  // a shard.
  std::vector<int64_t> global_shape;
  std::vector<int64_t> global_offset;
};

// Opaque non-tensor state.
struct BlobRef {
  std::string key;
  std::string data;
};

// A destination for load_into(): a caller-owned buffer in host memory, or
// (device_type other than "" and "cpu") in device memory of that type's
// backend, filled host-to-device from the pinned slot or pinned read buffers
// and ordered after the caller's `stream` on `device`.
struct MutableTensorRef {
  void* data = nullptr;
  uint64_t nbytes = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string device_type;
  int device = -1;
  void* stream = nullptr;
  // ReadGlobalInto: fill this box [global_offset, global_offset + shape) of a
  // tensor saved as shards of `global_shape` (empty: the whole saved tensor,
  // of `shape`). The buffer is row-major and contiguous.
  std::vector<int64_t> global_shape;
  std::vector<int64_t> global_offset;
  bool on_device() const { return !device_type.empty() && device_type != "cpu"; }
};

enum class Source { kMemory, kStorage };

struct TensorInfo {
  std::string key;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  int64_t storage_offset = 0;
  std::string storage_key;
  uint32_t element_size = 1;
  uint64_t nbytes = 0;
  uint32_t crc32c = 0;
  bool replicated = false;         // saved as the same bytes on every rank (TensorRef::replicated)
  int held_by = -1;                // DescribeGlobalStep: the rank whose files hold it (-1: replicated)
  std::vector<int64_t> global_shape;   // a shard (TensorRef::global_shape); empty: not a shard
  std::vector<int64_t> global_offset;
  const void* data = nullptr;      // points into LoadedSnapshot's buffer
};

// A loaded step. Tensor data lives in one aligned buffer owned by this object
// (keep it alive while the data is used; Python wraps it without a copy).
class LoadedSnapshot {
 public:
  int64_t step() const { return step_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  Source source() const { return source_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& blobs() const { return blobs_; }
  const TensorInfo* find(const std::string& key) const;
  uint64_t data_bytes() const { return data_bytes_; }
  const void* buffer() const { return buffer_.get(); }

  // Internal: filled by the loader.
  struct Init;
  explicit LoadedSnapshot(Init&& init);
  LoadedSnapshot(const LoadedSnapshot&) = delete;
  LoadedSnapshot& operator=(const LoadedSnapshot&) = delete;

 private:
  int64_t step_ = -1;
  int rank_ = 0, world_size_ = 1;
  Source source_ = Source::kStorage;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> blobs_;
  uint64_t data_bytes_ = 0;
  std::shared_ptr<void> buffer_;
};

// What a step holds, without its tensor bytes (TensorInfo::data is null):
// the manifest of the copy a load would read first.
struct StepDescription {
  int64_t step = -1;
  Source source = Source::kStorage;
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> blobs;
  std::vector<std::map<std::string, std::string>> rank_blobs;  // DescribeGlobalStep: every rank's blobs
};

struct StepInfo {
  int64_t step = -1;
  bool committed = false;
  bool in_memory = false;
  uint64_t bytes = 0;
  int world_size = 0;
};

struct LoadOptions {
  std::optional<int64_t> step;           // default: newest step available
  bool prefer_memory = true;
  bool allow_fallback = false;           // on corruption, try older committed steps
  bool verify = true;                    // check crc32c of every tensor
};

// A load buffer made ready ahead of a load: `bytes` of memory allocated and
// touched now (on a background thread), so that the next load of at most that
// size in this process copies into it instead of taking a page fault for every
// 4 KiB of a fresh buffer (most of a load's time). For a process that waits
// to take over a rank, like flashrun's warm standbys, once the rank's snapshot
// size is known. Calling it again replaces the buffer; 0 releases it. The
// next load of half to all of that size takes the buffer (once); a larger
// load releases it and allocates as usual; a much smaller one leaves it.
void PrepareLoadBuffer(uint64_t bytes);
// Bytes held by the prepared buffer (0: none).
uint64_t PreparedLoadBufferBytes();

}  // namespace flashckpt
