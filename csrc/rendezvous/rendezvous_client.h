// A blocking rendezvous client with a deadline on every call. One connection,
// reopened on failure; not thread-safe (use one client per thread).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "rendezvous.pb.h"

namespace flashckpt::rendezvous {

using Deadline = std::chrono::steady_clock::time_point;

class RendezvousClient {
 public:
  RendezvousClient(std::string host, uint16_t port, std::string token, std::string run_id);
  ~RendezvousClient();
  RendezvousClient(const RendezvousClient&) = delete;
  RendezvousClient& operator=(const RendezvousClient&) = delete;

  absl::StatusOr<RoundView> Join(const NodeDescriptor& node, Deadline deadline);
  // Long poll: returns when there is news for node_id past known_round, or after wait.
  absl::StatusOr<RoundView> Sync(const std::string& node_id, uint64_t known_round,
                                 std::chrono::milliseconds wait, Deadline deadline);
  absl::Status Leave(const std::string& node_id, Deadline deadline);

  absl::Status StoreSet(const std::string& key, const std::string& value, Deadline deadline);
  // Waits until the key is set or the deadline passes.
  absl::StatusOr<std::string> StoreGet(const std::string& key, Deadline deadline);
  absl::StatusOr<int64_t> StoreAdd(const std::string& key, int64_t delta, Deadline deadline);
  // Waits up to `wait` (0: not at all) for the key: its value, or nullopt when
  // it was not set in that time. An error only when the server did not answer
  // (by the deadline) or refused the request.
  absl::StatusOr<std::optional<std::string>> StoreWait(const std::string& key, std::chrono::milliseconds wait,
                                                       Deadline deadline);
  // Deletes key, or with range_end every key in [key, range_end); returns how many.
  absl::StatusOr<int64_t> StoreDelete(const std::string& key, const std::string& range_end, Deadline deadline);

  // Sends one request and reads its response; reconnects (until the deadline)
  // when the server is not up yet or the connection dropped.
  absl::StatusOr<Response> Call(Request request, Deadline deadline);
  // As Call, but a response the server sent with an error code is returned as
  // it is; the status says only whether an answer came.
  absl::StatusOr<Response> Exchange(Request request, Deadline deadline);

  std::string endpoint() const;

  // Wakes up a call blocked in another thread (it fails at once). The only
  // method that may be called concurrently.
  void Interrupt();

 private:
  absl::Status Connect(Deadline deadline);
  absl::StatusOr<int64_t> CallForCounter(Request request, Deadline deadline);
  absl::Status SendAll(const std::string& bytes, Deadline deadline);
  absl::Status ReceiveAll(char* data, size_t size, Deadline deadline);
  void Disconnect();

  std::string host_;
  uint16_t port_;
  std::string token_;
  std::string run_id_;
  int fd_ = -1;
  std::atomic<int> interruptible_fd_{-1};
  std::atomic<bool> interrupted_{false};
};

// "host:port" that also reads well for IPv6 ("[::1]:29400").
std::string FormatEndpoint(const std::string& host, uint16_t port);

}  // namespace flashckpt::rendezvous
