#include "rendezvous/rendezvous_client.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "rendezvous/frame_codec.h"

namespace flashckpt::rendezvous {
namespace {

using Clock = std::chrono::steady_clock;

int MillisUntil(Deadline deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left.count(), 1 << 30));
}

absl::Status ResponseStatus(const Response& response, const std::string& endpoint) {
  if (response.code() == Response::OK) return absl::OkStatus();
  const std::string text = absl::StrFormat("rendezvous server %s: %s", endpoint, response.error());
  switch (response.code()) {
    case Response::UNAUTHENTICATED: return absl::UnauthenticatedError(text);
    case Response::NOT_FOUND: return absl::NotFoundError(text);
    case Response::TIMEOUT: return absl::DeadlineExceededError(text);
    case Response::WRONG_RUN: return absl::FailedPreconditionError(text);
    default: return absl::InvalidArgumentError(text);
  }
}

}  // namespace

std::string FormatEndpoint(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return absl::StrFormat("[%s]:%d", host, port);
  return absl::StrFormat("%s:%d", host, port);
}

RendezvousClient::RendezvousClient(std::string host, uint16_t port, std::string token, std::string run_id)
    : host_(std::move(host)), port_(port), token_(std::move(token)), run_id_(std::move(run_id)) {}

RendezvousClient::~RendezvousClient() { Disconnect(); }

std::string RendezvousClient::endpoint() const { return FormatEndpoint(host_, port_); }

void RendezvousClient::Interrupt() {
  interrupted_ = true;
  const int fd = interruptible_fd_.load();
  if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
}

void RendezvousClient::Disconnect() {
  interruptible_fd_ = -1;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

absl::Status RendezvousClient::Connect(Deadline deadline) {
  const Clock::time_point started = Clock::now();
  int attempts = 0;
  std::string last_error;
  while (true) {
    ++attempts;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    const std::string port_text = std::to_string(port_);
    const int gai = ::getaddrinfo(host_.c_str(), port_text.c_str(), &hints, &found);
    if (gai != 0) {
      last_error = absl::StrFormat("cannot resolve host: %s", gai_strerror(gai));
    } else {
      for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) {
          last_error = absl::StrFormat("socket: %s", std::strerror(errno));
          continue;
        }
        int rc = ::connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
          pollfd p{fd, POLLOUT, 0};
          rc = ::poll(&p, 1, std::min(MillisUntil(deadline), 1000));
          if (rc == 1) {
            int so_error = 0;
            socklen_t len = sizeof(so_error);
            ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
            rc = so_error == 0 ? 0 : -1;
            errno = so_error;
          } else {
            rc = -1;
            errno = ETIMEDOUT;
          }
        }
        if (rc == 0) {
          int one = 1;
          ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          fd_ = fd;
          interruptible_fd_ = fd;
          ::freeaddrinfo(found);
          return absl::OkStatus();
        }
        last_error = absl::StrFormat("connect: %s", std::strerror(errno));
        ::close(fd);
      }
      ::freeaddrinfo(found);
    }
    if (MillisUntil(deadline) <= 0 || interrupted_) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(50, MillisUntil(deadline))));
  }
  const double waited = std::chrono::duration<double>(Clock::now() - started).count();
  return absl::UnavailableError(absl::StrFormat(
      "rendezvous server %s did not accept a connection after %.1f s (%d attempts; last error: %s)",
      endpoint(), waited, attempts, last_error));
}

absl::Status RendezvousClient::SendAll(const std::string& bytes, Deadline deadline) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd_, POLLOUT, 0};
      if (::poll(&p, 1, MillisUntil(deadline)) <= 0) {
        return absl::DeadlineExceededError(
            absl::StrFormat("rendezvous server %s: send timed out (%d/%d bytes)", endpoint(), sent, bytes.size()));
      }
      continue;
    }
    return absl::UnavailableError(
        absl::StrFormat("rendezvous server %s: send failed: %s", endpoint(), std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status RendezvousClient::ReceiveAll(char* data, size_t size, Deadline deadline) {
  size_t got = 0;
  while (got < size) {
    pollfd p{fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, MillisUntil(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      return absl::DeadlineExceededError(
          absl::StrFormat("rendezvous server %s: no answer before the deadline", endpoint()));
    }
    const ssize_t n = ::recv(fd_, data + got, size - got, 0);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (n == 0) {
      return absl::UnavailableError(absl::StrFormat("rendezvous server %s closed the connection", endpoint()));
    } else if (errno != EINTR && errno != EAGAIN) {
      return absl::UnavailableError(
          absl::StrFormat("rendezvous server %s: receive failed: %s", endpoint(), std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Response> RendezvousClient::Call(Request request, Deadline deadline) {
  absl::StatusOr<Response> response = Exchange(std::move(request), deadline);
  if (!response.ok()) return response.status();
  if (absl::Status status = ResponseStatus(*response, endpoint()); !status.ok()) {
    if (status.code() != absl::StatusCode::kNotFound && status.code() != absl::StatusCode::kDeadlineExceeded) {
      Disconnect();  // the server closes after refusing a request
    }
    return status;
  }
  return response;
}

absl::StatusOr<Response> RendezvousClient::Exchange(Request request, Deadline deadline) {
  request.set_token(token_);
  request.set_run_id(run_id_);
  const std::string frame = EncodeFrame(request);
  absl::Status last = absl::OkStatus();
  // A dropped connection is retried once on a fresh one; a refused connect is
  // retried by Connect until the deadline.
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (fd_ < 0) {
      if (absl::Status connected = Connect(deadline); !connected.ok()) return connected;
    }
    // Interrupt() stores the flag before reading the fd, Connect() the fd before
    // this check: one of the two sees the other.
    if (interrupted_) {
      Disconnect();
      return absl::CancelledError(absl::StrFormat("rendezvous call to %s interrupted", endpoint()));
    }
    last = SendAll(frame, deadline);
    char header[kFrameHeaderBytes];
    if (last.ok()) last = ReceiveAll(header, kFrameHeaderBytes, deadline);
    if (last.ok()) {
      absl::StatusOr<uint32_t> length =
          DecodeFrameHeader(std::string_view(header, kFrameHeaderBytes), kDefaultMaxFrameBytes);
      if (!length.ok()) {
        Disconnect();
        return absl::DataLossError(absl::StrFormat("rendezvous server %s: %s", endpoint(), length.status().message()));
      }
      std::string body(*length, '\0');
      last = ReceiveAll(body.data(), body.size(), deadline);
      if (last.ok()) {
        Response response;
        if (!response.ParseFromString(body)) {
          Disconnect();
          return absl::DataLossError(absl::StrFormat("rendezvous server %s sent a malformed response", endpoint()));
        }
        return response;
      }
    }
    Disconnect();
    if (last.code() == absl::StatusCode::kDeadlineExceeded) break;
  }
  return last;
}

absl::StatusOr<RoundView> RendezvousClient::Join(const NodeDescriptor& node, Deadline deadline) {
  Request request;
  *request.mutable_join()->mutable_node() = node;
  absl::StatusOr<Response> response = Call(std::move(request), deadline);
  if (!response.ok()) return response.status();
  return response->round();
}

absl::StatusOr<RoundView> RendezvousClient::Sync(const std::string& node_id, uint64_t known_round,
                                                 std::chrono::milliseconds wait, Deadline deadline) {
  Request request;
  request.mutable_sync()->set_node_id(node_id);
  request.mutable_sync()->set_known_round(known_round);
  request.mutable_sync()->set_wait_ms(static_cast<uint32_t>(std::max<int64_t>(0, wait.count())));
  absl::StatusOr<Response> response = Call(std::move(request), deadline);
  if (!response.ok()) return response.status();
  return response->round();
}

absl::Status RendezvousClient::Leave(const std::string& node_id, Deadline deadline) {
  Request request;
  request.mutable_leave()->set_node_id(node_id);
  return Call(std::move(request), deadline).status();
}

absl::Status RendezvousClient::StoreSet(const std::string& key, const std::string& value, Deadline deadline) {
  Request request;
  request.mutable_store_set()->set_key(key);
  request.mutable_store_set()->set_value(value);
  return Call(std::move(request), deadline).status();
}

absl::StatusOr<std::string> RendezvousClient::StoreGet(const std::string& key, Deadline deadline) {
  Request request;
  request.mutable_store_get()->set_key(key);
  // The server answers a little before our deadline so that its TIMEOUT, not a
  // dropped connection, reaches us.
  request.mutable_store_get()->set_wait_ms(static_cast<uint32_t>(std::max(1, MillisUntil(deadline) - 50)));
  absl::StatusOr<Response> response = Call(std::move(request), deadline);
  if (!response.ok()) return response.status();
  return response->value();
}

absl::StatusOr<int64_t> RendezvousClient::StoreAdd(const std::string& key, int64_t delta, Deadline deadline) {
  Request request;
  request.mutable_store_add()->set_key(key);
  request.mutable_store_add()->set_delta(delta);
  return CallForCounter(std::move(request), deadline);
}

absl::StatusOr<int64_t> RendezvousClient::CallForCounter(Request request, Deadline deadline) {
  absl::StatusOr<Response> response = Call(std::move(request), deadline);
  if (!response.ok()) return response.status();
  return response->counter();
}

absl::StatusOr<std::optional<std::string>> RendezvousClient::StoreWait(const std::string& key,
                                                                       std::chrono::milliseconds wait,
                                                                       Deadline deadline) {
  Request request;
  request.mutable_store_get()->set_key(key);
  request.mutable_store_get()->set_wait_ms(static_cast<uint32_t>(std::clamp<int64_t>(wait.count(), 0, 1 << 30)));
  absl::StatusOr<Response> response = Exchange(std::move(request), deadline);
  if (!response.ok()) return response.status();
  if (response->code() == Response::NOT_FOUND || response->code() == Response::TIMEOUT) return std::nullopt;
  if (absl::Status status = ResponseStatus(*response, endpoint()); !status.ok()) {
    Disconnect();
    return status;
  }
  return std::optional<std::string>(response->value());
}

absl::StatusOr<int64_t> RendezvousClient::StoreDelete(const std::string& key, const std::string& range_end,
                                                      Deadline deadline) {
  Request request;
  request.mutable_store_delete()->set_key(key);
  request.mutable_store_delete()->set_range_end(range_end);
  return CallForCounter(std::move(request), deadline);
}

}  // namespace flashckpt::rendezvous
