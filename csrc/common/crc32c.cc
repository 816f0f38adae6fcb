#include "common/crc32c.h"

#include <immintrin.h>
#include <nmmintrin.h>

#include <cstring>

namespace flashckpt {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli

// a(x) * b(x) mod P(x), reflected bit order (zlib's multmodp).
uint32_t MultModP(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

struct PowTable {
  uint32_t x2n[64];  // x^(2^k) mod P
  PowTable() {
    uint32_t p = 1u << 30;  // x^1
    x2n[0] = p;
    for (int k = 1; k < 64; ++k) x2n[k] = p = MultModP(p, p);
  }
};
const PowTable kPow;

// x^(n * 2^k) mod P
uint32_t X2nModP(uint64_t n, unsigned k) {
  uint32_t p = 1u << 31;  // x^0
  while (n) {
    if (n & 1) p = MultModP(kPow.x2n[k & 63], p);
    n >>= 1;
    ++k;
  }
  return p;
}

inline uint32_t CrcRaw(uint32_t c, const uint8_t* p, size_t n) {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) { c = _mm_crc32_u8(c, *p++); --n; }
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
    p += 8; n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = _mm_crc32_u8(c, *p++);
  return c;
}

// Three independent streams hide the 3-cycle latency of crc32 instructions.
constexpr size_t kBlock = 4096;

inline void StreamCopyAligned(uint8_t* dst, const uint8_t* src, size_t n) {
  // n is a multiple of 64, dst 16-byte aligned.
  for (size_t i = 0; i < n; i += 64) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
}

// crc of three equal-length streams (len multiple of 8) read in lock step;
// when dst != nullptr each kBlock of the three streams is copied right after
// it was checksummed, while it is still in L1.
void Crc3(const uint8_t* src, uint8_t* dst, size_t len, uint32_t out[3]) {
  uint64_t c0 = 0xFFFFFFFFu, c1 = 0xFFFFFFFFu, c2 = 0xFFFFFFFFu;
  const uint8_t* s0 = src;
  const uint8_t* s1 = src + len;
  const uint8_t* s2 = src + 2 * len;
  for (size_t off = 0; off < len; off += kBlock) {
    size_t b = len - off < kBlock ? len - off : kBlock;
    for (size_t i = 0; i < b; i += 8) {
      uint64_t w0, w1, w2;
      std::memcpy(&w0, s0 + off + i, 8);
      std::memcpy(&w1, s1 + off + i, 8);
      std::memcpy(&w2, s2 + off + i, 8);
      c0 = _mm_crc32_u64(c0, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
    }
    if (dst != nullptr) {
      if ((b & 63) == 0) {
        StreamCopyAligned(dst + off, s0 + off, b);
        StreamCopyAligned(dst + len + off, s1 + off, b);
        StreamCopyAligned(dst + 2 * len + off, s2 + off, b);
      } else {
        std::memcpy(dst + off, s0 + off, b);
        std::memcpy(dst + len + off, s1 + off, b);
        std::memcpy(dst + 2 * len + off, s2 + off, b);
      }
    }
  }
  out[0] = ~static_cast<uint32_t>(c0);
  out[1] = ~static_cast<uint32_t>(c1);
  out[2] = ~static_cast<uint32_t>(c2);
}

uint32_t CrcImpl(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc) {
  const bool streaming = dst != nullptr && (reinterpret_cast<uintptr_t>(dst) & 15) == 0;
  if (n >= 3 * kBlock) {
    size_t len = (n / 3) & ~static_cast<size_t>(63);
    uint32_t c[3];
    Crc3(src, streaming ? dst : nullptr, len, c);
    if (dst != nullptr && !streaming) std::memcpy(dst, src, 3 * len);
    crc = Crc32cCombine(crc, c[0], len);
    crc = Crc32cCombine(crc, c[1], len);
    crc = Crc32cCombine(crc, c[2], len);
    src += 3 * len;
    if (dst != nullptr) dst += 3 * len;
    n -= 3 * len;
  }
  if (n == 0) return crc;
  if (dst != nullptr) std::memcpy(dst, src, n);
  return ~CrcRaw(~crc, src, n);
}

}  // namespace

uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  return MultModP(X2nModP(len_b, 3), crc_a) ^ crc_b;
}

uint32_t Crc32c(const void* data, size_t n, uint32_t crc) {
  return CrcImpl(nullptr, static_cast<const uint8_t*>(data), n, crc);
}

uint32_t CopyWithCrc32c(void* dst, const void* src, size_t n, uint32_t crc) {
  uint32_t r = CrcImpl(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n, crc);
  _mm_sfence();
  return r;
}

void CopyStreaming(void* dst, const void* src, size_t n) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
  if ((reinterpret_cast<uintptr_t>(d) & 15) == 0 && n >= 64) {
    size_t body = n & ~static_cast<size_t>(63);
    StreamCopyAligned(d, s, body);
    _mm_sfence();
    d += body; s += body; n -= body;
  }
  if (n) std::memcpy(d, s, n);
}

}  // namespace flashckpt
