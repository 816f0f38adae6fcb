// Length-prefixed Protobuf frames over a Unix stream socket, with deadlines.
#pragma once

#include <chrono>
#include <string>

#include "absl/status/statusor.h"
#include "google/protobuf/message_lite.h"

namespace flashckpt {

inline constexpr uint32_t kMaxAgentFrame = 1u << 20;

// Writes one frame. A peer that stops reading (its socket buffer full) gets
// `timeout` to make room, then kDeadlineExceeded names the bytes sent.
absl::Status WriteFrame(int fd, const google::protobuf::MessageLite& msg,
                        std::chrono::milliseconds timeout = std::chrono::seconds(10));
// Reads one frame; kDeadlineExceeded when nothing complete arrived in time,
// kUnavailable when the peer closed the connection.
absl::Status ReadFrame(int fd, google::protobuf::MessageLite* msg, std::chrono::milliseconds timeout);
// Connects to the Unix socket at path; the error names the path.
absl::StatusOr<int> ConnectUnix(const std::string& path);

}  // namespace flashckpt
