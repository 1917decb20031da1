// When the forward releases each value, on graphs whose ops carry module paths (Note [Eager lifetimes]).
#include "simulator/forward_lifetimes.h"

#include <gtest/gtest.h>

#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

int32_t ReleaseOf(const std::vector<int32_t>& release, ValueId v) { return release[static_cast<size_t>(v.index)]; }

ValueId OutputOf(const Graph& g, int32_t node) { return g.node(NodeId{node}).outputs.at(0); }

// Graph D (tiny_graphs.h): the norm output h and the logits are returned to the model's forward (`outputs =
// self.model(...)`, `logits = self.lm_head(h)`), whose loss function upcasts the logits.
//   value                     torchscript  eager (released after op)
//   h = mul(x, x)             1            3 (held by the model's frame until it returns)
//   logits = linear(h, w)     2            3
//   f = to(logits, f32)       3            3 (stays inside the model's call)
//   loss                      4            4 (held until backward)
TEST(ForwardLifetimesTest, ValuesReturnedToAFrameLiveUntilItReturns) {
  Graph g = CausalLmHead();
  const std::vector<ValueId> values = {OutputOf(g, 0), OutputOf(g, 1), OutputOf(g, 2), g.loss()};
  const auto ts = ForwardReleasePoints(g, Lifetimes::kTorchScript);
  const auto eager = ForwardReleasePoints(g, Lifetimes::kEager);
  std::vector<int32_t> ts_at, eager_at;
  for (ValueId v : values) {
    ts_at.push_back(ReleaseOf(ts, v));
    eager_at.push_back(ReleaseOf(eager, v));
  }
  EXPECT_EQ(ts_at, (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ(eager_at, (std::vector<int32_t>{3, 3, 3, 4}));
}

// The same head when the model's own forward casts the logits (`lm_logits = lm_logits.to(torch.float32)`, as
// GPT-Neo does): the frame rebinds its name to the cast, so the logits die at the cast (op 2); h is still held.
TEST(ForwardLifetimesTest, AFrameThatRebindsAValueToItsCastDropsItThere) {
  Graph g = CausalLmHead(/*model_casts=*/true);
  const auto eager = ForwardReleasePoints(g, Lifetimes::kEager);
  EXPECT_EQ(ReleaseOf(eager, OutputOf(g, 0)), 3);
  EXPECT_EQ(ReleaseOf(eager, OutputOf(g, 1)), 2);
  EXPECT_EQ(ReleaseOf(eager, OutputOf(g, 2)), 3);
}

// An argument passed into a module call is held until that call returns; a temporary inside one call dies at its
// last use; a module's result is held by the caller until the caller's call returns.
//
//   op  path           value              torchscript  eager
//   0   layer          a = relu(x)        1            2 (argument of layer.mlp's call, ops 1..2)
//   1   layer.mlp      t = mul(a, a)      2            2 (a temporary of the mlp)
//   2   layer.mlp      u = relu(t)        3            4 (returned to layer, whose call ends at op 4)
//   3   layer          v = mul(u, u)      4            4
//   4   layer          s = relu(v)        5            5 (returned to the outermost frame: until the end)
//   5   ""             loss = sum(s)
TEST(ForwardLifetimesTest, ArgumentsLiveUntilTheCallReturnsTemporariesDieAtLastUse) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId a = b.OpOut("aten::relu", {T(x)}, Out({4, 8}), "layer");
  ValueId t = b.OpOut("aten::mul", {T(a), T(a)}, Out({4, 8}), "layer.mlp");
  ValueId u = b.OpOut("aten::relu", {T(t)}, Out({4, 8}), "layer.mlp");
  ValueId v = b.OpOut("aten::mul", {T(u), T(u)}, Out({4, 8}), "layer");
  ValueId s = b.OpOut("aten::relu", {T(v)}, Out({4, 8}), "layer");
  ValueId loss = b.OpOut("aten::sum", {T(s), None()}, Out({}), "");
  Graph g = b.Build(loss);

  const auto ts = ForwardReleasePoints(g, Lifetimes::kTorchScript);
  EXPECT_EQ((std::vector<int32_t>{ReleaseOf(ts, a), ReleaseOf(ts, t), ReleaseOf(ts, u), ReleaseOf(ts, v),
                                  ReleaseOf(ts, s)}),
            (std::vector<int32_t>{1, 2, 3, 4, 5}));
  const auto eager = ForwardReleasePoints(g, Lifetimes::kEager);
  EXPECT_EQ((std::vector<int32_t>{ReleaseOf(eager, a), ReleaseOf(eager, t), ReleaseOf(eager, u),
                                  ReleaseOf(eager, v), ReleaseOf(eager, s)}),
            (std::vector<int32_t>{2, 2, 4, 4, 5}));
}

// A module call is a run of consecutive ops inside its path: a value returned from the first of two calls of the
// same module path is held by their common frame, not by the second call.
//
//   op  path        value                torchscript  eager
//   0   blocks.0    a = relu(x)          1            2 (returned to "blocks", whose run ends at op 2)
//   1   blocks.1    b = mul(a, a)        2            2
//   2   blocks.1    c = relu(b)          3            3
//   3   head        loss = sum(c)
TEST(ForwardLifetimesTest, ValuesPassedBetweenSiblingCallsLiveInTheirCommonFrame) {
  TestGraphBuilder bld;
  ValueId x = bld.Input("x", {4, 8}, DType::kF32);
  ValueId a = bld.OpOut("aten::relu", {T(x)}, Out({4, 8}), "blocks.0");
  ValueId b = bld.OpOut("aten::mul", {T(a), T(a)}, Out({4, 8}), "blocks.1");
  ValueId c = bld.OpOut("aten::relu", {T(b)}, Out({4, 8}), "blocks.1");
  ValueId loss = bld.OpOut("aten::sum", {T(c), None()}, Out({}), "head");
  Graph g = bld.Build(loss);

  const auto eager = ForwardReleasePoints(g, Lifetimes::kEager);
  EXPECT_EQ(ReleaseOf(eager, a), 2);
  EXPECT_EQ(ReleaseOf(eager, b), 2);
  EXPECT_EQ(ReleaseOf(eager, c), 3);
}

// A ModuleList has no frame of its own: its parent loops `for layer in self.layers: h = layer(h)`, so a layer's
// output lives in the loop variable until the next layer returns, not until the whole stack of layers is done.
TEST(ForwardLifetimesTest, ALayersOutputIsReboundOnceTheNextLayerReturns) {
  TestGraphBuilder bld;
  ValueId x = bld.Input("x", {4, 8}, DType::kF32);
  ValueId a = bld.OpOut("aten::relu", {T(x)}, Out({4, 8}), "model.layers.0");
  ValueId b = bld.OpOut("aten::relu", {T(a)}, Out({4, 8}), "model.layers.1");
  ValueId b2 = bld.OpOut("aten::mul", {T(b), T(b)}, Out({4, 8}), "model.layers.1");
  ValueId c = bld.OpOut("aten::relu", {T(b2)}, Out({4, 8}), "model.layers.2");
  ValueId c2 = bld.OpOut("aten::mul", {T(c), T(c)}, Out({4, 8}), "model.layers.2");
  ValueId loss = bld.OpOut("aten::sum", {T(c2), None()}, Out({}), "model.norm");
  Graph g = bld.Build(loss);

  const auto eager = ForwardReleasePoints(g, Lifetimes::kEager);
  EXPECT_EQ(ReleaseOf(eager, a), 2);   // the end of layer 1's call, not of layer 2's
  EXPECT_EQ(ReleaseOf(eager, b2), 4);  // layer 1's result, an argument of layer 2
  EXPECT_EQ(ReleaseOf(eager, c2), 5);  // layer 2's result, returned into the model's frame and used there
}

// `self.down_proj(self.act_fn(self.gate_proj(x)))`: the export marks gate_proj's and act_fn's calls as nested in an
// expression of the MLP's forward, so their results die at their last use instead of when the MLP returns.
TEST(ForwardLifetimesTest, ACallNestedInAnExpressionReturnsATemporary) {
  TestGraphBuilder bld;
  ValueId x = bld.Input("x", {4, 8}, DType::kF32);
  ValueId g = bld.OpOut("aten::relu", {T(x)}, Out({4, 8}), "mlp.gate_proj");
  ValueId a = bld.OpOut("aten::relu", {T(g)}, Out({4, 8}), "mlp.act_fn");
  ValueId d = bld.OpOut("aten::relu", {T(a)}, Out({4, 8}), "mlp.down_proj");
  ValueId loss = bld.OpOut("aten::sum", {T(d), None()}, Out({}), "mlp");
  Graph held = bld.Build(loss);
  std::vector<OpNode> nodes = held.nodes();
  for (size_t i = 0; i < 2; ++i) nodes[i].temporary_calls = {0, 1};  // depth 1: the call from mlp into its child
  Graph nested(held.values(), nodes, held.params(), held.inputs(), held.loss(), held.batch(), held.seq());

  const auto bound = ForwardReleasePoints(held, Lifetimes::kEager);
  const auto temporary = ForwardReleasePoints(nested, Lifetimes::kEager);
  EXPECT_EQ(ReleaseOf(bound, g), 3);  // held by the MLP's frame until it returns
  EXPECT_EQ(ReleaseOf(temporary, g), 1);
  EXPECT_EQ(ReleaseOf(temporary, a), 2);
  EXPECT_EQ(ReleaseOf(temporary, d), ReleaseOf(bound, d));  // down_proj's result is bound
}

// `logits = self.lm_head(h).contiguous()`: contiguous returns the temporary itself, so the name binds it and the
// outer module's frame holds it until it returns, as when the call is bound directly.
TEST(ForwardLifetimesTest, ATemporaryViewedByItsExpressionIsBound) {
  TestGraphBuilder bld;
  ValueId h = bld.Input("h", {4, 8}, DType::kF32);
  ValueId l = bld.OpOut("aten::linear", {T(h), None()}, Out({4, 8}), "model.lm_head");
  ValueId c = bld.OpOut("aten::contiguous", {T(l)}, Out({4, 8}).AliasOf(l), "model");
  ValueId f = bld.OpOut("aten::relu", {T(c)}, Out({4, 8}), "model");
  ValueId loss = bld.OpOut("aten::sum", {T(f), None()}, Out({}), "model");
  Graph held = bld.Build(loss);
  std::vector<OpNode> nodes = held.nodes();
  nodes[0].temporary_calls = {0, 1};
  Graph nested(held.values(), nodes, held.params(), held.inputs(), held.loss(), held.batch(), held.seq());

  const auto bound = ForwardReleasePoints(held, Lifetimes::kEager);
  const auto temporary = ForwardReleasePoints(nested, Lifetimes::kEager);
  EXPECT_EQ(ReleaseOf(bound, l), 3);  // until the outer module returns
  EXPECT_EQ(ReleaseOf(temporary, l), ReleaseOf(bound, l));
}

// A decoder layer `h = self.norm1(x); h, _ = self.attn(h); h = x + h; h = self.norm2(h); h = self.mlp(h)`: the
// export says the first norm's name is rebound by attn's call, attn's by a statement that calls no child (so before
// norm2), norm2's by mlp's call. Ops: 0 norm1, 1 attn, 2 add (the layer's own), 3 norm2, 4 mlp, 5 sum.
Graph DecoderLayer(bool with_rules, bool attn_returns_two) {
  TestGraphBuilder bld;
  ValueId x = bld.Input("x", {4, 8}, DType::kF32);
  ValueId n1 = bld.OpOut("aten::relu", {T(x)}, Out({4, 8}), "layer.norm1");
  std::vector<ValueId> attn = attn_returns_two ? bld.OpN("aten::split", {T(n1), I(4), I(1)}, {Out({4, 4}), Out({4, 4})},
                                                        "layer.attn")
                                               : std::vector<ValueId>{bld.OpOut("aten::relu", {T(n1)}, Out({4, 8}),
                                                                                "layer.attn")};
  ValueId a = attn[0];
  ValueId r = bld.OpOut("aten::add", {T(x), T(a)}, Out({4, 8}), "layer");
  ValueId n2 = bld.OpOut("aten::relu", {T(r)}, Out({4, 8}), "layer.norm2");
  ValueId m = bld.OpOut("aten::relu", {T(n2)}, Out({4, 8}), "layer.mlp");
  std::vector<OpArg> sum_args = {T(m), None()};
  if (attn_returns_two) sum_args = {T(m), T(attn[1])};
  ValueId loss = bld.OpOut(attn_returns_two ? "aten::add" : "aten::sum", sum_args, Out({}), "layer");
  Graph g = bld.Build(loss);
  if (!with_rules) return g;
  std::vector<OpNode> nodes = g.nodes();
  auto rule = [](std::vector<std::string> between, std::vector<std::string> rebinders, bool several) {
    return std::make_shared<const NameRebinding>(NameRebinding{std::move(between), std::move(rebinders), several});
  };
  nodes[0].rebindings = {nullptr, rule({}, {"attn"}, false)};  // depth 1: the call from layer into its child
  nodes[1].rebindings = {nullptr, rule({}, {}, true)};
  nodes[3].rebindings = {nullptr, rule({}, {"mlp"}, false)};
  return Graph(g.values(), nodes, g.params(), g.inputs(), g.loss(), g.batch(), g.seq());
}

TEST(ForwardLifetimesTest, AFrameDropsAResultWhenItRebindsItsName) {
  const Graph held = DecoderLayer(false, false), rebound = DecoderLayer(true, false);
  const auto bound = ForwardReleasePoints(held, Lifetimes::kEager);
  const auto early = ForwardReleasePoints(rebound, Lifetimes::kEager);
  for (int32_t op : {0, 1, 3}) EXPECT_EQ(ReleaseOf(bound, OutputOf(held, op)), 5) << op;  // until the layer returns
  EXPECT_EQ(ReleaseOf(early, OutputOf(rebound, 0)), 1);  // when attn returns (its argument until then anyway)
  EXPECT_EQ(ReleaseOf(early, OutputOf(rebound, 1)), 2);  // `h = x + h` runs before norm2's call (op 3)
  EXPECT_EQ(ReleaseOf(early, OutputOf(rebound, 3)), 4);  // when mlp returns
  EXPECT_EQ(ReleaseOf(early, OutputOf(rebound, 4)), ReleaseOf(bound, OutputOf(held, 4)));  // no rule: returned
}

// `h, w = self.attn(h)` where attn returns two tensors: the name binds one of them, which the graph cannot tell, so
// both stay bound until the frame returns.
TEST(ForwardLifetimesTest, ARuleForOneElementOfATupleNeedsACallThatReturnsOneTensor) {
  const Graph g = DecoderLayer(true, true);
  const auto release = ForwardReleasePoints(g, Lifetimes::kEager);
  const NodeId attn{1};
  EXPECT_EQ(ReleaseOf(release, g.node(attn).outputs[0]), 5);
  EXPECT_EQ(ReleaseOf(release, OutputOf(g, 0)), 1);  // norm1's rule still holds
}

}  // namespace
}  // namespace llmem::sim
