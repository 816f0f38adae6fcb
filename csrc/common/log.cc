#include "common/log.h"

#include <sys/time.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <atomic>
#include <mutex>

namespace flashckpt {
namespace {

LogLevel ThresholdFromEnv() {
  const char* v = std::getenv("FLASHCKPT_LOG");
  if (v == nullptr) return LogLevel::kInfo;
  if (!strcasecmp(v, "debug")) return LogLevel::kDebug;
  if (!strcasecmp(v, "warn") || !strcasecmp(v, "warning")) return LogLevel::kWarn;
  if (!strcasecmp(v, "error")) return LogLevel::kError;
  return LogLevel::kInfo;
}

std::mutex& Mu() { static std::mutex mu; return mu; }
std::string& Prefix() { static std::string p; return p; }

std::atomic<int>& Threshold() {
  static std::atomic<int> t{static_cast<int>(ThresholdFromEnv())};
  return t;
}
std::atomic<LogSink> g_sink{nullptr};

}  // namespace

bool LogEnabled(LogLevel level) {
  return static_cast<int>(level) >= Threshold().load(std::memory_order_relaxed);
}

void SetLogThreshold(LogLevel level) { Threshold().store(static_cast<int>(level)); }
LogLevel LogThreshold() { return static_cast<LogLevel>(Threshold().load()); }
void SetLogSink(LogSink sink) { g_sink.store(sink); }

void SetLogPrefix(const std::string& prefix) {
  std::lock_guard<std::mutex> l(Mu());
  Prefix() = prefix;
}

void LogLine(LogLevel level, const std::string& message) {
  if (LogSink sink = g_sink.load()) {
    std::string prefix;
    {
      std::lock_guard<std::mutex> l(Mu());
      prefix = Prefix();
    }
    sink(level, prefix, message);
    return;
  }
  static const char kLetters[] = {'D', 'I', 'W', 'E'};
  timeval tv;
  gettimeofday(&tv, nullptr);
  tm t;
  localtime_r(&tv.tv_sec, &t);
  std::lock_guard<std::mutex> l(Mu());
  std::fprintf(stderr, "[flashckpt %c %02d:%02d:%02d.%03d%s%s] %s\n",
               kLetters[static_cast<int>(level)], t.tm_hour, t.tm_min, t.tm_sec,
               static_cast<int>(tv.tv_usec / 1000), Prefix().empty() ? "" : " ",
               Prefix().c_str(), message.c_str());
}

}  // namespace flashckpt
