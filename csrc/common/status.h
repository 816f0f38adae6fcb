// Status helpers for I/O code: one place that turns errno into a status that
// names the operation, the path and the offset.
#pragma once

#include <cerrno>
#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "flashckpt/errors.h"

namespace flashckpt {

// "open /ckpt/step-5/rank-0.data: No space left on device (errno 28)"
absl::Status ErrnoStatus(absl::string_view op, absl::string_view path, int err,
                         int64_t offset = -1);
absl::StatusCode StatusCodeForErrno(int err);

// Converts a status into the public exception (API edge only).
[[noreturn]] void ThrowStatus(const absl::Status& status);
inline void ThrowIfError(const absl::Status& status) {
  if (!status.ok()) ThrowStatus(status);
}
template <typename T>
T ValueOrThrow(absl::StatusOr<T>&& v) {
  if (!v.ok()) ThrowStatus(v.status());
  return std::move(*v);
}
absl::Status StatusFromError(const Error& e);

// Prefixes the message with context, keeping the code.
absl::Status Annotate(const absl::Status& s, absl::string_view context);

}  // namespace flashckpt

#define FCK_CONCAT_INNER(a, b) a##b
#define FCK_CONCAT(a, b) FCK_CONCAT_INNER(a, b)

#define FCK_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::absl::Status _fck_st = (expr);              \
    if (!_fck_st.ok()) return _fck_st;            \
  } while (0)

#define FCK_ASSIGN_OR_RETURN(lhs, expr) \
  FCK_ASSIGN_OR_RETURN_IMPL(FCK_CONCAT(_fck_sor_, __LINE__), lhs, expr)
#define FCK_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(*tmp)
