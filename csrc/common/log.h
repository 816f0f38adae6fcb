// Minimal leveled logging to stderr: "[flashckpt I 12:00:01.123 rank0] message".
// Level from $FLASHCKPT_LOG (debug, info, warn, error; default info).
#pragma once

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace flashckpt {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

bool LogEnabled(LogLevel level);
void LogLine(LogLevel level, const std::string& message);
void SetLogPrefix(const std::string& prefix);  // e.g. "rank0"

}  // namespace flashckpt

#define FCK_LOG(level, ...)                                                   \
  do {                                                                        \
    if (::flashckpt::LogEnabled(::flashckpt::LogLevel::level))                \
      ::flashckpt::LogLine(::flashckpt::LogLevel::level, ::absl::StrCat(__VA_ARGS__)); \
  } while (0)
