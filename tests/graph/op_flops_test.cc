// Op costs worked out by hand: FLOPs and bytes of matmuls, attention, losses, norms, embedding, elementwise ops and
// views, forward and backward, and the options that change them (autocast dtypes, shape overrides).
#include "graph/op_flops.h"

#include <gtest/gtest.h>

#include "graph/error.h"
#include "tests/simulator/test_graph_builder.h"

namespace llmem {
namespace {

using testing::B;
using testing::D;
using testing::I;
using testing::Ints;
using testing::None;
using testing::Out;
using testing::T;
using testing::TestGraphBuilder;
using testing::TList;

// An activation of `shape` that requires grad, as a layer's input would.
ValueId Activation(TestGraphBuilder& b, const std::string& name, std::vector<int64_t> shape,
                   DType dtype = DType::kF32) {
  ValueId v = b.Input(name, std::move(shape), dtype);
  b.value(v).requires_grad = true;
  return v;
}

// The cost of the op that produces `v`.
OpCost CostOfProducer(const Graph& g, ValueId v, const CostOptions& options = {}) {
  return CostOf(g, g.node(g.value(v).producer), options);
}

// Graph: x [2,4,16] (B=2, S=4, H=16) -> linear(w [64,16] = H x 4H) -> y [2,4,64] -> sum -> loss.
struct LinearGraph {
  Graph g;
  ValueId x, w, y;
};
LinearGraph Linear(bool input_requires_grad = true, bool with_bias = false) {
  TestGraphBuilder b;
  LinearGraph r;
  r.x = input_requires_grad ? Activation(b, "x", {2, 4, 16}) : b.Input("x", {2, 4, 16}, DType::kF32);
  r.w = b.Param("w", {64, 16});
  ValueId bias = with_bias ? b.Param("b", {64}) : ValueId{};
  r.y = b.Op("aten::linear", {T(r.x), T(r.w), with_bias ? T(bias) : None()}, {2, 4, 64});
  r.g = b.Build(b.Op("aten::sum", {T(r.y), None()}, {}));
  return r;
}

TEST(OpFlopsTest, LinearIsTwoMkn) {
  LinearGraph l = Linear();
  OpCost c = CostOfProducer(l.g, l.y);
  EXPECT_TRUE(c.matmul_like);
  // [B*S, H] x [H, 4H]: 2 * 8 * 16 * 64.
  EXPECT_DOUBLE_EQ(c.fwd_flops, 16384);
  // dX = dY * W and dW = dY^T * X: one product each.
  EXPECT_DOUBLE_EQ(c.bwd_flops, 32768);
  // Reads x (8*16*4 = 512 B) and w (64*16*4 = 4096 B), writes y (8*64*4 = 2048 B).
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 512 + 4096 + 2048);
  // dX: reads dY and w, writes dX; dW: reads dY and x, writes dW.
  EXPECT_DOUBLE_EQ(c.bwd_bytes, (2048 + 4096 + 512) + (2048 + 512 + 4096));
}

TEST(OpFlopsTest, LinearBackwardOnlyForOperandsThatNeedGrad) {
  LinearGraph l = Linear(/*input_requires_grad=*/false);
  OpCost c = CostOfProducer(l.g, l.y);
  EXPECT_DOUBLE_EQ(c.bwd_flops, 16384);               // dW only
  EXPECT_DOUBLE_EQ(c.bwd_bytes, 2048 + 512 + 4096);  // reads dY and x, writes dW
}

TEST(OpFlopsTest, LinearBiasAddsOneFlopPerOutput) {
  LinearGraph l = Linear(true, /*with_bias=*/true);
  OpCost c = CostOfProducer(l.g, l.y);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 16384 + 512);  // + 8 * 64 additions
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 512 + 4096 + 256 + 2048);
  EXPECT_DOUBLE_EQ(c.bwd_flops, 32768 + 512);  // + the bias gradient, dY summed over rows
}

TEST(OpFlopsTest, MatmulFamily) {
  TestGraphBuilder b;
  ValueId a = Activation(b, "a", {2, 3, 4, 5});
  ValueId m = Activation(b, "m", {2, 3, 5, 6});
  ValueId mm = b.Op("aten::matmul", {T(a), T(m)}, {2, 3, 4, 6});
  ValueId p = Activation(b, "p", {2, 4, 5});
  ValueId q = Activation(b, "q", {2, 5, 3});
  ValueId bmm = b.Op("aten::bmm", {T(p), T(q)}, {2, 4, 3});
  ValueId bias = b.Param("bias", {64});
  ValueId x = Activation(b, "x", {8, 16});
  ValueId w = b.Param("w", {16, 64});
  ValueId addmm = b.Op("aten::addmm", {T(bias), T(x), T(w), I(1), I(1)}, {8, 64});
  ValueId baddbmm = b.Op("aten::baddbmm", {T(bmm), T(p), T(q), I(1), I(1)}, {2, 4, 3});
  Graph g = b.Build(b.Op("aten::sum", {T(addmm), None()}, {}));
  EXPECT_DOUBLE_EQ(CostOfProducer(g, mm).fwd_flops, 2.0 * (2 * 3 * 4 * 6) * 5);
  EXPECT_DOUBLE_EQ(CostOfProducer(g, bmm).fwd_flops, 2.0 * (2 * 4 * 3) * 5);
  // GPT-2's Conv1D: bias + x [8,16] x w [16,64].
  EXPECT_DOUBLE_EQ(CostOfProducer(g, addmm).fwd_flops, 2.0 * 8 * 16 * 64 + 8 * 64);
  EXPECT_DOUBLE_EQ(CostOfProducer(g, baddbmm).fwd_flops, 2.0 * (2 * 4 * 3) * 5 + 2 * 4 * 3);
  EXPECT_TRUE(CostOfProducer(g, baddbmm).matmul_like);
}

TEST(OpFlopsTest, EinsumContractsLikeTheEquivalentMatmul) {
  TestGraphBuilder b;
  ValueId a = Activation(b, "a", {2, 3, 4});
  ValueId c = Activation(b, "c", {2, 4, 5});
  ValueId m = Activation(b, "m", {3, 4});
  ValueId n = Activation(b, "n", {4, 5});
  ValueId o = Activation(b, "o", {5, 2});
  auto einsum = [&](const std::string& eq, std::vector<ValueId> ops, std::vector<int64_t> shape) {
    OpArg e;
    e.kind = OpArg::Kind::kString;
    e.text = eq;
    return b.Op("aten::einsum", {e, TList(std::move(ops)), None()}, std::move(shape));
  };
  ValueId batched = einsum("bij,bjk->bik", {a, c}, {2, 3, 5});
  ValueId ellipsis = einsum("...ij,...jk->...ik", {a, c}, {2, 3, 5});
  ValueId implicit = einsum("ij,jk", {m, n}, {3, 5});
  ValueId chain = einsum("ij,jk,kl->il", {m, n, o}, {3, 2});
  ValueId malformed = einsum("ij,jk->ik", {m}, {3, 5});  // fewer operands than the equation names
  Graph g = b.Build(b.Op("aten::sum", {T(batched), None()}, {}));
  EXPECT_DOUBLE_EQ(CostOfProducer(g, batched).fwd_flops, 2.0 * 2 * 3 * 4 * 5);
  EXPECT_DOUBLE_EQ(CostOfProducer(g, ellipsis).fwd_flops, 2.0 * 2 * 3 * 4 * 5);
  EXPECT_DOUBLE_EQ(CostOfProducer(g, implicit).fwd_flops, 2.0 * 3 * 4 * 5);
  // Left to right: (ij,jk) -> ik costs 2*3*4*5, then (ik,kl) -> il costs 2*3*5*2.
  EXPECT_DOUBLE_EQ(CostOfProducer(g, chain).fwd_flops, 2.0 * 3 * 4 * 5 + 2.0 * 3 * 5 * 2);
  EXPECT_TRUE(CostOfProducer(g, batched).matmul_like);
  // Both operands need grads: two products of the same size.
  EXPECT_DOUBLE_EQ(CostOfProducer(g, batched).bwd_flops, 2 * 2.0 * 2 * 3 * 4 * 5);
  // An equation that does not match its operands falls back to the elementwise rule.
  EXPECT_FALSE(CostOfProducer(g, malformed).matmul_like);
  EXPECT_DOUBLE_EQ(CostOfProducer(g, malformed).fwd_flops, 15);
}

// Attention of q, k, v [B=1, H=2, L=8, E=4] (64 elements = 256 B each in f32).
struct AttentionCase {
  Graph g;
  ValueId out;
};
AttentionCase Attention(const std::string& kind, std::vector<OpArg> extra_args, int kv_heads = 2, int q_heads = 2,
                        bool with_mask = false) {
  TestGraphBuilder b;
  ValueId q = Activation(b, "q", {1, q_heads, 8, 4});
  ValueId k = Activation(b, "k", {1, kv_heads, 8, 4});
  ValueId v = Activation(b, "v", {1, kv_heads, 8, 4});
  std::vector<OpArg> args = {T(q), T(k), T(v)};
  if (with_mask) args.push_back(T(b.Input("mask", {1, 1, 8, 8}, DType::kBool)));
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  ValueId out = b.Op(kind, std::move(args), {1, q_heads, 8, 4});
  return {b.Build(b.Op("aten::sum", {T(out), None()}, {})), out};
}
// scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)
std::vector<OpArg> SdpaArgs(bool causal, bool enable_gqa = false) {
  return {None(), D(0.0), B(causal), None(), B(enable_gqa)};
}

TEST(OpFlopsTest, AttentionCountsTwoMatmuls) {
  AttentionCase a = Attention("aten::scaled_dot_product_attention", SdpaArgs(false));
  OpCost c = CostOfProducer(a.g, a.out);
  EXPECT_TRUE(c.matmul_like);
  // Q*K^T: 2 * heads(2) * 8 * 8 * 4 = 1024; P*V the same.
  EXPECT_DOUBLE_EQ(c.fwd_flops, 2048);
  EXPECT_DOUBLE_EQ(c.bwd_flops, 2.5 * 2048);  // fused backward recomputes the scores
  // Reads q, k, v; writes the output and a float logsumexp per query row (2 * 8 * 4 B).
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 3 * 256 + 256 + 64);
  // Reads q, k, v, out, dout, logsumexp; writes dq, dk, dv.
  EXPECT_DOUBLE_EQ(c.bwd_bytes, 3 * 256 + 2 * 256 + 64 + 3 * 256);
}

TEST(OpFlopsTest, CausalAttentionComputesTheLowerTriangle) {
  AttentionCase a = Attention("aten::scaled_dot_product_attention", SdpaArgs(true));
  // 8 * 9 / 2 = 36 of the 64 (query, key) pairs.
  EXPECT_DOUBLE_EQ(CostOfProducer(a.g, a.out).fwd_flops, 2 * (2.0 * 2 * 36 * 4));
}

TEST(OpFlopsTest, AnExplicitMaskComputesEveryPair) {
  // What HF exports trace: a materialized bool mask and is_causal=False.
  AttentionCase a = Attention("aten::scaled_dot_product_attention", {D(0.0), B(false), None(), B(false)}, 2, 2,
                              /*with_mask=*/true);
  OpCost c = CostOfProducer(a.g, a.out);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 2048);
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 3 * 256 + 64 + 256 + 64);  // + the 8x8 bool mask
}

TEST(OpFlopsTest, GroupedQueryAttentionCountsQueryHeads) {
  AttentionCase a = Attention("aten::scaled_dot_product_attention", SdpaArgs(false, true), /*kv_heads=*/2,
                              /*q_heads=*/4);
  OpCost c = CostOfProducer(a.g, a.out);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 2 * (2.0 * 4 * 64 * 4));
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 512 + 2 * 256 + 512 + 4 * 8 * 4);  // q and out are twice k and v
}

TEST(OpFlopsTest, AttentionVariantsReadIsCausalAtTheirOwnPosition) {
  // _scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
  AttentionCase flash = Attention("aten::_scaled_dot_product_flash_attention", {D(0.0), B(true), B(false), None()});
  EXPECT_DOUBLE_EQ(CostOfProducer(flash.g, flash.out).fwd_flops, 2 * (2.0 * 2 * 36 * 4));
  // _scaled_dot_product_efficient_attention(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, ...)
  AttentionCase eff = Attention("aten::_scaled_dot_product_efficient_attention",
                                {None(), B(true), D(0.0), B(true), None()});
  EXPECT_DOUBLE_EQ(CostOfProducer(eff.g, eff.out).fwd_flops, 2 * (2.0 * 2 * 36 * 4));
  // The math kernel keeps the probabilities: backward is 2x, not 2.5x.
  AttentionCase math = Attention("aten::_scaled_dot_product_attention_math", {None(), D(0.0), B(false), None()});
  OpCost m = CostOfProducer(math.g, math.out);
  EXPECT_DOUBLE_EQ(m.bwd_flops, 2 * m.fwd_flops);
}

TEST(OpFlopsTest, CrossEntropy) {
  TestGraphBuilder b;
  ValueId logits = Activation(b, "logits", {6, 10});  // 240 B
  ValueId labels = b.Input("labels", {6});           // 48 B
  ValueId loss = b.Op("aten::cross_entropy_loss", {T(logits), T(labels), None(), I(1), I(-100), D(0.0)}, {});
  Graph g = b.Build(loss);
  OpCost c = CostOfProducer(g, loss);
  EXPECT_FALSE(c.matmul_like);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 5 * 60 + 6);          // log_softmax, then one gather per row
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 240 + 240 + 48 + 4);  // read x, write log-probs, read labels, write the loss
  EXPECT_DOUBLE_EQ(c.bwd_flops, 4 * 60);
  EXPECT_DOUBLE_EQ(c.bwd_bytes, 4 * 240 + 48);
}

TEST(OpFlopsTest, EmbeddingIsAGather) {
  TestGraphBuilder b;
  ValueId ids = b.Input("ids", {2, 3});  // 48 B
  ValueId wte = b.Param("wte", {10, 4});  // 160 B
  ValueId e = b.Op("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, {2, 3, 4});  // 96 B
  Graph g = b.Build(b.Op("aten::sum", {T(e), None()}, {}));
  OpCost c = CostOfProducer(g, e);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 0);
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 48 + 96 + 96);  // indices, the gathered rows, the output
  EXPECT_DOUBLE_EQ(c.bwd_flops, 24);            // one add per gathered element
  EXPECT_DOUBLE_EQ(c.bwd_bytes, 160 + 48 + 3 * 96);
}

TEST(OpFlopsTest, LayerNorm) {
  TestGraphBuilder b;
  ValueId x = Activation(b, "x", {4, 8});  // 128 B, 4 rows
  ValueId w = b.Param("w", {8});
  ValueId bias = b.Param("b", {8});
  ValueId y = b.Op("aten::layer_norm", {T(x), Ints({8}), T(w), T(bias), D(1e-5), B(true)}, {4, 8});
  Graph g = b.Build(b.Op("aten::sum", {T(y), None()}, {}));
  OpCost c = CostOfProducer(g, y);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 6 * 32 + 2 * 32);
  // Reads x and the affine weights, writes y and mean/rstd (2 floats per row).
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 128 + 128 + 2 * 4 * 4 + 32 + 32);
  EXPECT_DOUBLE_EQ(c.bwd_flops, 2 * c.fwd_flops);
}

TEST(OpFlopsTest, ElementwiseCostsOneFlopPerElement) {
  TestGraphBuilder b;
  ValueId x = Activation(b, "x", {4, 8});  // 128 B
  ValueId bias = b.Param("bias", {8});     // 32 B
  ValueId scale = b.Input("scale", {}, DType::kF32);
  ValueId g1 = b.Op("aten::gelu", {T(x), None()}, {4, 8});
  ValueId s = b.Op("aten::add", {T(g1), T(x), I(1)}, {4, 8});
  ValueId sb = b.Op("aten::add", {T(s), T(bias), I(1)}, {4, 8});
  ValueId m = b.Op("aten::mul", {T(sb), T(scale)}, {4, 8});
  Graph g = b.Build(b.Op("aten::sum", {T(m), None()}, {}));
  OpCost gelu = CostOfProducer(g, g1);
  EXPECT_DOUBLE_EQ(gelu.fwd_flops, 32);
  EXPECT_DOUBLE_EQ(gelu.fwd_bytes, 128 + 128);
  EXPECT_DOUBLE_EQ(gelu.bwd_flops, 32);
  EXPECT_DOUBLE_EQ(gelu.bwd_bytes, 128 + 128 + 128);  // reads the gradient and x, writes dx
  // An add passes its gradient through: no backward kernel...
  EXPECT_DOUBLE_EQ(CostOfProducer(g, s).bwd_flops, 0);
  EXPECT_DOUBLE_EQ(CostOfProducer(g, s).bwd_bytes, 0);
  // ...except to sum it down onto a broadcast operand.
  OpCost add_bias = CostOfProducer(g, sb);
  EXPECT_DOUBLE_EQ(add_bias.fwd_bytes, 128 + 32 + 128);
  EXPECT_DOUBLE_EQ(add_bias.bwd_flops, 32);
  EXPECT_DOUBLE_EQ(add_bias.bwd_bytes, 128 + 32);
  // A 0-dim operand costs its 4 bytes; it needs no grad, the other operand does.
  OpCost mul = CostOfProducer(g, m);
  EXPECT_DOUBLE_EQ(mul.fwd_bytes, 128 + 4 + 128);
  EXPECT_DOUBLE_EQ(mul.bwd_bytes, 128 + 4 + 128);  // reads the gradient and the scale, writes d(sb)
}

TEST(OpFlopsTest, ViewsAndNoOpsCostNothing) {
  TestGraphBuilder b;
  ValueId x = Activation(b, "x", {4, 8});
  ValueId t = b.OpOut("aten::transpose", {T(x), I(0), I(1)}, Out({8, 4}).AliasOf(x));
  ValueId c = b.Op("aten::contiguous", {T(t), I(0)}, {8, 4});  // copies: a transposed view cannot be reused
  ValueId d0 = b.Op("aten::dropout", {T(c), D(0.0), B(true)}, {8, 4});
  ValueId d1 = b.Op("aten::dropout", {T(c), D(0.1), B(true)}, {8, 4});
  Graph g = b.Build(b.Op("aten::sum", {T(d1), None()}, {}));
  OpCost view = CostOfProducer(g, t);
  EXPECT_DOUBLE_EQ(view.fwd_flops + view.fwd_bytes + view.bwd_flops + view.bwd_bytes, 0);
  OpCost copy = CostOfProducer(g, c);
  EXPECT_DOUBLE_EQ(copy.fwd_flops, 0);
  EXPECT_DOUBLE_EQ(copy.fwd_bytes, 128 + 128);
  EXPECT_DOUBLE_EQ(copy.bwd_bytes, 0);  // the gradient of a copy is a view of the output's
  EXPECT_DOUBLE_EQ(CostOfProducer(g, d0).fwd_bytes, 0);  // p = 0: returns its input
  OpCost drop = CostOfProducer(g, d1);
  EXPECT_DOUBLE_EQ(drop.fwd_bytes, 128 + 128 + 32);  // + a 1-byte mask per element
}

TEST(OpFlopsTest, SumCostsSplitsMatmulFromTheRestAndNamesUnknownKinds) {
  TestGraphBuilder b;
  ValueId x = Activation(b, "x", {4, 8});
  ValueId w = b.Param("w", {16, 8});
  ValueId y = b.Op("aten::linear", {T(x), T(w), None()}, {4, 16});
  ValueId z = b.Op("aten::mystery_op", {T(y)}, {4, 16});
  ValueId r = b.Op("aten::relu", {T(z)}, {4, 16});
  Graph g = b.Build(b.Op("aten::sum", {T(r), None()}, {}));
  GraphCost cost = SumCosts(g);
  ASSERT_EQ(cost.ops.size(), g.nodes().size());
  EXPECT_DOUBLE_EQ(cost.matmul.fwd_flops, 2.0 * 4 * 8 * 16);
  EXPECT_DOUBLE_EQ(cost.other.fwd_flops, 64 + 64 + 64);  // mystery, relu (1 per element), sum (1 per input)
  EXPECT_DOUBLE_EQ(cost.total().fwd_flops, cost.matmul.fwd_flops + cost.other.fwd_flops);
  EXPECT_DOUBLE_EQ(cost.total().bwd_bytes, cost.matmul.bwd_bytes + cost.other.bwd_bytes);
  EXPECT_EQ(cost.generic_kinds, std::vector<std::string>{"aten::mystery_op"});
}

TEST(OpFlopsTest, ShapeOverridesShardAnOp) {
  LinearGraph l = Linear();
  CostOptions column_parallel;
  column_parallel.shape_overrides = ScaledShapes(l.g, {l.w}, 0, 2);
  const auto more = ScaledShapes(l.g, {l.y}, -1, 2);
  column_parallel.shape_overrides.insert(more.begin(), more.end());
  EXPECT_EQ(column_parallel.shape_overrides.at(l.w), (std::vector<int64_t>{32, 16}));
  EXPECT_EQ(column_parallel.shape_overrides.at(l.y), (std::vector<int64_t>{2, 4, 32}));
  OpCost c = CostOfProducer(l.g, l.y, column_parallel);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 16384 / 2);
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 512 + 2048 + 1024);
  EXPECT_THROW(ScaledShapes(l.g, {l.w}, 2, 2), ConfigError);
  EXPECT_THROW(ScaledShapes(l.g, {l.w}, 0, 0), ConfigError);
}

TEST(OpFlopsTest, AutocastReadsMatmulOperandsIn16BitsAfterCastingThem) {
  TestGraphBuilder b;
  ValueId x = Activation(b, "x", {8, 16});  // f32: 512 B
  ValueId w = b.Param("w", {64, 16});       // f32: 4096 B
  ValueId y = b.Op("aten::linear", {T(x), T(w), None()}, {8, 64});
  Graph g = b.Build(b.Op("aten::sum", {T(y), None()}, {}));
  CostOptions autocast;
  autocast.matmul_dtype = DType::kBF16;
  OpCost c = CostOfProducer(g, y, autocast);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 2.0 * 8 * 16 * 64);
  // Casts read f32 and write bf16 (x: 512 + 256, w: 4096 + 2048); the matmul reads the bf16 copies (256 + 2048)
  // and writes y in bf16 (1024).
  EXPECT_DOUBLE_EQ(c.fwd_bytes, (512 + 256) + (4096 + 2048) + (256 + 2048) + 1024);
  // Pure bf16: the weight is read as the bf16-weights run recorded it.
  CostOptions pure;
  pure.bf16_weights = true;
  EXPECT_DOUBLE_EQ(CostOfProducer(g, y, pure).fwd_bytes, 512 + 2048 + 2048);
}

TEST(OpFlopsTest, OpsWithoutGradientsHaveNoBackward) {
  TestGraphBuilder b;
  ValueId ids = b.Input("ids", {2, 16});
  ValueId eq = b.Op("aten::eq", {T(ids), I(1)}, {2, 16}, DType::kBool);
  Graph g = b.Build(b.Op("aten::sum", {T(eq), None()}, {}));
  OpCost c = CostOfProducer(g, eq);
  EXPECT_DOUBLE_EQ(c.fwd_flops, 32);
  EXPECT_DOUBLE_EQ(c.fwd_bytes, 256 + 32);
  EXPECT_DOUBLE_EQ(c.bwd_flops + c.bwd_bytes, 0);
}

}  // namespace
}  // namespace llmem
