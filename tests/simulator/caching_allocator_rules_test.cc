#include "simulator/caching_allocator_rules.h"

#include <gtest/gtest.h>

namespace llmem::sim {
namespace {

// ---- RoundSize: 512 B granules, minimum 512 B ----

TEST(RoundSizeTest, BelowMinBlockSizeBecomesMinBlockSize) {
  EXPECT_EQ(RoundSize(0), 512);
  EXPECT_EQ(RoundSize(1), 512);
  EXPECT_EQ(RoundSize(511), 512);
}

TEST(RoundSizeTest, RoundsUpToMultipleOf512) {
  EXPECT_EQ(RoundSize(512), 512);
  EXPECT_EQ(RoundSize(513), 1024);    // 2 granules
  EXPECT_EQ(RoundSize(1000), 1024);   // §1.11.1: a 1 KiB-ish tensor
  EXPECT_EQ(RoundSize(kMiB), kMiB);   // §1.11.2: already a multiple
  EXPECT_EQ(RoundSize(kMiB + 1), kMiB + 512);  // §1.11.3
  EXPECT_EQ(RoundSize(10 * kMiB - 512), 10 * kMiB - 512);
  EXPECT_EQ(RoundSize(10 * kMiB), 10 * kMiB);
  EXPECT_EQ(RoundSize(10 * kMiB + 1), 10 * kMiB + 512);
  EXPECT_EQ(RoundSize(8'519'680), 8'519'680);  // §1.11.6: 8,519,680 = 16,640 × 512
}

TEST(RoundSizeTest, NineTenthsMiBRoundsToNextGranule) {
  // §1.11.4: 9.9 MiB = 10,380,902 B (truncated); 10,380,902 / 512 = 20,275.2 → 20,276 × 512 = 10,381,312.
  EXPECT_EQ(RoundSize(10'380'902), 10'381'312);
}

// ---- roundup_power2_divisions ----

TEST(RoundSizeTest, Power2DivisionExampleFromC10Comment) {
  // 1200 lies in [1024, 2048); 4 divisions → steps of 256 → 1280.
  EXPECT_EQ(RoundUpToPower2Division(1200, 4), 1280);
}

TEST(RoundSizeTest, Power2DivisionsOnlyApplyAbove512TimesDivisions) {
  // 1200 <= 512 × 4 = 2048, so RoundSize uses plain 512 B granules: 1200 → 1536.
  EXPECT_EQ(RoundSize(1200, 4), 1536);
  // 5 MiB + 1 > 2048: interval [4 MiB, 8 MiB) in 4 steps of 1 MiB → 6 MiB.
  EXPECT_EQ(RoundSize(5 * kMiB + 1, 4), 6 * kMiB);
  // Without divisions the same request is 5 MiB + 512.
  EXPECT_EQ(RoundSize(5 * kMiB + 1, 0), 5 * kMiB + 512);
  // Divisions of 1 mean "off".
  EXPECT_EQ(RoundSize(5 * kMiB + 1, 1), 5 * kMiB + 512);
}

TEST(RoundSizeTest, Power2DivisionKeepsPowersOfTwoAndStepBoundaries) {
  EXPECT_EQ(RoundUpToPower2Division(4 * kMiB, 4), 4 * kMiB);
  EXPECT_EQ(RoundUpToPower2Division(5 * kMiB, 4), 5 * kMiB);  // exactly on a 1 MiB step
  // 3 lies in [2, 4); 2 / 4 = 0 B steps → c10 returns the next power of two, 4.
  EXPECT_EQ(RoundUpToPower2Division(3, 4), 4);
}

// ---- pool choice ----

TEST(IsSmallPoolSizeTest, OneMiBIsTheLastSmallSize) {
  EXPECT_TRUE(IsSmallPoolSize(512));
  EXPECT_TRUE(IsSmallPoolSize(kMiB));                        // §1.11.2: <= 1 MiB
  EXPECT_FALSE(IsSmallPoolSize(RoundSize(kMiB + 1)));        // §1.11.3: 1 MiB + 512
}

// ---- segment size ("cudaMalloc" size) ----

TEST(SegmentSizeForTest, SmallRequestsGetTwoMiB) {
  EXPECT_EQ(SegmentSizeFor(RoundSize(1)), 2 * kMiB);
  EXPECT_EQ(SegmentSizeFor(1024), 2 * kMiB);  // §1.11.1
  EXPECT_EQ(SegmentSizeFor(kMiB), 2 * kMiB);  // §1.11.2
}

TEST(SegmentSizeForTest, MidRequestsGetTwentyMiB) {
  EXPECT_EQ(SegmentSizeFor(kMiB + 512), 20 * kMiB);        // §1.11.3
  EXPECT_EQ(SegmentSizeFor(10'381'312), 20 * kMiB);        // §1.11.4: 9.9 MiB
  EXPECT_EQ(SegmentSizeFor(10 * kMiB - 512), 20 * kMiB);   // last size below kMinLargeAlloc
  EXPECT_EQ(SegmentSizeFor(8'519'680), 20 * kMiB);         // §1.11.6: cuBLAS workspace
}

TEST(SegmentSizeForTest, LargeRequestsRoundToTwoMiB) {
  EXPECT_EQ(SegmentSizeFor(10 * kMiB), 10 * kMiB);              // §1.11.5: not < 10 MiB, exact
  EXPECT_EQ(SegmentSizeFor(10 * kMiB + 512), 12 * kMiB);        // next 2 MiB multiple
  EXPECT_EQ(SegmentSizeFor(RoundSize(100 * kMiB + 1)), 102 * kMiB);  // §1.11.5
  EXPECT_EQ(SegmentSizeFor(32 * kMiB), 32 * kMiB);              // §1.11.6: H100 cuBLAS workspace
}

// ---- split decision ----

TEST(ShouldSplitTest, SmallPoolSplitsWhenAtLeast512Remain) {
  EXPECT_TRUE(ShouldSplit(2 * kMiB, 1024, /*is_small_pool=*/true));  // §1.11.1: 2 MiB − 1 KiB remain
  EXPECT_TRUE(ShouldSplit(2 * kMiB, kMiB, true));                    // §1.11.2: 1 MiB remains
  EXPECT_TRUE(ShouldSplit(1024, 512, true));                         // exactly 512 remain
  EXPECT_FALSE(ShouldSplit(1024, 1024, true));                       // nothing remains
}

TEST(ShouldSplitTest, LargePoolSplitsOnlyWhenMoreThanOneMiBRemains) {
  EXPECT_TRUE(ShouldSplit(20 * kMiB, kMiB + 512, /*is_small_pool=*/false));  // §1.11.3: ≈19 MiB remain
  EXPECT_TRUE(ShouldSplit(20 * kMiB, 10'381'312, false));   // §1.11.4: 20,971,520 − 10,381,312 = 10,590,208
  EXPECT_TRUE(ShouldSplit(20 * kMiB, 8'519'680, false));    // §1.11.6: 12,451,840 B (≈11.9 MiB) remain
  EXPECT_FALSE(ShouldSplit(20 * kMiB, 19 * kMiB + kMiB / 2, false));  // §1.11.4: 0.5 MiB remain → whole block
  EXPECT_FALSE(ShouldSplit(20 * kMiB, 19 * kMiB, false));         // exactly 1 MiB remains: not strictly more
  EXPECT_TRUE(ShouldSplit(20 * kMiB, 19 * kMiB - 512, false));    // 1 MiB + 512 remain
  EXPECT_FALSE(ShouldSplit(10 * kMiB, 10 * kMiB, false));         // §1.11.5: exact segment, nothing remains
}

}  // namespace
}  // namespace llmem::sim
