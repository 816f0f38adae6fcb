#include "common/status.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace flashckpt {

absl::StatusCode StatusCodeForErrno(int err) {
  switch (err) {
    case ENOSPC: case EDQUOT: case ENOMEM: case EMFILE: case ENFILE:
      return absl::StatusCode::kResourceExhausted;
    case ENOENT: return absl::StatusCode::kNotFound;
    case EACCES: case EPERM: case EROFS: return absl::StatusCode::kPermissionDenied;
    case EEXIST: return absl::StatusCode::kAlreadyExists;
    case EINVAL: case ENOTDIR: case EISDIR: case ENAMETOOLONG:
      return absl::StatusCode::kInvalidArgument;
    case ETIMEDOUT: return absl::StatusCode::kDeadlineExceeded;
    case EAGAIN: case EINTR: case EBUSY: return absl::StatusCode::kUnavailable;
    default: return absl::StatusCode::kInternal;
  }
}

absl::Status ErrnoStatus(absl::string_view op, absl::string_view path, int err,
                         int64_t offset) {
  std::string msg = absl::StrCat(op, " ", path);
  if (offset >= 0) absl::StrAppend(&msg, " at offset ", offset);
  absl::StrAppend(&msg, ": ", std::strerror(err), " (errno ", err, ")");
  return absl::Status(StatusCodeForErrno(err), msg);
}

absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

void ThrowStatus(const absl::Status& status) {
  ErrorCode code = ErrorCode::kInternal;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: code = ErrorCode::kInvalidArgument; break;
    case absl::StatusCode::kNotFound: code = ErrorCode::kNotFound; break;
    case absl::StatusCode::kDataLoss: code = ErrorCode::kCorruption; break;
    case absl::StatusCode::kResourceExhausted: code = ErrorCode::kResourceExhausted; break;
    case absl::StatusCode::kPermissionDenied: code = ErrorCode::kPermissionDenied; break;
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAlreadyExists: code = ErrorCode::kFailedPrecondition; break;
    case absl::StatusCode::kDeadlineExceeded: code = ErrorCode::kDeadlineExceeded; break;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kUnimplemented: code = ErrorCode::kUnavailable; break;
    default: break;
  }
  throw Error(code, std::string(status.message()));
}

absl::Status StatusFromError(const Error& e) {
  absl::StatusCode c = absl::StatusCode::kInternal;
  switch (e.code()) {
    case ErrorCode::kInvalidArgument: c = absl::StatusCode::kInvalidArgument; break;
    case ErrorCode::kNotFound: c = absl::StatusCode::kNotFound; break;
    case ErrorCode::kCorruption: c = absl::StatusCode::kDataLoss; break;
    case ErrorCode::kResourceExhausted: c = absl::StatusCode::kResourceExhausted; break;
    case ErrorCode::kPermissionDenied: c = absl::StatusCode::kPermissionDenied; break;
    case ErrorCode::kFailedPrecondition: c = absl::StatusCode::kFailedPrecondition; break;
    case ErrorCode::kDeadlineExceeded: c = absl::StatusCode::kDeadlineExceeded; break;
    case ErrorCode::kUnavailable: c = absl::StatusCode::kUnavailable; break;
    case ErrorCode::kInternal: break;
  }
  return absl::Status(c, e.what());
}

}  // namespace flashckpt
