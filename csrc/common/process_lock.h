// Exclusive flock()s that tell a live owner from one on its way out.
//
// A process killed with a large address space holds its file locks until the
// kernel has torn its memory down (do_exit frees the memory before the file
// table), a second or more for many GiB. A worker restarted into a warm
// interpreter (flashrun --standby) gets to its Checkpointer within
// milliseconds: it must not wait for such a dying predecessor, and still
// refuse at once a second live process for the same rank.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace flashckpt {

// True when pid is gone, a zombie, or in the kernel's exit path (PF_EXITING).
bool ProcessGoneOrExiting(pid_t pid);

// flock(fd, LOCK_EX) that tells a rival from a predecessor on its way out.
// When the lock is held, `owner()` names the holder (0: unknown). A holder
// that is exiting can run no code any more: the caller takes over at once and
// the returned thread takes the lock as soon as the kernel releases it (join
// it before closing fd), or gives up with an error logged after 120 s. A live holder gives kFailedPrecondition (the caller
// words the message; `*owner_pid` says who holds it); other errors: flock's.
absl::StatusOr<std::thread> LockOrTakeOverFromExitingOwner(int fd, const std::function<pid_t()>& owner,
                                                          const std::string& what, pid_t* owner_pid);

}  // namespace flashckpt
