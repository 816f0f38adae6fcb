#include "common/process_lock.h"

#include <chrono>
#include <thread>

#include <sys/file.h>

#include <cerrno>
#include <fstream>
#include <iterator>
#include <sstream>
#include <vector>

#include "common/log.h"
#include "common/status.h"

namespace flashckpt {

bool ProcessGoneOrExiting(pid_t pid) {
  if (pid <= 0) return false;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return true;  // no such process
  std::istringstream fields(stat.substr(paren + 1));
  std::vector<std::string> f;
  for (std::string field; f.size() < 7 && fields >> field;) f.push_back(field);
  if (f.size() < 7) return true;
  constexpr unsigned long kPfExiting = 0x4;  // field 9, flags
  return f[0] == "Z" || f[0] == "X" || (std::stoul(f[6]) & kPfExiting) != 0;
}

absl::StatusOr<std::thread> LockOrTakeOverFromExitingOwner(int fd, const std::function<pid_t()>& owner,
                                                          const std::string& what, pid_t* owner_pid) {
  if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return std::thread();
  if (errno != EWOULDBLOCK) return ErrnoStatus("flock", what, errno);
  const pid_t pid = owner ? owner() : 0;
  *owner_pid = pid;
  if (pid == 0 || !ProcessGoneOrExiting(pid)) return absl::FailedPreconditionError(what);
  FCK_LOG(kDebug, "process ", pid, " holding ", what, " is on its way out: taking over");
  return std::thread([fd, pid, what] {
    // The kernel releases the lock once the exit has torn the memory down:
    // seconds for many GiB. Past the deadline the exit is stuck (a process in
    // D state, a hung file system); say so instead of waiting for ever.
    constexpr auto kDeadline = std::chrono::seconds(120);
    const auto t0 = std::chrono::steady_clock::now();
    while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK && errno != EINTR) {
        FCK_LOG(kError, "taking over ", what, " from exiting process ", pid, ": ", ErrnoStatus("flock", what, errno).message());
        return;
      }
      if (std::chrono::steady_clock::now() - t0 > kDeadline) {
        FCK_LOG(kError, "process ", pid, " still holds ", what, " ", kDeadline.count(),
                " s after it began exiting (stuck in the kernel?); going on without the lock");
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
}

}  // namespace flashckpt
