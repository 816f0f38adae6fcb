// The storage layout of a checkpoint directory and its records.
//
//   <dir>/step-<N>/rank-<r>.data       tensor bytes of rank r (the slot's data region; with
//                                      replicated state, its private part only)
//   <dir>/step-<N>/rank-<r>.replica    rank r's share of the replicated tensors, stored once
//                                      over all ranks (Manifest.replicated_bytes)
//   <dir>/step-<N>/rank-<r>.manifest   framed Manifest
//   <dir>/step-<N>/rank-<r>.durable    framed RankRecord: rank r's files are on disk
//   <dir>/step-<N>/COMMIT              framed CommitRecord: the step is complete
//   <dir>/latest                       "<N>\n", replaced atomically after each commit
//   <dir>/FORMAT                       format version of the directory
//
// A record is framed as "FCKREC01", u32 kind, u32 format version, u64 length,
// u32 crc32c of the payload, then the Protobuf payload, so a torn or foreign
// file is told apart from a valid one.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "flashckpt.pb.h"

namespace flashckpt {

enum class RecordKind : uint32_t { kManifest = 1, kRankRecord = 2, kCommit = 3 };

std::string StepDir(const std::string& root, int64_t step);
std::string RankDataName(int rank);
std::string RankManifestName(int rank);
std::string RankReplicaName(int rank);
std::string RankDurableName(int rank);
inline constexpr const char* kCommitName = "COMMIT";
inline constexpr const char* kLatestName = "latest";

std::string FrameRecord(RecordKind kind, const google::protobuf::MessageLite& msg);
// Parses and checks a framed record; errors name `path`.
absl::Status ParseRecord(const std::string& bytes, RecordKind kind, const std::string& path,
                         google::protobuf::MessageLite* msg);

absl::StatusOr<pb::CommitRecord> ReadCommit(const std::string& root, int64_t step);
absl::StatusOr<pb::Manifest> ReadManifest(const std::string& root, int64_t step, int rank);

struct StepListing {
  int64_t step = -1;
  bool committed = false;   // COMMIT present and valid
  uint64_t bytes = 0;       // from COMMIT, or the files on disk
  int world_size = 0;
  std::vector<int> ranks;   // ranks with a .data file
};
// Every step directory, ascending.
std::vector<StepListing> ListSteps(const std::string& root);
// The step the `latest` file names, if it is committed (no scan).
std::optional<int64_t> NamedLatest(const std::string& root);
// The newest step with a valid COMMIT (`latest` first, then a scan).
std::optional<int64_t> LatestCommitted(const std::string& root);
// Committed steps, descending.
std::vector<int64_t> CommittedSteps(const std::string& root);

// Creates the directory (and FORMAT) or checks an existing one: a file in
// the way, no permission, or a newer format version is a clear error.
absl::Status PrepareDirectory(const std::string& root);
// Removes temp files and step directories without COMMIT that are older than
// the newest committed step (leftovers of crashed saves).
void CleanLeftovers(const std::string& root);
// Removes step directories without COMMIT that hold nothing but failure
// markers (rank-<r>.failed): the remains of persists that failed, which no
// rank will complete. At the end of a job, when no rank waits on a marker.
// Returns the steps removed.
std::vector<int64_t> RemoveFailedSteps(const std::string& root);
// Keeps the newest `keep_last` committed steps; deletes older steps.
void ApplyRetention(const std::string& root, int keep_last);
absl::Status RemoveTree(const std::string& path);

}  // namespace flashckpt
