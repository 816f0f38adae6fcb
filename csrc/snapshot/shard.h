// Boxes of global indices: where a shard (TensorEntry.global_shape /
// global_offset) sits in its global tensor, how two boxes meet, and which byte
// runs of a saved chunk land where in a destination box. Pure arithmetic over
// the manifest; the commit check (storage) and the global load (api) use it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "flashckpt.pb.h"

namespace flashckpt {

// [offset, offset + shape) in every dimension.
struct Box {
  std::vector<int64_t> offset, shape;
  bool operator==(const Box&) const = default;
};

// The box a manifest entry covers: its shard box, or the whole tensor at 0.
Box BoxOf(const pb::TensorEntry& e);
// "[0:4, 2:8]".
std::string BoxString(const Box& b);
uint64_t Volume(const Box& b);
// Where a and b overlap (same rank assumed); nullopt when they do not.
std::optional<Box> Intersection(const Box& a, const Box& b);

// A contiguous byte run to copy: chunk bytes [src, src + len) go to
// destination bytes [dst, dst + len).
struct CopyRun {
  uint64_t src = 0, dst = 0, len = 0;
};
// The runs that copy `common` (inside both) out of a row-major chunk holding
// box `chunk` into a row-major destination holding box `dest`, ascending in
// src, adjacent runs merged (a first-dimension split is a single run).
std::vector<CopyRun> RunsOf(const Box& chunk, const Box& dest, const Box& common, uint32_t element_size);

// The shards of each key over the manifests of one step's ranks (index =
// rank) agree: a key sharded on one rank is sharded on every rank that saves
// it, with one global shape and dtype, and no two boxes overlap unless they
// are the same box with the same bytes (copies). FailedPrecondition naming
// the key, the ranks and their boxes, saying what to fix.
absl::Status CheckShardsAgree(const std::vector<const pb::Manifest*>& ranks, int64_t step);

}  // namespace flashckpt
