// PyTorch's CUDA caching allocator size rules as small pure functions with named constants.
//
// Each function ports one function of c10/cuda/CUDACachingAllocator.cpp (round_size, get_allocation_size,
// should_split, roundup_power2_next_division) and the pool choice of get_pool. Inputs and outputs are byte
// counts (int64_t, >= 0). CudaCachingAllocatorModel composes them.
//
// Deliberately not here: max_split_size and its oversize-block rules (the default is "unlimited", which makes
// them inert), per-interval roundup_power2_divisions lists (one division count applies to every size),
// expandable segments, garbage_collection_threshold, and all state (pools, segments, stats).
#pragma once

#include <cstdint>

#include "graph/dtype.h"

namespace llmem::sim {

// Constants of c10/cuda/CUDACachingAllocator.cpp ("c10" below), same names and values.
// c10 kMinBlockSize: every block size is a multiple of this, and the smallest block is this.
constexpr int64_t kMinBlockSize = 512;
// c10 kSmallSize: rounded requests of at most this size are served from the small pool.
constexpr int64_t kSmallSize = 1 * kMiB;
// c10 kSmallBuffer: size of every segment allocated for the small pool.
constexpr int64_t kSmallBuffer = 2 * kMiB;
// c10 kMinLargeAlloc: large requests strictly below this get a kLargeBuffer segment.
constexpr int64_t kMinLargeAlloc = 10 * kMiB;
// c10 kLargeBuffer (large_segment_size default): segment size for 1 MiB < request < 10 MiB.
constexpr int64_t kLargeBuffer = 20 * kMiB;
// c10 kRoundLarge: requests of at least kMinLargeAlloc get a segment rounded up to a multiple of this.
constexpr int64_t kRoundLarge = 2 * kMiB;

// c10 round_size: the block size a request of `bytes` occupies. Below kMinBlockSize → kMinBlockSize; with
// `roundup_power2_divisions` d > 1 and bytes > kMinBlockSize·d → RoundUpToPower2Division(bytes, d); otherwise
// the next multiple of kMinBlockSize. Note: the allocator itself never calls this for 0 bytes (a zero-byte
// tensor gets no block); the rule alone maps 0 to kMinBlockSize.
int64_t RoundSize(int64_t bytes, int roundup_power2_divisions = 0);

// c10 roundup_power2_next_division: powers of two stay; otherwise the interval [2^k, 2^(k+1)) holding `bytes`
// is cut into `divisions` (a power of two >= 2) equal steps and `bytes` is rounded up to the next step.
// Example from the c10 source comment: 1200 B with 4 divisions → steps of 256 B above 1024 → 1280 B.
int64_t RoundUpToPower2Division(int64_t bytes, int divisions);

// c10 get_pool: true when a block of `rounded_bytes` belongs to the small pool (rounded_bytes <= kSmallSize).
bool IsSmallPoolSize(int64_t rounded_bytes);

// c10 get_allocation_size: bytes of the segment ("cudaMalloc") made when no cached block fits.
// <= 1 MiB → kSmallBuffer; < 10 MiB → kLargeBuffer; else rounded up to a multiple of kRoundLarge.
int64_t SegmentSizeFor(int64_t rounded_bytes);

// c10 should_split with the default (unlimited) max_split_size: whether a free block of `block_bytes` chosen
// for a request of `request_bytes` (already rounded) is split, the remainder going back to the pool.
// Small pool: split iff the remainder is >= kMinBlockSize. Large pool: split iff the remainder is > kSmallSize
// (strictly); otherwise the whole block is handed out and the slack counts as allocated.
bool ShouldSplit(int64_t block_bytes, int64_t request_bytes, bool is_small_pool);

}  // namespace llmem::sim
