#include "simulator/memory_snapshot.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "simulator/caching_allocator_rules.h"

namespace llmem::sim {
namespace {

using Action = SnapshotEvent::Action;

Timeline Events(const std::vector<std::pair<int64_t, int64_t>>& steps) {  // (block, bytes > 0 alloc, < 0 free)
  Timeline t;
  int64_t blocks = 0;
  for (const auto& [block, bytes] : steps) {
    t.events.push_back({.is_alloc = bytes > 0, .block = block, .bytes = bytes > 0 ? bytes : -bytes});
    blocks = std::max(blocks, block + 1);
  }
  t.block_labels.assign(static_cast<size_t>(blocks), "");
  return t;
}

std::vector<Action> Actions(const MemorySnapshot& s) {
  std::vector<Action> out;
  for (const SnapshotEvent& e : s.trace) out.push_back(e.action);
  return out;
}

TEST(MemorySnapshotTest, SegmentsAreReservedOnceAndFreedBlocksKeepTheirAddress) {
  // Two 4 MiB blocks share the first 20 MiB segment (large requests under 10 MiB); the third reuses the first's
  // address once it is freed, without a new segment.
  const Timeline t = Events({{0, 4 * kMiB}, {1, 4 * kMiB}, {0, -4 * kMiB}, {2, 4 * kMiB}});
  const MemorySnapshot s = ReplayForSnapshot(t, /*caching_allocator=*/true, kUnlimitedBytes);
  EXPECT_EQ(Actions(s), (std::vector<Action>{Action::kSegmentAlloc, Action::kAlloc, Action::kAlloc,
                                             Action::kFreeRequested, Action::kFreeCompleted, Action::kAlloc}));
  EXPECT_EQ(s.trace[0].bytes, 20 * kMiB);
  EXPECT_EQ(s.trace[1].address, 0);
  EXPECT_EQ(s.trace[2].address, 4 * kMiB);
  EXPECT_EQ(s.trace[4].address, 0);
  EXPECT_EQ(s.trace[5].address, 0);  // best fit: the freed front block
  ASSERT_EQ(s.segments.size(), 1u);
  EXPECT_FALSE(s.out_of_memory);
}

TEST(MemorySnapshotTest, AFailedRequestReleasesTheCacheAndEndsTheHistoryInAnOom) {
  // 40 MiB for the allocator: a 30 MiB segment is cached free when a 35 MiB request needs a 36 MiB one; the retry
  // releases it (segment_free) and the request fits then. A 6 MiB one needs a 20 MiB segment: the history ends.
  const Timeline t = Events({{0, 30 * kMiB}, {0, -30 * kMiB}, {1, 35 * kMiB}, {2, 6 * kMiB}, {1, -35 * kMiB}});
  const MemorySnapshot s = ReplayForSnapshot(t, true, 40 * kMiB);
  EXPECT_EQ(Actions(s), (std::vector<Action>{Action::kSegmentAlloc, Action::kAlloc, Action::kFreeRequested,
                                             Action::kFreeCompleted, Action::kSegmentFree, Action::kSegmentAlloc,
                                             Action::kAlloc, Action::kOom}));
  EXPECT_EQ(s.trace[5].bytes, 36 * kMiB);
  EXPECT_TRUE(s.out_of_memory);
  EXPECT_EQ(s.trace.back().bytes, 6 * kMiB);
  EXPECT_EQ(s.trace.back().device_free, 4 * kMiB);
  EXPECT_EQ(s.trace.back().event, 3);
  ASSERT_EQ(s.segments.size(), 1u);  // the history ends with the 35 MiB block live
}

TEST(MemorySnapshotTest, TheCpuTargetLaysBlocksOutOneAfterAnother) {
  const Timeline t = Events({{0, 100}, {1, 7}, {0, -100}, {2, 5}});
  const MemorySnapshot s = ReplayForSnapshot(t, false, kUnlimitedBytes);
  EXPECT_EQ(s.trace[0].address, 0);
  EXPECT_EQ(s.trace[1].address, 100);
  EXPECT_EQ(s.trace.back().address, 107);  // never reused: the cpu target has no allocator model
  EXPECT_TRUE(s.segments.empty());
}

}  // namespace
}  // namespace llmem::sim
