// The IR container: regions, storage roots, layer counting, and the invariants VerifyGraph enforces.
#include "graph/graph.h"

#include <gtest/gtest.h>

#include "graph/error.h"
#include "tests/simulator/test_graph_builder.h"

namespace llmem {
namespace {

using testing::D;
using testing::I;
using testing::Ints;
using testing::None;
using testing::Out;
using testing::T;
using testing::TestGraphBuilder;

TEST(GraphTest, RegionNames) {
  EXPECT_EQ(RegionName(Region{RegionKind::kEmbedding, -1}), "embedding");
  EXPECT_EQ(RegionName(Region{RegionKind::kDecoderLayer, 3}), "layer 3");
  EXPECT_EQ(RegionName(Region{RegionKind::kHead, -1}), "head");
}

// ids -> embedding -> (layer 0) view -> transpose -> (layer 2) linear -> (head) cross_entropy.
Graph SmallGraph() {
  TestGraphBuilder b;
  ValueId ids = b.Input("input_ids", {2, 3});
  ValueId labels = b.Input("labels", {2, 3});
  ValueId wte = b.Param("wte", {10, 4});
  ValueId w = b.Param("w", {10, 4});
  ValueId e = b.Op("aten::embedding", {T(wte), T(ids)}, {2, 3, 4});
  b.SetLayer(0);
  ValueId v = b.OpOut("aten::view", {T(e), Ints({6, 4})}, Out({6, 4}).AliasOf(e));
  ValueId t = b.OpOut("aten::transpose", {T(v), I(0), I(1)}, Out({4, 6}).AliasOf(v));
  b.SetLayer(2);
  ValueId c = b.Op("aten::contiguous", {T(t)}, {4, 6});
  ValueId logits = b.Op("aten::linear", {T(e), T(w), None()}, {2, 3, 10});
  (void)c;
  b.SetHead();
  ValueId loss = b.Op("aten::cross_entropy_loss", {T(logits), T(labels), None(), I(1), I(-100), D(0.0)}, {});
  return b.Build(loss, 2, 3);
}

TEST(GraphTest, BasicAccessors) {
  Graph g = SmallGraph();
  EXPECT_EQ(g.batch(), 2);
  EXPECT_EQ(g.seq(), 3);
  EXPECT_EQ(g.num_layers(), 3);  // highest layer index 2, plus one
  EXPECT_EQ(g.inputs().size(), 2u);
  EXPECT_EQ(g.params().size(), 2u);
  EXPECT_EQ(g.nodes().size(), 6u);
  EXPECT_EQ(g.value(g.loss()).shape, std::vector<int64_t>{});
  EXPECT_TRUE(g.runs_with_bf16_weights());
  g.set_runs_with_bf16_weights(false);
  EXPECT_FALSE(g.runs_with_bf16_weights());
}

TEST(GraphTest, StorageRootFollowsAliasChains) {
  Graph g = SmallGraph();
  // values: 0 ids, 1 labels, 2 wte, 3 w, 4 e, 5 view(e), 6 transpose(view), 7 contiguous, 8 logits, 9 loss
  EXPECT_EQ(g.StorageRoot(ValueId{6}), ValueId{4});
  EXPECT_EQ(g.StorageRoot(ValueId{5}), ValueId{4});
  EXPECT_EQ(g.StorageRoot(ValueId{4}), ValueId{4});
  EXPECT_EQ(g.StorageRoot(ValueId{7}), ValueId{7});
}

TEST(GraphTest, EmptyGraphHasNoLayers) {
  Graph g;
  EXPECT_EQ(g.num_layers(), 0);
  EXPECT_TRUE(g.nodes().empty());
}

// Hand-built pieces for the negative cases: x (input) -> %1 = aten::sum(x) as the loss.
struct Parts {
  std::vector<TensorValue> values;
  std::vector<OpNode> nodes;
  ValueId loss{1};
};

Parts ValidParts() {
  Parts p;
  TensorValue x;
  x.id = ValueId{0};
  x.role = ValueRole::kInput;
  x.name = "x";
  x.shape = {4};
  x.storage_numel = 4;
  TensorValue s;
  s.id = ValueId{1};
  s.name = "%1";
  s.storage_numel = 1;
  s.producer = NodeId{0};
  OpNode n;
  n.id = NodeId{0};
  n.kind = "aten::sum";
  n.args = {T(ValueId{0})};
  n.outputs = {ValueId{1}};
  p.values = {x, s};
  p.nodes = {n};
  return p;
}

Graph Make(const Parts& p) { return Graph(p.values, p.nodes, {}, {ValueId{0}}, p.loss, 1, 1); }

TEST(GraphTest, VerifyAcceptsAValidGraph) { EXPECT_NO_THROW(Make(ValidParts())); }

// The returned tensor must be floating; a training export's is a scalar loss (the importer checks that), a generation
// forward's the logits (graph/generation_forward.h).
TEST(GraphTest, VerifyRejectsAnOutputThatIsNotAFloat) {
  Parts p = ValidParts();
  p.values[1].shape = {2};
  EXPECT_NO_THROW(Make(p));
  p = ValidParts();
  p.values[1].dtype = DType::kI64;
  EXPECT_THROW(Make(p), ModelLoadError);
  p = ValidParts();
  p.loss = ValueId{};
  EXPECT_THROW(Make(p), ModelLoadError);
}

TEST(GraphTest, VerifyRejectsUseBeforeDefinition) {
  // Node 0 reads %2, which node 1 produces.
  Parts p = ValidParts();
  TensorValue late;
  late.id = ValueId{2};
  late.name = "%2";
  late.shape = {4};
  late.storage_numel = 4;
  late.producer = NodeId{1};
  p.values.push_back(late);
  p.nodes[0].args.push_back(T(ValueId{2}));
  OpNode n1;
  n1.id = NodeId{1};
  n1.kind = "aten::neg";
  n1.args = {T(ValueId{0})};
  n1.outputs = {ValueId{2}};
  p.nodes.push_back(n1);
  EXPECT_THROW(Make(p), ModelLoadError);
}

TEST(GraphTest, VerifyRejectsOutOfRangeUse) {
  Parts p = ValidParts();
  p.nodes[0].args.push_back(T(ValueId{7}));
  EXPECT_THROW(Make(p), ModelLoadError);
}

TEST(GraphTest, VerifyRejectsBadIdsAliasesAndProducers) {
  Parts p = ValidParts();
  p.values[1].id = ValueId{5};
  EXPECT_THROW(Make(p), ModelLoadError);
  p = ValidParts();
  p.nodes[0].id = NodeId{3};
  EXPECT_THROW(Make(p), ModelLoadError);
  p = ValidParts();
  p.values[0].alias_of = ValueId{1};  // aliases a later value
  EXPECT_THROW(Make(p), ModelLoadError);
  p = ValidParts();
  p.values[1].producer = NodeId{4};  // the node's output claims another producer
  EXPECT_THROW(Make(p), ModelLoadError);
  p = ValidParts();
  p.values[0].storage_numel = -1;
  EXPECT_THROW(Make(p), ModelLoadError);
}

}  // namespace
}  // namespace llmem
