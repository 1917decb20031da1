// Text form of the IR: values, ops with every argument kind, and whole graphs.
#include "graph/ir_printer.h"

#include <gtest/gtest.h>

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

TEST(IrPrinterTest, PrintsEveryArgumentKind) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("model.layers.0.mlp.up_proj.weight", {16, 8});
  ValueId mask = b.Param("model.layers.0.attn.bias", {1, 1, 4, 4}, DType::kBool, /*trainable=*/false);
  (void)mask;
  b.SetLayer(0);
  ValueId y = b.OpOut("aten::linear", {T(x), T(w), None()}, Out({4, 16}), "model.layers.0.mlp.up_proj");
  ValueId v = b.OpOut("aten::view", {T(y), Ints({2, 2, 16})}, Out({2, 2, 16}).AliasOf(y));
  llmem::OpArg text;
  text.kind = OpArg::Kind::kString;
  text.text = "tanh";
  ValueId g = b.Op("aten::gelu", {T(v), text}, {2, 2, 16});
  ValueId c = b.Op("aten::cat", {TList({g, g}), I(-1)}, {2, 2, 32});
  b.SetHead();
  ValueId d = b.Op("aten::dropout", {T(c), D(0.5), B(false)}, {2, 2, 32}, DType::kBF16);
  ValueId loss = b.Op("aten::cross_entropy_loss", {T(d), T(labels), None(), I(1), I(-100), D(0.0)}, {});
  Graph graph = b.Build(loss);

  EXPECT_EQ(PrintValue(graph, x), "x:f32[4,8]");
  EXPECT_EQ(PrintValue(graph, v), "%5:f32[2,2,16]@%4");
  EXPECT_EQ(PrintValue(graph, loss), "%9:f32[]");
  EXPECT_EQ(PrintOp(graph, graph.node(NodeId{0})),
            "%4:f32[4,16] = aten::linear(x, model.layers.0.mlp.up_proj.weight, None)  # layer 0 "
            "model.layers.0.mlp.up_proj");
  EXPECT_EQ(PrintOp(graph, graph.node(NodeId{1})), "%5:f32[2,2,16]@%4 = aten::view(%4, [2,2,16])  # layer 0");
  EXPECT_EQ(PrintOp(graph, graph.node(NodeId{2})), "%6:f32[2,2,16] = aten::gelu(%5, \"tanh\")  # layer 0");
  EXPECT_EQ(PrintOp(graph, graph.node(NodeId{3})), "%7:f32[2,2,32] = aten::cat([%6, %6], -1)  # layer 0");
  EXPECT_EQ(PrintOp(graph, graph.node(NodeId{4})), "%8:bf16[2,2,32] = aten::dropout(%7, 0.5, False)  # head");
}

TEST(IrPrinterTest, PrintsWholeGraphWithParamsFirstAndTheReturn) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {16, 8});
  b.Param("buf", {4}, DType::kF32, /*trainable=*/false);
  b.SetLayer(1);
  ValueId y = b.Op("aten::linear", {T(x), T(w), None()}, {4, 16});
  b.SetHead();
  ValueId loss = b.Op("aten::cross_entropy_loss", {T(y), T(labels), None(), I(1), I(-100), D(0.0)}, {});
  Graph graph = b.Build(loss);
  EXPECT_EQ(PrintGraph(graph),
            "param w:f32[16,8]\n"
            "param buf:f32[4] buffer\n"
            "%4:f32[4,16] = aten::linear(x, w, None)  # layer 1\n"
            "%5:f32[] = aten::cross_entropy_loss(%4, labels, None, 1, -100, 0)  # head\n"
            "return %5\n");
}

}  // namespace
}  // namespace llmem
