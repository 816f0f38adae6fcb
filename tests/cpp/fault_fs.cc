#include "fault_fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"

namespace flashckpt::testing {
namespace fs = std::filesystem;
using fileops::Op;

namespace {

std::optional<std::string> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::nullopt;
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

FaultFs::FaultFs(std::string root) : root_(fs::absolute(root).lexically_normal().string()) {
  while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
  Baseline();
  fileops::SetInterceptor(this);
}

FaultFs::~FaultFs() { fileops::SetInterceptor(nullptr); }

void FaultFs::Baseline() {
  std::lock_guard<std::mutex> l(mu_);
  synced_.clear();
  pending_.clear();
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(root_, ec); it != fs::recursive_directory_iterator(); ++it)
    if (it->is_regular_file()) synced_[it->path().string()] = ReadAll(it->path().string());
}

bool FaultFs::Under(const std::string& path) const {
  return path.size() > root_.size() && path.compare(0, root_.size(), root_) == 0 && path[root_.size()] == '/';
}

std::string FaultFs::Parent(const std::string& path) { return fs::path(path).parent_path().string(); }

void FaultFs::FailNext(Op op, std::string path_part, int err, int times) {
  std::lock_guard<std::mutex> l(mu_);
  failures_.push_back({op, std::move(path_part), err, times});
}

void FaultFs::CrashAtOp(int64_t k) {
  crash_at_ = ops_.load() + k;
  crashed_ = false;
}

int FaultFs::Before(Op op, const std::string& path) {
  if (!Under(path) && !(op == Op::kFsyncDir && path == root_)) return 0;
  const int64_t n = ops_++;
  if (crashed_ || (crash_at_ >= 0 && n >= crash_at_)) {
    crashed_ = true;
    return EIO;
  }
  if (op == Op::kOpenDirect) {
    if (refuse_direct_) return EINVAL;
    saw_direct_ = true;
  }
  std::lock_guard<std::mutex> l(mu_);
  for (auto& f : failures_) {
    if (f.times > 0 && f.op == op && path.find(f.part) != std::string::npos) {
      --f.times;
      return f.err;
    }
  }
  return 0;
}

void FaultFs::After(Op op, const std::string& path, const std::string& to) {
  if (!Under(path) && path != root_) return;
  std::lock_guard<std::mutex> l(mu_);
  switch (op) {
    case Op::kCreate:
    case Op::kMkdir:
      pending_.push_back({op, path, "", Parent(path), {}, {}});
      break;
    case Op::kRename: {
      EntryOp e{op, path, to, Parent(to), {}, {}};
      if (synced_.count(to)) e.saved[to] = synced_[to];  // the file it replaced
      pending_.push_back(std::move(e));
      // The content travels with the inode.
      if (synced_.count(path)) {
        synced_[to] = synced_[path];
        synced_.erase(path);
      } else {
        synced_.erase(to);
      }
      break;
    }
    case Op::kUnlink: {
      EntryOp e{op, path, "", Parent(path), {}, {}};
      if (synced_.count(path)) e.saved[path] = synced_[path];
      synced_.erase(path);
      pending_.push_back(std::move(e));
      break;
    }
    case Op::kRemoveAll: {
      // Called after the removal: what it removed is what synced_ held under it.
      EntryOp e{op, path, "", Parent(path), {}, {}};
      for (auto it = synced_.begin(); it != synced_.end();) {
        if (it->first.compare(0, path.size() + 1, path + "/") == 0) {
          e.saved[it->first] = it->second;
          it = synced_.erase(it);
        } else {
          ++it;
        }
      }
      e.saved_dirs.push_back(path);
      for (auto& [f, content] : e.saved)
        for (std::string d = Parent(f); d.size() > path.size(); d = Parent(d)) e.saved_dirs.push_back(d);
      pending_.push_back(std::move(e));
      break;
    }
    case Op::kFsync:
      synced_[path] = ReadAll(path);
      break;
    case Op::kFsyncDir:
      std::erase_if(pending_, [&](const EntryOp& e) { return e.parent == path; });
      break;
    default:
      break;
  }
}

void FaultFs::Submitted(const std::string& path, uint64_t, uint64_t, bool fixed, int in_flight) {
  // The bulk data files only; manifests and records are small pwrites.
  if (!Under(path) || !absl::EndsWith(path, ".data")) return;
  ++writes_;
  if (fixed) ++fixed_writes_;
  int m = max_in_flight_.load();
  while (in_flight > m && !max_in_flight_.compare_exchange_weak(m, in_flight)) {
  }
}

int64_t FaultFs::Completed(const std::string& path, uint64_t, int64_t res) {
  if (!Under(path) || !short_writes_ || res <= 4096) return res;
  return std::max<int64_t>(4096, (res / 2) & ~int64_t{4095});  // O_DIRECT keeps its alignment
}

void FaultFs::PowerLoss() {
  std::lock_guard<std::mutex> l(mu_);
  std::error_code ec;
  // Entry changes that were not durable, newest first.
  for (auto it = pending_.rbegin(); it != pending_.rend(); ++it) {
    const EntryOp& e = *it;
    switch (e.op) {
      case Op::kCreate:
        fs::remove(e.path, ec);
        synced_.erase(e.path);
        break;
      case Op::kMkdir:
        fs::remove_all(e.path, ec);
        std::erase_if(synced_, [&](const auto& kv) { return kv.first.compare(0, e.path.size() + 1, e.path + "/") == 0; });
        break;
      case Op::kRename:
        fs::rename(e.to, e.path, ec);
        if (synced_.count(e.to)) {
          synced_[e.path] = synced_[e.to];
          synced_.erase(e.to);
        }
        for (auto& [p, content] : e.saved) {
          if (content) WriteAll(p, *content);
          synced_[p] = content;
        }
        break;
      case Op::kUnlink:
      case Op::kRemoveAll:
        for (const auto& d : e.saved_dirs) fs::create_directories(d, ec);
        for (auto& [p, content] : e.saved) {
          fs::create_directories(Parent(p), ec);
          WriteAll(p, content.value_or(""));
          synced_[p] = content;
        }
        break;
      default:
        break;
    }
  }
  pending_.clear();
  // Contents back to their last synced bytes.
  for (auto it = fs::recursive_directory_iterator(root_, ec); it != fs::recursive_directory_iterator(); ++it) {
    if (!it->is_regular_file()) continue;
    const std::string p = it->path().string();
    auto s = synced_.find(p);
    const std::string want = s == synced_.end() || !s->second ? std::string() : *s->second;
    if (ReadAll(p) != want) WriteAll(p, want);
  }
  crashed_ = false;
  crash_at_ = -1;
  failures_.clear();
}

}  // namespace flashckpt::testing
