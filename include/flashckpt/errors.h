// Exceptions thrown at the edge of the C++ API. Inside the library, I/O and
// network code returns absl::Status; the public Checkpointer turns a failed
// status into one of these, keeping the message (which names the path, key,
// step or host:port that failed).
#pragma once

#include <stdexcept>
#include <string>

namespace flashckpt {

enum class ErrorCode {
  kInvalidArgument,   // bad option, wrong keys/shapes/dtypes on load
  kNotFound,          // no such step, no committed step, missing file
  kCorruption,        // checksum mismatch, truncated file, bad record
  kResourceExhausted, // disk full, /dev/shm too small, memlock limit
  kPermissionDenied,
  kFailedPrecondition,// directory of a newer format, locked by another writer
  kDeadlineExceeded,
  kUnavailable,       // CUDA requested but no GPU / not built with CUDA
  kInternal,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace flashckpt
