// Selective activation checkpointing: which ops torchtitan's op-level policy saves on each backend, and that a
// saved op's output lives from the forward into backward instead of being recomputed.
#include <gtest/gtest.h>

#include <string>

#include "graph/error.h"
#include "simulator/step_plan_builder.h"
#include "simulator/training_step_simulator.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

// One decoder layer: q, k (linears without bias: mm), attention over them, a linear with a bias (addmm) and one
// without (the third mm), then the LM head.
struct Layer {
  Graph graph;
  ValueId q, k, attention, biased, down;
};

Layer OneLayer() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {2, 3, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {2, 3});
  ValueId wq = b.Param("wq", {8, 8}), wk = b.Param("wk", {8, 8}), wb = b.Param("wb", {8, 8});
  ValueId bias = b.Param("bias", {8}), wd = b.Param("wd", {8, 8}), head = b.Param("head", {16, 8});
  b.SetLayer(0);
  Layer l;
  l.q = b.Op("aten::linear", {T(x), T(wq), None()}, {2, 3, 8});
  l.k = b.Op("aten::linear", {T(x), T(wk), None()}, {2, 3, 8});
  ValueId q4 = b.OpOut("aten::unsqueeze", {T(l.q), I(1)}, Out({2, 1, 3, 8}).AliasOf(l.q));
  ValueId k4 = b.OpOut("aten::unsqueeze", {T(l.k), I(1)}, Out({2, 1, 3, 8}).AliasOf(l.k));
  l.attention = b.Op("aten::scaled_dot_product_attention", {T(q4), T(k4), T(k4), None(), D(0.0), B(true)},
                     {2, 1, 3, 8});
  ValueId o = b.OpOut("aten::squeeze", {T(l.attention), I(1)}, Out({2, 3, 8}).AliasOf(l.attention));
  l.biased = b.Op("aten::linear", {T(o), T(wb), T(bias)}, {2, 3, 8});
  l.down = b.Op("aten::linear", {T(l.biased), T(wd), None()}, {2, 3, 8});
  b.SetHead();
  ValueId logits = b.Op("aten::linear", {T(l.down), T(head), None()}, {2, 3, 16});
  l.graph = b.Build(CrossEntropy(b, logits, labels));
  return l;
}

TrainingConfig Selective(TrainingConfig c) {
  c.checkpointing = {CheckpointingMode::kSelective, 0, CheckpointingImpl::kNonReentrant};
  return c;
}

SavePolicy PolicyOf(const StepPlan& plan, const Graph& g, ValueId v) {
  return plan.ops.at(static_cast<size_t>(g.value(v).producer.index)).save;
}

TEST(SelectiveCheckpointingTest, SavesEveryOtherMmAndTheAttentionKernelOnlyOnCuda) {
  const Layer l = OneLayer();
  const StepPlan cpu = BuildStepPlan(l.graph, Selective(CpuConfig()));
  EXPECT_EQ(PolicyOf(cpu, l.graph, l.q), SavePolicy::kCacheOutput);     // first mm
  EXPECT_EQ(PolicyOf(cpu, l.graph, l.k), SavePolicy::kRecompute);       // second mm
  EXPECT_EQ(PolicyOf(cpu, l.graph, l.attention), SavePolicy::kRecompute);  // the CPU kernel is not on the list
  EXPECT_EQ(PolicyOf(cpu, l.graph, l.biased), SavePolicy::kRecompute);  // addmm is not on the list
  EXPECT_EQ(PolicyOf(cpu, l.graph, l.down), SavePolicy::kCacheOutput);  // third mm
  EXPECT_EQ(cpu.checkpointing.rng_state_bytes, 0);                      // preserve_rng_state=False
  EXPECT_FALSE(cpu.checkpointing.reentrant);
  for (const char* gpu : {"a100-80", "h100-80"}) {
    for (Precision p : {Precision::kFp32, Precision::kBf16Autocast}) {  // efficient / flash kernel
      const StepPlan cuda = BuildStepPlan(l.graph, Selective(GpuConfig(gpu, p)));
      EXPECT_EQ(PolicyOf(cuda, l.graph, l.attention), SavePolicy::kCacheOutput) << gpu;
      EXPECT_EQ(PolicyOf(cuda, l.graph, l.k), SavePolicy::kRecompute) << gpu;
    }
  }
}

TEST(SelectiveCheckpointingTest, IsNonReentrantOnly) {
  TrainingConfig c = Selective(CpuConfig());
  c.checkpointing.impl = CheckpointingImpl::kReentrant;
  EXPECT_THROW(BuildStepPlan(OneLayer().graph, c), ConfigError);
}

// The free event of the block labelled `label`, or nullptr.
const MemoryEvent* FreeOf(const Timeline& tl, const std::string& label) {
  int64_t block = -1;
  for (const auto& e : tl.events) {
    if (e.is_alloc && tl.block_labels.at(static_cast<size_t>(e.block)) == label) block = e.block;
    if (!e.is_alloc && e.block == block) return &e;
  }
  return nullptr;
}

TEST(SelectiveCheckpointingTest, ASavedOutputLivesIntoBackwardAndIsNotRecomputed) {
  const Layer l = OneLayer();
  const std::string q = l.graph.value(l.q).name + " = aten::linear";
  const std::string k = l.graph.value(l.k).name + " = aten::linear";
  TrainingConfig full = CpuConfig();
  full.checkpointing = {CheckpointingMode::kFull, 0, CheckpointingImpl::kNonReentrant};
  const Timeline plain = SimulateTrainingStep(l.graph, full).timeline;
  const Timeline selective = SimulateTrainingStep(l.graph, Selective(CpuConfig())).timeline;
  // Full checkpointing drops q in the forward and makes it again in the recompute.
  ASSERT_NE(FreeOf(plain, q), nullptr);
  EXPECT_EQ(FreeOf(plain, q)->phase, Phase::kForward);
  EXPECT_EQ(BlocksLabelled(plain, "recomputed: " + q).size(), 1u);
  // The policy keeps q from the forward to its backward; k (the second mm) is recomputed.
  ASSERT_NE(FreeOf(selective, q), nullptr);
  EXPECT_EQ(FreeOf(selective, q)->phase, Phase::kBackward);
  EXPECT_TRUE(BlocksLabelled(selective, "recomputed: " + q).empty());
  EXPECT_EQ(BlocksLabelled(selective, "recomputed: " + k).size(), 1u);
}

TEST(FullCheckpointingTest, ReentrantKeepsTheRngStateUntilTheGraphIsFreed) {
  // CheckpointFunction stashes the RNG state as a ctx attribute: it goes with the autograd graph, after the whole
  // backward. The non-reentrant checkpoint's state goes with the layer's recompute frame, in the layer's backward.
  // An op before the layer (its backward runs after the layer's), the layer, the head.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {2, 3, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {2, 3});
  ValueId we = b.Param("we", {8, 8}), wl = b.Param("wl", {8, 8}), head = b.Param("head", {16, 8});
  ValueId e = b.Op("aten::linear", {T(x), T(we), None()}, {2, 3, 8});
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {T(e), T(wl), None()}, {2, 3, 8});
  b.SetHead();
  ValueId logits = b.Op("aten::linear", {T(h), T(head), None()}, {2, 3, 16});
  const Graph g = b.Build(CrossEntropy(b, logits, labels));
  for (const auto impl : {CheckpointingImpl::kReentrant, CheckpointingImpl::kNonReentrant}) {
    TrainingConfig c = CpuConfig();
    c.checkpointing = {CheckpointingMode::kFull, 0, impl};
    const Timeline tl = SimulateTrainingStep(g, c).timeline;
    const MemoryEvent* freed = FreeOf(tl, "checkpoint RNG state (layer 0)");
    ASSERT_NE(freed, nullptr);
    EXPECT_EQ(freed->phase, Phase::kBackward);
    if (impl == CheckpointingImpl::kReentrant) {
      EXPECT_EQ(freed->node, -1);  // after the last op's backward
    } else {
      EXPECT_GE(freed->node, 0);
    }
  }
}

TEST(SelectiveCheckpointingTest, EveryMicroBatchSavesAnewOnEveryTarget) {
  const Layer l = OneLayer();
  const std::string q = l.graph.value(l.q).name + " = aten::linear";
  for (TrainingConfig c : {CpuConfig(), CpuConfig(Precision::kBf16Autocast), GpuConfig("a100-80"),
                           GpuConfig("h100-80", Precision::kBf16Autocast)}) {
    c.grad_accum = 2;
    const Timeline tl = SimulateTrainingStep(l.graph, Selective(c)).timeline;  // timeline invariants checked
    int freed_in_backward = 0;
    for (const auto& e : tl.events) {
      if (!e.is_alloc && tl.block_labels.at(static_cast<size_t>(e.block)) == q) {
        freed_in_backward += e.phase == Phase::kBackward;
      }
    }
    EXPECT_EQ(BlocksLabelled(tl, q).size(), 2u);
    EXPECT_EQ(freed_in_backward, 2);
  }
}

}  // namespace
}  // namespace llmem::sim
