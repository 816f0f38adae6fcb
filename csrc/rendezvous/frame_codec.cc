#include "rendezvous/frame_codec.h"

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace flashckpt::rendezvous {

std::string EncodeFrame(const google::protobuf::MessageLite& message) {
  std::string body = message.SerializeAsString();
  const uint32_t length = static_cast<uint32_t>(body.size());
  std::string frame;
  frame.reserve(kFrameHeaderBytes + body.size());
  frame.push_back(static_cast<char>((length >> 24) & 0xff));
  frame.push_back(static_cast<char>((length >> 16) & 0xff));
  frame.push_back(static_cast<char>((length >> 8) & 0xff));
  frame.push_back(static_cast<char>(length & 0xff));
  frame.append(body);
  return frame;
}

absl::StatusOr<uint32_t> DecodeFrameHeader(std::string_view header, uint32_t max_frame_bytes) {
  if (header.size() < kFrameHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("frame header needs %d bytes, got %d", kFrameHeaderBytes, header.size()));
  }
  const auto byte = [&](int i) { return static_cast<uint32_t>(static_cast<uint8_t>(header[i])); };
  const uint32_t length = (byte(0) << 24) | (byte(1) << 16) | (byte(2) << 8) | byte(3);
  if (length > max_frame_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("frame of %u bytes exceeds the cap of %u bytes", length, max_frame_bytes));
  }
  return length;
}

absl::StatusOr<std::optional<std::string>> FrameDecoder::NextFrame() {
  if (buffer_.size() < kFrameHeaderBytes) return std::optional<std::string>();
  absl::StatusOr<uint32_t> length = DecodeFrameHeader(buffer_, max_frame_bytes_);
  if (!length.ok()) return length.status();
  if (buffer_.size() < kFrameHeaderBytes + *length) return std::optional<std::string>();
  std::string body = buffer_.substr(kFrameHeaderBytes, *length);
  buffer_.erase(0, kFrameHeaderBytes + *length);
  return std::optional<std::string>(std::move(body));
}

absl::StatusOr<Request> ParseRequest(std::string_view body) {
  Request request;
  if (!request.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
    return absl::InvalidArgumentError(
        absl::StrFormat("malformed request: %d bytes that are not a rendezvous Request", body.size()));
  }
  if (request.body_case() == Request::BODY_NOT_SET) {
    return absl::InvalidArgumentError("malformed request: no body set");
  }
  if (request.has_join() && request.join().node().node_id().empty()) {
    return absl::InvalidArgumentError("malformed request: join without a node_id");
  }
  if (request.has_sync() && request.sync().node_id().empty()) {
    return absl::InvalidArgumentError("malformed request: sync without a node_id");
  }
  return request;
}

}  // namespace flashckpt::rendezvous
