#include "simulator/caching_allocator_rules.h"

#include <bit>

#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem::sim {
namespace {

int64_t RoundUpToMultiple(int64_t bytes, int64_t multiple) {
  return CheckedAdd(bytes, multiple - 1, "a rounded allocation") / multiple * multiple;
}

}  // namespace

int64_t RoundSize(int64_t bytes, int roundup_power2_divisions) {
  LLMEM_CHECK(bytes >= 0) << "negative request of " << bytes << " B";
  if (bytes < kMinBlockSize) return kMinBlockSize;
  if (roundup_power2_divisions > 1 && bytes > kMinBlockSize * roundup_power2_divisions) {
    return RoundUpToPower2Division(bytes, roundup_power2_divisions);
  }
  return RoundUpToMultiple(bytes, kMinBlockSize);
}

int64_t RoundUpToPower2Division(int64_t bytes, int divisions) {
  LLMEM_CHECK(bytes > 0) << "bytes=" << bytes;
  LLMEM_CHECK(divisions >= 2 && std::has_single_bit(static_cast<uint32_t>(divisions)))
      << "divisions must be a power of two >= 2, got " << divisions;
  const auto unsigned_bytes = static_cast<uint64_t>(bytes);
  if (std::has_single_bit(unsigned_bytes)) return bytes;
  const int64_t power2_floor = static_cast<int64_t>(std::bit_floor(unsigned_bytes));
  const int64_t step_bytes = power2_floor / divisions;
  // The interval is narrower than `divisions` bytes: c10 then rounds to the next power of two.
  if (step_bytes == 0) return CheckedMul(power2_floor, 2, "a rounded allocation");
  return RoundUpToMultiple(bytes, step_bytes);
}

bool IsSmallPoolSize(int64_t rounded_bytes) { return rounded_bytes <= kSmallSize; }

int64_t SegmentSizeFor(int64_t rounded_bytes) {
  if (rounded_bytes <= kSmallSize) return kSmallBuffer;
  if (rounded_bytes < kMinLargeAlloc) return kLargeBuffer;
  return RoundUpToMultiple(rounded_bytes, kRoundLarge);
}

bool ShouldSplit(int64_t block_bytes, int64_t request_bytes, bool is_small_pool) {
  LLMEM_CHECK(block_bytes >= request_bytes) << "block " << block_bytes << " B < request " << request_bytes << " B";
  const int64_t remaining_bytes = block_bytes - request_bytes;
  if (is_small_pool) return remaining_bytes >= kMinBlockSize;
  return remaining_bytes > kSmallSize;
}

}  // namespace llmem::sim
