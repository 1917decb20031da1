// Generation on one rank of a tensor-parallel group (distributed/tensor_parallel_generation.h), on TpBlock
// (distributed_test_graphs.h: 2 heads of 4 that are also its key/value heads, hidden 8, MLP 32, vocabulary 10), fp32
// on the cpu target. Sizes are counted by hand from the block's shapes.
#include "distributed/tensor_parallel_generation.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "graph/error.h"
#include "simulator/generation_simulator.h"
#include "tests/distributed/distributed_test_graphs.h"

namespace llmem::dist {
namespace {

using namespace llmem::dist::testing;  // NOLINT

sim::GenerationEstimate Generate(int tp, std::vector<CollectiveList>* collectives = nullptr,
                                 CacheKind cache = CacheKind::kDynamic) {
  const auto at = [](int64_t b, int64_t s, int64_t /*past*/) { return MakeTpBlock(10, b, s).graph; };
  const sim::GenerationRequest r{.batch = 2, .prompt = 3, .new_tokens = 4, .loop = {.cache = cache}};
  return sim::EstimateGeneration(at, r, CpuConfig(), TensorParallelGenerationForward(tp, collectives));
}

int64_t BlocksEndingWith(const sim::MemoryEstimate& e, const std::string& suffix) {
  const auto& labels = e.simulation->timeline.block_labels;
  return std::count_if(labels.begin(), labels.end(), [&](const std::string& l) {
    return l.size() >= suffix.size() && l.compare(l.size() - suffix.size(), suffix.size(), suffix) == 0;
  });
}

TEST(TensorParallelGenerationTest, EachRankCachesItsShareOfTheKeyValueHeads) {
  const sim::GenerationEstimate one = Generate(1), two = Generate(2);
  // Keys and values of 2 sequences, 2 heads, 3 + 4 - 1 = 6 tokens, head dim 4, fp32: 2 x 192 x 4 B.
  EXPECT_EQ(one.cache_bytes, 2 * 2 * 2 * 6 * 4 * 4);
  EXPECT_EQ(two.cache_bytes, one.cache_bytes / 2);
  // The decode step reads a rank's previous entries: [2, 1 head, 5 tokens, 4].
  ASSERT_TRUE(two.decode_graph.has_value());
  int cats = 0;
  for (const OpNode& n : two.decode_graph->nodes()) {
    if (n.kind != "aten::cat") continue;
    ++cats;
    EXPECT_EQ(two.decode_graph->value(n.args[0].tensors.at(0)).shape, (std::vector<int64_t>{2, 1, 5, 4}));
  }
  EXPECT_EQ(cats, 2);
}

TEST(TensorParallelGenerationTest, TheDecoderLayersLinearsAreSplitAndTheirRowParallelOutputsReduced) {
  std::vector<CollectiveList> collectives;
  const sim::GenerationEstimate one = Generate(1), two = Generate(2, &collectives);
  // Weights: wpe 96 + wte 320 + lm_head 320 B stay whole; q, k, v, o (4 x 256 B), up and down (2 x 1024 B) halve.
  EXPECT_EQ(one.prefill.weights_bytes, 96 + 320 + 320 + 4 * 256 + 2 * 1024);
  EXPECT_EQ(two.prefill.weights_bytes, 96 + 320 + 320 + (4 * 256 + 2 * 1024) / 2);
  // Per forward (prefill, then the decode step) the o and down outputs are all-reduced: [2, S, 8] fp32.
  ASSERT_EQ(collectives.size(), 2u);
  for (size_t f = 0; f < 2; ++f) {
    ASSERT_EQ(collectives[f].size(), 2u);
    for (const Collective& c : collectives[f]) {
      EXPECT_EQ(c.kind, CollectiveKind::kAllReduce);
      EXPECT_EQ(c.group_size, 2);
      EXPECT_EQ(c.bytes, 2 * (f == 0 ? 3 : 1) * 8 * 4);
    }
  }
  // Each reduced output is a copy beside its partial sum (functional all_reduce clones, then reduces in place).
  EXPECT_EQ(BlocksEndingWith(two.prefill, " after collective"), 2);
  EXPECT_EQ(BlocksEndingWith(one.prefill, " after collective"), 0);
}

TEST(TensorParallelGenerationTest, AStaticCacheIsMadeOfTheRanksHeads) {
  const sim::GenerationEstimate one = Generate(1, nullptr, CacheKind::kStatic),
                                two = Generate(2, nullptr, CacheKind::kStatic);
  EXPECT_EQ(one.cache_bytes, 2 * 2 * 2 * 6 * 4 * 4);
  EXPECT_EQ(two.cache_bytes, one.cache_bytes / 2);
  int zeros = 0;
  for (const OpNode& n : two.prefill_graph.nodes()) {
    if (n.kind != "aten::zeros") continue;
    ++zeros;
    EXPECT_EQ(two.prefill_graph.value(n.outputs.at(0)).shape, (std::vector<int64_t>{2, 1, 6, 4}));
  }
  EXPECT_EQ(zeros, 2);
}

TEST(TensorParallelGenerationTest, ADegreeThatDoesNotDivideTheHeadsIsNamed) {
  const Graph g = MakeTpBlock().graph;
  EXPECT_EQ(CheckTensorParallelGeneration(g, 2), "");
  EXPECT_EQ(CheckTensorParallelGeneration(g, 4), "tensor-parallel degree 4 does not divide the 2 attention heads");
}

}  // namespace
}  // namespace llmem::dist
