// vLLM's KV pool sizing (simulator/paged_kv_pool.h), on cases worked by hand from vLLM V1's formulas.
#include "simulator/paged_kv_pool.h"

#include <gtest/gtest.h>

#include "graph/error.h"

namespace llmem::sim {
namespace {

// Llama-2-7B in bf16 on one 80 GiB GPU: 32 layers of 32 key/value heads of 128, 6,738,415,616 parameters.
PagedPoolInputs Llama2On80GiB() {
  return {.total_memory_bytes = 80LL << 30, .gpu_memory_utilization = 0.9, .weights_bytes = 6'738'415'616LL * 2,
          .profile_peak_bytes = 1LL << 30, .non_torch_bytes = 0, .block_size = 16, .layers = 32, .kv_heads = 32,
          .head_size = 128, .kv_element_bytes = 2, .max_model_len = 4096};
}

TEST(PagedKvPoolTest, Llama2On80GiBByHand) {
  const PagedPool p = SizePagedPool(Llama2On80GiB());
  // 0.9 x 85,899,345,920 = 77,309,411,328; minus 13,476,831,232 of weights and 1,073,741,824 of activations.
  EXPECT_EQ(p.requested_bytes, 77'309'411'328LL);
  EXPECT_EQ(p.available_bytes, 62'758'838'272LL);
  // 2 x 16 tokens x 32 heads x 128 x 2 B = 262,144 B per layer; x 32 layers = 8 MiB a block.
  EXPECT_EQ(p.page_bytes, 262'144);
  EXPECT_EQ(p.block_bytes, 8'388'608);
  // 62,758,838,272 / 8,388,608 = 7481.46...
  EXPECT_EQ(p.num_blocks, 7481);
  EXPECT_EQ(p.tokens, 7481 * 16);
  EXPECT_EQ(p.blocks_per_max_len_request, 256);
  EXPECT_DOUBLE_EQ(p.max_concurrency, 7481.0 / 256.0);
  EXPECT_TRUE(p.holds_one_max_len_request);
  EXPECT_TRUE(p.starts());
}

TEST(PagedKvPoolTest, TheRequestedFractionMustBeFreeAtStartUp) {
  PagedPoolInputs in = Llama2On80GiB();
  in.free_at_start_bytes = 77'309'411'328LL;  // exactly 0.9 of 80 GiB free after the context: starts
  EXPECT_TRUE(SizePagedPool(in).starts());
  in.free_at_start_bytes -= 1;
  EXPECT_FALSE(SizePagedPool(in).requested_is_free);
  EXPECT_FALSE(SizePagedPool(in).starts());
  EXPECT_EQ(SizePagedPool(in).num_blocks, 7481);  // the pool it would have had
}

TEST(PagedKvPoolTest, AnFp8CacheOnOneTensorParallelRankHoldsTwiceTheBlocks) {
  // Llama-3-70B on 8 ranks: 80 layers, 1 of the 8 key/value heads per rank, head 128; fp8 halves each page.
  PagedPoolInputs in{.total_memory_bytes = 80LL << 30, .gpu_memory_utilization = 0.9,
                     .weights_bytes = 20LL << 30, .profile_peak_bytes = 2LL << 30, .block_size = 16, .layers = 80,
                     .kv_heads = 1, .head_size = 128, .kv_element_bytes = 2, .max_model_len = 8192};
  const PagedPool bf16 = SizePagedPool(in);
  in.kv_element_bytes = 1;
  const PagedPool fp8 = SizePagedPool(in);
  EXPECT_EQ(bf16.page_bytes, 2 * 16 * 1 * 128 * 2);     // 8,192 B
  EXPECT_EQ(fp8.block_bytes, 2 * 16 * 1 * 128 * 1 * 80);  // 327,680 B
  // available = 77,309,411,328 - 21,474,836,480 - 2,147,483,648 = 53,687,091,200
  EXPECT_EQ(fp8.available_bytes, 53'687'091'200LL);
  EXPECT_EQ(fp8.num_blocks, 53'687'091'200LL / 327'680);  // 163,840 exactly
  EXPECT_EQ(bf16.num_blocks, 81'920);
  EXPECT_EQ(fp8.blocks_per_max_len_request, 512);
  EXPECT_DOUBLE_EQ(fp8.max_concurrency, 320.0);
}

TEST(PagedKvPoolTest, APoolThatCannotHoldOneLongestRequestIsSaid) {
  PagedPoolInputs in = Llama2On80GiB();
  in.weights_bytes = 75LL << 30;  // leaves 0.9 x 80 - 75 - 1 < 0
  const PagedPool none = SizePagedPool(in);
  EXPECT_LT(none.available_bytes, 0);
  EXPECT_EQ(none.num_blocks, 0);
  EXPECT_FALSE(none.holds_one_max_len_request);
  // A 4,096-token request holds 256 blocks of 8 MiB (2,147,483,648 B). With all 85,899,345,920 B requested and
  // 1 GiB of activations, weights of 82,678,120,449 B leave one byte less: 255 blocks; one byte less weight, 256.
  in.gpu_memory_utilization = 1.0;
  in.weights_bytes = 82'678'120'449LL;
  EXPECT_EQ(SizePagedPool(in).available_bytes, 2'147'483'647LL);
  EXPECT_EQ(SizePagedPool(in).num_blocks, 255);
  EXPECT_FALSE(SizePagedPool(in).holds_one_max_len_request);
  in.weights_bytes -= 1;
  EXPECT_EQ(SizePagedPool(in).num_blocks, 256);
  EXPECT_TRUE(SizePagedPool(in).holds_one_max_len_request);
}

TEST(PagedKvPoolTest, ASequenceHoldsWholeBlocks) {
  EXPECT_EQ(BlocksFor(1, 16), 1);
  EXPECT_EQ(BlocksFor(16, 16), 1);
  EXPECT_EQ(BlocksFor(17, 16), 2);
  EXPECT_EQ(BlocksFor(4607, 16), 288);
}

TEST(PagedKvPoolTest, InputsOutOfRangeAreConfigErrors) {
  PagedPoolInputs in = Llama2On80GiB();
  in.gpu_memory_utilization = 0;
  EXPECT_THROW(SizePagedPool(in), ConfigError);
  in.gpu_memory_utilization = 1.5;
  EXPECT_THROW(SizePagedPool(in), ConfigError);
  in = Llama2On80GiB();
  in.block_size = 0;
  EXPECT_THROW(SizePagedPool(in), ConfigError);
}

}  // namespace
}  // namespace llmem::sim
