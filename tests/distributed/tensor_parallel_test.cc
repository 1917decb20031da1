// Megatron-style tensor parallelism (tensor_parallel.h): which tensors ShardForTensorParallel splits and along
// which dim, the collectives it lists, and the memory of the all-reduce copies (TensorParallelHooks) against a
// hand count on the cpu target.
#include "distributed/tensor_parallel.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "graph/error.h"
#include "simulator/memory_estimate.h"
#include "simulator/training_step_simulator.h"
#include "tests/distributed/distributed_test_graphs.h"

namespace llmem::dist {
namespace {

using namespace llmem::dist::testing;  // NOLINT
using sim::Phase;
using sim::testing::BlocksLabelled;
using sim::testing::Replay;
using sim::testing::ReplayExact;

using Shape = std::vector<int64_t>;

const Parameter& ParamNamed(const Graph& g, const std::string& name) {
  for (const auto& p : g.params()) {
    if (p.name == name) return p;
  }
  ADD_FAILURE() << "no parameter " << name;
  return g.params().front();
}

NodeId ProducerOf(const Graph& g, ValueId v) { return g.value(v).producer; }

// Every value in the dtype of the traced program (what an fp32 step runs).
std::vector<DType> TraceDTypes(const Graph& g) {
  std::vector<DType> dtypes;
  for (const auto& v : g.values()) dtypes.push_back(v.dtype);
  return dtypes;
}

// ---- The split of a decoder layer (TpBlock, tp = 2) ----

TEST(TensorParallelTest, AttentionAndMlpSplitColumnThenRow) {
  TpBlock t = MakeTpBlock();
  const TensorParallelRank rank = ShardForTensorParallel(t.graph, 2, /*vocab_parallel=*/true);
  auto split = [&](ValueId v) { return rank.split_dim.at(static_cast<size_t>(v.index)); };
  auto shape = [&](ValueId v) { return rank.graph.value(v).shape; };

  // Column-parallel q/k/v and up: weights split on dim 0 (output features), outputs on their last dim.
  EXPECT_EQ(split(t.wq), 0);
  EXPECT_EQ(split(t.wk), 0);
  EXPECT_EQ(split(t.wv), 0);
  EXPECT_EQ(split(t.w1), 0);
  EXPECT_EQ(shape(t.wq), (Shape{4, 8}));  // [8,8] -> 4 output rows per rank
  EXPECT_EQ(shape(t.w1), (Shape{16, 8}));  // [32,8] -> 16
  EXPECT_EQ(split(t.q), 2);
  EXPECT_EQ(shape(t.q), (Shape{1, 3, 4}));
  // The heads follow through view [1,3,2,4] (heads dim 2) and transpose(1,2) (heads dim 1): one head per rank.
  EXPECT_EQ(split(t.qv), 2);
  EXPECT_EQ(shape(t.qv), (Shape{1, 3, 1, 4}));
  EXPECT_EQ(split(t.qt), 1);
  EXPECT_EQ(shape(t.qt), (Shape{1, 1, 3, 4}));
  // The transposed view of the [1,3,4] shard: strides [24,4,8,1] become [12,4,4,1].
  EXPECT_EQ(rank.graph.value(t.qt).strides, (Shape{12, 4, 4, 1}));
  EXPECT_EQ(split(t.kt), 1);
  EXPECT_EQ(split(t.vt), 1);
  EXPECT_EQ(split(t.a), 1);  // attention output [1,2,3,4] -> [1,1,3,4]
  EXPECT_EQ(shape(t.a), (Shape{1, 1, 3, 4}));
  EXPECT_EQ(split(t.at), 2);  // back to [B,S,heads,hd]: [1,3,1,4], strides [24,4,12,1] -> [12,4,12,1]
  EXPECT_EQ(shape(t.at), (Shape{1, 3, 1, 4}));
  EXPECT_EQ(rank.graph.value(t.at).strides, (Shape{12, 4, 12, 1}));
  EXPECT_EQ(split(t.ar), 2);  // reshape [1,3,8] -> [1,3,4]
  EXPECT_EQ(shape(t.ar), (Shape{1, 3, 4}));
  // On one GPU the reshape of the transposed [1,3,2,4] copies; with one head per rank the transposed [1,3,1,4]
  // (strides [12,4,12,1]) merges into [1,3,4] with strides [12,4,1]: ATen returns a view.
  EXPECT_TRUE(t.graph.value(t.ar).storage_numel == 24 && !t.graph.value(t.ar).alias_of.valid());
  EXPECT_EQ(rank.graph.value(t.ar).alias_of, t.at);
  EXPECT_EQ(rank.graph.value(t.ar).storage_numel, 0);
  EXPECT_EQ(rank.graph.value(t.ar).strides, (Shape{12, 4, 1}));
  EXPECT_EQ(split(t.u), 2);
  EXPECT_EQ(shape(t.u), (Shape{1, 3, 16}));
  EXPECT_EQ(split(t.g), 2);  // gelu keeps the split
  EXPECT_EQ(shape(t.g), (Shape{1, 3, 16}));
  // Storages shrink with their values; views own none.
  EXPECT_EQ(rank.graph.value(t.q).storage_numel, 12);   // 24 / 2
  EXPECT_EQ(rank.graph.value(t.u).storage_numel, 48);   // 96 / 2
  EXPECT_EQ(rank.graph.value(t.qv).storage_numel, 0);

  // Row-parallel o and down: weights split on dim 1 (input features), outputs whole (all-reduced).
  EXPECT_EQ(split(t.wo), 1);
  EXPECT_EQ(split(t.w2), 1);
  EXPECT_EQ(shape(t.wo), (Shape{8, 4}));
  EXPECT_EQ(shape(t.w2), (Shape{8, 16}));
  EXPECT_EQ(split(t.o), -1);
  EXPECT_EQ(shape(t.o), (Shape{1, 3, 8}));
  EXPECT_EQ(split(t.d), -1);
  // Residual adds and the embeddings' sum are replicated.
  EXPECT_EQ(split(t.x), -1);
  EXPECT_EQ(split(t.r1), -1);
  EXPECT_EQ(split(t.r2), -1);
  EXPECT_EQ(shape(t.r2), (Shape{1, 3, 8}));

  // Parameters of the rank carry the split shapes and bytes.
  EXPECT_EQ(ParamNamed(rank.graph, "q_proj.weight").shape, (Shape{4, 8}));
  EXPECT_EQ(ParamNamed(rank.graph, "q_proj.weight").bytes, 128);
  EXPECT_EQ(ParamNamed(rank.graph, "up.weight").bytes, 512);     // 16 * 8 * 4
  EXPECT_EQ(ParamNamed(rank.graph, "down.weight").bytes, 512);   // 8 * 16 * 4
  EXPECT_EQ(ParamNamed(rank.graph, "o_proj.weight").bytes, 128);  // 8 * 4 * 4
}

TEST(TensorParallelTest, CollectiveFlagsAndList) {
  TpBlock t = MakeTpBlock();
  const TensorParallelRank rank = ShardForTensorParallel(t.graph, 2, /*vocab_parallel=*/true);
  const Graph& g = t.graph;
  const size_t emb = static_cast<size_t>(ProducerOf(g, t.x0).index);
  const size_t q_lin = static_cast<size_t>(ProducerOf(g, t.q).index);
  const size_t o_lin = static_cast<size_t>(ProducerOf(g, t.o).index);
  const size_t up = static_cast<size_t>(ProducerOf(g, t.u).index);
  const size_t down = static_cast<size_t>(ProducerOf(g, t.d).index);
  const size_t head = static_cast<size_t>(ProducerOf(g, t.logits).index);
  ASSERT_EQ(emb, 2u);
  ASSERT_EQ(q_lin, 4u);
  ASSERT_EQ(o_lin, 16u);
  ASSERT_EQ(head, 22u);
  // Forward all-reduce of partial sums: the vocab-parallel embedding and the row-parallel linears only.
  for (size_t n = 0; n < g.nodes().size(); ++n) {
    const bool expected = n == emb || n == o_lin || n == down;
    EXPECT_EQ(rank.output_all_reduced[n] != 0, expected) << "node " << n << " " << g.nodes()[n].kind;
  }
  // Backward all-reduce of the input gradient (tensor input 0) on the column-parallel linears: q, k, v (nodes
  // 4, 7, 10), up and the vocab-parallel LM head; never on a weight, never on a row-parallel linear.
  for (size_t n = 0; n < g.nodes().size(); ++n) {
    const auto& flags = rank.input_grad_all_reduced[n];
    const bool expected = n == 4 || n == 7 || n == 10 || n == up || n == head;
    ASSERT_FALSE(flags.empty() && expected) << "node " << n;
    for (size_t i = 0; i < flags.size(); ++i) {
      EXPECT_EQ(flags[i] != 0, expected && i == 0) << "node " << n << " input " << i;
    }
  }
  // The list, in graph order; every tensor is a replicated [1,3,8] f32 = 96 B over the 2 ranks.
  struct Want {
    StepPhase phase;
    std::string what;
  };
  const std::vector<Want> want = {
      {StepPhase::kForward, "vocab-parallel embedding all-reduce"},
      {StepPhase::kBackward, "column-parallel input-gradient all-reduce (model.layers.0.attn.q_proj)"},
      {StepPhase::kBackward, "column-parallel input-gradient all-reduce (model.layers.0.attn.k_proj)"},
      {StepPhase::kBackward, "column-parallel input-gradient all-reduce (model.layers.0.attn.v_proj)"},
      {StepPhase::kForward, "row-parallel output all-reduce (model.layers.0.attn.o_proj)"},
      {StepPhase::kBackward, "column-parallel input-gradient all-reduce (model.layers.0.mlp.up)"},
      {StepPhase::kForward, "row-parallel output all-reduce (model.layers.0.mlp.down)"},
      {StepPhase::kBackward, "column-parallel input-gradient all-reduce (lm_head)"},
  };
  const CollectiveList collectives = TensorParallelCollectives(rank, TraceDTypes(rank.graph));
  ASSERT_EQ(collectives.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const auto& c = collectives[i];
    EXPECT_EQ(c.kind, CollectiveKind::kAllReduce) << i;
    EXPECT_EQ(c.bytes, 96) << i;
    EXPECT_EQ(c.group_size, 2) << i;
    EXPECT_EQ(c.phase, want[i].phase) << i;
    EXPECT_EQ(c.what.rfind(want[i].what, 0), 0u) << c.what;
  }
}

// Under bf16 autocast the row-parallel linears' partial outputs are 16-bit, so their all-reduces move half the
// bytes; a column-parallel input gradient is reduced in its input's dtype after autocast's ToCopyBackward (fp32
// here: the residual stream adds fp32 embeddings), and the embedding's output is fp32 (not an autocast op).
TEST(TensorParallelTest, AllReducesMoveTheDtypeOfTheSimulatedStep) {
  TpBlock t = MakeTpBlock();
  const TensorParallelRank rank = ShardForTensorParallel(t.graph, 2, /*vocab_parallel=*/true);
  sim::TrainingConfig config = CpuConfig();
  config.precision = sim::Precision::kBf16Autocast;
  TensorParallelHooks hooks(&rank);
  const sim::StepSimulation sim = sim::SimulateTrainingStep(rank.graph, config, &hooks);
  const CollectiveList collectives = TensorParallelCollectives(rank, sim.value_dtypes);
  // [1,3,8] replicated: 96 B in fp32, 48 B in bf16; in the order of the fp32 list above.
  const std::vector<int64_t> want = {96, 96, 96, 96, 48, 96, 48, 96};
  ASSERT_EQ(collectives.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(collectives[i].bytes, want[i]) << collectives[i].what;
}

TEST(TensorParallelTest, VocabParallelEmbeddingAndHead) {
  TpBlock t = MakeTpBlock();
  const TensorParallelRank vp = ShardForTensorParallel(t.graph, 2, /*vocab_parallel=*/true);
  auto split = [&](const TensorParallelRank& r, ValueId v) { return r.split_dim.at(static_cast<size_t>(v.index)); };
  // Token embedding (ids are a graph input): rows split, output whole after the all-reduce.
  EXPECT_EQ(split(vp, t.wte), 0);
  EXPECT_EQ(vp.graph.value(t.wte).shape, (Shape{5, 8}));
  EXPECT_EQ(ParamNamed(vp.graph, "wte").bytes, 160);
  EXPECT_EQ(split(vp, t.x0), -1);
  // Position embedding (indices from arange, not a graph input) stays whole.
  EXPECT_EQ(split(vp, t.wpe), -1);
  EXPECT_EQ(ParamNamed(vp.graph, "wpe").bytes, 96);
  // LM head column-parallel: [10,8] -> [5,8], logits split on the vocabulary.
  EXPECT_EQ(split(vp, t.wh), 0);
  EXPECT_EQ(split(vp, t.logits), 2);
  EXPECT_EQ(vp.graph.value(t.logits).shape, (Shape{1, 3, 5}));
  EXPECT_EQ(vp.graph.value(vp.graph.loss()).shape, Shape{});  // the loss is a replicated scalar
  // DTensor hands back the embedding's weight gradient whole: [10, 8] fp32 = 320 B, not the 160 B shard.
  const TensorParallelHooks hooks(&vp);
  const OpNode& embedding = vp.graph.node(ProducerOf(t.graph, t.x0));
  EXPECT_EQ(hooks.InputGradBytes(embedding, 0, 160), 320);
  EXPECT_EQ(hooks.InputGradBytes(vp.graph.node(ProducerOf(t.graph, t.logits)), 1, 160), 160);  // the LM head's: a shard

  const TensorParallelRank plain = ShardForTensorParallel(t.graph, 2, /*vocab_parallel=*/false);
  EXPECT_EQ(split(plain, t.wte), -1);
  EXPECT_EQ(split(plain, t.wh), -1);
  EXPECT_EQ(split(plain, t.logits), -1);
  EXPECT_EQ(plain.graph.value(t.logits).shape, (Shape{1, 3, 10}));
  EXPECT_EQ(plain.output_all_reduced[static_cast<size_t>(ProducerOf(t.graph, t.x0).index)], 0);
  EXPECT_EQ(plain.all_reduces.size(), 6u);  // q, k, v, o, up, down
  // The layer is split the same way either way.
  EXPECT_EQ(split(plain, t.wq), 0);
  EXPECT_EQ(split(plain, t.w2), 1);
}

TEST(TensorParallelTest, DegreeOneIsTheGraphItself) {
  TpBlock t = MakeTpBlock();
  const TensorParallelRank rank = ShardForTensorParallel(t.graph, 1, true);
  EXPECT_TRUE(rank.all_reduces.empty());
  ASSERT_EQ(rank.graph.values().size(), t.graph.values().size());
  for (size_t i = 0; i < t.graph.values().size(); ++i) {
    EXPECT_EQ(rank.graph.values()[i].shape, t.graph.values()[i].shape);
    EXPECT_EQ(rank.split_dim[i], -1);
  }
  for (uint8_t f : rank.output_all_reduced) EXPECT_EQ(f, 0);
}

TEST(TensorParallelTest, RankGraphSimulatesWithTheHooks) {
  TpBlock t = MakeTpBlock();
  const TensorParallelRank rank = ShardForTensorParallel(t.graph, 2, true);
  TensorParallelHooks hooks(&rank);
  sim::StepSimulation sim = sim::SimulateTrainingStep(rank.graph, CpuConfig(), &hooks);
  // One copy per forward all-reduce (embedding, o, down), one per column-parallel input gradient.
  EXPECT_EQ(BlocksLabelled(sim.timeline, t.graph.value(t.o).name + " after collective"), (std::vector<int64_t>{96}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, t.graph.value(t.d).name + " after collective"), (std::vector<int64_t>{96}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, t.graph.value(t.x0).name + " after collective"), (std::vector<int64_t>{96}));
  // x feeds q, k and v: three input-gradient all-reduces of 96 B.
  EXPECT_EQ(BlocksLabelled(sim.timeline, "d " + t.graph.value(t.x).name + " after collective"),
            (std::vector<int64_t>{96, 96, 96}));
  // Vocab-parallel cross entropy: one fp32 temporary of the logits shard ([1,3,5] = 60 B) beyond the single-GPU
  // kernels, in forward (shifted = x - max) and in backward.
  EXPECT_EQ(BlocksLabelled(sim.timeline, "aten::cross_entropy_loss parallel workspace"), (std::vector<int64_t>{60}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "aten::cross_entropy_loss parallel backward"), (std::vector<int64_t>{60}));
  EXPECT_EQ(rank.loss_workspace_bytes.at(23), 60);
}

// ---- Errors ----

TEST(TensorParallelTest, DegreesThatDoNotSplitAreConfigErrors) {
  TpBlock t = MakeTpBlock();
  EXPECT_THROW(ShardForTensorParallel(t.graph, 0, true), ConfigError);
  EXPECT_THROW(ShardForTensorParallel(t.graph, -2, true), ConfigError);
  try {
    ShardForTensorParallel(t.graph, 3, /*vocab_parallel=*/false);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    // The split is followed in op order: the first reshape it cannot cross is q's view to [1,3,2,4] heads,
    // whose 2 heads 3 does not divide.
    EXPECT_EQ(std::string(e.what()), "tensor-parallel degree 3 does not divide dim 2 (2) of %10");
  }
}

TEST(TensorParallelTest, LinearOnAHeadSplitTensorIsUnsupported) {
  // linear(x, w) [1,3,8] -> view [1,3,2,4] -> transpose [1,2,3,4] (split on the heads, dim 1) -> linear: its input
  // is split on a dim that is not the last, which neither a column- nor a row-parallel linear handles.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {1, 3, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {1, 3});
  b.SetLayer(0);
  ValueId w = b.Param("w", {8, 8});
  ValueId q = b.Op("aten::linear", {T(x), T(w), None()}, {1, 3, 8});
  ValueId qv = b.OpOut("aten::view", {T(q), Ints({1, 3, 2, 4})}, Out({1, 3, 2, 4}).AliasOf(q));
  ValueId qt = b.OpOut("aten::transpose", {T(qv), I(1), I(2)}, Out({1, 2, 3, 4}).AliasOf(q));
  ValueId w2 = b.Param("w2", {4, 4});
  ValueId y = b.OpOut("aten::linear", {T(qt), T(w2), None()}, Out({1, 2, 3, 4}), "model.layers.0.odd");
  Graph g = b.Build(CrossEntropy(b, y, labels), 1, 3);
  try {
    ShardForTensorParallel(g, 2, false);
    FAIL() << "expected UnsupportedOpError";
  } catch (const UnsupportedOpError& e) {
    EXPECT_EQ(std::string(e.what()),
              "tensor parallelism: the input of model.layers.0.odd is split along dim 1, not its last dim");
  }
}

TEST(TensorParallelTest, SpreadingADimThatFoldedOthersInIsRefused) {
  // BLOOM-style, batch 2: heads folded into the batch ([2,2,3,4] -> [4,3,4], the split now inside dim 0), then
  // spread again ([4,3,4] -> [2,2,3,4]): which output dim holds the split (the batch or the heads, both 2) is
  // ambiguous, so the split is refused rather than guessed.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {2, 3, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {2, 3});
  b.SetLayer(0);
  ValueId w = b.Param("w", {8, 8});
  ValueId q = b.Op("aten::linear", {T(x), T(w), None()}, {2, 3, 8});
  ValueId qv = b.OpOut("aten::view", {T(q), Ints({2, 3, 2, 4})}, Out({2, 3, 2, 4}).AliasOf(q));
  ValueId qt = b.OpOut("aten::transpose", {T(qv), I(1), I(2)}, Out({2, 2, 3, 4}).AliasOf(q));
  ValueId folded = b.Op("aten::reshape", {T(qt), Ints({4, 3, 4})}, {4, 3, 4});
  ValueId spread = b.OpOut("aten::view", {T(folded), Ints({2, 2, 3, 4})}, Out({2, 2, 3, 4}).AliasOf(folded),
                           "model.layers.0.attn");
  ValueId back = b.OpOut("aten::transpose", {T(spread), I(1), I(2)}, Out({2, 3, 2, 4}).AliasOf(folded));
  ValueId flat = b.Op("aten::reshape", {T(back), Ints({2, 3, 8})}, {2, 3, 8});
  ValueId w2 = b.Param("w2", {8, 8});
  ValueId y = b.Op("aten::linear", {T(flat), T(w2), None()}, {2, 3, 8});
  Graph g = b.Build(CrossEntropy(b, y, labels), 2, 3);
  try {
    ShardForTensorParallel(g, 2, false);
    FAIL() << "expected UnsupportedOpError";
  } catch (const UnsupportedOpError& e) {
    EXPECT_EQ(std::string(e.what()), "tensor parallelism: cannot follow the split through aten::view (model.layers.0.attn)");
  }
}

// A fused projection: linear(x, w [sum of widths, 8]) [1,3,sum] cut by `cut` into pieces of `widths` features
// along the last dim (the split one); each piece feeds a row-parallel linear back to 8 features, summed.
Graph FusedProjection(const std::vector<int64_t>& widths, const std::string& cut) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {1, 3, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {1, 3});
  b.SetLayer(0);
  int64_t total = 0;
  for (int64_t w : widths) total += w;
  ValueId w = b.Param("qkv_proj.weight", {total, 8});
  ValueId fused = b.OpOut("aten::linear", {T(x), T(w), None()}, Out({1, 3, total}), "model.layers.0.attn.qkv_proj");
  std::vector<ValueId> pieces;
  if (cut == "aten::slice") {
    int64_t start = 0;
    for (int64_t width : widths) {
      pieces.push_back(b.OpOut("aten::slice", {T(fused), I(2), I(start), I(start + width), I(1)},
                               Out({1, 3, width}).AliasOf(fused), "model.layers.0.attn"));
      start += width;
    }
  } else {  // aten::split_with_sizes: one op, one output per piece
    std::vector<Out> outs;
    for (int64_t width : widths) outs.push_back(Out({1, 3, width}).AliasOf(fused));
    pieces = b.OpN("aten::split_with_sizes", {T(fused), Ints(widths), I(2)}, outs, "model.layers.0.attn");
  }
  ValueId sum;
  for (size_t i = 0; i < pieces.size(); ++i) {
    ValueId wo = b.Param("o" + std::to_string(i) + ".weight", {8, widths[i]});
    ValueId o = b.Op("aten::linear", {T(pieces[i]), T(wo), None()}, {1, 3, 8});
    sum = sum.valid() ? b.Op("aten::add", {T(sum), T(o), I(1)}, {1, 3, 8}) : o;
  }
  return b.Build(CrossEntropy(b, sum, labels), 1, 3);
}

TEST(TensorParallelTest, FusedProjectionGivesEachRankAShareOfEveryPieceOnlyWhenPiecesAreEqual) {
  // Equal pieces (MHA q/k/v, gate/up): Megatron's fused layout, 1/tp of every piece per rank.
  for (const std::string cut : {"aten::slice", "aten::split_with_sizes"}) {
    const Graph g = FusedProjection({8, 8, 8}, cut);
    const TensorParallelRank rank = ShardForTensorParallel(g, 2, false);
    EXPECT_EQ(ParamNamed(rank.graph, "qkv_proj.weight").shape, (Shape{12, 8})) << cut;
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(ParamNamed(rank.graph, "o" + std::to_string(i) + ".weight").shape, (Shape{8, 4})) << cut;
    }
  }
  // Unequal pieces (fused GQA q/k/v: 8 query features, 4 key, 4 value): refused with the projection named.
  for (const std::string cut : {"aten::slice", "aten::split_with_sizes"}) {
    const Graph g = FusedProjection({8, 4, 4}, cut);
    try {
      ShardForTensorParallel(g, 2, false);
      ADD_FAILURE() << "expected UnsupportedOpError for " << cut;
    } catch (const UnsupportedOpError& e) {
      EXPECT_EQ(std::string(e.what()),
                "tensor parallelism: the fused projection model.layers.0.attn.qkv_proj (aten::linear) is cut by " +
                    cut + " into pieces of unequal widths (8, 4, 4): each rank's share depends on how its weight "
                    "is interleaved, which is not modelled");
    }
  }
}

TEST(TensorParallelTest, FusedConv1DProjectionIsFollowedThroughTheViewBackToThreeDims) {
  // GPT-2's c_attn: addmm(bias, x [B*S, 8], w [8, total]) [3, total] -> view [1, 3, total] -> split.
  auto build = [](const std::vector<int64_t>& widths) {
    TestGraphBuilder b;
    ValueId x = b.Input("x", {3, 8}, DType::kF32);
    ValueId labels = b.Input("labels", {1, 3});
    b.SetLayer(0);
    int64_t total = 0;
    for (int64_t w : widths) total += w;
    ValueId bias = b.Param("c_attn.bias", {total});
    ValueId w = b.Param("c_attn.weight", {8, total});
    ValueId flat = b.OpOut("aten::addmm", {T(bias), T(x), T(w), I(1), I(1)}, Out({3, total}), "h.0.attn.c_attn");
    ValueId fused = b.OpOut("aten::view", {T(flat), Ints({1, 3, total})}, Out({1, 3, total}).AliasOf(flat));
    std::vector<Out> outs;
    for (int64_t width : widths) outs.push_back(Out({1, 3, width}).AliasOf(flat));
    std::vector<ValueId> pieces = b.OpN("aten::split_with_sizes", {T(fused), Ints(widths), I(2)}, outs);
    ValueId wo = b.Param("c_proj.weight", {8, widths[0]});
    ValueId o = b.Op("aten::linear", {T(pieces[0]), T(wo), None()}, {1, 3, 8});
    return b.Build(CrossEntropy(b, o, labels), 1, 3);
  };
  const TensorParallelRank rank = ShardForTensorParallel(build({4, 4, 4}), 2, false);
  EXPECT_EQ(ParamNamed(rank.graph, "c_attn.weight").shape, (Shape{8, 6}));  // [in, out]: out split
  EXPECT_EQ(ParamNamed(rank.graph, "c_attn.bias").shape, (Shape{6}));
  EXPECT_THROW(ShardForTensorParallel(build({4, 2, 2}), 2, false), UnsupportedOpError);
}

TEST(TensorParallelTest, WeightSplitTwoWaysIsUnsupported) {
  // w [8,8] is column-parallel in the first linear (dim 0) and row-parallel in the second (dim 1).
  TestGraphBuilder b;
  ValueId x = b.Input("x", {1, 3, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {1, 3});
  b.SetLayer(0);
  ValueId w = b.Param("w", {8, 8});
  ValueId h = b.Op("aten::linear", {T(x), T(w), None()}, {1, 3, 8});
  ValueId y = b.OpOut("aten::linear", {T(h), T(w), None()}, Out({1, 3, 8}), "model.layers.0.shared");
  Graph g = b.Build(CrossEntropy(b, y, labels), 1, 3);
  EXPECT_THROW(ShardForTensorParallel(g, 2, false), UnsupportedOpError);
}

// ---- Memory of the all-reduce copies, by hand ----

// TpMlp (f32): ids [1,2] i64 16 B, labels 16 B; embedding wte [8,4] -> x [1,2,4]; layer 0: up W1 [16,4] ->
// u [1,2,16]; gelu; down W2 [4,16] -> d [1,2,4]; r = add(x, d); head wh [8,4] -> logits [1,2,8] -> cross_entropy.
// Not vocab-parallel: wte, wh and logits stay whole. Nodes: 0 embedding, 1 up, 2 gelu, 3 down, 4 add, 5 head,
// 6 cross_entropy.
struct TpMlp {
  Graph graph;
  ValueId x, u, d;
};

TpMlp MakeTpMlp() {
  TestGraphBuilder b;
  TpMlp t;
  ValueId ids = b.Input("input_ids", {1, 2});
  ValueId labels = b.Input("labels", {1, 2});
  ValueId wte = b.Param("wte", {8, 4});
  t.x = b.Op("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, {1, 2, 4});
  b.SetLayer(0);
  ValueId w1 = b.Param("up.weight", {16, 4});
  t.u = b.OpOut("aten::linear", {T(t.x), T(w1), None()}, Out({1, 2, 16}), "model.layers.0.mlp.up");
  ValueId g = b.Op("aten::gelu", {T(t.u)}, {1, 2, 16});
  ValueId w2 = b.Param("down.weight", {4, 16});
  t.d = b.OpOut("aten::linear", {T(g), T(w2), None()}, Out({1, 2, 4}), "model.layers.0.mlp.down");
  ValueId r = b.Op("aten::add", {T(t.x), T(t.d), I(1)}, {1, 2, 4});
  b.SetHead();
  ValueId wh = b.Param("lm_head.weight", {8, 4});
  ValueId logits = b.Op("aten::linear", {T(r), T(wh), None()}, {1, 2, 8});
  t.graph = b.Build(CrossEntropy(b, logits, labels), 1, 2);
  return t;
}

// Rank sizes (tp = 2, f32): weights wte 128, W1 [8,4] 128, W2 [4,8] 128, wh 128 = 512 B (one GPU: 768 B);
// x 32, u [1,2,8] 64, g 64, d 32, r 32, logits 64, loss 4.
//   setup: weights 512 + AdamW states 1024 + inputs 32                                                  = 1568
//   forward: x 32 = 1600; u 64 = 1664; g 64 = 1728;
//            down: partial d 32 = 1760, all-reduced copy 32 = 1792 (both alive), partial freed = 1760;
//            add: r 32 = 1792, the copy of d freed = 1760; head: logits 64 = 1824;
//            loss 4 = 1828, log-probs 64 = 1892 (forward peak), logits freed                            -> 1828
//   backward: d loss 4 = 1832; CE workspace 64 = 1896, d logits 64 = 1960; -> 1828.
//            head: d r 32 = 1860, d wh 128 = 1988; d logits, r freed = 1892. add: d r passes to x and d.
//            down: d g 64 = 1956, d W2 128 = 2084; g freed = 2020. gelu: d u 64 = 2084; d g, u freed = 1956.
//            up: partial d x 32 = 1988, all-reduced copy 32 = 2020, partial freed = 1988; the copy is added into
//            x's gradient (d r) in place and freed = 1956; d W1 128 = 2084; d u, x freed = 1988.
//            embedding: d wte 128 = 2116 (backward peak); d x freed = 2084; loss freed                 -> 2080
//   optimizer (cpu, one parameter at a time): sqrt + denom of a 128 B parameter: 2080 + 256            = 2336
TEST(TensorParallelTest, AllReduceCopiesLiveBesideThePartialsHandCount) {
  TpMlp t = MakeTpMlp();
  // The count above frees each value at its last use: the graph's module paths are not a real program's frames
  // (its residual add sits outside the layer), so eager frame lifetimes would hold `d` for the whole forward.
  sim::TrainingConfig config = CpuConfig();
  config.lifetimes = sim::Lifetimes::kTorchScript;
  const TensorParallelRank rank = ShardForTensorParallel(t.graph, 2, /*vocab_parallel=*/false);
  EXPECT_EQ(rank.graph.value(t.u).shape, (Shape{1, 2, 8}));
  EXPECT_EQ(rank.all_reduces.size(), 2u);  // up's input gradient (backward), down's output (forward)
  TensorParallelHooks hooks(&rank);
  sim::StepSimulation sim = sim::SimulateTrainingStep(rank.graph, config, &hooks);
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[static_cast<size_t>(Phase::kSetup)], 1568);
  EXPECT_EQ((r.node_peak[{Phase::kForward, 3}]), 1792);  // partial + all-reduced copy of d
  EXPECT_EQ(r.phase_peak[static_cast<size_t>(Phase::kForward)], 1892);
  EXPECT_EQ(r.phase_start[static_cast<size_t>(Phase::kBackward)], 1828);
  EXPECT_EQ((r.node_peak[{Phase::kBackward, 1}]), 2084);
  EXPECT_EQ(r.phase_peak[static_cast<size_t>(Phase::kBackward)], 2116);
  EXPECT_EQ(r.phase_start[static_cast<size_t>(Phase::kOptimizer)], 2080);
  EXPECT_EQ(r.peak, 2336);

  // The order of the forward copy: the partial, then the copy, then the partial's free.
  const std::string d = t.graph.value(t.d).name;
  const auto all = TraceOf(sim.timeline, [](sim::MemoryCategory) { return true; });
  auto at = [&](const std::string& line) {
    const auto it = std::find(all.begin(), all.end(), line);
    EXPECT_NE(it, all.end()) << line;
    return it - all.begin();
  };
  EXPECT_EQ(at("forward +" + d + " = aten::linear 32") + 1, at("forward +" + d + " after collective 32"));
  EXPECT_EQ(at("forward +" + d + " after collective 32") + 1, at("forward -" + d + " = aten::linear"));
  // And of the backward copy of x's partial gradient.
  const std::string x = t.graph.value(t.x).name;
  EXPECT_EQ(at("backward +d " + x + " 32") + 1, at("backward +d " + x + " after collective 32"));
  EXPECT_EQ(at("backward +d " + x + " after collective 32") + 1, at("backward -d " + x));

  // Without the hooks the same rank graph holds no copy: 32 B less at the down projection.
  sim::StepSimulation bare = sim::SimulateTrainingStep(rank.graph, config);
  EXPECT_EQ((ReplayExact(bare.timeline).node_peak[{Phase::kForward, 3}]), 1760);

  // The estimate on the cpu target reports the same peak and the rank's weights.
  TensorParallelHooks hooks2(&rank);
  sim::MemoryEstimate est = sim::EstimateMemory(rank.graph, config, &hooks2);
  EXPECT_EQ(est.peak_allocated_bytes, 2336);
  EXPECT_EQ(est.phase_peak_bytes[static_cast<size_t>(Phase::kForward)], 1892);
  EXPECT_EQ(est.weights_bytes, 512);
  EXPECT_EQ(sim::EstimateMemory(t.graph, config).weights_bytes, 768);  // one GPU holds the whole layer
}

}  // namespace
}  // namespace llmem::dist
