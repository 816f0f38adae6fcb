#include "ipc/agent_protocol.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace flashckpt {

absl::Status WriteFrame(int fd, const google::protobuf::MessageLite& msg, std::chrono::milliseconds timeout) {
  std::string payload = msg.SerializeAsString();
  uint32_t len = static_cast<uint32_t>(payload.size());
  std::string buf(reinterpret_cast<const char*>(&len), 4);
  buf += payload;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (size_t off = 0; off < buf.size();) {
    ssize_t w = ::send(fd, buf.data() + off, buf.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w >= 0) {
      off += static_cast<size_t>(w);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return ErrnoStatus("send to agent socket", "", errno);
    // The peer is not reading (stuck, or stopped): wait for room, not for ever.
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      return absl::DeadlineExceededError(absl::StrCat("send to agent socket: the peer took ", off, " of ", buf.size(),
                                                      " bytes of a frame in ", timeout.count(),
                                                      " ms and reads no more (is it stuck?)"));
    pollfd pfd{fd, POLLOUT, 0};
    if (::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000))) < 0 && errno != EINTR)
      return ErrnoStatus("poll", "agent socket", errno);
  }
  return absl::OkStatus();
}

namespace {
absl::Status ReadExact(int fd, char* p, size_t n, std::chrono::steady_clock::time_point deadline) {
  for (size_t off = 0; off < n;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return absl::DeadlineExceededError("no complete frame in time");
    pollfd pfd{fd, POLLIN, 0};
    int rc = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (rc < 0 && errno != EINTR) return ErrnoStatus("poll", "agent socket", errno);
    if (rc <= 0) continue;
    ssize_t r = ::recv(fd, p + off, n - off, 0);
    if (r == 0) return absl::UnavailableError("the peer closed the connection");
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == ECONNRESET) return absl::UnavailableError("the peer reset the connection");
      return ErrnoStatus("recv", "agent socket", errno);
    }
    off += static_cast<size_t>(r);
  }
  return absl::OkStatus();
}
}  // namespace

absl::Status ReadFrame(int fd, google::protobuf::MessageLite* msg, std::chrono::milliseconds timeout) {
  // `timeout` bounds the wait for a frame to begin; once its first byte is
  // here the whole frame gets kFrameDeadline, so a slow sender never leaves a
  // half-read frame behind (which would desynchronize the stream).
  constexpr std::chrono::seconds kFrameDeadline{30};
  pollfd pfd{fd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return ErrnoStatus("poll", "agent socket", errno);
  if (rc == 0) return absl::DeadlineExceededError("no frame in time");
  auto deadline = std::chrono::steady_clock::now() + std::max<std::chrono::milliseconds>(timeout, kFrameDeadline);
  uint32_t len = 0;
  FCK_RETURN_IF_ERROR(ReadExact(fd, reinterpret_cast<char*>(&len), 4, deadline));
  if (len > kMaxAgentFrame) return absl::InvalidArgumentError(absl::StrCat("frame of ", len, " bytes exceeds the 1 MiB cap"));
  std::string payload(len, '\0');
  FCK_RETURN_IF_ERROR(ReadExact(fd, payload.data(), len, deadline));
  if (!msg->ParseFromString(payload)) return absl::InvalidArgumentError("malformed frame");
  return absl::OkStatus();
}

absl::StatusOr<int> ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    return absl::InvalidArgumentError(absl::StrCat("agent socket path too long: ", path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoStatus("socket", path, errno);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoStatus("connect to the flashrun agent at", path, err);
  }
  return fd;
}

}  // namespace flashckpt
