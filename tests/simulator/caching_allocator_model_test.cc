#include "simulator/caching_allocator_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "simulator/caching_allocator_rules.h"
#include "simulator/simple_allocator_models.h"

namespace llmem::sim {
namespace {

// "4M", "1K" or plain bytes: the shortest exact spelling of a block size.
std::string Size(int64_t bytes) {
  if (bytes % kMiB == 0) return std::to_string(bytes / kMiB) + "M";
  if (bytes % kKiB == 0) return std::to_string(bytes / kKiB) + "K";
  return std::to_string(bytes);
}

// One line per segment: "large@0M: 4M(#1) 16M(free)", blocks in address order.
std::string Layout(const CudaCachingAllocatorModel& model) {
  std::string out;
  for (const SegmentInfo& segment : model.Segments()) {
    if (!out.empty()) out += "\n";
    out += (segment.small_pool ? "small@" : "large@") + Size(segment.address) + ":";
    for (const BlockInfo& block : segment.blocks) {
      out += " " + Size(block.size_bytes) + (block.allocated ? "(#" + std::to_string(block.id) + ")" : "(free)");
    }
  }
  return out;
}

// Brute-force consistency check of the model against its own Segments() listing. `live` maps each live id to
// its requested bytes. Returns "" when every invariant holds, else the first violation.
std::string CheckInvariants(const CudaCachingAllocatorModel& model, const std::map<int64_t, int64_t>& live) {
  const AllocatorStats stats = model.Stats();
  const std::vector<SegmentInfo> segments = model.Segments();
  int64_t reserved_bytes = 0, allocated_bytes = 0, requested_bytes = 0, inactive_split_bytes = 0;
  std::map<int64_t, int64_t> seen_live;                  // id -> requested bytes, from the blocks
  std::vector<std::pair<int64_t, int64_t>> live_ranges;  // [begin, end) of allocated blocks
  int64_t previous_segment_end = 0;
  for (const SegmentInfo& segment : segments) {
    const std::string where = "segment @" + std::to_string(segment.address) + ": ";
    if (segment.address < previous_segment_end) return where + "overlaps the previous segment";
    previous_segment_end = segment.address + segment.size_bytes;
    reserved_bytes += segment.size_bytes;
    int64_t cursor = segment.address;
    bool previous_free = false;
    for (const BlockInfo& block : segment.blocks) {
      if (block.address != cursor) return where + "gap or overlap at " + std::to_string(block.address);
      if (block.size_bytes <= 0 || block.size_bytes % kMinBlockSize != 0) return where + "bad block size";
      cursor += block.size_bytes;
      if (!block.allocated) {
        if (previous_free) return where + "two adjacent free blocks were not merged";
        if (segment.blocks.size() > 1) inactive_split_bytes += block.size_bytes;
        previous_free = true;
        continue;
      }
      previous_free = false;
      if (block.size_bytes < RoundSize(block.requested_bytes)) return where + "block smaller than its request";
      if (IsSmallPoolSize(block.size_bytes) != segment.small_pool) return where + "block in the wrong pool";
      if (!seen_live.emplace(block.id, block.requested_bytes).second) return where + "id appears twice";
      allocated_bytes += block.size_bytes;
      requested_bytes += block.requested_bytes;
      live_ranges.emplace_back(block.address, block.address + block.size_bytes);
    }
    if (cursor != segment.address + segment.size_bytes) return where + "block sizes do not sum to segment size";
  }
  std::sort(live_ranges.begin(), live_ranges.end());
  for (size_t i = 1; i < live_ranges.size(); ++i) {
    if (live_ranges[i].first < live_ranges[i - 1].second) return "live blocks overlap";
  }
  std::map<int64_t, int64_t> expected_live;
  for (const auto& [id, bytes] : live) {
    if (bytes > 0) expected_live.emplace(id, bytes);
  }
  if (seen_live != expected_live) return "live blocks differ from the expected live set";
  if (stats.reserved_bytes != reserved_bytes) return "reserved_bytes differs from the sum of segments";
  if (stats.allocated_bytes != allocated_bytes) return "allocated_bytes differs from the sum of live blocks";
  if (stats.requested_bytes != requested_bytes) return "requested_bytes differs from the sum of requests";
  if (stats.inactive_split_bytes != inactive_split_bytes) return "inactive_split_bytes differs";
  if (stats.num_segments != static_cast<int64_t>(segments.size())) return "num_segments differs";
  if (stats.peak_allocated_bytes < stats.allocated_bytes || stats.peak_reserved_bytes < stats.reserved_bytes ||
      stats.peak_requested_bytes < stats.requested_bytes) {
    return "a peak is below its current value";
  }
  return "";
}

// Reference §1.11.1: a 1,000 B tensor rounds to 1 KiB and gets a fresh 2 MiB small segment, split.
//   small@0  [#1 1K][ free 2047K ]
TEST(CudaCachingAllocatorModelTest, FirstSmallAllocCreatesSplitTwoMiBSegment) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 1000));
  EXPECT_EQ(Layout(model), "small@0M: 1K(#1) 2047K(free)");
  const AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.allocated_bytes, 1024);
  EXPECT_EQ(stats.requested_bytes, 1000);
  EXPECT_EQ(stats.reserved_bytes, 2 * kMiB);
  EXPECT_EQ(stats.num_segments, 1);
  EXPECT_EQ(stats.inactive_split_bytes, 2 * kMiB - 1024);  // 2,096,128 B free in a split segment
}

// A freed block is reused by a smaller request, and split because 2 MiB (> 1 MiB) would remain.
//   after #1,#2:   [#1 4M][#2 4M][   free 12M   ]
//   free #1:       [free4][#2 4M][   free 12M   ]
//   alloc #3 2M:   [#3][f][#2 4M][   free 12M   ]   best fit is the 4M hole, not the 12M tail
TEST(CudaCachingAllocatorModelTest, FreedBlockIsReusedAndSplitBySmallerRequest) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 4 * kMiB));
  ASSERT_TRUE(model.Alloc(2, 4 * kMiB));
  EXPECT_EQ(Layout(model), "large@0M: 4M(#1) 4M(#2) 12M(free)");
  model.Free(1);
  ASSERT_TRUE(model.Alloc(3, 2 * kMiB));
  EXPECT_EQ(Layout(model), "large@0M: 2M(#3) 2M(free) 4M(#2) 12M(free)");
  const AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.reserved_bytes, 20 * kMiB);              // still one segment
  EXPECT_EQ(stats.allocated_bytes, 6 * kMiB);              // 2M + 4M
  EXPECT_EQ(stats.inactive_split_bytes, 14 * kMiB);        // 2M + 12M free in the split segment
  EXPECT_EQ(stats.peak_allocated_bytes, 8 * kMiB);         // #1 + #2
}

// Freeing merges with free neighbours on both sides until the segment is one free block again.
//   [#1 4][#2 4][#3 4][free 8]  free #1, free #3 → [f 4][#2 4][free 12]  free #2 → [free 20]
TEST(CudaCachingAllocatorModelTest, FreeMergesWithFreeNeighbours) {
  CudaCachingAllocatorModel model;
  for (int64_t id = 1; id <= 3; ++id) ASSERT_TRUE(model.Alloc(id, 4 * kMiB));
  model.Free(1);
  model.Free(3);
  EXPECT_EQ(Layout(model), "large@0M: 4M(free) 4M(#2) 12M(free)");
  EXPECT_EQ(model.Stats().inactive_split_bytes, 16 * kMiB);
  model.Free(2);
  EXPECT_EQ(Layout(model), "large@0M: 20M(free)");
  EXPECT_EQ(model.Stats().inactive_split_bytes, 0);  // unsplit: releasable, not fragmentation
  EXPECT_EQ(model.Stats().reserved_bytes, 20 * kMiB);
  EXPECT_EQ(model.LargestFreeBlockBytes(), 20 * kMiB);
  model.EmptyCache();
  EXPECT_EQ(Layout(model), "");
  EXPECT_EQ(model.Stats().reserved_bytes, 0);
  EXPECT_EQ(model.Stats().peak_reserved_bytes, 20 * kMiB);
}

// Best fit takes the smallest block that fits; among equal sizes the lowest address.
//   [#1 6M][#2 2M][#3 4M][#4 2M][#5 6M]         (#5 takes the 6M tail whole: 0 remain)
//   free #5, #3, #1:  [f 6M][#2][f 4M][#4][f 6M]
//   alloc #6 3M → the 4M hole (smallest fit), unsplit: 1M remain is not > 1M
//   alloc #7 5M → 6M @0 and 6M @14M tie on size → the lower address @0, unsplit
TEST(CudaCachingAllocatorModelTest, BestFitPicksSmallestThenLowestAddress) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 6 * kMiB));
  ASSERT_TRUE(model.Alloc(2, 2 * kMiB));
  ASSERT_TRUE(model.Alloc(3, 4 * kMiB));
  ASSERT_TRUE(model.Alloc(4, 2 * kMiB));
  ASSERT_TRUE(model.Alloc(5, 6 * kMiB));
  EXPECT_EQ(Layout(model), "large@0M: 6M(#1) 2M(#2) 4M(#3) 2M(#4) 6M(#5)");
  model.Free(5);
  model.Free(3);
  model.Free(1);
  ASSERT_TRUE(model.Alloc(6, 3 * kMiB));
  EXPECT_EQ(Layout(model), "large@0M: 6M(free) 2M(#2) 4M(#6) 2M(#4) 6M(free)");
  ASSERT_TRUE(model.Alloc(7, 5 * kMiB));
  EXPECT_EQ(Layout(model), "large@0M: 6M(#7) 2M(#2) 4M(#6) 2M(#4) 6M(free)");
  const AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.allocated_bytes, 14 * kMiB);  // 6 + 2 + 4 + 2: unsplit slack counts as allocated
  EXPECT_EQ(stats.requested_bytes, 12 * kMiB);  // 5 + 2 + 3 + 2
  EXPECT_EQ(stats.num_segments, 1);
}

// A small request never takes large-pool memory: a free 20M large block does not serve 1 KiB.
//   large@0M [free 20M]          small@20M [#2 1K][free 2047K]
TEST(CudaCachingAllocatorModelTest, SmallRequestNeverUsesLargePool) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 5 * kMiB));
  model.Free(1);
  ASSERT_TRUE(model.Alloc(2, kKiB));
  EXPECT_EQ(Layout(model), "large@0M: 20M(free)\nsmall@20M: 1K(#2) 2047K(free)");
  EXPECT_EQ(model.Stats().reserved_bytes, 22 * kMiB);
}

// A large request never takes small-pool memory: 1 MiB + 1 B does not go into a free 2M small segment.
//   small@0M [free 2M]           large@2M [#2 1M+512 = 1,049,088][free 20M − 1,049,088 = 19,922,432]
TEST(CudaCachingAllocatorModelTest, LargeRequestNeverUsesSmallPool) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, kKiB));
  model.Free(1);
  ASSERT_TRUE(model.Alloc(2, kMiB + 1));  // rounds to 1 MiB + 512: large pool, 20 MiB segment
  EXPECT_EQ(Layout(model), "small@0M: 2M(free)\nlarge@2M: 1049088(#2) 19922432(free)");
  EXPECT_EQ(model.Stats().allocated_bytes, kMiB + 512);
  EXPECT_EQ(model.Stats().reserved_bytes, 22 * kMiB);
}

// Reference §1.11.4: 19.5 MiB from a free 20 MiB block leaves 0.5 MiB (not > 1 MiB): the whole block is
// allocated and the slack counts in allocated_bytes but not in requested_bytes.
TEST(CudaCachingAllocatorModelTest, NineteenAndAHalfMiBTakesWholeTwentyMiBBlock) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 5 * kMiB));
  model.Free(1);
  ASSERT_TRUE(model.Alloc(2, 19 * kMiB + kMiB / 2));
  EXPECT_EQ(Layout(model), "large@0M: 20M(#2)");
  EXPECT_EQ(model.Stats().allocated_bytes, 20 * kMiB);
  EXPECT_EQ(model.Stats().requested_bytes, 19 * kMiB + kMiB / 2);
  EXPECT_EQ(model.Stats().num_segments, 1);
  EXPECT_EQ(model.Stats().inactive_split_bytes, 0);
}

// Capacity 24 MiB. A cached, entirely free 20M segment blocks a 22M segment (20 + 2 + 22 = 44 > 24); the
// allocator releases it and retries: 2 + 22 = 24 <= 24 succeeds. The small segment holds a live block and stays.
//   before: large@0M [free 20M]  small@20M [#2 1K][free]      after: small@20M [...]  large@22M [#3 22M]
TEST(CudaCachingAllocatorModelTest, FailedSegmentAllocReleasesCacheAndRetries) {
  CudaCachingAllocatorModel model(CachingAllocatorConfig{.capacity_bytes = 24 * kMiB});
  ASSERT_TRUE(model.Alloc(1, 5 * kMiB));
  ASSERT_TRUE(model.Alloc(2, kKiB));
  model.Free(1);
  ASSERT_TRUE(model.Alloc(3, 22 * kMiB));
  EXPECT_EQ(Layout(model), "small@20M: 1K(#2) 2047K(free)\nlarge@22M: 22M(#3)");
  const AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.num_alloc_retries, 1);
  EXPECT_EQ(stats.num_ooms, 0);
  EXPECT_EQ(stats.reserved_bytes, 24 * kMiB);
  EXPECT_EQ(stats.peak_reserved_bytes, 24 * kMiB);
  EXPECT_EQ(stats.num_segments, 2);
}

// Capacity 24 MiB, a live 20M block: a 6M request needs another 20M segment (40 > 24). Nothing is cached
// entirely free, the retry fails too, and the request is an OOM that changes nothing else.
TEST(CudaCachingAllocatorModelTest, OomWhenLiveBlocksFillCapacity) {
  CudaCachingAllocatorModel model(CachingAllocatorConfig{.capacity_bytes = 24 * kMiB});
  ASSERT_TRUE(model.Alloc(1, 20 * kMiB));
  EXPECT_FALSE(model.Alloc(2, 6 * kMiB));
  AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.num_ooms, 1);
  EXPECT_EQ(stats.num_alloc_retries, 1);  // c10 counts the retry even when nothing was released
  EXPECT_EQ(stats.allocated_bytes, 20 * kMiB);
  EXPECT_EQ(stats.reserved_bytes, 20 * kMiB);
  EXPECT_EQ(Layout(model), "large@0M: 20M(#1)");
  // Id 2 was never allocated: it may be requested again (and fail again), and small requests still fit.
  EXPECT_FALSE(model.Alloc(2, 6 * kMiB));
  EXPECT_EQ(model.Stats().num_ooms, 2);
  EXPECT_TRUE(model.Alloc(2, kKiB));  // 20M + 2M small segment = 22M <= 24M
  model.Free(1);
  EXPECT_TRUE(model.Alloc(3, 6 * kMiB));  // reuses the cached 20M block, split
  EXPECT_EQ(CheckInvariants(model, {{2, kKiB}, {3, 6 * kMiB}}), "");
}

// Peaks follow the maximum; ResetPeaks lowers them to the current values.
//   #1 3M, #2 12M in one 20M segment → allocated 15M (peak); free #2 → 3M; ResetPeaks → peak 3M.
TEST(CudaCachingAllocatorModelTest, PeaksAndResetPeaks) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 3 * kMiB));
  ASSERT_TRUE(model.Alloc(2, 12 * kMiB));  // from the 17M tail: 5M remain > 1M → split
  EXPECT_EQ(Layout(model), "large@0M: 3M(#1) 12M(#2) 5M(free)");
  model.Free(2);
  AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.allocated_bytes, 3 * kMiB);
  EXPECT_EQ(stats.peak_allocated_bytes, 15 * kMiB);
  EXPECT_EQ(stats.peak_requested_bytes, 15 * kMiB);
  EXPECT_EQ(stats.peak_reserved_bytes, 20 * kMiB);
  model.ResetPeaks();
  stats = model.Stats();
  EXPECT_EQ(stats.peak_allocated_bytes, 3 * kMiB);
  EXPECT_EQ(stats.peak_requested_bytes, 3 * kMiB);
  EXPECT_EQ(stats.peak_reserved_bytes, 20 * kMiB);
  model.EmptyCache();  // the segment still holds #1: nothing is released
  EXPECT_EQ(model.Stats().reserved_bytes, 20 * kMiB);
  model.Free(1);
  model.EmptyCache();
  model.ResetPeaks();
  stats = model.Stats();
  EXPECT_EQ(stats.reserved_bytes, 0);
  EXPECT_EQ(stats.peak_reserved_bytes, 0);
  EXPECT_EQ(stats.peak_allocated_bytes, 0);
}

// A zero-byte request succeeds without a block, as c10's allocate(0) returns a null pointer.
TEST(CudaCachingAllocatorModelTest, ZeroByteRequestTakesNoMemory) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 0));
  EXPECT_EQ(model.Stats().num_segments, 0);
  EXPECT_EQ(model.Stats().allocated_bytes, 0);
  model.Free(1);
  ASSERT_TRUE(model.Alloc(1, 0));  // the id is free again
}

// Segments get increasing addresses that are never reused, and ids in creation order.
TEST(CudaCachingAllocatorModelTest, SegmentAddressesIncreaseAndAreNotReused) {
  CudaCachingAllocatorModel model;
  ASSERT_TRUE(model.Alloc(1, 12 * kMiB));  // segment 0 @0, 12M
  model.Free(1);
  model.EmptyCache();
  ASSERT_TRUE(model.Alloc(2, 12 * kMiB));  // segment 1 @12M
  const std::vector<SegmentInfo> segments = model.Segments();
  ASSERT_EQ(segments.size(), 1u);
  EXPECT_EQ(segments[0].segment_id, 1);
  EXPECT_EQ(segments[0].address, 12 * kMiB);
}

TEST(CudaCachingAllocatorModelDeathTest, FreeOfUnknownIdAborts) {
  CudaCachingAllocatorModel model;
  EXPECT_DEATH(model.Free(42), "not live");
}

// Property test over a fixed-seed random sequence of 1,000 events: after every event the block layout is
// consistent (CheckInvariants), the no-fragmentation bound is <= the caching model's allocated bytes, and
// both agree with the exact-bytes model on requested bytes. Run with and without a capacity so the retry
// and OOM paths are exercised.
void RunRandomSequence(int64_t capacity_bytes, uint64_t seed) {
  CudaCachingAllocatorModel caching(CachingAllocatorConfig{.capacity_bytes = capacity_bytes});
  NoFragmentationModel lower_bound;
  ExactBytesModel exact;
  std::mt19937_64 rng(seed);  // raw engine output only: the sequence is the same on every standard library
  std::map<int64_t, int64_t> live;  // id -> requested bytes
  int64_t next_id = 0;
  for (int event = 0; event < 1000; ++event) {
    const uint64_t draw = rng();
    if (!live.empty() && draw % 100 < 45) {
      auto it = live.begin();
      std::advance(it, static_cast<int64_t>(rng() % live.size()));
      caching.Free(it->first);
      lower_bound.Free(it->first);
      exact.Free(it->first);
      live.erase(it);
    } else {
      // Sizes: 0 B now and then, small (< 1 MiB), mid (1–10 MiB) and large (10–64 MiB) requests.
      const uint64_t kind = rng() % 20;
      const int64_t max_bytes = kind == 0 ? 1 : kind < 10 ? kMiB : kind < 17 ? 10 * kMiB : 64 * kMiB;
      const int64_t bytes = kind == 0 ? 0 : 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(max_bytes));
      const int64_t id = next_id++;
      if (caching.Alloc(id, bytes)) {
        ASSERT_TRUE(lower_bound.Alloc(id, bytes));
        ASSERT_TRUE(exact.Alloc(id, bytes));
        live.emplace(id, bytes);
      }
    }
    ASSERT_EQ(CheckInvariants(caching, live), "") << "after event " << event;
    ASSERT_LE(lower_bound.Stats().allocated_bytes, caching.Stats().allocated_bytes) << "after event " << event;
    ASSERT_LE(lower_bound.Stats().peak_allocated_bytes, caching.Stats().peak_allocated_bytes);
    ASSERT_LE(caching.Stats().allocated_bytes, caching.Stats().reserved_bytes);
    ASSERT_LE(caching.Stats().reserved_bytes, capacity_bytes);
    ASSERT_EQ(exact.Stats().requested_bytes, caching.Stats().requested_bytes);
    ASSERT_EQ(exact.Stats().allocated_bytes, caching.Stats().requested_bytes);
  }
  if (capacity_bytes != kUnlimitedBytes) {
    EXPECT_GT(caching.Stats().num_ooms, 0) << "the capacity was meant to be hit";
    EXPECT_GT(caching.Stats().num_alloc_retries, caching.Stats().num_ooms) << "some retries were meant to succeed";
  }
  // Free everything: merging must leave only unsplit segments, which EmptyCache returns.
  for (const auto& [id, bytes] : live) caching.Free(id);
  EXPECT_EQ(caching.Stats().inactive_split_bytes, 0);
  caching.EmptyCache();
  EXPECT_EQ(caching.Stats().reserved_bytes, 0);
  EXPECT_EQ(caching.Stats().num_segments, 0);
}

TEST(CudaCachingAllocatorModelPropertyTest, RandomSequenceUnlimited) { RunRandomSequence(kUnlimitedBytes, 20240601); }

TEST(CudaCachingAllocatorModelPropertyTest, RandomSequenceWithCapacity) { RunRandomSequence(256 * kMiB, 7); }

}  // namespace
}  // namespace llmem::sim
