// Exclusive flock()s that tell a live owner from one on its way out.
//
// A process killed with a large address space holds its file locks until the
// kernel has torn its memory down (do_exit frees the memory before the file
// table), a second or more for many GiB. A worker restarted into a warm
// interpreter (flashrun --standby) gets to its Checkpointer within
// milliseconds: it must wait for such a dying predecessor, and still refuse at
// once a second live process for the same rank.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>

#include "absl/status/status.h"

namespace flashckpt {

// How long a Checkpointer waits for a predecessor that is exiting.
inline constexpr std::chrono::milliseconds kExitingOwnerGrace{30000};

// True when pid is gone, a zombie, or in the kernel's exit path (PF_EXITING).
bool ProcessGoneOrExiting(pid_t pid);

// flock(fd, LOCK_EX) without blocking on a live owner: when the lock is held,
// `owner()` names the holder (0: unknown); a holder that is exiting is waited
// for, up to `grace`. Otherwise kFailedPrecondition (the caller words the
// message; `*owner_pid` says who holds it) or the errno of flock.
absl::Status LockOrWaitForExitingOwner(int fd, const std::function<pid_t()>& owner, const std::string& what,
                                       std::chrono::milliseconds grace, pid_t* owner_pid);

}  // namespace flashckpt
