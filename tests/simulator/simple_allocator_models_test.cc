#include "simulator/simple_allocator_models.h"

#include <gtest/gtest.h>

#include "graph/dtype.h"
#include "simulator/caching_allocator_model.h"

namespace llmem::sim {
namespace {

TEST(ExactBytesModelTest, CountsRequestedBytesOnly) {
  ExactBytesModel model;
  EXPECT_EQ(model.Name(), "exact_bytes");
  ASSERT_TRUE(model.Alloc(1, 1000));
  ASSERT_TRUE(model.Alloc(2, 1));
  AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.allocated_bytes, 1001);  // 1000 + 1, no rounding
  EXPECT_EQ(stats.reserved_bytes, 1001);   // reserved = allocated
  EXPECT_EQ(stats.requested_bytes, 1001);
  EXPECT_EQ(stats.num_segments, 0);
  model.Free(1);
  stats = model.Stats();
  EXPECT_EQ(stats.allocated_bytes, 1);
  EXPECT_EQ(stats.peak_allocated_bytes, 1001);
  EXPECT_EQ(stats.peak_reserved_bytes, 1001);
  model.ResetPeaks();
  EXPECT_EQ(model.Stats().peak_allocated_bytes, 1);
  EXPECT_EQ(model.Stats().peak_requested_bytes, 1);
}

TEST(ExactBytesModelTest, CapacityIsInclusive) {
  ExactBytesModel model(/*capacity_bytes=*/1000);
  ASSERT_TRUE(model.Alloc(1, 600));
  EXPECT_FALSE(model.Alloc(2, 401));  // 600 + 401 = 1001 > 1000
  EXPECT_EQ(model.Stats().num_ooms, 1);
  EXPECT_EQ(model.Stats().allocated_bytes, 600);
  EXPECT_TRUE(model.Alloc(2, 400));   // 600 + 400 = 1000 <= 1000
  EXPECT_EQ(model.Stats().allocated_bytes, 1000);
}

TEST(NoFragmentationModelTest, RoundsEachRequestTo512ByteGranules) {
  NoFragmentationModel model;
  EXPECT_EQ(model.Name(), "no_fragmentation");
  ASSERT_TRUE(model.Alloc(1, 1000));  // → 1024
  ASSERT_TRUE(model.Alloc(2, 1));     // → 512
  ASSERT_TRUE(model.Alloc(3, 0));     // no block
  const AllocatorStats stats = model.Stats();
  EXPECT_EQ(stats.allocated_bytes, 1536);  // 1024 + 512
  EXPECT_EQ(stats.reserved_bytes, 1536);
  EXPECT_EQ(stats.requested_bytes, 1001);
  model.Free(3);
  model.Free(2);
  EXPECT_EQ(model.Stats().allocated_bytes, 1024);
  EXPECT_EQ(model.Stats().peak_allocated_bytes, 1536);
}

TEST(NoFragmentationModelTest, CapacityCountsRoundedBytes) {
  NoFragmentationModel model(/*capacity_bytes=*/1536);
  ASSERT_TRUE(model.Alloc(1, 1000));  // 1024
  ASSERT_TRUE(model.Alloc(2, 1));     // 512 → 1536, exactly full
  EXPECT_FALSE(model.Alloc(3, 1));    // another 512 would be 2048 > 1536
  EXPECT_EQ(model.Stats().num_ooms, 1);
  EXPECT_TRUE(model.Alloc(3, 0));     // zero bytes still fit
}

TEST(NoFragmentationModelTest, PowerOfTwoDivisionsMatchTheCachingRule) {
  NoFragmentationModel model(kUnlimitedBytes, /*roundup_power2_divisions=*/4);
  ASSERT_TRUE(model.Alloc(1, 5 * kMiB + 1));  // [4 MiB, 8 MiB) in 1 MiB steps → 6 MiB
  EXPECT_EQ(model.Stats().allocated_bytes, 6 * kMiB);
}

// The lower bound against the caching model on reference §1.11.4: 19.5 MiB occupies 19.5 MiB without
// fragmentation, but the whole 20 MiB block in the caching allocator (0.5 MiB remain, not split).
TEST(NoFragmentationModelTest, IsBelowCachingModelByTheUnsplitSlack) {
  NoFragmentationModel lower_bound;
  CudaCachingAllocatorModel caching;
  const int64_t bytes = 19 * kMiB + kMiB / 2;
  ASSERT_TRUE(lower_bound.Alloc(1, bytes));
  ASSERT_TRUE(caching.Alloc(1, bytes));
  EXPECT_EQ(lower_bound.Stats().allocated_bytes, 19 * kMiB + kMiB / 2);
  EXPECT_EQ(caching.Stats().allocated_bytes, 20 * kMiB);
}

TEST(SizeOnlyAllocatorModelDeathTest, DoubleAllocOfLiveIdAborts) {
  ExactBytesModel model;
  ASSERT_TRUE(model.Alloc(1, 8));
  EXPECT_DEATH(model.Alloc(1, 8), "already live");
}

}  // namespace
}  // namespace llmem::sim
