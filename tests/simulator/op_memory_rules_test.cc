// Per-op memory rules: what each op saves for backward, the extra buffers it allocates, and how each input's
// gradient is produced. Every case builds a one- or two-op graph with tiny shapes and checks the byte counts
// against the sizes worked out in the comments (gpu-memory-facts.md §3.1 lists what autograd saves).
#include "simulator/op_memory_rules.h"

#include <gtest/gtest.h>

#include "simulator/backend_rules.h"
#include "simulator/gpu_catalog.h"
#include "tests/simulator/test_graph_builder.h"

namespace llmem::sim {
namespace {

using llmem::testing::B;
using llmem::testing::D;
using llmem::testing::I;
using llmem::testing::Ints;
using llmem::testing::None;
using llmem::testing::Out;
using llmem::testing::T;
using llmem::testing::TestGraphBuilder;
using llmem::testing::TList;

BackendRules Cpu() {
  Target t;
  t.is_cpu = true;
  return RulesFor(t);
}

BackendRules Cuda() {
  Target t;
  t.is_cpu = false;
  t.gpu = *FindGpu("a100-80");
  return RulesFor(t);
}

// The rule of node `node` with every value at its IR dtype.
std::optional<OpMemoryRule> Rule(const Graph& g, const BackendRules& backend, int node = 0) {
  RuleContext ctx{g, backend, [&g](ValueId v) { return g.value(v).dtype; },
                  [&g](ValueId v) { return ShapeBytes(g.value(v).shape, g.value(v).dtype); }};
  return RuleFor(g.node(NodeId{node}), ctx);
}

// Every graph needs a scalar floating loss; the ops under test come first, a sum closes the graph.
ValueId CloseWithSum(TestGraphBuilder& b, ValueId v) { return b.Op("aten::sum", {T(v), None()}, {}); }

TEST(OpMemoryRulesTest, FrozenWeightLinearKeepsOnlyTheWeight) {
  // x requires grad, W is frozen (requires_grad False): x's gradient needs W; nothing needs x.
  TestGraphBuilder b;
  ValueId in = b.Input("in", {4, 8}, DType::kF32);
  ValueId w0 = b.Param("w0", {8, 8});
  ValueId x = b.Op("aten::linear", {T(in), T(w0), None()}, {4, 8});
  ValueId w = b.Param("w", {16, 8}, DType::kF32, /*trainable=*/false);
  ValueId y = b.Op("aten::linear", {T(x), T(w), None()}, {4, 16});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu(), 1);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{1}));
}

TEST(OpMemoryRulesTest, LinearSavesInputAndWeightAndMakesNewGrads) {
  // y = x W^T + b: x [4,8] (the output of an op on the gradient path), W [16,8], b [16].
  TestGraphBuilder b;
  ValueId in = b.Input("in", {4, 8}, DType::kF32);
  ValueId w0 = b.Param("w0", {8, 8});
  ValueId x = b.Op("aten::linear", {T(in), T(w0), None()}, {4, 8});
  ValueId w = b.Param("w", {16, 8});
  ValueId bias = b.Param("b", {16});
  ValueId y = b.Op("aten::linear", {T(x), T(w), T(bias)}, {4, 16});
  Graph g = b.Build(CloseWithSum(b, y));

  // The first linear's input needs no gradient: its weight is not kept (only the input, for w0's gradient).
  auto first = Rule(g, Cpu(), 0);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->saved_inputs, (std::vector<int>{0}));
  auto r = Rule(g, Cpu(), 1);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{0, 1}));
  EXPECT_TRUE(r->saved_outputs.empty());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNew, GradKind::kNew}));
  EXPECT_TRUE(r->forward_extra.empty());
  EXPECT_EQ(r->backward_workspace_bytes, 0);
}

TEST(OpMemoryRulesTest, MulSavesEachInputOnlyForTheOthersGradient) {
  // Both require grad: a is saved for d b, b for d a.
  {
    TestGraphBuilder b;
    ValueId a = b.Param("a", {4, 8});
    ValueId c = b.Param("c", {4, 8});
    ValueId y = b.Op("aten::mul", {T(a), T(c)}, {4, 8});
    Graph g = b.Build(CloseWithSum(b, y));
    auto r = Rule(g, Cpu());
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->saved_inputs, (std::vector<int>{0, 1}));
    EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNew}));
    EXPECT_EQ(r->backward_workspace_bytes, 0);  // same shapes: no sum_to workspace
  }
  // Only a requires grad: d a = grad * c needs c (input 1); a itself is not saved.
  {
    TestGraphBuilder b;
    ValueId a = b.Param("a", {4, 8});
    ValueId c = b.Input("c", {4, 8}, DType::kF32);
    ValueId y = b.Op("aten::mul", {T(a), T(c)}, {4, 8});
    Graph g = b.Build(CloseWithSum(b, y));
    auto r = Rule(g, Cpu());
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->saved_inputs, (std::vector<int>{1}));
  }
  // Only c requires grad: d c = grad * a needs a (input 0).
  {
    TestGraphBuilder b;
    ValueId a = b.Input("a", {4, 8}, DType::kF32);
    ValueId c = b.Param("c", {4, 8});
    ValueId y = b.Op("aten::mul", {T(a), T(c)}, {4, 8});
    Graph g = b.Build(CloseWithSum(b, y));
    auto r = Rule(g, Cpu());
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->saved_inputs, (std::vector<int>{0}));
  }
}

TEST(OpMemoryRulesTest, MulWithBroadcastWeightNeedsFullSizeWorkspace) {
  // x [4,8] * w [8] (RMSNorm weight): d w = sum_to(grad * x): a full [4,8] f32 product first = 4*8*4 = 128 B.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId w = b.Param("w", {8});
  ValueId y = b.Op("aten::mul", {T(x), T(w)}, {4, 8});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{0}));
  EXPECT_EQ(r->backward_workspace_bytes, 128);
}

TEST(OpMemoryRulesTest, IndexKeepsItsIndexTensorsForIndexPut) {
  // h[top_x] (Mixtral's expert rows): IndexBackward0 keeps the indices; its gradient is a new h-sized tensor.
  TestGraphBuilder b;
  ValueId in = b.Input("in", {6, 4}, DType::kF32);
  ValueId w = b.Param("w", {4, 4});
  ValueId h = b.Op("aten::linear", {T(in), T(w), None()}, {6, 4});
  ValueId top_x = b.Input("top_x", {3});
  ValueId rows = b.Op("aten::index", {T(h), TList({top_x})}, {3, 4});
  Graph g = b.Build(CloseWithSum(b, rows));
  auto r = Rule(g, Cpu(), 1);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{1}));
  EXPECT_EQ(r->input_grads[0], GradKind::kNew);
}

TEST(OpMemoryRulesTest, IndexAddKeepsTheIndexAndTheSourceRows) {
  // out.index_add_(0, top_x, rows): IndexAddBackward0 keeps the index and the source (torch 2.11's _saved_index,
  // _saved_source); out's gradient is the output's, the rows' a new one of their own shape.
  TestGraphBuilder b;
  ValueId in = b.Input("in", {3, 4}, DType::kF32);
  ValueId w = b.Param("w", {4, 4});
  ValueId rows = b.Op("aten::linear", {T(in), T(w), None()}, {3, 4});
  ValueId out = b.Op("aten::zeros", {Ints({6, 4}), None(), None(), None(), None()}, {6, 4});
  ValueId top_x = b.Input("top_x", {3});
  ValueId added = b.Op("aten::index_add_", {T(out), I(0), T(top_x), T(rows)}, {6, 4});
  Graph g = b.Build(CloseWithSum(b, added));
  auto r = Rule(g, Cpu(), 2);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{1, 2}));
  EXPECT_EQ(r->input_grads[1], GradKind::kNone);
  EXPECT_EQ(r->input_grads[2], GradKind::kPassThrough);  // a shape other than the output's: a new tensor
}

TEST(OpMemoryRulesTest, AddPassesTheGradientThroughAndSavesNothing) {
  TestGraphBuilder b;
  ValueId a = b.Param("a", {4, 8});
  ValueId c = b.Param("c", {4, 8});
  ValueId y = b.Op("aten::add", {T(a), T(c), I(1)}, {4, 8});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->saved_inputs.empty());
  EXPECT_TRUE(r->saved_outputs.empty());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kPassThrough, GradKind::kPassThrough}));
  EXPECT_EQ(r->backward_workspace_bytes, 0);
}

TEST(OpMemoryRulesTest, PowSavesInputAndNeedsTwoInputSizedTemporaries) {
  // x [4,8] f32 = 128 B; pow_backward: exponent * x.pow(exponent - 1) and its product with grad: 2 * 128 = 256 B.
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 8});
  ValueId y = b.Op("aten::pow", {T(x), I(2)}, {4, 8});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{0}));
  EXPECT_TRUE(r->saved_outputs.empty());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew}));
  EXPECT_EQ(r->backward_workspace_bytes, 256);
}

TEST(OpMemoryRulesTest, RsqrtSavesResultAndNeedsTwoOutputSizedTemporaries) {
  // rsqrt of the per-row variance [4,1] f32 = 16 B; backward -0.5 * grad * result^3: 2 * 16 = 32 B.
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 1});
  ValueId y = b.Op("aten::rsqrt", {T(x)}, {4, 1});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->saved_inputs.empty());
  EXPECT_EQ(r->saved_outputs, (std::vector<int>{0}));
  EXPECT_EQ(r->backward_workspace_bytes, 32);
}

TEST(OpMemoryRulesTest, SoftmaxSavesOnlyItsResult) {
  TestGraphBuilder b;
  ValueId x = b.Param("x", {2, 4, 4});
  ValueId y = b.Op("aten::softmax", {T(x), I(-1), None()}, {2, 4, 4});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->saved_inputs.empty());
  EXPECT_EQ(r->saved_outputs, (std::vector<int>{0}));
  EXPECT_TRUE(r->forward_extra.empty());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew}));
}

TEST(OpMemoryRulesTest, LayerNormKeepsMeanAndRstdOnePerRowInTheBackendsDtype) {
  // x [2,3,8]: 2*3 = 6 rows; mean and rstd are [6] each, saved for backward. CUDA keeps them in float (the
  // accumulate type): 24 B each. The CPU kernel keeps them in the input's dtype (12 B for bf16), float only
  // when a 16-bit input meets fp32 weights.
  struct Case {
    DType input, params;
    bool cuda;
    int64_t bytes;
  };
  for (const Case& c : {Case{DType::kF32, DType::kF32, false, 24}, Case{DType::kBF16, DType::kBF16, false, 12},
                        Case{DType::kBF16, DType::kF32, false, 24}, Case{DType::kBF16, DType::kBF16, true, 24},
                        Case{DType::kF32, DType::kF32, true, 24}}) {
    SCOPED_TRACE(std::string(DTypeName(c.input)) + " input, " + std::string(DTypeName(c.params)) + " weights" +
                 (c.cuda ? ", cuda" : ", cpu"));
    TestGraphBuilder b;
    ValueId x = b.Input("x", {2, 3, 8}, c.input);
    ValueId w = b.Param("w", {8}, c.params);
    ValueId bias = b.Param("b", {8}, c.params);
    ValueId y =
        b.Op("aten::layer_norm", {T(x), Ints({8}), T(w), T(bias), D(1e-5), B(true)}, {2, 3, 8}, c.input);
    Graph g = b.Build(CloseWithSum(b, y));
    auto r = Rule(g, c.cuda ? Cuda() : Cpu());
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->saved_inputs, (std::vector<int>{0, 1, 2}));
    ASSERT_EQ(r->forward_extra.size(), 2u);
    for (const auto& e : r->forward_extra) {
      EXPECT_EQ(e.bytes, c.bytes);
      EXPECT_TRUE(e.saved);
    }
    EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNew, GradKind::kNew}));
  }
}

TEST(OpMemoryRulesTest, CrossEntropyKeepsLogProbsAndNeedsLogitSizedBackwardWorkspace) {
  // logits [4,16] f32 = 256 B: log_softmax(logits) (256 B) is kept for backward; nll_loss_backward's zero-filled
  // [4,16] gradient (256 B) is the workspace alive while the logits' gradient is made.
  TestGraphBuilder b;
  ValueId w = b.Param("w", {4, 16});
  ValueId labels = b.Input("labels", {4});
  ValueId loss = b.Op("aten::cross_entropy_loss", {T(w), T(labels), None(), I(1), I(-100), D(0.0)}, {});
  Graph g = b.Build(loss);
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->forward_extra.size(), 1u);
  EXPECT_EQ(r->forward_extra[0].bytes, 256);
  EXPECT_TRUE(r->forward_extra[0].saved);
  EXPECT_EQ(r->backward_workspace_bytes, 256);
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNone}));
}

TEST(OpMemoryRulesTest, EmbeddingSavesIndicesAndItsGradientIsTheWholeWeight) {
  // embedding(weight [100,8], ids [2,3]): the gradient is a new [100,8] tensor (kNew of the weight input), not
  // one row per token; only the indices are saved.
  TestGraphBuilder b;
  ValueId w = b.Param("wte", {100, 8});
  ValueId ids = b.Input("ids", {2, 3});
  ValueId e = b.Op("aten::embedding", {T(w), T(ids), I(-1), B(false), B(false)}, {2, 3, 8});
  Graph g = b.Build(CloseWithSum(b, e));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{1}));
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNone}));
  EXPECT_TRUE(r->forward_extra.empty());
}

TEST(OpMemoryRulesTest, DropoutWithPZeroIsAView) {
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 8});
  ValueId y = b.OpOut("aten::dropout", {T(x), D(0.0), B(true)}, Out({4, 8}).AliasOf(x));
  Graph g = b.Build(CloseWithSum(b, y));
  for (const BackendRules& backend : {Cpu(), Cuda()}) {
    auto r = Rule(g, backend);
    ASSERT_TRUE(r.has_value());
    EXPECT_TRUE(r->forward_extra.empty());
    EXPECT_TRUE(r->saved_inputs.empty());
    EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kView}));
  }
}

TEST(OpMemoryRulesTest, DropoutInTrainingSavesNoiseOnCpuAndAByteMaskOnCuda) {
  // x [4,8] = 32 elements. cpu (_dropout_impl): noise in the input dtype, f32 = 128 B, bf16 = 64 B;
  // cuda (native_dropout): bool mask = 32 B whatever the dtype.
  for (DType dt : {DType::kF32, DType::kBF16}) {
    TestGraphBuilder b;
    ValueId x = b.Param("x", {4, 8}, dt);
    ValueId y = b.Op("aten::dropout", {T(x), D(0.1), B(true)}, {4, 8}, dt);
    Graph g = b.Build(CloseWithSum(b, y));
    auto cpu = Rule(g, Cpu());
    ASSERT_TRUE(cpu.has_value());
    ASSERT_EQ(cpu->forward_extra.size(), 1u);
    EXPECT_EQ(cpu->forward_extra[0].bytes, dt == DType::kF32 ? 128 : 64);
    EXPECT_TRUE(cpu->forward_extra[0].saved);
    EXPECT_EQ(cpu->input_grads, (std::vector<GradKind>{GradKind::kNew}));
    auto cuda = Rule(g, Cuda());
    ASSERT_TRUE(cuda.has_value());
    ASSERT_EQ(cuda->forward_extra.size(), 1u);
    EXPECT_EQ(cuda->forward_extra[0].bytes, 32);
    EXPECT_TRUE(cuda->forward_extra[0].saved);
  }
}

TEST(OpMemoryRulesTest, DropoutInEvalModeIsAView) {
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 8});
  ValueId y = b.OpOut("aten::dropout", {T(x), D(0.1), B(false)}, Out({4, 8}).AliasOf(x));
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->forward_extra.empty());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kView}));
}

// q, k, v [B=2, H=4, L=10, E=8] and an optional bool mask [2,1,10,10] (200 elements).
Graph Attention(DType dt, bool with_mask) {
  TestGraphBuilder b;
  ValueId q = b.Param("q", {2, 4, 10, 8}, dt);
  ValueId k = b.Param("k", {2, 4, 10, 8}, dt);
  ValueId v = b.Param("v", {2, 4, 10, 8}, dt);
  std::vector<llmem::OpArg> args{T(q), T(k), T(v)};
  if (with_mask) {
    ValueId mask = b.Input("mask", {2, 1, 10, 10}, DType::kBool);
    args.push_back(T(mask));
  } else {
    args.push_back(None());
  }
  args.push_back(D(0.0));
  args.push_back(B(!with_mask));
  ValueId o = b.Op("aten::scaled_dot_product_attention", args, {2, 4, 10, 8}, dt);
  return b.Build(CloseWithSum(b, o));
}

TEST(OpMemoryRulesTest, AttentionOnCpuSavesF32LogsumexpAndAFloatMask) {
  // lse f32 [2,4,10] = 80 * 4 = 320 B, saved. The bool mask [2,1,10,10] becomes a float mask in q's dtype,
  // 200 * 4 = 800 B, saved (a measured CPU step shows no further temporary).
  Graph g = Attention(DType::kF32, /*with_mask=*/true);
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(r->saved_outputs, (std::vector<int>{0}));
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNew, GradKind::kNew, GradKind::kNone}));
  ASSERT_EQ(r->forward_extra.size(), 3u);
  EXPECT_EQ(r->forward_extra[0].bytes, 320);
  EXPECT_TRUE(r->forward_extra[0].saved);
  EXPECT_EQ(r->forward_extra[1].bytes, 800);
  EXPECT_TRUE(r->forward_extra[1].saved);
  // The kernel's buffers on one thread: 10 x 10 scores, 2 x 10 row stats, 10 x 8 output rows in f32 = 800 B.
  EXPECT_EQ(r->forward_extra[2].bytes, 800);
  EXPECT_FALSE(r->forward_extra[2].saved);
}

TEST(OpMemoryRulesTest, AttentionWithoutMaskSavesOnlyLogsumexp) {
  // cpu, bf16 q: lse is still f32 [2,4,10] = 320 B; the kernel's buffers (800 B in f32 and a 10 x 10 bf16 copy of
  // the scores, 200 B) are freed when it returns.
  Graph g = Attention(DType::kBF16, /*with_mask=*/false);
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->forward_extra.size(), 2u);
  EXPECT_EQ(r->forward_extra[0].bytes, 320);
  EXPECT_TRUE(r->forward_extra[0].saved);
  EXPECT_EQ(r->forward_extra[1].bytes, 1000);
  EXPECT_FALSE(r->forward_extra[1].saved);
}

TEST(OpMemoryRulesTest, CpuFlashAttentionBuffersScaleWithTheThreads) {
  // q, k, v bf16 [1, 4, 64, 64] on 2 threads, measured on this CPU (torch 2.11) with and without a mask, with and
  // without grad: 41472 B beyond the output and lse. Per thread: 32-row query blocks, 64-key blocks:
  // (32 x 64 + 2 x 32 + 32 x 64) f32 = 16640 B, plus the 32 x 64 bf16 scores = 4096 B.
  TestGraphBuilder b;
  ValueId q = b.Param("q", {1, 4, 64, 64}, DType::kBF16);
  ValueId k = b.Param("k", {1, 4, 64, 64}, DType::kBF16);
  ValueId v = b.Param("v", {1, 4, 64, 64}, DType::kBF16);
  ValueId o = b.Op("aten::scaled_dot_product_attention", {T(q), T(k), T(v), None(), D(0.0), B(true)}, {1, 4, 64, 64},
                   DType::kBF16);
  Graph g = b.Build(CloseWithSum(b, o));
  Target t;
  t.is_cpu = true;
  t.cpu_threads = 2;
  auto r = Rule(g, RulesFor(t));
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->forward_extra.size(), 2u);
  EXPECT_EQ(r->forward_extra[1].bytes, 41472);
  // CUDA kernels keep no such buffers.
  auto cuda = Rule(g, Cuda());
  ASSERT_TRUE(cuda.has_value());
  EXPECT_EQ(cuda->forward_extra.size(), 1u);
}

TEST(OpMemoryRulesTest, AttentionOnCudaFp32UsesEfficientKernelWithPaddedLogsumexp) {
  // Memory-efficient kernel: lse rows padded to a multiple of 32: [2,4,32] f32 = 256 * 4 = 1024 B.
  // The float mask (200 * 4 = 800 B) is saved as the attention bias.
  Graph g = Attention(DType::kF32, /*with_mask=*/true);
  auto r = Rule(g, Cuda());
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->forward_extra.size(), 2u);
  EXPECT_EQ(r->forward_extra[0].bytes, 1024);
  EXPECT_EQ(r->forward_extra[1].bytes, 800);
  EXPECT_TRUE(r->forward_extra[1].saved);
}

TEST(OpMemoryRulesTest, AttentionOnCudaBf16WithAMaskUsesTheEfficientKernel) {
  // Flash attention takes no explicit mask: bf16 [2,4,10] lse padded to 32 rows = 1024 B, float mask in bf16
  // 200 * 2 = 400 B.
  Graph g = Attention(DType::kBF16, /*with_mask=*/true);
  auto r = Rule(g, Cuda());
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->forward_extra.size(), 2u);
  EXPECT_EQ(r->forward_extra[0].bytes, 1024);
  EXPECT_EQ(r->forward_extra[1].bytes, 400);
}

TEST(OpMemoryRulesTest, AttentionOnCudaBf16WithoutMaskUsesFlash) {
  // Flash kernel: lse f32 [2,4,10] unpadded = 320 B; no float mask.
  Graph g = Attention(DType::kBF16, /*with_mask=*/false);
  auto r = Rule(g, Cuda());
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ(r->forward_extra.size(), 1u);
  EXPECT_EQ(r->forward_extra[0].bytes, 320);
  EXPECT_TRUE(r->forward_extra[0].saved);
  EXPECT_EQ(r->saved_outputs, (std::vector<int>{0}));
}

TEST(OpMemoryRulesTest, ViewOpsPassAViewOfTheGradient) {
  for (const char* kind : {"aten::view", "aten::reshape", "aten::transpose", "aten::permute", "aten::unsqueeze",
                           "aten::t", "aten::contiguous"}) {
    TestGraphBuilder b;
    ValueId x = b.Param("x", {4, 8});
    ValueId y = b.OpOut(kind, {T(x), Ints({8, 4})}, Out({8, 4}).AliasOf(x));
    Graph g = b.Build(CloseWithSum(b, y));
    auto r = Rule(g, Cpu());
    ASSERT_TRUE(r.has_value()) << kind;
    EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kView})) << kind;
    EXPECT_TRUE(r->saved_inputs.empty()) << kind;
    EXPECT_TRUE(r->forward_extra.empty()) << kind;
  }
}

TEST(OpMemoryRulesTest, UnknownOpHasNoRule) {
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 8});
  ValueId y = b.Op("aten::frobnicate", {T(x)}, {4, 8});
  Graph g = b.Build(CloseWithSum(b, y));
  EXPECT_FALSE(Rule(g, Cpu()).has_value());
  EXPECT_FALSE(Rule(g, Cuda()).has_value());
}

// derivatives.yaml gives these a formula; only their usual inputs (masks, position ids) carry no gradient, and the
// FLOP count already gave them a backward. A trainable input gets its gradient.
TEST(OpMemoryRulesTest, TriuAndCumsumOfATrainableValueHaveAGradient) {
  for (const char* kind : {"aten::triu", "aten::cumsum"}) {
    TestGraphBuilder b;
    ValueId x = b.Param("x", {4, 4});
    ValueId y = b.Op(kind, {T(x), I(0)}, {4, 4});
    Graph g = b.Build(CloseWithSum(b, y));
    auto r = Rule(g, Cpu());
    ASSERT_TRUE(r.has_value()) << kind;
    EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew})) << kind;  // grad.triu(), cumsum_backward
    EXPECT_TRUE(r->saved_inputs.empty() && r->saved_outputs.empty()) << kind;
    EXPECT_FALSE(IsKnownNonDifferentiable(kind)) << kind;
  }
}

TEST(OpMemoryRulesTest, CopySendsTheGradientToItsSource) {
  // buf.copy_(src): src gets the output gradient, buf's overwritten value gets zeros.
  TestGraphBuilder b;
  ValueId buf = b.Input("buf", {4, 8}, DType::kF32);
  ValueId src = b.Param("src", {4, 8});
  ValueId y = b.OpOut("aten::copy_", {T(buf), T(src), B(false)}, Out({4, 8}).AliasOf(buf));
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kPassThrough}));
}

TEST(OpMemoryRulesTest, FullMaxSavesInputAndResult) {
  // evenly_distribute_backward(grad, self, result).
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 8});
  ValueId m = b.Op("aten::max", {T(x)}, {});
  Graph g = b.Build(m);
  auto r = Rule(g, Cpu());
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNew}));
  EXPECT_EQ(r->saved_inputs, (std::vector<int>{0}));
  EXPECT_EQ(r->saved_outputs, (std::vector<int>{0}));
}

TEST(OpMemoryRulesTest, NonDifferentiableOpsCarryNoGradient) {
  EXPECT_TRUE(IsKnownNonDifferentiable("aten::arange"));
  EXPECT_TRUE(IsKnownNonDifferentiable("aten::eq"));
  EXPECT_FALSE(IsKnownNonDifferentiable("aten::linear"));
  EXPECT_FALSE(IsKnownNonDifferentiable("aten::frobnicate"));
  TestGraphBuilder b;
  ValueId x = b.Param("x", {4, 8});
  ValueId m = b.Op("aten::gt", {T(x), I(0)}, {4, 8}, DType::kBool);
  ValueId y = b.Op("aten::masked_fill", {T(x), T(m), D(0.0)}, {4, 8});
  Graph g = b.Build(CloseWithSum(b, y));
  auto r = Rule(g, Cpu(), 0);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->input_grads, (std::vector<GradKind>{GradKind::kNone}));
  auto fill = Rule(g, Cpu(), 1);  // masked_fill saves the mask (input 1) only
  ASSERT_TRUE(fill.has_value());
  EXPECT_EQ(fill->saved_inputs, (std::vector<int>{1}));
  EXPECT_EQ(fill->input_grads, (std::vector<GradKind>{GradKind::kNew, GradKind::kNone}));
}

TEST(OpMemoryRulesTest, TensorInputsFlattenListsInSchemaOrder) {
  TestGraphBuilder b;
  ValueId x = b.Param("x", {2, 4});
  ValueId y = b.Param("y", {2, 4});
  ValueId z = b.Param("z", {4, 4});
  ValueId c = b.Op("aten::cat", {llmem::testing::TList({x, y}), I(0)}, {4, 4});
  ValueId s = b.Op("aten::add", {T(c), T(z), I(1)}, {4, 4});
  Graph g = b.Build(CloseWithSum(b, s));
  EXPECT_EQ(g.tensor_inputs(NodeId{0}), (std::vector<ValueId>{x, y}));
  EXPECT_EQ(g.tensor_inputs(NodeId{1}), (std::vector<ValueId>{c, z}));
}

}  // namespace
}  // namespace llmem::sim
