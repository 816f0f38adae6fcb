// A fault-injecting file layer for tests (after RocksDB's
// FaultInjectionTestFS), installed under the storage layer through
// storage/file_ops.h. Tracks what is durable under one root:
//   - a file's content is durable as of its last fsync/fdatasync;
//   - a directory entry (a file created, renamed, unlinked; a directory made
//     or removed) is durable once its parent directory is fsynced.
// PowerLoss() undoes everything that was not durable: entry changes in
// reverse order, then file contents back to their last synced bytes (a file
// never synced comes back empty). Errors: fail chosen operations with an
// errno, shorten every write, refuse O_DIRECT or io_uring, or "crash" at the
// k-th operation (it and every later one fail with EIO, as if the machine
// were off, until PowerLoss()).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "storage/file_ops.h"

namespace flashckpt::testing {

class FaultFs : public fileops::Interceptor {
 public:
  // Installs itself for paths under `root` (which exists, and whose present
  // contents count as durable); uninstalls in the destructor.
  explicit FaultFs(std::string root);
  ~FaultFs() override;

  // The next `times` operations `op` on a path containing `path_part` fail with `err`.
  void FailNext(fileops::Op op, std::string path_part, int err, int times = 1);
  void ShortWrites(bool on) { short_writes_ = on; }
  void RefuseDirectIo(bool on) { refuse_direct_ = on; }
  void RefuseIoUringSetup(bool on) { refuse_uring_ = on; }
  // The k-th operation from now (0: the next) and all after it fail with EIO.
  void CrashAtOp(int64_t k);
  bool crashed() const { return crashed_.load(); }
  int64_t ops() const { return ops_.load(); }
  // Undoes what was not durable; afterwards everything present counts as durable.
  void PowerLoss();

  // What the bulk writes of rank-<r>.data files did since construction.
  bool saw_direct_open() const { return saw_direct_.load(); }
  bool all_writes_fixed() const { return writes_ > 0 && writes_ == fixed_writes_; }
  int max_in_flight() const { return max_in_flight_.load(); }
  int64_t writes() const { return writes_.load(); }

  int Before(fileops::Op op, const std::string& path) override;
  void After(fileops::Op op, const std::string& path, const std::string& to) override;
  void Submitted(const std::string& path, uint64_t offset, uint64_t len, bool fixed, int in_flight) override;
  int64_t Completed(const std::string& path, uint64_t offset, int64_t res) override;
  bool RefuseIoUring() override { return refuse_uring_; }

 private:
  struct EntryOp {
    fileops::Op op;
    std::string path, to, parent;
    // What an undo brings back: the synced content of a file unlinked or
    // overwritten by a rename, or every synced file under a removed directory.
    std::map<std::string, std::optional<std::string>> saved;
    std::vector<std::string> saved_dirs;
  };
  struct Failure {
    fileops::Op op;
    std::string part;
    int err;
    int times;
  };
  bool Under(const std::string& path) const;
  static std::string Parent(const std::string& path);
  void Baseline();  // everything present is durable

  std::string root_;
  std::mutex mu_;
  std::map<std::string, std::optional<std::string>> synced_;  // file -> content at its last fsync
  std::vector<EntryOp> pending_;                               // entry changes not yet durable
  std::vector<Failure> failures_;
  std::atomic<bool> short_writes_{false}, refuse_direct_{false}, refuse_uring_{false};
  std::atomic<bool> crashed_{false};
  std::atomic<int64_t> ops_{0}, crash_at_{-1};
  std::atomic<bool> saw_direct_{false};
  std::atomic<int64_t> writes_{0}, fixed_writes_{0};
  std::atomic<int> max_in_flight_{0};
};

}  // namespace flashckpt::testing
