// Fault injection for crash tests: with FLASHCKPT_CRASH_AT=N set, the N-th
// call of CrashPoint() in this process (counting from 1) kills the process
// with SIGKILL, as a power cut or OOM kill would at that point;
// FLASHCKPT_CRASH_AT=NAME@N the N-th time it passes the point called NAME
// (e.g. "persist: rank durable@3": only the process that persists crashes).
// FLASHCKPT_CRASH_TRACE=1 prints each point as it is passed.
#pragma once

namespace flashckpt {
void CrashPoint(const char* where);
}
