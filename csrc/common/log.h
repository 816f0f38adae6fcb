// Leveled logging of the core (FCK_LOG); sinks and levels: flashckpt/log.h.
#pragma once

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "flashckpt/log.h"

namespace flashckpt {

bool LogEnabled(LogLevel level);
void LogLine(LogLevel level, const std::string& message);
void SetLogPrefix(const std::string& prefix);  // e.g. "rank0"

}  // namespace flashckpt

#define FCK_LOG(level, ...)                                                   \
  do {                                                                        \
    if (::flashckpt::LogEnabled(::flashckpt::LogLevel::level))                \
      ::flashckpt::LogLine(::flashckpt::LogLevel::level, ::absl::StrCat(__VA_ARGS__)); \
  } while (0)
