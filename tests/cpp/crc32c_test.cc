#include "common/crc32c.h"

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>
#include <vector>

#include "common/parallel_copy.h"
#include "gtest/gtest.h"

namespace flashckpt {
namespace {

// Bit-at-a-time reference (RFC 3720 polynomial).
uint32_t Reference(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
  }
  return ~c;
}

TEST(Crc32c, KnownVector) {
  const char* s = "123456789";
  EXPECT_EQ(Crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(Crc32c(s, 0), 0u);
}

TEST(Crc32c, MatchesReferenceAndCombines) {
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(1 << 20);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t n : {size_t{1}, size_t{7}, size_t{4095}, size_t{12288}, size_t{12289}, size_t{100003}, buf.size()}) {
    for (size_t off : {size_t{0}, size_t{3}}) {
      if (off + n > buf.size()) continue;
      uint32_t want = Reference(buf.data() + off, n);
      EXPECT_EQ(Crc32c(buf.data() + off, n), want) << n << "@" << off;
      size_t cut = n / 3;
      uint32_t a = Crc32c(buf.data() + off, cut);
      uint32_t b = Crc32c(buf.data() + off + cut, n - cut);
      EXPECT_EQ(Crc32cCombine(a, b, n - cut), want) << n;
      EXPECT_EQ(Crc32c(buf.data() + off + cut, n - cut, a), want) << n;
    }
  }
}

TEST(Crc32c, CopyWithCrcCopiesExactly) {
  std::mt19937 rng(11);
  std::vector<uint8_t> src(3 << 20), dst(src.size() + 64);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  for (size_t n : {size_t{0}, size_t{5}, size_t{4096 * 3 + 17}, src.size() - 1}) {
    for (size_t doff : {size_t{0}, size_t{16}, size_t{1}}) {
      std::fill(dst.begin(), dst.end(), 0xAB);
      auto* d = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(dst.data()) + 63) & ~uintptr_t{63}) + doff;
      uint32_t crc = CopyWithCrc32c(d, src.data(), n);
      ASSERT_EQ(crc, Reference(src.data(), n));
      ASSERT_EQ(0, memcmp(d, src.data(), n));
      if (d + n < dst.data() + dst.size()) EXPECT_EQ(d[n], 0xAB) << "wrote past the end";
    }
  }
}

TEST(CopyPool, ChunkedCopyMatchesPerTaskCrc) {
  CopyPool pool(2);
  std::mt19937 rng(3);
  std::vector<std::vector<uint8_t>> srcs, dsts;
  std::vector<CopyTask> tasks;
  for (size_t n : {size_t{0}, size_t{10}, CopyPool::kChunkBytes * 2 + 5, size_t{123456}}) {
    srcs.emplace_back(n);
    for (auto& b : srcs.back()) b = static_cast<uint8_t>(rng());
    dsts.emplace_back(n);
  }
  for (size_t i = 0; i < srcs.size(); ++i) tasks.push_back({dsts[i].data(), srcs[i].data(), srcs[i].size()});
  std::vector<uint32_t> crcs;
  pool.CopyAndChecksum(tasks, &crcs);
  for (size_t i = 0; i < srcs.size(); ++i) {
    EXPECT_EQ(srcs[i], dsts[i]);
    EXPECT_EQ(crcs[i], Reference(srcs[i].data(), srcs[i].size()));
  }
}

// The read-through path (fresh processes reading a segment): every byte goes
// through `fill` and a bounce buffer, across piece and chunk boundaries; the
// crcs are the per-task crcs; a failing fill stops the copy with its errno.
TEST(CopyPool, FillAndChecksumMatchesCopyAndReportsTheFirstError) {
  CopyPool pool(2);
  std::mt19937 rng(5);
  std::vector<uint8_t> file(CopyPool::kChunkBytes * 2 + (700u << 10) + 3);
  for (auto& b : file) b = static_cast<uint8_t>(rng());
  // Tasks over disjoint ranges of `file`, as tensors over a slot.
  const std::vector<std::pair<size_t, size_t>> ranges = {
      {0, 0}, {0, 13}, {13, CopyPool::kChunkBytes + (512u << 10) + 1}, {CopyPool::kChunkBytes * 2, (700u << 10) + 3}};
  std::vector<std::vector<uint8_t>> dsts;
  std::vector<CopyTask> tasks;
  for (auto [off, n] : ranges) {
    dsts.emplace_back(n, 0xEE);
    tasks.push_back({dsts.back().data(), file.data() + off, n});
  }
  std::atomic<size_t> filled{0};
  auto pread_like = [&](void* buf, const void* src, size_t n) {
    const auto* s = static_cast<const uint8_t*>(src);
    EXPECT_TRUE(s >= file.data() && s + n <= file.data() + file.size());
    std::memcpy(buf, s, n);
    filled += n;
    return 0;
  };
  std::vector<uint32_t> crcs;
  ASSERT_EQ(pool.FillAndChecksum(tasks, pread_like, &crcs), 0);
  size_t total = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    auto [off, n] = ranges[i];
    total += n;
    if (n > 0) EXPECT_EQ(0, std::memcmp(dsts[i].data(), file.data() + off, n)) << i;
    EXPECT_EQ(crcs[i], Reference(file.data() + off, n)) << i;
  }
  EXPECT_EQ(filled.load(), total);

  std::atomic<int> calls{0};
  auto failing = [&](void* buf, const void* src, size_t n) {
    if (++calls == 3) return EIO;
    std::memcpy(buf, src, n);
    return 0;
  };
  EXPECT_EQ(pool.FillAndChecksum(tasks, failing, &crcs), EIO);
}

}  // namespace
}  // namespace flashckpt
