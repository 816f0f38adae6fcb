// The rendezvous server an agent embeds: Boost.Asio on one thread, TCP,
// length-prefixed Protobuf frames with a size cap, a shared-secret token.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "rendezvous/frame_codec.h"
#include "rendezvous/round_state.h"

namespace flashckpt::rendezvous {

struct RendezvousServerOptions {
  std::string bind_host = "127.0.0.1";  // only this address is bound
  uint16_t port = 0;                    // 0: pick a free one
  std::string token;                    // empty: no authentication
  std::string run_id;
  RoundSettings round;
  uint32_t max_frame_bytes = kDefaultMaxFrameBytes;
  // A peer that starts a frame must finish it within this time.
  std::chrono::milliseconds read_timeout{60000};
};

struct RendezvousServerCounters {
  std::atomic<uint64_t> requests_served{0};
  std::atomic<uint64_t> frames_rejected{0};  // malformed, oversized, wrong token or run
  std::atomic<uint64_t> connections_accepted{0};
  std::atomic<uint64_t> store_keys{0};  // keys in the key-value store now
};

class RendezvousServer {
 public:
  // Binds and starts serving on a background thread.
  static absl::StatusOr<std::unique_ptr<RendezvousServer>> Start(RendezvousServerOptions options);
  ~RendezvousServer();
  RendezvousServer(const RendezvousServer&) = delete;
  RendezvousServer& operator=(const RendezvousServer&) = delete;

  uint16_t port() const;
  const std::string& host() const;
  const RendezvousServerCounters& counters() const;

  class Impl;

 private:
  explicit RendezvousServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace flashckpt::rendezvous
