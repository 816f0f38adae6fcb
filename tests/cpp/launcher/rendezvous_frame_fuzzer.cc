// libFuzzer target for the rendezvous server's input path: the frame decoder
// (length prefix, size cap, reassembly) and the request parser/validator.
// Build with clang (see docs/flashrun.md), run: rendezvous_frame_fuzzer -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "rendezvous/frame_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace flashckpt::rendezvous;
  // The first byte picks how the stream is cut into reads, as a socket would.
  const size_t chunk = size > 0 ? 1 + data[0] % 64 : 1;
  FrameDecoder decoder(/*max_frame_bytes=*/4096);
  const char* bytes = reinterpret_cast<const char*>(data);
  for (size_t offset = size > 0 ? 1 : 0; offset < size; offset += chunk) {
    const size_t n = offset + chunk <= size ? chunk : size - offset;
    decoder.Append(std::string_view(bytes + offset, n));
    while (true) {
      auto frame = decoder.NextFrame();
      if (!frame.ok()) return 0;  // the server drops the connection here
      if (!frame->has_value()) break;
      auto request = ParseRequest(**frame);
      if (request.ok()) {
        // A valid request re-encodes into a frame the decoder accepts.
        FrameDecoder again;
        again.Append(EncodeFrame(*request));
        auto round_trip = again.NextFrame();
        if (!round_trip.ok() || !round_trip->has_value()) __builtin_trap();
      }
    }
  }
  // Whole input as one body, too.
  (void)ParseRequest(std::string_view(bytes, size));
  return 0;
}
