#include "common/crash_point.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace flashckpt {

void CrashPoint(const char* where) {
  static const long crash_at = [] {
    const char* v = std::getenv("FLASHCKPT_CRASH_AT");
    return v ? std::atol(v) : 0L;
  }();
  static const bool trace = std::getenv("FLASHCKPT_CRASH_TRACE") != nullptr;
  static std::atomic<long> count{0};
  if (crash_at == 0 && !trace) return;
  long n = count.fetch_add(1) + 1;
  if (trace) std::fprintf(stderr, "crash point %ld: %s\n", n, where);
  if (n == crash_at) {
    std::fprintf(stderr, "flashckpt: injected crash at point %ld (%s)\n", n, where);
    ::kill(::getpid(), SIGKILL);
  }
}

}  // namespace flashckpt
