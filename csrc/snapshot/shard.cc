#include "snapshot/shard.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace flashckpt {

Box BoxOf(const pb::TensorEntry& e) {
  Box b;
  b.shape.assign(e.shape().begin(), e.shape().end());
  if (e.global_offset_size() == e.shape_size()) b.offset.assign(e.global_offset().begin(), e.global_offset().end());
  else b.offset.assign(b.shape.size(), 0);
  return b;
}

std::string BoxString(const Box& b) {
  std::vector<std::string> dims;
  for (size_t d = 0; d < b.shape.size(); ++d) dims.push_back(absl::StrCat(b.offset[d], ":", b.offset[d] + b.shape[d]));
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

uint64_t Volume(const Box& b) {
  uint64_t v = 1;
  for (int64_t d : b.shape) v *= static_cast<uint64_t>(std::max<int64_t>(d, 0));
  return v;
}

std::optional<Box> Intersection(const Box& a, const Box& b) {
  if (a.shape.size() != b.shape.size()) return std::nullopt;
  Box c;
  for (size_t d = 0; d < a.shape.size(); ++d) {
    const int64_t lo = std::max(a.offset[d], b.offset[d]);
    const int64_t hi = std::min(a.offset[d] + a.shape[d], b.offset[d] + b.shape[d]);
    if (hi <= lo) return std::nullopt;
    c.offset.push_back(lo);
    c.shape.push_back(hi - lo);
  }
  return c;
}

namespace {
// Row-major element strides of a box's shape.
std::vector<uint64_t> Strides(const Box& b) {
  std::vector<uint64_t> s(b.shape.size(), 1);
  for (size_t d = b.shape.size(); d-- > 1;) s[d - 1] = s[d] * static_cast<uint64_t>(b.shape[d]);
  return s;
}
}  // namespace

std::vector<CopyRun> RunsOf(const Box& chunk, const Box& dest, const Box& common, uint32_t element_size) {
  const size_t n = common.shape.size();
  if (n == 0) return {{0, 0, element_size}};
  // The innermost dimensions where `common` spans both boxes whole are one
  // contiguous run in each; the outer dimensions are walked.
  size_t inner = n - 1;  // runs cover dims [inner, n)
  uint64_t run_elems = static_cast<uint64_t>(common.shape[n - 1]);
  while (inner > 0 && common.shape[inner] == chunk.shape[inner] && common.shape[inner] == dest.shape[inner]) {
    --inner;
    run_elems *= static_cast<uint64_t>(common.shape[inner]);
  }
  const std::vector<uint64_t> cs = Strides(chunk), ds = Strides(dest);
  std::vector<int64_t> idx(inner, 0);  // position in common's outer dims
  std::vector<CopyRun> runs;
  for (;;) {
    uint64_t src = 0, dst = 0;
    for (size_t d = 0; d < n; ++d) {
      const int64_t g = common.offset[d] + (d < inner ? idx[d] : 0);
      src += static_cast<uint64_t>(g - chunk.offset[d]) * cs[d];
      dst += static_cast<uint64_t>(g - dest.offset[d]) * ds[d];
    }
    CopyRun r{src * element_size, dst * element_size, run_elems * element_size};
    if (!runs.empty() && runs.back().src + runs.back().len == r.src && runs.back().dst + runs.back().len == r.dst)
      runs.back().len += r.len;
    else
      runs.push_back(r);
    size_t d = inner;
    while (d > 0) {
      --d;
      if (++idx[d] < common.shape[d]) break;
      idx[d] = 0;
      if (d == 0) return runs;
    }
    if (inner == 0) return runs;
  }
}

absl::Status CheckShardsAgree(const std::vector<const pb::Manifest*>& ranks, int64_t step) {
  struct Holder {
    int rank;
    const pb::TensorEntry* e;
    Box box;
  };
  std::map<std::string, std::vector<Holder>> by_key;
  std::map<std::string, std::vector<int>> whole;  // keys some rank saves unsharded
  for (size_t r = 0; r < ranks.size(); ++r)
    for (const auto& e : ranks[r]->tensors()) {
      if (!e.storage_key().empty()) continue;
      if (e.global_shape_size() > 0) by_key[e.key()].push_back({static_cast<int>(r), &e, BoxOf(e)});
      else whole[e.key()].push_back(static_cast<int>(r));
    }
  const std::string what = absl::StrCat("commit of step ", step, " refused: ");
  auto gshape = [](const pb::TensorEntry& e) { return absl::StrCat("[", absl::StrJoin(e.global_shape(), ","), "]"); };
  for (auto& [key, hs] : by_key) {
    if (auto w = whole.find(key); w != whole.end())
      return absl::FailedPreconditionError(absl::StrCat(
          what, "tensor '", key, "' is a shard on rank ", hs.front().rank, " but a whole tensor on rank ",
          w->second.front(), ": save it as a shard (flashckpt.Shard) on every rank or on none"));
    const pb::TensorEntry& first = *hs.front().e;
    for (const Holder& h : hs)
      if (gshape(*h.e) != gshape(first) || h.e->dtype() != first.dtype())
        return absl::FailedPreconditionError(absl::StrCat(
            what, "the shards of '", key, "' disagree: rank ", hs.front().rank, " declares global shape ", gshape(first),
            " ", first.dtype(), ", rank ", h.rank, " ", gshape(*h.e), " ", h.e->dtype(),
            " (every rank declares the same global shape and dtype for a key)"));
    // Overlaps: sorted along the first dimension, each box only meets the
    // following ones that start before it ends there.
    std::sort(hs.begin(), hs.end(), [](const Holder& a, const Holder& b) {
      return a.box.offset.empty() ? a.rank < b.rank : std::pair(a.box.offset[0], a.rank) < std::pair(b.box.offset[0], b.rank);
    });
    for (size_t i = 0; i < hs.size(); ++i)
      for (size_t j = i + 1; j < hs.size(); ++j) {
        const Holder &a = hs[i], &b = hs[j];
        if (!a.box.offset.empty() && b.box.offset[0] >= a.box.offset[0] + a.box.shape[0]) break;
        if (!Intersection(a.box, b.box) || Volume(a.box) == 0 || Volume(b.box) == 0) continue;
        if (a.box == b.box && a.e->crc32c() == b.e->crc32c()) continue;  // copies of one shard
        return absl::FailedPreconditionError(absl::StrCat(
            what, "the shards of '", key, "' overlap: rank ", a.rank, " holds ", BoxString(a.box), ", rank ", b.rank,
            " holds ", BoxString(b.box),
            a.box == b.box ? " with other bytes (two copies of one shard must be equal)"
                           : " (each element of the global tensor belongs to one shard, or to equal copies of one)"));
      }
  }
  return absl::OkStatus();
}

}  // namespace flashckpt
