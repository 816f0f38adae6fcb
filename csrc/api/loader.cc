#include "api/loader.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/crc32c.h"
#include "common/log.h"
#include "common/status.h"
#include "snapshot/shard.h"
#include "snapshot/snapshot.h"
#include "storage/layout.h"

namespace flashckpt {
namespace fs = std::filesystem;

namespace {

// The keys of the tensors of `m` that are per rank (not replicated, not views).
std::vector<std::string> PerRankKeys(const pb::Manifest& m) {
  std::vector<std::string> keys;
  for (const auto& e : m.tensors())
    if (e.storage_key().empty() && !e.replicated()) keys.push_back(e.key());
  return keys;
}

// Lists every key problem at once: missing, unexpected, mismatched.
absl::Status CheckDestinations(const std::map<std::string, MutableTensorRef>& dest, const pb::Manifest& m) {
  std::map<std::string, const pb::TensorEntry*> saved;
  for (const auto& e : m.tensors()) saved[e.key()] = &e;
  std::vector<std::string> missing, unexpected, mismatched;
  for (const auto& [k, d] : dest) {
    auto it = saved.find(k);
    if (it == saved.end()) { missing.push_back(k); continue; }
    const pb::TensorEntry& e = *it->second;
    if (!e.storage_key().empty()) {
      mismatched.push_back(absl::StrCat(k, " (a view of ", e.storage_key(), "; load it through that key)"));
      continue;
    }
    std::vector<int64_t> shape(e.shape().begin(), e.shape().end());
    if (shape != d.shape || e.dtype() != d.dtype || e.length() != d.nbytes) {
      mismatched.push_back(absl::StrCat(k, " (saved ", e.dtype(), " [", absl::StrJoin(shape, ","), "], target ",
                                        d.dtype, " [", absl::StrJoin(d.shape, ","), "])"));
      continue;
    }
    // A shard loads here only into the same box; another layout reads the
    // chunks it needs from every rank's files (ReadGlobalInto).
    const std::vector<int64_t> g(e.global_shape().begin(), e.global_shape().end());
    const std::vector<int64_t> o(e.global_offset().begin(), e.global_offset().end());
    if (!d.global_shape.empty() && (g != d.global_shape || o != d.global_offset))
      mismatched.push_back(absl::StrCat(k, " (saved as the box ", BoxString(BoxOf(e)), " of [", absl::StrJoin(g, ","),
                                        "], target the box at [", absl::StrJoin(d.global_offset, ","), "] of [",
                                        absl::StrJoin(d.global_shape, ","),
                                        "]: load another layout with flashckpt.load_resharded / ReadGlobalInto)"));
  }
  for (const auto& e : m.tensors())
    if (!dest.count(e.key()) && e.storage_key().empty()) unexpected.push_back(e.key());
  if (missing.empty() && unexpected.empty() && mismatched.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("cannot load step ", m.step(), " into the given buffers: missing keys [", absl::StrJoin(missing, ", "),
                   "], unexpected keys [", absl::StrJoin(unexpected, ", "), "], mismatched [",
                   absl::StrJoin(mismatched, "; "), "]"));
}

// The host-to-device copies of one load, batched per backend, device and
// stream. Backends are resolved (an unknown type named with its key) before a
// byte is written; the destructor waits for whatever was queued.
class DeviceUploads {
 public:
  DeviceUploads() = default;
  DeviceUploads(const DeviceUploads&) = delete;
  DeviceUploads& operator=(const DeviceUploads&) = delete;
  ~DeviceUploads() { Wait().IgnoreError(); }

  // The backends of every device destination, or the first that has none.
  static absl::StatusOr<std::set<DeviceBackend*>> Resolve(const std::map<std::string, MutableTensorRef>& dest) {
    std::set<DeviceBackend*> out;
    for (const auto& [k, d] : dest) {
      if (!d.on_device()) continue;
      absl::StatusOr<DeviceBackend*> b = DeviceBackend::For(d.device_type);
      if (!b.ok()) return Annotate(b.status(), absl::StrCat("load into tensor '", k, "'"));
      out.insert(*b);
    }
    return out;
  }
  void Add(const MutableTensorRef& d, const void* src, size_t n) {
    DeviceBackend* b = *DeviceBackend::For(d.device_type);  // resolved above
    for (Batch& x : batches_)
      if (x.backend == b && x.device == d.device && x.stream == d.stream) {
        x.copies.push_back({d.data, src, n});
        return;
      }
    batches_.push_back({b, d.device, d.stream, {{d.data, src, n}}, nullptr});
  }
  absl::Status Start() {
    for (Batch& x : batches_) {
      if (x.done || x.copies.empty()) continue;
      FCK_ASSIGN_OR_RETURN(x.done, x.backend->CopyToDeviceAsync(x.device, x.stream, x.copies));
    }
    return absl::OkStatus();
  }
  // Waits for every queued batch; the first error is returned. Then empty.
  absl::Status Wait() {
    absl::Status first;
    for (Batch& x : batches_)
      if (x.done) {
        absl::Status w = x.backend->Wait(std::exchange(x.done, nullptr));
        if (first.ok()) first = w;
      }
    batches_.clear();
    return first;
  }

 private:
  struct Batch {
    DeviceBackend* backend;
    int device;
    void* stream;
    std::vector<DeviceBackend::Copy> copies;
    void* done;
  };
  std::vector<Batch> batches_;
};

}  // namespace

absl::Status Loader::CheckDevices(const std::map<std::string, MutableTensorRef>& dest) const {
  return DeviceUploads::Resolve(dest).status();
}

absl::Status Loader::CopyOut(const SharedSegment& seg, const SlotView& v, const std::vector<CopyTask>& tasks,
                             std::vector<uint32_t>* crcs) const {
  if (seg.slot_touched_here(v.index)) {
    c_.pool->CopyAndChecksum(tasks, crcs);
    return absl::OkStatus();
  }
  // A slot this process never touched (a fresh process restoring): read
  // through the file, not through page faults on a fresh mapping.
  int err = c_.pool->FillAndChecksum(
      tasks, [&](void* dst, const void* src, size_t n) { return seg.ReadMapped(src, dst, n); }, crcs);
  if (err != 0) return ErrnoStatus(absl::StrCat("pread step ", v.step, " of shared-memory segment"), seg.path(), err);
  return absl::OkStatus();
}

absl::Status Loader::UsableHere(const pb::Manifest& m) const {
  if (m.world_size() == c_.world_size && m.rank() == c_.rank) return absl::OkStatus();
  const std::vector<std::string> per_rank = PerRankKeys(m);
  if (per_rank.empty()) return absl::OkStatus();  // all replicated: the same on every rank of any world
  return absl::NotFoundError(absl::StrCat(
      "shared-memory snapshot ", c_.shm_path, " of step ", m.step(), " was saved by rank ", m.rank(), " of ",
      m.world_size(), ", this is rank ", c_.rank, " of ", c_.world_size, ", and it holds per-rank tensors (",
      per_rank.front(), per_rank.size() > 1 ? ", ..." : "", "): not taken from memory"));
}

bool Loader::UsableFromMemory(const SharedSegment& seg, const SlotView& v) const {
  absl::StatusOr<std::string> framed = seg.ManifestBytes(v);
  pb::Manifest m;
  return framed.ok() && ParseRecord(*framed, RecordKind::kManifest, c_.shm_path, &m).ok() && UsableHere(m).ok();
}

absl::StatusOr<std::unique_ptr<LoadedSnapshot>> Loader::FromMemory(const SharedSegment* seg, int64_t step,
                                                                   bool verify) const {
  SlotView v;
  if (!seg || !seg->Newest(&v, step))
    return absl::NotFoundError(absl::StrCat("step ", step, " is not in shared memory"));
  const uint8_t* data = seg->slot_data(v.index);
  FCK_ASSIGN_OR_RETURN(std::string framed, seg->ManifestBytes(v));
  pb::Manifest m;
  FCK_RETURN_IF_ERROR(ParseRecord(framed, RecordKind::kManifest, c_.shm_path, &m));
  FCK_RETURN_IF_ERROR(UsableHere(m));
  bool prepared = false;
  auto buffer = AllocateAligned(v.data_bytes, &prepared);
  if (!buffer) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", v.data_bytes, " bytes to load step ", step));
  std::vector<CopyTask> tasks;
  auto* dst = static_cast<uint8_t*>(buffer.get());
  for (const auto& e : m.tensors()) {
    if (!e.storage_key().empty() || e.offset() + e.length() > v.data_bytes) { tasks.push_back({}); continue; }
    tasks.push_back({dst + e.offset(), data + e.offset(), e.length()});
  }
  std::vector<uint32_t> crcs;
  FCK_RETURN_IF_ERROR(CopyOut(*seg, v, tasks, &crcs));
  if (!seg->StillValid(v))
    return absl::UnavailableError(absl::StrCat("slot of step ", step, " was overwritten while reading"));
  if (!verify) crcs.clear();
  if (prepared) FCK_LOG(kInfo, "step ", step, " copied into the load buffer prepared ahead");
  return MakeLoadedSnapshot(m, std::move(buffer), v.data_bytes, Source::kMemory, verify, std::move(crcs), c_.pool,
                            absl::StrCat("shared-memory snapshot ", c_.shm_path, " step ", step));
}

std::string Loader::StorageManifest::FilesOf(uint64_t off, uint64_t len) const {
  std::vector<std::string> names;
  for (const StorageFile& f : files)
    if (f.region_offset < off + std::max<uint64_t>(len, 1) && off < f.region_offset + f.size) names.push_back(f.path);
  if (names.empty()) return dir;
  return absl::StrJoin(names, " and ");
}

absl::StatusOr<Loader::StorageManifest> Loader::ReadStorageManifest(int64_t step) const {
  const std::string& root = c_.root;
  const std::string dir = StepDir(root, step);
  auto commit = ReadCommit(root, step);
  if (!commit.ok()) {
    if (commit.status().code() == absl::StatusCode::kNotFound) {
      auto all = CommittedSteps(root);
      return absl::NotFoundError(absl::StrCat("step ", step, " in ", root, " has no COMMIT record (never completed); ",
                                              all.empty() ? std::string("no step is committed")
                                                          : absl::StrCat("committed steps: ", absl::StrJoin(all, ", "))));
    }
    return commit.status();
  }
  const bool resized = commit->world_size() != c_.world_size;
  return ManifestOfRank(*commit, step, !resized || c_.rank < commit->world_size() ? c_.rank : 0, resized);
}

absl::StatusOr<Loader::StorageManifest> Loader::ManifestOfRank(const pb::CommitRecord& commit, int64_t step,
                                                               int source, bool resized) const {
  const std::string dir = StepDir(c_.root, step);
  const int saved_world = commit.world_size();
  std::map<std::string, const pb::FileRecord*> listed;
  for (const auto& f : commit.files()) listed[f.name()] = &f;
  auto record_of = [&](const std::string& name) -> const pb::FileRecord* {
    auto it = listed.find(name);
    return it == listed.end() ? nullptr : it->second;
  };
  const pb::FileRecord* data_rec = record_of(RankDataName(source));
  const pb::FileRecord* manifest_rec = record_of(RankManifestName(source));
  if (!data_rec || !manifest_rec)
    return absl::DataLossError(absl::StrCat(dir, "/COMMIT does not list the files of rank ", source));
  const std::string manifest_path = absl::StrCat(dir, "/", RankManifestName(source));
  FCK_ASSIGN_OR_RETURN(std::string framed, ReadSmallFile(manifest_path));
  if (framed.size() != manifest_rec->size() || Crc32c(framed.data(), framed.size()) != manifest_rec->crc32c())
    return absl::DataLossError(absl::StrCat(manifest_path, " does not match its COMMIT entry (size ", framed.size(),
                                            ", expected ", manifest_rec->size(), ", or checksum)"));
  StorageManifest out;
  out.dir = dir;
  FCK_RETURN_IF_ERROR(ParseRecord(framed, RecordKind::kManifest, manifest_path, &out.manifest));
  const pb::Manifest& m = out.manifest;
  if (resized) {
    const std::vector<std::string> per_rank = PerRankKeys(m);
    if (!per_rank.empty())
      return absl::FailedPreconditionError(absl::StrCat(
          dir, " was saved with world size ", saved_world, ", this Checkpointer has ", c_.world_size, ": rank ", source,
          "'s state has ", per_rank.size(), " tensors that are not replicated (",
          absl::StrJoin(per_rank.begin(), per_rank.begin() + std::min<size_t>(per_rank.size(), 5), ", "),
          per_rank.size() > 5 ? ", ..." : "",
          "), and only replicated state loads into another world size this way; load it with world size ",
          saved_world, ", or save state that is the same on every rank as replicated, or load partitioned state "
          "(shards, a ZeroRedundancyOptimizer's) with flashckpt.load_resharded"));
    FCK_LOG(kInfo, "step ", step, " was saved by a world of ", saved_world, "; rank ", c_.rank, " of ", c_.world_size,
            " loads its replicated state (and rank ", source, "'s other state)");
  }
  const uint64_t replicated = m.replicated_bytes();
  if (replicated > m.data_bytes())
    return absl::DataLossError(absl::StrCat(manifest_path, ": replicated region of ", replicated,
                                            " bytes is larger than the data region (", m.data_bytes(), ")"));
  if (replicated > 0) {
    for (int r = 0; r < saved_world; ++r) {
      const std::string name = RankReplicaName(r);
      const pb::FileRecord* rec = record_of(name);
      const ReplicaSlice slice = ReplicaSliceOf(replicated, saved_world, r);
      if (!rec)
        return absl::DataLossError(absl::StrCat(dir, "/COMMIT does not list ", name,
                                                ", rank ", r, "'s share of the replicated state"));
      if (rec->size() != slice.length)
        return absl::DataLossError(absl::StrCat(dir, "/", name, " is ", rec->size(), " bytes in COMMIT, rank ", r,
                                                "'s share of ", replicated, " replicated bytes is ", slice.length));
      out.files.push_back({absl::StrCat(dir, "/", name), rec->size(), slice.offset});
    }
  }
  out.files.push_back({absl::StrCat(dir, "/", RankDataName(source)), data_rec->size(), replicated});
  return out;
}

absl::StatusOr<Loader::StorageManifest> Loader::ReadStorageManifestAndSize(int64_t step) const {
  FCK_ASSIGN_OR_RETURN(StorageManifest sm, ReadStorageManifest(step));
  FCK_RETURN_IF_ERROR(CheckSizes(sm));
  return sm;
}

absl::Status Loader::CheckSizes(const StorageManifest& sm) const {
  for (const StorageFile& f : sm.files) {
    std::error_code ec;
    uint64_t on_disk = fs::file_size(f.path, ec);
    if (ec) return ErrnoStatus("open", f.path, ec.value());
    if (on_disk != f.size)
      return absl::DataLossError(absl::StrCat(f.path, " has ", on_disk, " bytes, its COMMIT entry says ", f.size,
                                              ": the file is truncated or replaced"));
  }
  const StorageFile& own = sm.files.back();
  if (sm.manifest.data_bytes() > own.region_offset + own.size)
    return absl::DataLossError(absl::StrCat(own.path, " has ", own.size, " bytes, its manifest needs ",
                                            sm.manifest.data_bytes() - own.region_offset));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LoadedSnapshot>> Loader::FromStorage(int64_t step, bool verify) const {
  FCK_ASSIGN_OR_RETURN(StorageManifest sm, ReadStorageManifestAndSize(step));
  const pb::Manifest& m = sm.manifest;
  bool prepared = false;
  auto buffer = AllocateAligned(m.data_bytes(), &prepared);
  if (!buffer)
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", m.data_bytes(), " bytes to load ",
                                                     sm.FilesOf(0, m.data_bytes())));
  BulkIo reader(c_.io);
  for (const StorageFile& f : sm.files) {
    const uint64_t n = std::min<uint64_t>(f.size, m.data_bytes() - std::min(m.data_bytes(), f.region_offset));
    if (n == 0) continue;
    FCK_RETURN_IF_ERROR(reader.ReadFile(f.path, static_cast<uint8_t*>(buffer.get()) + f.region_offset, n).status());
  }
  if (prepared) FCK_LOG(kInfo, "step ", step, " read into the load buffer prepared ahead");
  return MakeLoadedSnapshot(m, std::move(buffer), m.data_bytes(), Source::kStorage, verify, {}, c_.pool,
                            sm.FilesOf(0, m.data_bytes()));
}

absl::StatusOr<int64_t> Loader::NewestStep(const SharedSegment* seg, bool prefer_memory) const {
  std::optional<int64_t> committed = LatestCommitted(c_.root);
  SlotView mem;
  // Only a snapshot this rank can take: one a rank of another world left
  // (an elastic restart that renumbered the ranks) is skipped.
  if (prefer_memory && seg && seg->Newest(&mem) && (!committed || mem.step >= *committed) &&
      UsableFromMemory(*seg, mem))
    return mem.step;
  if (committed) return *committed;
  return absl::NotFoundError(absl::StrCat("no checkpoint to load: ", c_.root,
                                          " has no committed step and shared memory holds none"));
}

absl::StatusOr<StepDescription> Loader::Describe(const SharedSegment* seg, int64_t step, bool prefer_memory) const {
  StepDescription d;
  d.step = step;
  pb::Manifest m;
  SlotView v;
  bool from_memory = false;
  if (prefer_memory && seg && seg->Newest(&v, d.step)) {
    absl::StatusOr<std::string> framed = seg->ManifestBytes(v);
    from_memory = framed.ok() && ParseRecord(*framed, RecordKind::kManifest, c_.shm_path, &m).ok() &&
                  UsableHere(m).ok() && seg->StillValid(v);
  }
  if (from_memory) {
    d.source = Source::kMemory;
  } else {
    FCK_ASSIGN_OR_RETURN(StorageManifest sm, ReadStorageManifest(d.step));
    m = std::move(sm.manifest);
    d.source = Source::kStorage;
  }
  for (const auto& e : m.tensors()) d.tensors.push_back(TensorInfoOf(e));
  for (const auto& b : m.blobs()) d.blobs[b.key()] = b.data();
  return d;
}

absl::StatusOr<int64_t> Loader::IntoFromMemory(const SharedSegment* seg,
                                               const std::map<std::string, MutableTensorRef>& dest,
                                               std::map<std::string, std::string>* blobs, const LoadOptions& lo) const {
  SlotView v;
  if (!seg || !seg->Newest(&v, lo.step.value_or(-1))) return absl::NotFoundError("not in memory");
  auto committed = LatestCommitted(c_.root);
  if (!lo.step && committed && *committed > v.step) return absl::NotFoundError("storage is newer");
  const uint8_t* data = seg->slot_data(v.index);
  FCK_ASSIGN_OR_RETURN(std::string framed, seg->ManifestBytes(v));
  pb::Manifest m;
  FCK_RETURN_IF_ERROR(ParseRecord(framed, RecordKind::kManifest, c_.shm_path, &m));
  FCK_RETURN_IF_ERROR(UsableHere(m));
  FCK_RETURN_IF_ERROR(CheckDestinations(dest, m));
  FCK_ASSIGN_OR_RETURN(std::set<DeviceBackend*> backends, DeviceUploads::Resolve(dest));
  for (DeviceBackend* b : backends) {
    if (!c_.register_segment) return absl::InternalError("device load without a segment registration");
    FCK_RETURN_IF_ERROR(c_.register_segment(b));
  }
  // Device tensors: host-to-device straight from the pinned slot, queued first;
  // their crcs are taken from the slot on the host meanwhile (no copy there).
  DeviceUploads uploads;
  std::vector<CopyTask> tasks;
  std::vector<const pb::TensorEntry*> entries;
  for (const auto& e : m.tensors()) {
    auto it = dest.find(e.key());
    if (it == dest.end() || e.offset() + e.length() > v.data_bytes) continue;
    const bool device = it->second.on_device();
    if (device) uploads.Add(it->second, data + e.offset(), e.length());
    tasks.push_back({device ? nullptr : it->second.data, data + e.offset(), e.length()});
    entries.push_back(&e);
  }
  FCK_RETURN_IF_ERROR(uploads.Start());
  std::vector<uint32_t> crcs;
  absl::Status copied = CopyOut(*seg, v, tasks, &crcs);
  absl::Status uploaded = uploads.Wait();
  FCK_RETURN_IF_ERROR(copied);
  FCK_RETURN_IF_ERROR(uploaded);
  if (!seg->StillValid(v)) return absl::UnavailableError("slot was overwritten while reading");
  for (size_t i = 0; lo.verify && i < entries.size(); ++i)
    if (crcs[i] != entries[i]->crc32c())
      return absl::DataLossError(absl::StrCat("shared-memory snapshot ", c_.shm_path, " step ", v.step, ": tensor '",
                                              entries[i]->key(), "' fails its crc32c check"));
  if (blobs) {
    blobs->clear();
    for (const auto& b : m.blobs()) (*blobs)[b.key()] = b.data();
  }
  FCK_LOG(kInfo, "loaded step ", v.step, " from shared memory into caller buffers");
  return v.step;
}

// One destination of a storage load: region bytes [off, off + len) of the
// source rank's data region, into dst.
struct Loader::Piece {
  uint64_t off = 0, len = 0;
  uint8_t* dst = nullptr;
  const pb::TensorEntry* entry = nullptr;
  uint32_t crc = 0;
  const MutableTensorRef* target = nullptr;
  // A chunk of which only some bytes go to a box of the destination: chunk
  // bytes runs[i].src.. go to dst + runs[i].dst.., ascending in src (the
  // whole chunk is read all the same, for its crc). Empty: all len bytes to
  // dst in order.
  std::vector<CopyRun> runs;
  size_t next_run = 0;  // the first run not yet whole
};

absl::StatusOr<IoResult> Loader::StreamPieces(const StorageManifest& sm, std::vector<Piece>& pieces,
                                              const std::set<DeviceBackend*>& backends, int64_t step,
                                              bool verify) const {
  for (const Piece& p : pieces) {
    if (p.off + p.len > sm.manifest.data_bytes() || p.off + p.len < p.off)
      return absl::DataLossError(absl::StrCat(sm.FilesOf(p.off, p.len), ": tensor '", p.entry->key(),
                                              "' lies past the data (offset ", p.off, ", ", p.len, " bytes of ",
                                              sm.manifest.data_bytes(), ")"));
  }
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.off < b.off; });
  for (size_t i = 1; i < pieces.size(); ++i)
    if (pieces[i - 1].off + pieces[i - 1].len > pieces[i].off)
      return absl::DataLossError(absl::StrCat(sm.dir, ": tensors '", pieces[i - 1].entry->key(), "' and '",
                                              pieces[i].entry->key(), "' overlap in the manifest"));
  size_t first = 0;  // the first piece not yet whole
  // fn(dst, src, n) for each part of piece p within delivered bytes
  // [off, off + n) at `data`, from its first unfinished run on.
  auto parts = [](Piece& p, uint64_t off, const uint8_t* data, uint64_t n, const auto& fn) {
    const uint64_t a = std::max(p.off, off), b = std::min(p.off + p.len, off + n);
    if (a >= b) return;
    if (p.runs.empty()) return fn(p.dst + (a - p.off), data + (a - off), b - a);
    const uint64_t ca = a - p.off, cb = b - p.off;  // chunk-relative
    for (size_t i = p.next_run; i < p.runs.size() && p.runs[i].src < cb; ++i) {
      const CopyRun& r = p.runs[i];
      const uint64_t x = std::max(r.src, ca), y = std::min(r.src + r.len, cb);
      if (x < y) fn(p.dst + r.dst + (x - r.src), data + (p.off + x - off), y - x);
    }
  };
  auto sink = [&](uint64_t off, const uint8_t* data, uint64_t n) {
    const uint64_t stop = off + n;
    // Device pieces go host-to-device from the (registered) read buffer,
    // which is reused once this returns: queued first, waited for last.
    DeviceUploads uploads;
    for (size_t i = first; i < pieces.size() && pieces[i].off < stop; ++i) {
      if (!pieces[i].target->on_device()) continue;
      parts(pieces[i], off, data, n, [&](uint8_t* dst, const uint8_t* src, uint64_t k) {
        MutableTensorRef part = *pieces[i].target;
        part.data = dst;
        uploads.Add(part, src, k);
      });
    }
    FCK_RETURN_IF_ERROR(uploads.Start());
    for (size_t i = first; i < pieces.size() && pieces[i].off < stop; ++i) {
      Piece& p = pieces[i];
      const uint64_t a = std::max(p.off, off), b = std::min(p.off + p.len, stop);
      if (a < b) {
        if (p.target->on_device()) {
          p.crc = Crc32c(data + (a - off), b - a, p.crc);
        } else if (p.runs.empty()) {
          p.crc = CopyWithCrc32c(p.dst + (a - p.off), data + (a - off), b - a, p.crc);
        } else {
          // One pass in chunk order: the runs copied as their crc is taken,
          // the bytes between them (outside the box) only checksummed.
          const uint64_t ca = a - p.off, cb = b - p.off;
          uint64_t pos = ca;
          for (size_t r = p.next_run; r < p.runs.size() && p.runs[r].src < cb; ++r) {
            const CopyRun& run = p.runs[r];
            const uint64_t x = std::max(run.src, ca), y = std::min(run.src + run.len, cb);
            if (x >= y) continue;
            if (pos < x) p.crc = Crc32c(data + (p.off + pos - off), x - pos, p.crc);
            p.crc = CopyWithCrc32c(p.dst + run.dst + (x - run.src), data + (p.off + x - off), y - x, p.crc);
            pos = y;
          }
          if (pos < cb) p.crc = Crc32c(data + (p.off + pos - off), cb - pos, p.crc);
        }
        if (!p.runs.empty()) {
          while (p.next_run < p.runs.size() && p.off + p.runs[p.next_run].src + p.runs[p.next_run].len <= stop)
            ++p.next_run;
        }
      }
      if (i == first && p.off + p.len <= stop) ++first;
    }
    return uploads.Wait();
  };
  // The read buffers are page-locked for the device backends while they are used.
  std::vector<DeviceBackend*> registered;
  BulkIo::BufferHooks hooks;
  hooks.acquired = [&](void* base, size_t len) -> absl::Status {
    for (DeviceBackend* b : backends) {
      FCK_RETURN_IF_ERROR(b->RegisterHost(base, len));
      registered.push_back(b);
    }
    return absl::OkStatus();
  };
  hooks.releasing = [&](void* base) {
    for (DeviceBackend* b : registered) b->UnregisterHost(base).IgnoreError();
  };
  // Only the byte ranges the pieces need are read: a load of another rank's
  // few tensors, or of a few chunks of a sharded tensor, skips the rest of
  // its files. Gaps shorter than kReadThrough are read through (one request
  // beats two nearby ones).
  constexpr uint64_t kReadThrough = 1u << 20;
  struct Span {
    uint64_t lo, hi;
  };
  std::vector<Span> spans;
  for (const Piece& p : pieces) {
    if (p.len == 0) continue;
    if (!spans.empty() && p.off <= spans.back().hi + kReadThrough) spans.back().hi = std::max(spans.back().hi, p.off + p.len);
    else spans.push_back({p.off, p.off + p.len});
  }
  BulkIo reader(c_.io);
  IoResult io;
  for (const Span& span : spans)
    for (const StorageFile& f : sm.files) {
      const uint64_t lo = std::max(span.lo, f.region_offset), hi = std::min(span.hi, f.region_offset + f.size);
      if (lo >= hi) continue;
      const uint64_t base = f.region_offset;
      FCK_ASSIGN_OR_RETURN(IoResult r, reader.ReadFileStreaming(
                                           f.path, lo - base, hi - lo,
                                           [&](uint64_t off, const uint8_t* data, uint64_t k) { return sink(base + off, data, k); },
                                           hooks));
      io.bytes += r.bytes;
      io.used_io_uring = r.used_io_uring;
      io.used_direct_io = r.used_direct_io;
    }
  for (const Piece& p : pieces)
    if (verify && p.crc != p.entry->crc32c())
      return absl::DataLossError(absl::StrCat(sm.FilesOf(p.off, p.len), " step ", step, ": tensor '", p.entry->key(),
                                              "' fails its crc32c check (the buffers given hold partly loaded "
                                              "bytes: load another step into them)"));
  return io;
}

absl::StatusOr<int64_t> Loader::IntoFromStorage(int64_t step, const std::map<std::string, MutableTensorRef>& dest,
                                                std::map<std::string, std::string>* blobs, bool verify) const {
  auto t0 = std::chrono::steady_clock::now();
  FCK_ASSIGN_OR_RETURN(StorageManifest sm, ReadStorageManifestAndSize(step));
  const pb::Manifest& m = sm.manifest;
  FCK_RETURN_IF_ERROR(CheckDestinations(dest, m));
  FCK_ASSIGN_OR_RETURN(std::set<DeviceBackend*> backends, DeviceUploads::Resolve(dest));
  std::vector<Piece> pieces;
  for (const auto& e : m.tensors()) {
    auto it = dest.find(e.key());
    if (it == dest.end()) continue;
    pieces.push_back({e.offset(), e.length(), static_cast<uint8_t*>(it->second.data), &e, 0, &it->second, {}, 0});
  }
  FCK_ASSIGN_OR_RETURN(IoResult io, StreamPieces(sm, pieces, backends, step, verify));
  if (blobs) {
    blobs->clear();
    for (const auto& b : m.blobs()) (*blobs)[b.key()] = b.data();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  FCK_LOG(kInfo, "loaded step ", step, " from ", c_.root, " into caller buffers: ", HumanBytes(io.bytes), " in ",
          absl::StrFormat("%.2f", secs), " s", io.used_io_uring ? ", io_uring" : ", pread",
          io.used_direct_io ? " O_DIRECT" : "");
  return step;
}

absl::StatusOr<std::vector<Loader::StorageManifest>> Loader::EveryRankOf(int64_t step) const {
  FCK_ASSIGN_OR_RETURN(pb::CommitRecord commit, ReadCommit(c_.root, step));
  std::vector<StorageManifest> out;
  for (int r = 0; r < commit.world_size(); ++r) {
    FCK_ASSIGN_OR_RETURN(StorageManifest sm, ManifestOfRank(commit, step, r, /*resized=*/false));
    FCK_RETURN_IF_ERROR(CheckSizes(sm));
    out.push_back(std::move(sm));
  }
  return out;
}

Loader::GlobalIndex Loader::IndexOf(const std::vector<StorageManifest>& ranks) {
  GlobalIndex index;
  for (size_t r = 0; r < ranks.size(); ++r)
    for (const auto& e : ranks[r].manifest.tensors()) {
      if (!e.storage_key().empty()) continue;
      if (e.replicated()) {
        if (r == 0) index[e.key()].push_back({-1, &e});
        continue;
      }
      index[e.key()].push_back({static_cast<int>(r), &e});
    }
  return index;
}

absl::StatusOr<StepDescription> Loader::DescribeGlobal(int64_t step) const {
  FCK_ASSIGN_OR_RETURN(std::vector<StorageManifest> ranks, EveryRankOf(step));
  const GlobalIndex index = IndexOf(ranks);
  StepDescription d;
  d.step = step;
  d.source = Source::kStorage;
  for (const auto& [key, holders] : index)
    for (const auto& [rank, e] : holders) {
      TensorInfo t = TensorInfoOf(*e);
      t.held_by = rank;
      d.tensors.push_back(std::move(t));
    }
  for (const auto& b : ranks[0].manifest.blobs()) d.blobs[b.key()] = b.data();
  for (const StorageManifest& sm : ranks) {
    auto& blobs = d.rank_blobs.emplace_back();
    for (const auto& b : sm.manifest.blobs()) blobs[b.key()] = b.data();
  }
  return d;
}

absl::Status Loader::IntoFromGlobal(int64_t step, const std::map<std::string, MutableTensorRef>& dest,
                                    bool verify) const {
  auto t0 = std::chrono::steady_clock::now();
  FCK_ASSIGN_OR_RETURN(std::vector<StorageManifest> ranks, EveryRankOf(step));
  const GlobalIndex index = IndexOf(ranks);
  FCK_ASSIGN_OR_RETURN(std::set<DeviceBackend*> backends, DeviceUploads::Resolve(dest));
  // Every key is found, held once (or replicated, or as shards that cover
  // the box asked for), and fits, before a byte is written.
  std::vector<std::vector<Piece>> per_rank(ranks.size());
  std::vector<std::string> missing, ambiguous, mismatched, uncovered;
  auto dims = [](const auto& v) { return absl::StrCat("[", absl::StrJoin(v, ","), "]"); };
  for (const auto& [key, d] : dest) {
    auto it = index.find(key);
    if (it == index.end()) {
      missing.push_back(key);
      continue;
    }
    const auto& holders = it->second;
    const pb::TensorEntry& e0 = *holders.front().second;
    const bool sharded = e0.global_shape_size() > 0;
    if (!sharded && holders.size() > 1) {
      std::vector<int> ranks_of;
      for (const auto& h : holders) ranks_of.push_back(h.first);
      ambiguous.push_back(absl::StrCat(key, " (held by ranks ", absl::StrJoin(ranks_of, ","), ")"));
      continue;
    }
    // The global tensor: the shards' global shape, or the one saved tensor.
    const std::vector<int64_t> global = sharded ? std::vector<int64_t>(e0.global_shape().begin(), e0.global_shape().end())
                                                : std::vector<int64_t>(e0.shape().begin(), e0.shape().end());
    Box want;
    want.shape = d.shape;
    want.offset = d.global_offset.empty() ? std::vector<int64_t>(d.shape.size(), 0) : d.global_offset;
    const std::vector<int64_t>& want_global = d.global_shape.empty() ? d.shape : d.global_shape;
    bool inside = want_global == global && want.offset.size() == global.size() && want.shape.size() == global.size();
    for (size_t k = 0; inside && k < global.size(); ++k)
      inside = want.offset[k] >= 0 && want.shape[k] >= 0 && want.offset[k] + want.shape[k] <= global[k];
    if (!inside || e0.dtype() != d.dtype || Volume(want) * e0.element_size() != d.nbytes) {
      mismatched.push_back(absl::StrCat(key, " (saved ", e0.dtype(), " ", dims(global), sharded ? " in shards" : "",
                                        ", target ", d.dtype, " ",
                                        d.global_shape.empty() ? dims(d.shape)
                                                               : absl::StrCat(BoxString(want), " of ", dims(want_global)),
                                        ")"));
      continue;
    }
    // The chunks that meet the box; equal copies of one shard read once.
    uint64_t covered = 0;
    std::vector<Box> taken;
    for (const auto& [rank, e] : holders) {
      const Box have = BoxOf(*e);
      std::optional<Box> common = Intersection(have, want);
      if (!common || std::find(taken.begin(), taken.end(), have) != taken.end()) continue;
      taken.push_back(have);
      covered += Volume(*common);
      Piece p{e->offset(), e->length(), static_cast<uint8_t*>(d.data), e, 0, &d, {}, 0};
      if (!(have == want)) p.runs = RunsOf(have, want, *common, e->element_size());
      per_rank[rank < 0 ? 0 : rank].push_back(std::move(p));
    }
    if (covered != Volume(want)) {
      std::vector<std::string> boxes;
      for (const auto& [rank, e] : holders)
        if (boxes.size() < 8) boxes.push_back(absl::StrCat("rank ", rank, " ", BoxString(BoxOf(*e))));
      uncovered.push_back(absl::StrCat(key, " ", BoxString(want), ": ", Volume(want) - covered, " of ", Volume(want),
                                       " elements in no saved shard (saved: ", absl::StrJoin(boxes, ", "),
                                       holders.size() > boxes.size() ? ", ..." : "", ")"));
    }
  }
  if (!missing.empty() || !ambiguous.empty() || !mismatched.empty() || !uncovered.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot load step ", step, " of ", c_.root, " (saved by ", ranks.size(), " ranks) into the given buffers: ",
        "missing keys [", absl::StrJoin(missing, ", "), "], keys each rank holds its own of (per-rank state: load it "
        "with the world size it was saved with) [", absl::StrJoin(ambiguous, "; "), "], mismatched [",
        absl::StrJoin(mismatched, "; "), "]",
        uncovered.empty() ? std::string()
                          : absl::StrCat(", boxes the saved shards do not cover [", absl::StrJoin(uncovered, "; "), "]")));
  uint64_t bytes = 0;
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (per_rank[r].empty()) continue;
    FCK_ASSIGN_OR_RETURN(IoResult io, StreamPieces(ranks[r], per_rank[r], backends, step, verify));
    bytes += io.bytes;
  }
  FCK_LOG(kInfo, "loaded ", dest.size(), " tensors of step ", step, " (saved by ", ranks.size(), " ranks) from ",
          c_.root, ": ", HumanBytes(bytes), " read in ",
          absl::StrFormat("%.2f", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()), " s");
  return absl::OkStatus();
}

std::vector<StepInfo> Loader::Steps(const SharedSegment* seg) const {
  std::map<int64_t, StepInfo> by_step;
  for (const auto& l : ListSteps(c_.root)) {
    StepInfo& s = by_step[l.step];
    s.step = l.step;
    s.committed = l.committed;
    s.bytes = l.bytes;
    s.world_size = l.world_size;
  }
  if (seg) {
    for (int i = 0; i < seg->num_slots(); ++i) {
      SlotView v;
      if (!seg->ReadSlot(i, &v) || !UsableFromMemory(*seg, v)) continue;
      StepInfo& s = by_step[v.step];
      s.step = v.step;
      s.in_memory = true;
      if (!s.committed) s.bytes = v.data_bytes;
    }
  }
  std::vector<StepInfo> out;
  for (auto& [k, v] : by_step) out.push_back(v);
  return out;
}

}  // namespace flashckpt
