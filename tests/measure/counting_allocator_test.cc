#include "measure/counting_allocator.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace llmem {
namespace {

constexpr int64_t kFloatBytes = 4;

TEST(CountingAllocatorTest, CountsCpuTensorCurrentAndPeak) {
  ScopedCountingAllocator counting(c10::DeviceType::CPU);
  {
    at::Tensor t = at::empty({1000}, at::kFloat);
    EXPECT_EQ(counting.counters().current_bytes, 1000 * kFloatBytes);
    EXPECT_EQ(counting.counters().peak_bytes, 1000 * kFloatBytes);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64, 0u);
  }
  EXPECT_EQ(counting.counters().current_bytes, 0);
  EXPECT_EQ(counting.counters().peak_bytes, 1000 * kFloatBytes);
  counting.ResetPeak();
  EXPECT_EQ(counting.counters().peak_bytes, 0);
}

TEST(CountingAllocatorTest, PeakKeepsTheHighestOfOverlappingTensors) {
  ScopedCountingAllocator counting(c10::DeviceType::CPU);
  at::Tensor a = at::ones({100}, at::kFloat);
  {
    at::Tensor b = a * 2;  // 400 B more while b lives
    EXPECT_FLOAT_EQ(b.sum().item<float>(), 200.0f);
  }
  at::Tensor c = at::empty({50}, at::kFloat);
  EXPECT_EQ(counting.counters().current_bytes, 150 * kFloatBytes);
  EXPECT_GE(counting.counters().peak_bytes, 200 * kFloatBytes);
}

TEST(CountingAllocatorTest, RestoresThePreviousAllocator) {
  c10::Allocator* before_cpu = c10::GetAllocator(c10::DeviceType::CPU);
  c10::Allocator* before_meta = c10::GetAllocator(c10::DeviceType::Meta);
  {
    ScopedCountingAllocator cpu(c10::DeviceType::CPU);
    ScopedCountingAllocator meta(c10::DeviceType::Meta);
    EXPECT_NE(c10::GetAllocator(c10::DeviceType::CPU), before_cpu);
    EXPECT_NE(c10::GetAllocator(c10::DeviceType::Meta), before_meta);
  }
  EXPECT_EQ(c10::GetAllocator(c10::DeviceType::CPU), before_cpu);
  EXPECT_EQ(c10::GetAllocator(c10::DeviceType::Meta), before_meta);
}

TEST(CountingAllocatorTest, TensorOutlivingTheScopeIsFreedSafely) {
  at::Tensor survivor;
  {
    ScopedCountingAllocator counting(c10::DeviceType::CPU);
    survivor = at::full({16}, 3.0f);
  }
  ScopedCountingAllocator counting(c10::DeviceType::CPU);
  EXPECT_FLOAT_EQ(survivor.sum().item<float>(), 48.0f);
  survivor.reset();  // allocated under the earlier scope: not subtracted from this one
  EXPECT_EQ(counting.counters().current_bytes, 0);
}

TEST(CountingAllocatorTest, CountsMetaTensorsWithoutMemory) {
  ScopedCountingAllocator counting(c10::DeviceType::Meta);
  {
    at::Tensor t = at::empty({1000}, at::TensorOptions().dtype(at::kFloat).device(at::kMeta));
    EXPECT_EQ(counting.counters().current_bytes, 1000 * kFloatBytes);
    at::Tensor u = t.matmul(at::empty({1000, 8}, t.options()));  // 32 kB weight + 32 B result
    EXPECT_EQ(u.sizes(), at::IntArrayRef({8}));
    EXPECT_EQ(counting.counters().current_bytes, (1000 + 8) * kFloatBytes);
    EXPECT_EQ(counting.counters().peak_bytes, (1000 + 8000 + 8) * kFloatBytes);
  }
  EXPECT_EQ(counting.counters().current_bytes, 0);
}

TEST(CountingAllocatorTest, LiveBytesPastInt64AreFlaggedNotWrapped) {
  ScopedCountingAllocator counting(c10::DeviceType::Meta);
  const auto meta = at::TensorOptions().dtype(at::kFloat).device(at::kMeta);
  at::Tensor a = at::empty({int64_t{1} << 60}, meta);  // 2^62 bytes each: two of them reach 2^63
  EXPECT_FALSE(counting.counters().overflowed);
  at::Tensor b = at::empty({int64_t{1} << 60}, meta);
  EXPECT_TRUE(counting.counters().overflowed);
  EXPECT_EQ(counting.counters().current_bytes, int64_t{1} << 62);  // the sum that still fits, never negative
}

TEST(CountingAllocatorTest, RecordsEventsWithPhase) {
  ScopedCountingAllocator counting(c10::DeviceType::Meta, /*record_events=*/true);
  counting.SetPhase("forward");
  { at::Tensor t = at::empty({10}, at::TensorOptions().dtype(at::kFloat).device(at::kMeta)); }
  const std::vector<AllocationEvent> events = counting.events();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_TRUE(events[0].is_alloc);
  EXPECT_EQ(events[0].bytes, 40);
  EXPECT_EQ(events[0].phase, "forward");
  EXPECT_FALSE(events[1].is_alloc);
  EXPECT_EQ(events[1].current_bytes_after, 0);
}

}  // namespace
}  // namespace llmem
