#include "storage/commit.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include <algorithm>
#include <chrono>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/crash_point.h"
#include "common/status.h"
#include "storage/file_ops.h"
#include "snapshot/shard.h"
#include "snapshot/snapshot.h"
#include "storage/layout.h"
#include "storage/uring_io.h"

namespace flashckpt {

namespace {
std::string FailedName(int rank) { return absl::StrCat("rank-", rank, ".failed"); }
}  // namespace

void ReportPersistFailure(const std::string& root, int64_t step, int rank, const std::string& why) {
  std::string dir = StepDir(root, step);
  fileops::MakeDirs(dir);
  WriteFileAtomic(absl::StrCat(dir, "/", FailedName(rank)), why + "\n").IgnoreError();
}

void ClearPersistFailure(const std::string& root, int64_t step, int rank) {
  fileops::Unlink(absl::StrCat(StepDir(root, step), "/", FailedName(rank)));
}

std::optional<std::string> PersistFailure(const std::string& root, int64_t step, int rank) {
  auto failed = ReadSmallFile(absl::StrCat(StepDir(root, step), "/", FailedName(rank)), 1 << 16);
  if (!failed.ok()) return std::nullopt;
  return std::string(absl::StripTrailingAsciiWhitespace(*failed));
}

void ForgetUncommittedRecords(const std::string& root, int rank) {
  for (const auto& st : ListSteps(root)) {
    if (st.committed) continue;
    const std::string dir = StepDir(root, st.step);
    fileops::Unlink(absl::StrCat(dir, "/", RankDurableName(rank)));
    fileops::Unlink(absl::StrCat(dir, "/", FailedName(rank)));
  }
}

absl::Status WriteRankRecordFile(const std::string& root, int64_t step, int rank, const std::string& record) {
  return WriteFileAtomic(absl::StrCat(StepDir(root, step), "/", RankDurableName(rank)), record);
}

absl::Status FileCommitBarrier::RankDurable(int64_t step, int rank, const std::string& record) {
  return WriteRankRecordFile(root_, step, rank, record);
}

void FileCommitBarrier::ReportFailure(int64_t step, int rank, const std::string& why) {
  ReportPersistFailure(root_, step, rank, why);
}

absl::Status FileCommitBarrier::WaitCommitted(int64_t step, std::chrono::milliseconds timeout,
                                              const std::function<bool()>& cancelled) {
  return WaitForCommit(root_, step, timeout, [&] { return (cancelled && cancelled()) || (cancelled_ && cancelled_()); });
}

std::string FileCommitBarrier::Describe() const { return absl::StrCat("rank records in ", root_); }

absl::StatusOr<std::vector<std::string>> FileCommitBarrier::WaitAll(int64_t step, int world_size,
                                                                    std::chrono::milliseconds timeout) {
  auto t0 = std::chrono::steady_clock::now();
  auto deadline = t0 + timeout;
  std::string dir = StepDir(root_, step);
  std::vector<std::string> records(static_cast<size_t>(world_size));
  std::vector<bool> have(static_cast<size_t>(world_size), false);
  int count = 0;
  auto sleep = std::chrono::microseconds(200);
  for (;;) {
    for (int r = 0; r < world_size; ++r) {
      if (have[r]) continue;
      std::string path = absl::StrCat(dir, "/", RankDurableName(r));
      auto bytes = ReadSmallFile(path);
      if (!bytes.ok()) continue;
      records[r] = std::move(*bytes);
      have[r] = true;
      ++count;
    }
    if (count == world_size) return records;
    if (cancelled_ && cancelled_())
      return absl::CancelledError(absl::StrCat("commit of step ", step, " in ", root_,
                                               " abandoned: a restart made it obsolete"));
    for (int r = 0; r < world_size; ++r) {
      if (have[r]) continue;
      if (auto why = PersistFailure(root_, step, r))
        return absl::AbortedError(absl::StrCat("commit of step ", step, " in ", root_, " abandoned: rank ", r,
                                               " did not persist it: ", *why));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      std::vector<int> missing;
      for (int r = 0; r < world_size; ++r) if (!have[r]) missing.push_back(r);
      return absl::DeadlineExceededError(
          absl::StrCat("commit of step ", step, " in ", root_, ": ", count, "/", world_size, " ranks durable after ",
                       std::chrono::duration_cast<std::chrono::seconds>(timeout).count(), " s; missing ranks ",
                       absl::StrJoin(missing, ",")));
    }
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(20000));
  }
}

absl::Status WriteCommit(const std::string& root, int64_t step, int world_size,
                         const std::vector<std::string>& rank_records) {
  std::string dir = StepDir(root, step);
  pb::CommitRecord commit;
  commit.set_format_version(kFormatVersion);
  commit.set_step(step);
  commit.set_world_size(world_size);
  std::set<int> seen;
  uint64_t total = 0;
  for (size_t i = 0; i < rank_records.size(); ++i) {
    pb::RankRecord rec;
    std::string where = absl::StrCat(dir, "/", RankDurableName(static_cast<int>(i)));
    FCK_RETURN_IF_ERROR(ParseRecord(rank_records[i], RecordKind::kRankRecord, where, &rec));
    if (rec.step() != step || rec.world_size() != world_size || !seen.insert(rec.rank()).second)
      return absl::DataLossError(absl::StrCat(where, ": record of rank ", rec.rank(), " step ", rec.step(),
                                              " world size ", rec.world_size(), " does not belong to step ",
                                              step, " of world size ", world_size));
    for (const auto& f : rec.files()) {
      *commit.add_files() = f;
      total += f.size();
    }
  }
  commit.set_total_bytes(total);
  commit.set_committed_unix_ns(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch()).count());
  CrashPoint("commit: before COMMIT");
  FCK_RETURN_IF_ERROR(WriteFileAtomic(absl::StrCat(dir, "/", kCommitName), FrameRecord(RecordKind::kCommit, commit)));
  CrashPoint("commit: before latest");
  // `latest` names the newest committed step: the highest step number (as
  // load(), retention and `flashckpt ls` count), not the last one committed.
  // It holds that already (this function keeps it so); the step it names is
  // kept when it is higher and still committed.
  const int64_t newest = std::max(step, NamedLatest(root).value_or(step));
  FCK_RETURN_IF_ERROR(WriteFileAtomic(absl::StrCat(root, "/", kLatestName), absl::StrCat(newest, "\n")));
  CrashPoint("commit: after latest");
  return absl::OkStatus();
}

namespace {
std::string Shape(const pb::TensorEntry& e) { return absl::StrCat(e.dtype(), " [", absl::StrJoin(e.shape(), ","), "]"); }

std::vector<const pb::TensorEntry*> ReplicatedEntries(const pb::Manifest& m) {
  std::vector<const pb::TensorEntry*> out;
  for (const auto& e : m.tensors())
    if (e.replicated() && e.storage_key().empty()) out.push_back(&e);
  return out;
}

// The keys of `a` missing from `b`, at most a few.
std::string Missing(const std::vector<const pb::TensorEntry*>& a, const std::vector<const pb::TensorEntry*>& b) {
  std::set<std::string> in_b;
  for (const auto* e : b) in_b.insert(e->key());
  std::vector<std::string> out;
  for (const auto* e : a)
    if (!in_b.count(e->key()) && out.size() < 5) out.push_back(e->key());
  return absl::StrJoin(out, ", ");
}
}  // namespace

absl::Status CheckAcrossRanks(const std::string& root, int64_t step, const pb::Manifest& mine,
                              const std::vector<std::string>& rank_records) {
  const int world = static_cast<int>(rank_records.size());
  const std::string dir = StepDir(root, step);
  std::vector<uint64_t> replica_size(rank_records.size(), 0);
  std::vector<bool> has_replica(rank_records.size(), false);
  bool any = mine.replicated_bytes() > 0;
  bool sharded = false;
  for (int r = 0; r < world; ++r) {
    pb::RankRecord rec;
    FCK_RETURN_IF_ERROR(ParseRecord(rank_records[r], RecordKind::kRankRecord,
                                    absl::StrCat(dir, "/", RankDurableName(r)), &rec));
    sharded = sharded || rec.sharded();
    for (const auto& f : rec.files())
      if (f.name() == RankReplicaName(r)) {
        has_replica[r] = true;
        replica_size[r] = f.size();
        any = true;
      }
  }
  if (!any && !sharded) return absl::OkStatus();
  // The other ranks' manifests, read once for both checks.
  std::vector<pb::Manifest> others(world > 0 ? world - 1 : 0);
  std::vector<const pb::Manifest*> manifests{&mine};
  for (int r = 1; r < world; ++r) {
    FCK_ASSIGN_OR_RETURN(others[r - 1], ReadManifest(root, step, r));
    manifests.push_back(&others[r - 1]);
  }
  if (sharded) FCK_RETURN_IF_ERROR(Annotate(CheckShardsAgree(manifests, step), root));
  if (!any) return absl::OkStatus();
  const std::string what = absl::StrCat("commit of step ", step, " in ", root, " refused: ");
  const std::string fix =
      "; only state that is identical on every rank may be saved as replicated (data-parallel model and optimizer; "
      "not state sharded over the ranks, such as ZeroRedundancyOptimizer's)";
  const auto e0 = ReplicatedEntries(mine);
  for (int r = 0; r < world; ++r) {
    const pb::Manifest* m = manifests[r];
    const ReplicaSlice want = ReplicaSliceOf(m->replicated_bytes(), world, r);
    if (m->replicated_bytes() != mine.replicated_bytes() || m->replica_offset() != want.offset ||
        m->replica_length() != want.length || replica_size[r] != want.length || has_replica[r] != (m->replicated_bytes() > 0)) {
      const auto er = ReplicatedEntries(*m);
      return absl::FailedPreconditionError(absl::StrCat(
          what, "rank ", r, " has ", er.size(), " replicated tensors (", m->replicated_bytes(), " bytes), rank 0 has ",
          e0.size(), " (", mine.replicated_bytes(), " bytes)",
          er.size() != e0.size() || !Missing(e0, er).empty() ? absl::StrCat("; only on rank 0: [", Missing(e0, er),
                                                                          "], only on rank ", r, ": [", Missing(er, e0), "]")
                                                           : std::string(),
          fix));
    }
    if (r == 0) continue;
    const auto er = ReplicatedEntries(*m);
    for (size_t i = 0; i < e0.size() && i < er.size(); ++i) {
      const pb::TensorEntry& a = *e0[i];
      const pb::TensorEntry& b = *er[i];
      if (a.key() != b.key())
        return absl::FailedPreconditionError(absl::StrCat(
            what, "the replicated tensors differ between ranks 0 and ", r, ": #", i, " is '", a.key(), "' on rank 0 and '",
            b.key(), "' on rank ", r, " (the same keys in the same order on every rank)", fix));
      if (Shape(a) != Shape(b) || a.length() != b.length())
        return absl::FailedPreconditionError(absl::StrCat(
            what, "replicated tensor '", a.key(), "' is ", Shape(a), " on rank 0 and ", Shape(b), " on rank ", r,
            " (a replicated tensor has one global shape)", fix));
      if (a.offset() != b.offset())
        return absl::FailedPreconditionError(absl::StrCat(what, "replicated tensor '", a.key(), "' lies at offset ",
                                                          a.offset(), " on rank 0 and ", b.offset(), " on rank ", r,
                                                          fix));
      if (a.crc32c() != b.crc32c())
        return absl::FailedPreconditionError(absl::StrCat(
            what, "replicated tensor '", a.key(), "' differs between ranks 0 and ", r, " (crc32c ", absl::Hex(a.crc32c()),
            " vs ", absl::Hex(b.crc32c()), "): its bytes are not the same on every rank", fix));
    }
    if (e0.size() != er.size())
      return absl::FailedPreconditionError(absl::StrCat(what, "rank ", r, " has ", er.size(),
                                                        " replicated tensors, rank 0 has ", e0.size(), "; only on rank 0: [",
                                                        Missing(e0, er), "], only on rank ", r, ": [", Missing(er, e0),
                                                        "]", fix));
  }
  return absl::OkStatus();
}

absl::Status WaitForCommit(const std::string& root, int64_t step, std::chrono::milliseconds timeout,
                           const std::function<bool()>& cancelled) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  auto sleep = std::chrono::microseconds(200);
  for (;;) {
    auto rec = ReadCommit(root, step);
    if (rec.ok()) return absl::OkStatus();
    if (rec.status().code() == absl::StatusCode::kFailedPrecondition) return rec.status();
    if (cancelled && cancelled())
      return absl::CancelledError(absl::StrCat("step ", step, " abandoned: a restart made it obsolete"));
    // Rank 0 writes COMMIT; its marker says it gave the step up.
    if (auto why = PersistFailure(root, step, 0))
      return absl::AbortedError(absl::StrCat("commit of step ", step, " in ", root, " abandoned by rank 0: ", *why));
    if (std::chrono::steady_clock::now() >= deadline)
      return absl::DeadlineExceededError(absl::StrCat("COMMIT of step ", step, " in ", root, " did not appear within ",
                                                      std::chrono::duration_cast<std::chrono::seconds>(timeout).count(),
                                                      " s (is rank 0 running and persisting?)"));
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::microseconds(20000));
  }
}

}  // namespace flashckpt
