// Generation: the forward rewrite (graph/generation_forward) and its simulation (simulator/generation_simulator).
#include "graph/generation_forward.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "graph/error.h"
#include "simulator/generation_simulator.h"
#include "simulator/op_memory_rules.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT
using namespace llmem::testing;       // NOLINT

constexpr int64_t kVocab = 32, kHidden = 16, kHeads = 4, kKvHeads = 2, kDim = 4;

// input_ids [B, S] -> embedding -> layers.0.self_attn: q / k / v projections viewed as [B, heads, S, D], keys and
// values repeated to 4 heads (expand + reshape, as repeat_kv), a [B, 1, S, S] mask, sdpa -> lm_head -> loss.
// With `positions`, the embedding is scaled by a function of `cache_position.unsqueeze(0)` ([1, S] int64 position ids
// broadcast over the batch, as RoPE's cos and sin are).
Graph TinyDecoder(int64_t batch, int64_t seq, bool positions = false) {
  TestGraphBuilder b;
  ValueId ids = b.Input("input_ids", {batch, seq});
  ValueId labels = b.Input("labels", {batch, seq});
  ValueId emb_w = b.Param("model.embed_tokens.weight", {kVocab, kHidden});
  b.SetRegion(Region{RegionKind::kEmbedding, -1});
  ValueId x = b.OpOut("aten::embedding", {T(emb_w), T(ids), I(-1), B(false), B(false)}, Out({batch, seq, kHidden}),
                      "model.embed_tokens");
  if (positions) {
    ValueId cache_position = b.OpOut("aten::arange", {I(seq)}, Out({seq}, DType::kI64), "model");
    ValueId ids1 = b.OpOut("aten::unsqueeze", {T(cache_position), I(0)}, Out({1, seq}, DType::kI64).AliasOf(cache_position),
                           "model");
    ValueId angle = b.OpOut("aten::unsqueeze", {T(ids1), I(-1)}, Out({1, seq, 1}, DType::kI64).AliasOf(cache_position),
                            "model.rotary_emb");
    ValueId cos = b.OpOut("aten::cos", {T(angle)}, Out({1, seq, 1}), "model.rotary_emb");
    x = b.OpOut("aten::mul", {T(x), T(cos)}, Out({batch, seq, kHidden}), "model");
  }
  ValueId mask = b.OpOut("aten::ones", {Ints({batch, 1, seq, seq})}, Out({batch, 1, seq, seq}, DType::kBool), "model");
  b.SetLayer(0);
  auto heads = [&](const char* name, int64_t n) {
    ValueId w = b.Param(std::string("model.layers.0.self_attn.") + name + ".weight", {n * kDim, kHidden});
    ValueId p = b.OpOut("aten::linear", {T(x), T(w), None()}, Out({batch, seq, n * kDim}),
                        std::string("model.layers.0.self_attn.") + name);
    ValueId v = b.OpOut("aten::view", {T(p), Ints({batch, seq, n, kDim})}, Out({batch, seq, n, kDim}).AliasOf(p),
                        "model.layers.0.self_attn");
    return b.OpOut("aten::transpose", {T(v), I(1), I(2)}, Out({batch, n, seq, kDim}).AliasOf(p),
                   "model.layers.0.self_attn");
  };
  ValueId q = heads("q_proj", kHeads), k = heads("k_proj", kKvHeads), v = heads("v_proj", kKvHeads);
  auto repeat = [&](ValueId t) {
    ValueId u = b.OpOut("aten::unsqueeze", {T(t), I(2)}, Out({batch, kKvHeads, 1, seq, kDim}).AliasOf(t),
                        "model.layers.0.self_attn");
    ValueId e = b.OpOut("aten::expand", {T(u), Ints({batch, kKvHeads, 2, seq, kDim}), B(false)},
                        Out({batch, kKvHeads, 2, seq, kDim}).AliasOf(t), "model.layers.0.self_attn");
    return b.OpOut("aten::reshape", {T(e), Ints({batch, kHeads, seq, kDim})}, Out({batch, kHeads, seq, kDim}),
                   "model.layers.0.self_attn");
  };
  ValueId a = b.OpOut("aten::scaled_dot_product_attention",
                      {T(q), T(repeat(k)), T(repeat(v)), T(mask), D(0.0), B(false), D(0.5), B(false)},
                      Out({batch, kHeads, seq, kDim}), "model.layers.0.self_attn");
  ValueId t = b.OpOut("aten::transpose", {T(a), I(1), I(2)}, Out({batch, seq, kHeads, kDim}).AliasOf(a),
                      "model.layers.0.self_attn");
  ValueId h = b.OpOut("aten::reshape", {T(t), Ints({batch, seq, kHidden})}, Out({batch, seq, kHidden}),
                      "model.layers.0.self_attn");
  b.SetHead();
  ValueId lm = b.Param("lm_head.weight", {kVocab, kHidden});
  ValueId logits = b.OpOut("aten::linear", {T(h), T(lm), None()}, Out({batch, seq, kVocab}), "lm_head");
  return b.Build(CrossEntropy(b, logits, labels), batch, seq);
}

std::vector<const OpNode*> Kind(const Graph& g, const std::string& kind) {
  std::vector<const OpNode*> out;
  for (const auto& n : g.nodes()) {
    if (n.kind == kind) out.push_back(&n);
  }
  return out;
}

TEST(GenerationForwardTest, CachesKeysAndValuesBeforeRepeatAndDropsTheMaskAndTheLoss) {
  const GenerationForward fw = MakeGenerationForward(TinyDecoder(2, 1), /*past_tokens=*/5, GenerationLoop{});
  const Graph& g = fw.graph;
  // One cache entry of keys and one of values, each the 5 cached tokens plus the new one, at the 2 key/value heads.
  ASSERT_EQ(fw.past.size(), 2u);
  ASSERT_EQ(fw.present.size(), 2u);
  EXPECT_EQ(g.value(fw.past[0]).shape, (std::vector<int64_t>{2, kKvHeads, 5, kDim}));
  EXPECT_EQ(g.value(fw.present[1]).shape, (std::vector<int64_t>{2, kKvHeads, 6, kDim}));
  const auto cats = Kind(g, "aten::cat");
  ASSERT_EQ(cats.size(), 2u);
  EXPECT_EQ(cats[0]->args[0].tensors.size(), 2u);  // torch.cat([cache, new])
  // sdpa reads the cache entries, no mask, not causal for one token, enable_gqa instead of repeat_kv copies.
  const auto sdpa = Kind(g, "aten::scaled_dot_product_attention");
  ASSERT_EQ(sdpa.size(), 1u);
  const auto& inputs = g.tensor_inputs(sdpa[0]->id);
  ASSERT_EQ(inputs.size(), 3u);
  EXPECT_EQ(inputs[1], fw.present[0]);
  EXPECT_EQ(sdpa[0]->args[5].int_value, 0);
  EXPECT_EQ(sdpa[0]->args[7].int_value, 1);
  EXPECT_TRUE(Kind(g, "aten::reshape").size() == 1u);  // the attention output's; repeat_kv's are gone
  EXPECT_TRUE(Kind(g, "aten::ones").empty());            // the mask
  EXPECT_TRUE(Kind(g, "aten::cross_entropy_loss").empty());
  // Logits of the last position only, then the loop's work; nothing requires grad.
  EXPECT_EQ(g.value(fw.logits).shape, (std::vector<int64_t>{2, 1, kVocab}));
  ASSERT_EQ(Kind(g, "hf::generate_next_token").size(), 1u);
  for (const auto& v : g.values()) EXPECT_FALSE(v.requires_grad) << v.name;
  for (ValueId in : g.inputs()) EXPECT_NE(g.value(in).name, "labels");
}

TEST(GenerationForwardTest, ThePrefillCopiesItsKeysIntoTheCacheAndSlicesTheLastPosition) {
  const GenerationForward fw = MakeGenerationForward(TinyDecoder(1, 7), 0, {});
  EXPECT_TRUE(fw.past.empty());
  EXPECT_EQ(fw.graph.value(fw.present[0]).shape, (std::vector<int64_t>{1, kKvHeads, 7, kDim}));
  const auto sdpa = Kind(fw.graph, "aten::scaled_dot_product_attention");
  EXPECT_EQ(sdpa[0]->args[5].int_value, 1);  // causal over the prompt
  const auto slices = Kind(fw.graph, "aten::slice");
  ASSERT_EQ(slices.size(), 1u);
  EXPECT_EQ(fw.graph.value(slices[0]->outputs[0]).shape, (std::vector<int64_t>{1, 1, kHidden}));
  EXPECT_THROW(MakeGenerationForward(TinyDecoder(1, 7), -1, {}), ConfigError);
}

TEST(GenerationForwardTest, AForwardWithoutLogitsToKeepComputesThePromptsLogitsAtEveryPosition) {
  const GenerationForward fw = MakeGenerationForward(TinyDecoder(1, 7), 0, {.last_position_logits = false});
  EXPECT_TRUE(Kind(fw.graph, "aten::slice").empty());
  EXPECT_EQ(fw.graph.value(fw.logits).shape, (std::vector<int64_t>{1, 7, kVocab}));
  // The prefill's timeline holds the [1, 7, V] logits where the last-position loop holds [1, 1, V].
  const TrainingConfig config = CpuConfig();
  const auto at = [](int64_t b, int64_t s, int64_t /*past*/) { return TinyDecoder(b, s); };
  const auto largest_head_block = [&](bool last_only) {
    const GenerationRequest r{.batch = 1, .prompt = 7, .new_tokens = 1, .loop = {.last_position_logits = last_only}};
    const MemoryEstimate est = EstimateGeneration(at, r, config).prefill;
    int64_t largest = 0;
    for (const auto& e : est.simulation->timeline.events) {
      if (e.is_alloc && e.category == MemoryCategory::kHeadActivations) largest = std::max(largest, e.bytes);
    }
    return largest;
  };
  EXPECT_EQ(largest_head_block(false), 7 * kVocab * 4);
  EXPECT_EQ(largest_head_block(true), kVocab * 4);
  const GenerationForward last = MakeGenerationForward(TinyDecoder(1, 7), 0, {});
  EXPECT_EQ(last.graph.value(last.logits).shape, (std::vector<int64_t>{1, 1, kVocab}));
}

TEST(GenerationForwardTest, PositionIdsArePerSequenceAsGenerateFeedsThem) {
  // generate() passes position_ids [B, S] (from the attention mask's cumsum) where the training forward builds
  // [1, S] from cache_position: what is computed from them has B rows.
  const GenerationForward fw = MakeGenerationForward(TinyDecoder(3, 5, true), 0, {});
  const auto cos = Kind(fw.graph, "aten::cos");
  ASSERT_EQ(cos.size(), 1u);
  EXPECT_EQ(fw.graph.value(cos[0]->outputs[0]).shape, (std::vector<int64_t>{3, 5, 1}));
  const auto& in = fw.graph.tensor_inputs(cos[0]->id);
  const ValueId root = fw.graph.StorageRoot(in.at(0));
  EXPECT_EQ(fw.graph.value(root).shape, (std::vector<int64_t>{3, 5}));
  EXPECT_NE(std::find(fw.graph.inputs().begin(), fw.graph.inputs().end(), root), fw.graph.inputs().end());
  // One sequence: the [1, S] ids are generate()'s already.
  const GenerationForward one = MakeGenerationForward(TinyDecoder(1, 5, true), 0, {});
  EXPECT_EQ(one.graph.value(Kind(one.graph, "aten::cos")[0]->outputs[0]).shape, (std::vector<int64_t>{1, 5, 1}));
  // The timeline stays consistent (views of the new ids free nothing twice).
  const auto at = [](int64_t b, int64_t s, int64_t /*past*/) { return TinyDecoder(b, s, true); };
  EXPECT_GT(EstimateGeneration(at, {.batch = 3, .prompt = 5, .new_tokens = 2}, CpuConfig()).prefill.peak_allocated_bytes,
            0);
}

TEST(GenerationForwardTest, AStaticCacheIsWholeUpdatedInPlaceAndMasked) {
  // StaticCache of 9 tokens: the prefill of 6 makes zeros [B, kv, 9, D] per entry and copies into them in place; the
  // mask is bool [B, 1, 6, 9]; with a mask the 2 key/value heads are copied to the 4 query heads (repeat_kv).
  const GenerationLoop loop{.cache = CacheKind::kStatic, .static_cache_tokens = 9};
  const GenerationForward prefill = MakeGenerationForward(TinyDecoder(2, 6), 0, loop);
  const Graph& g = prefill.graph;
  EXPECT_TRUE(Kind(g, "aten::cat").empty());
  ASSERT_EQ(Kind(g, "aten::zeros").size(), 2u);
  ASSERT_EQ(prefill.present.size(), 2u);
  EXPECT_EQ(g.value(prefill.present[0]).shape, (std::vector<int64_t>{2, kKvHeads, 9, kDim}));
  const auto copies = Kind(g, "aten::index_copy_");
  ASSERT_EQ(copies.size(), 2u);
  EXPECT_EQ(g.StorageRoot(copies[0]->outputs[0]), prefill.present[0]);  // in place
  const auto sdpa = Kind(g, "aten::scaled_dot_product_attention");
  ASSERT_EQ(sdpa.size(), 1u);
  const auto& in = g.tensor_inputs(sdpa[0]->id);
  ASSERT_EQ(in.size(), 4u);
  EXPECT_EQ(g.value(in[1]).shape, (std::vector<int64_t>{2, kHeads, 9, kDim}));  // repeated keys
  EXPECT_EQ(g.value(in[3]).shape, (std::vector<int64_t>{2, 1, 6, 9}));
  EXPECT_EQ(g.value(in[3]).dtype, DType::kBool);
  EXPECT_EQ(sdpa[0]->args[7].int_value, 0);  // no enable_gqa with a mask
  // A decode step reads the entries as inputs and updates them in place; the mask is still made.
  const GenerationForward decode = MakeGenerationForward(TinyDecoder(2, 1), 7, loop);
  ASSERT_EQ(decode.past.size(), 2u);
  EXPECT_EQ(decode.graph.value(decode.past[0]).shape, (std::vector<int64_t>{2, kKvHeads, 9, kDim}));
  EXPECT_EQ(decode.graph.StorageRoot(decode.present[0]), decode.past[0]);
  EXPECT_EQ(Kind(decode.graph, "aten::ones").size(), 1u);
  // The prefill's peak holds the whole entries; the cache after the last step is the same either way.
  const auto at = [](int64_t b, int64_t s, int64_t /*past*/) { return TinyDecoder(b, s); };
  GenerationRequest dynamic{.batch = 2, .prompt = 6, .new_tokens = 4};
  GenerationRequest fixed = dynamic;
  fixed.loop.cache = CacheKind::kStatic;
  const GenerationEstimate d = EstimateGeneration(at, dynamic, CpuConfig());
  const GenerationEstimate st = EstimateGeneration(at, fixed, CpuConfig());
  EXPECT_EQ(st.cache_bytes, d.cache_bytes);
  EXPECT_EQ(st.prefill.at_peak[static_cast<size_t>(MemoryCategory::kKvCache)], st.cache_bytes);
}

TEST(GenerationForwardTest, ASlidingWindowKeepsAViewOfThePreviousFullTensor) {
  // W = 4: the last decode step after 8 cached tokens (the step before fed 1) reads a kept view of 3 tokens whose
  // storage is the previous full tensor (3 + 1 tokens), concatenates [3 + 1] and, the keys filling the window, needs
  // a mask [B, 1, 1, 4]: repeat_kv copies the 2 key/value heads to 4 query heads.
  const GenerationLoop loop{.sliding_window = 4, .previous_tokens = 1};
  const GenerationForward fw = MakeGenerationForward(TinyDecoder(2, 1), 8, loop);
  const Graph& g = fw.graph;
  ASSERT_EQ(fw.past.size(), 2u);
  EXPECT_EQ(g.value(fw.past[0]).shape, (std::vector<int64_t>{2, kKvHeads, 3, kDim}));
  EXPECT_EQ(g.value(fw.past[0]).storage_numel, 2 * kKvHeads * 4 * kDim);
  EXPECT_EQ(g.value(fw.present[0]).shape, (std::vector<int64_t>{2, kKvHeads, 4, kDim}));
  const auto sdpa = Kind(g, "aten::scaled_dot_product_attention");
  ASSERT_EQ(sdpa.size(), 1u);
  const auto& in = g.tensor_inputs(sdpa[0]->id);
  ASSERT_EQ(in.size(), 4u);
  EXPECT_EQ(g.value(in[1]).shape, (std::vector<int64_t>{2, kHeads, 4, kDim}));
  EXPECT_EQ(g.value(in[3]).shape, (std::vector<int64_t>{2, 1, 1, 4}));
  // A prompt shorter than the window: no mask (HF skips it), enable_gqa, the plain cache.
  const GenerationForward short_prefill = MakeGenerationForward(TinyDecoder(2, 3), 0, {.sliding_window = 4});
  const auto s = Kind(short_prefill.graph, "aten::scaled_dot_product_attention");
  EXPECT_EQ(short_prefill.graph.tensor_inputs(s[0]->id).size(), 3u);
  EXPECT_EQ(s[0]->args[7].int_value, 1);
  // The cache after the last step: the last forward's full tensors, W tokens.
  const auto at = [](int64_t b, int64_t t, int64_t /*past*/) { return TinyDecoder(b, t); };
  GenerationRequest r{.batch = 2, .prompt = 6, .new_tokens = 3};
  r.loop.sliding_window = 4;
  EXPECT_EQ(EstimateGeneration(at, r, CpuConfig()).cache_bytes, 2 * (2 * kKvHeads * 4 * kDim * 4));
}

TEST(GenerationSimulatorTest, WithoutAnEosTokenTheLoopRunsNoMinLengthProcessors) {
  // min_new_tokens adds MinLengthLogitsProcessor and MinNewTokensLengthLogitsProcessor only when the generation
  // config has an eos_token_id; each clones the scores and builds a [V] int64 arange and a [V] mask.
  const TrainingConfig config = CpuConfig();
  const auto at = [](int64_t b, int64_t s, int64_t /*past*/) { return TinyDecoder(b, s); };
  GenerationRequest with{.batch = 1, .prompt = 1, .new_tokens = 2};
  GenerationRequest without = with;
  without.loop.min_length_processors = false;
  const MemoryEstimate a = *EstimateGeneration(at, with, config).decode;
  const MemoryEstimate b = *EstimateGeneration(at, without, config).decode;
  EXPECT_GE(a.peak_allocated_bytes - b.peak_allocated_bytes, kVocab * 8);
}

TEST(GenerationSimulatorTest, TheCacheGrowsByConcatenationAndTheLastStepPeaksAbove) {
  const TrainingConfig config = CpuConfig();
  const GenerationRequest request{.batch = 2, .prompt = 6, .new_tokens = 4};
  const GenerationEstimate est = EstimateGeneration([](int64_t b, int64_t s, int64_t /*past*/) { return TinyDecoder(b, s); }, request, config);
  // P + N - 1 = 9 tokens cached: keys and values, [2, 2, 9, 4] fp32 each.
  EXPECT_EQ(est.cache_bytes, 2 * (2 * kKvHeads * 9 * kDim * 4));
  ASSERT_TRUE(est.decode.has_value());
  // The last step starts with 8 cached tokens (an input each for keys and values) and makes 9 beside them.
  const auto& decode = *est.decode;
  EXPECT_GT(decode.at_peak[static_cast<size_t>(MemoryCategory::kKvCache)], 0);
  int64_t made = 0, dropped = 0;
  for (const auto& e : decode.simulation->timeline.events) {
    if (e.category != MemoryCategory::kKvCache) continue;
    if (e.is_alloc && e.phase == Phase::kForward) made += e.bytes;
  }
  for (const auto& e : decode.simulation->timeline.events) {
    if (!e.is_alloc && e.bytes == 2 * kKvHeads * 8 * kDim * 4 && e.phase == Phase::kForward) ++dropped;
  }
  EXPECT_EQ(made, 2 * (2 * kKvHeads * 9 * kDim * 4));
  EXPECT_EQ(dropped, 2);  // the previous entries, once the new ones exist
  // The generate loop: two [B, V] fp32 tensors of the previous step live through the forward.
  EXPECT_GE(decode.peak_allocated_bytes - est.prefill.weights_bytes, 2 * (2 * kVocab * 4) + est.cache_bytes);
  GenerationRequest bad = request;
  bad.new_tokens = 0;
  EXPECT_THROW(EstimateGeneration([](int64_t b, int64_t s, int64_t /*past*/) { return TinyDecoder(b, s); }, bad, config), ConfigError);
}

}  // namespace
}  // namespace llmem::sim
