// Where the core's log lines go. By default to stderr, as
// "[flashckpt I 12:00:01.123 rank0] message", at the level of $FLASHCKPT_LOG
// (debug, info, warn, error; default info). A front end routes them elsewhere:
// the Python module hands them to the `flashckpt` logger of `logging`.
#pragma once

#include <string>

namespace flashckpt {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Lines below `level` are not even formatted.
void SetLogThreshold(LogLevel level);
LogLevel LogThreshold();
// Receives every line at or above the threshold instead of stderr; null
// restores stderr. Called on the thread that logs (training, persister,
// agent threads), with no lock of the core held: it must return quickly and
// must not call back into a Checkpointer.
using LogSink = void (*)(LogLevel level, const std::string& prefix, const std::string& message);
void SetLogSink(LogSink sink);

}  // namespace flashckpt
