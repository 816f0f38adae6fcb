// Length-prefixed frames: a 4-byte big-endian body length, then the body.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "rendezvous.pb.h"

namespace flashckpt::rendezvous {

inline constexpr size_t kFrameHeaderBytes = 4;
// Rendezvous messages are small (a few hundred bytes per node); the cap keeps a
// peer from making the server allocate without bound.
inline constexpr uint32_t kDefaultMaxFrameBytes = 1u << 20;

std::string EncodeFrame(const google::protobuf::MessageLite& message);

// Reads the body length from a complete header; fails when it exceeds the cap.
absl::StatusOr<uint32_t> DecodeFrameHeader(std::string_view header, uint32_t max_frame_bytes);

// Accumulates bytes from a stream and splits them into frame bodies.
class FrameDecoder {
 public:
  explicit FrameDecoder(uint32_t max_frame_bytes = kDefaultMaxFrameBytes)
      : max_frame_bytes_(max_frame_bytes) {}

  void Append(std::string_view bytes) { buffer_.append(bytes); }

  // The next complete body, std::nullopt when more bytes are needed, or an error
  // when the stream is corrupt (then the connection must be dropped).
  absl::StatusOr<std::optional<std::string>> NextFrame();

  size_t buffered_bytes() const { return buffer_.size(); }

 private:
  uint32_t max_frame_bytes_;
  std::string buffer_;
};

// Parses and validates a request body: well-formed Protobuf with exactly one body set.
absl::StatusOr<Request> ParseRequest(std::string_view body);

}  // namespace flashckpt::rendezvous
