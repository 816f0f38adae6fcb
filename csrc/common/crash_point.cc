#include "common/crash_point.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace flashckpt {

namespace {
// FLASHCKPT_CRASH_AT: "N" (the N-th point this process passes) or "NAME@N"
// (the N-th time it passes the point called NAME).
struct CrashAt {
  long n = 0;
  std::string name;
};
CrashAt ParseCrashAt() {
  CrashAt c;
  const char* v = std::getenv("FLASHCKPT_CRASH_AT");
  if (!v) return c;
  std::string s = v;
  if (size_t at = s.rfind('@'); at != std::string::npos) {
    c.name = s.substr(0, at);
    c.n = std::atol(s.c_str() + at + 1);
  } else {
    c.n = std::atol(v);
  }
  return c;
}
}  // namespace

void CrashPoint(const char* where) {
  static const CrashAt crash_at = ParseCrashAt();
  static const bool trace = std::getenv("FLASHCKPT_CRASH_TRACE") != nullptr;
  static std::atomic<long> count{0}, named{0};
  if (crash_at.n == 0 && !trace) return;
  long n = count.fetch_add(1) + 1;
  if (trace) std::fprintf(stderr, "crash point %ld: %s\n", n, where);
  const bool hit = crash_at.name.empty() ? n == crash_at.n
                                         : crash_at.name == where && named.fetch_add(1) + 1 == crash_at.n;
  if (hit) {
    std::fprintf(stderr, "flashckpt: injected crash at point %ld (%s)\n", n, where);
    ::kill(::getpid(), SIGKILL);
  }
}

}  // namespace flashckpt
