#include "storage/layout.h"

#include "storage/file_ops.h"

#include <dirent.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/crc32c.h"
#include "common/log.h"
#include "common/status.h"
#include "flashckpt/types.h"
#include "storage/uring_io.h"

namespace flashckpt {
namespace fs = std::filesystem;

namespace {
constexpr char kRecordMagic[8] = {'F', 'C', 'K', 'R', 'E', 'C', '0', '1'};
constexpr size_t kFrameHeader = 8 + 4 + 4 + 8 + 4;

template <typename T>
void Put(std::string* s, T v) { s->append(reinterpret_cast<const char*>(&v), sizeof(v)); }
template <typename T>
T Get(const std::string& s, size_t off) { T v; std::memcpy(&v, s.data() + off, sizeof(v)); return v; }

const char* KindName(RecordKind k) {
  switch (k) {
    case RecordKind::kManifest: return "manifest";
    case RecordKind::kRankRecord: return "rank record";
    case RecordKind::kCommit: return "COMMIT record";
  }
  return "record";
}
}  // namespace

std::string StepDir(const std::string& root, int64_t step) { return absl::StrCat(root, "/step-", step); }
std::string RankDataName(int rank) { return absl::StrCat("rank-", rank, ".data"); }
std::string RankManifestName(int rank) { return absl::StrCat("rank-", rank, ".manifest"); }
std::string RankReplicaName(int rank) { return absl::StrCat("rank-", rank, ".replica"); }
std::string RankDurableName(int rank) { return absl::StrCat("rank-", rank, ".durable"); }

std::string FrameRecord(RecordKind kind, const google::protobuf::MessageLite& msg) {
  std::string payload = msg.SerializeAsString();
  std::string out(kRecordMagic, 8);
  Put<uint32_t>(&out, static_cast<uint32_t>(kind));
  Put<uint32_t>(&out, kFormatVersion);
  Put<uint64_t>(&out, payload.size());
  Put<uint32_t>(&out, Crc32c(payload.data(), payload.size()));
  out += payload;
  return out;
}

absl::Status ParseRecord(const std::string& bytes, RecordKind kind, const std::string& path,
                         google::protobuf::MessageLite* msg) {
  if (bytes.size() < kFrameHeader || std::memcmp(bytes.data(), kRecordMagic, 8) != 0)
    return absl::DataLossError(absl::StrCat(path, " is not a flashckpt ", KindName(kind),
                                            " (bad magic or truncated)"));
  uint32_t k = Get<uint32_t>(bytes, 8);
  uint32_t version = Get<uint32_t>(bytes, 12);
  uint64_t len = Get<uint64_t>(bytes, 16);
  uint32_t crc = Get<uint32_t>(bytes, 24);
  if (version > kFormatVersion)
    return absl::FailedPreconditionError(absl::StrCat(
        path, " was written by a newer flashckpt (format ", version, "; this version reads up to ",
        kFormatVersion, "): upgrade flashckpt to read it"));
  if (k != static_cast<uint32_t>(kind))
    return absl::DataLossError(absl::StrCat(path, " holds a record of kind ", k, ", expected a ", KindName(kind)));
  if (bytes.size() - kFrameHeader != len)
    return absl::DataLossError(absl::StrCat(path, " is truncated: ", bytes.size() - kFrameHeader,
                                            " payload bytes, header says ", len));
  if (Crc32c(bytes.data() + kFrameHeader, len) != crc)
    return absl::DataLossError(absl::StrCat(path, ": checksum mismatch in the ", KindName(kind)));
  if (!msg->ParseFromArray(bytes.data() + kFrameHeader, static_cast<int>(len)))
    return absl::DataLossError(absl::StrCat(path, ": cannot parse the ", KindName(kind)));
  return absl::OkStatus();
}

absl::StatusOr<pb::CommitRecord> ReadCommit(const std::string& root, int64_t step) {
  std::string path = absl::StrCat(StepDir(root, step), "/", kCommitName);
  FCK_ASSIGN_OR_RETURN(std::string bytes, ReadSmallFile(path, 64u << 20));
  pb::CommitRecord rec;
  FCK_RETURN_IF_ERROR(ParseRecord(bytes, RecordKind::kCommit, path, &rec));
  if (rec.format_version() > kFormatVersion)
    return absl::FailedPreconditionError(absl::StrCat(path, " has format version ", rec.format_version(),
                                                      ", newer than this flashckpt reads (", kFormatVersion, ")"));
  if (rec.step() != step)
    return absl::DataLossError(absl::StrCat(path, " names step ", rec.step(), ", expected ", step));
  return rec;
}

absl::StatusOr<pb::Manifest> ReadManifest(const std::string& root, int64_t step, int rank) {
  std::string path = absl::StrCat(StepDir(root, step), "/", RankManifestName(rank));
  FCK_ASSIGN_OR_RETURN(std::string bytes, ReadSmallFile(path));
  pb::Manifest m;
  FCK_RETURN_IF_ERROR(ParseRecord(bytes, RecordKind::kManifest, path, &m));
  return m;
}

namespace {
std::optional<int64_t> ParseStepDirName(const std::string& name) {
  absl::string_view v = name;
  if (!absl::ConsumePrefix(&v, "step-")) return std::nullopt;
  int64_t s;
  if (!absl::SimpleAtoi(v, &s) || s < 0) return std::nullopt;
  return s;
}
}  // namespace

std::vector<StepListing> ListSteps(const std::string& root) {
  std::vector<StepListing> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    auto step = ParseStepDirName(e.path().filename().string());
    if (!step || !e.is_directory(ec)) continue;
    StepListing l;
    l.step = *step;
    auto rec = ReadCommit(root, *step);
    if (rec.ok()) {
      l.committed = true;
      l.bytes = rec->total_bytes();
      l.world_size = rec->world_size();
    }
    uint64_t bytes = 0;
    for (const auto& f : fs::directory_iterator(e.path(), ec)) {
      std::string n = f.path().filename().string();
      int r;
      if (absl::StartsWith(n, "rank-") && absl::EndsWith(n, ".data") &&
          absl::SimpleAtoi(n.substr(5, n.size() - 10), &r)) {
        l.ranks.push_back(r);
        bytes += f.file_size(ec);
      }
    }
    std::sort(l.ranks.begin(), l.ranks.end());
    if (!l.committed) l.bytes = bytes;
    out.push_back(std::move(l));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  return out;
}

std::vector<int64_t> CommittedSteps(const std::string& root) {
  std::vector<int64_t> steps;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    auto step = ParseStepDirName(e.path().filename().string());
    if (step && ReadCommit(root, *step).ok()) steps.push_back(*step);
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

std::optional<int64_t> NamedLatest(const std::string& root) {
  auto latest = ReadSmallFile(absl::StrCat(root, "/", kLatestName), 64);
  int64_t step;
  if (latest.ok() && absl::SimpleAtoi(absl::StripAsciiWhitespace(*latest), &step) && ReadCommit(root, step).ok())
    return step;
  return std::nullopt;
}

std::optional<int64_t> LatestCommitted(const std::string& root) {
  if (std::optional<int64_t> step = NamedLatest(root)) {
    // `latest` is replaced after COMMIT, so a newer COMMIT may exist if we
    // crashed in between: the scan below settles it cheaply.
    auto all = CommittedSteps(root);
    if (!all.empty() && all.front() > *step) return all.front();
    return step;
  }
  auto all = CommittedSteps(root);
  if (all.empty()) return std::nullopt;
  return all.front();
}

absl::Status PrepareDirectory(const std::string& root) {
  struct stat st;
  if (::stat(root.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode))
      return absl::InvalidArgumentError(absl::StrCat("checkpoint directory ", root,
                                                     " exists and is not a directory"));
  } else {
    if (fileops::MakeDirs(root) != 0) return ErrnoStatus("create checkpoint directory", root, errno);
  }
  if (::access(root.c_str(), W_OK | X_OK) != 0)
    return ErrnoStatus("write to checkpoint directory", root, errno);
  std::string format_path = absl::StrCat(root, "/FORMAT");
  auto existing = ReadSmallFile(format_path, 4096);
  if (existing.ok()) {
    int v = 0;
    absl::string_view text = absl::StripAsciiWhitespace(*existing);
    absl::ConsumePrefix(&text, "flashckpt format ");
    if (!absl::SimpleAtoi(text, &v))
      return absl::DataLossError(absl::StrCat(format_path, " is unreadable; expected 'flashckpt format N'"));
    if (v > static_cast<int>(kFormatVersion))
      return absl::FailedPreconditionError(absl::StrCat(
          "checkpoint directory ", root, " was written by a newer flashckpt (format ", v,
          "; this version reads up to ", kFormatVersion, "): upgrade flashckpt or use another directory"));
    return absl::OkStatus();
  }
  absl::Status w = WriteFileAtomic(format_path, absl::StrCat("flashckpt format ", kFormatVersion, "\n"));
  // Another rank may have created it at the same moment: fine if it is there now.
  if (!w.ok() && ReadSmallFile(format_path, 4096).ok()) return absl::OkStatus();
  return w;
}

absl::Status RemoveTree(const std::string& path) {
  if (fileops::RemoveAll(path) != 0) return ErrnoStatus("remove", path, errno);
  return absl::OkStatus();
}

namespace {
// A temp file "<name>.tmp-<pid>" belongs to a live writer (another rank
// creating it right now) unless its pid is gone and it is not brand new.
bool AbandonedTempFile(const fs::directory_entry& e) {
  std::string name = e.path().filename().string();
  auto pos = name.rfind(".tmp-");
  if (pos == std::string::npos) return false;
  int pid = 0;
  if (absl::SimpleAtoi(name.substr(pos + 5), &pid) && pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM))
    return false;
  std::error_code ec;
  auto age = fs::file_time_type::clock::now() - fs::last_write_time(e.path(), ec);
  return !ec && age > std::chrono::seconds(60);
}
}  // namespace

void CleanLeftovers(const std::string& root) {
  auto newest = LatestCommitted(root);
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    std::string name = e.path().filename().string();
    if (name.find(".tmp-") != std::string::npos) {
      if (AbandonedTempFile(e)) fileops::Unlink(e.path().string());
      continue;
    }
    auto step = ParseStepDirName(name);
    if (!step) continue;
    bool committed = ReadCommit(root, *step).ok();
    if (!committed && newest && *step < *newest) {
      FCK_LOG(kInfo, "removing ", e.path().string(), ": an unfinished save older than committed step ", *newest);
      RemoveTree(e.path().string()).IgnoreError();
      continue;
    }
    for (const auto& f : fs::directory_iterator(e.path(), ec))
      if (AbandonedTempFile(f)) fileops::Unlink(f.path().string());
  }
}

std::vector<int64_t> RemoveFailedSteps(const std::string& root) {
  std::vector<int64_t> removed;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    auto step = ParseStepDirName(e.path().filename().string());
    if (!step || ReadCommit(root, *step).ok()) continue;
    bool only_markers = true, any = false;
    std::error_code ec2;
    for (const auto& f : fs::directory_iterator(e.path(), ec2)) {
      const std::string n = f.path().filename().string();
      any = true;
      if (!(absl::StartsWith(n, "rank-") && absl::EndsWith(n, ".failed"))) only_markers = false;
    }
    if (ec2 || !only_markers || !any) continue;
    if (RemoveTree(e.path().string()).ok()) removed.push_back(*step);
  }
  std::sort(removed.begin(), removed.end());
  return removed;
}

void ApplyRetention(const std::string& root, int keep_last) {
  auto committed = CommittedSteps(root);
  if (committed.empty()) return;
  int64_t newest = committed.front();
  std::vector<int64_t> doomed;
  if (keep_last > 0 && committed.size() > static_cast<size_t>(keep_last))
    doomed.assign(committed.begin() + keep_last, committed.end());
  // Unfinished steps older than the newest commit will never complete.
  for (const auto& l : ListSteps(root))
    if (!l.committed && l.step < newest) doomed.push_back(l.step);
  for (int64_t s : doomed) {
    // Remove COMMIT first, so a crash halfway leaves an uncommitted step (ignored), never a broken committed one.
    std::string dir = StepDir(root, s);
    fileops::Unlink(absl::StrCat(dir, "/", kCommitName));
    RemoveTree(dir).IgnoreError();
  }
}

}  // namespace flashckpt
