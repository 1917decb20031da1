// The passes that build a step plan: what each decides, read from the graph and the recipe.
#include <gtest/gtest.h>

#include "simulator/step_plan_builder.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using testing::CpuConfig;
using testing::GpuConfig;

// x -> linear(w) -> linear(frozen) -> linear(w tied) -> loss, with a buffer the forward never reads.
Graph FrozenAndTied() {
  testing::TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {8, 8});
  ValueId frozen = b.Param("frozen", {8, 8}, DType::kF32, /*trainable=*/false);
  ValueId unused = b.Param("unused", {8, 8}, DType::kF32, /*trainable=*/true, /*used_in_forward=*/false);
  (void)unused;
  ValueId tied = b.TiedParam("w_tied", w);
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {testing::T(x), testing::T(w), testing::None()}, {4, 8});
  ValueId h2 = b.Op("aten::linear", {testing::T(h), testing::T(frozen), testing::None()}, {4, 8});
  ValueId logits = b.Op("aten::linear", {testing::T(h2), testing::T(tied), testing::None()}, {4, 8});
  return b.Build(testing::CrossEntropy(b, logits, labels));
}

TEST(StepPlanTest, OnlyTrainableUsedParametersOncePerStorageAreOptimized) {
  const Graph g = FrozenAndTied();
  const StepPlan plan = BuildStepPlan(g, CpuConfig());
  ASSERT_EQ(plan.params.size(), 4u);
  EXPECT_TRUE(plan.params[0].optimized);    // w
  EXPECT_FALSE(plan.params[1].trainable);   // frozen: as the file has it
  EXPECT_FALSE(plan.params[1].optimized);
  EXPECT_TRUE(plan.params[2].trainable);    // unused: trainable, but the loss never reaches it
  EXPECT_FALSE(plan.params[2].optimized);
  EXPECT_FALSE(plan.params[3].optimized);   // w_tied: the same storage as w
  EXPECT_TRUE(plan.params[1].states.empty());
  EXPECT_TRUE(plan.params[3].states.empty());
}

TEST(StepPlanTest, OptimizerStatesFollowTheOptimizer) {
  const Graph g = testing::TwoLinears();
  const StepPlan adamw = BuildStepPlan(g, CpuConfig(Precision::kFp32, OptimizerKind::kAdamW));
  const StepPlan sgd = BuildStepPlan(g, CpuConfig(Precision::kFp32, OptimizerKind::kSgdMomentum));
  EXPECT_EQ(adamw.params[0].states.size(), 2u);
  EXPECT_EQ(sgd.params[0].states.size(), 1u);
  EXPECT_TRUE(sgd.optimizer_step.temporaries.empty());  // momentum updates in place
}

TEST(StepPlanTest, AdamWTemporariesFollowTheBackendsImplementation) {
  const Graph g = testing::TwoLinears();
  const StepPlan cpu = BuildStepPlan(g, CpuConfig());            // torch::optim, one parameter at a time
  const StepPlan gpu = BuildStepPlan(g, GpuConfig("a100-80"));   // torch.optim foreach
  EXPECT_FALSE(cpu.optimizer_step.whole_group);
  EXPECT_EQ(cpu.optimizer_step.temporaries.size(), 2u);  // sqrt and denom
  EXPECT_TRUE(gpu.optimizer_step.whole_group);
  EXPECT_EQ(gpu.optimizer_step.temporaries.size(), 1u);  // _foreach_sqrt
}

TEST(StepPlanTest, PrecisionPassGivesAutocastDtypes) {
  const Graph g = testing::TwoLinears();
  const StepPlan fp32 = BuildStepPlan(g, CpuConfig(Precision::kFp32));
  const StepPlan amp = BuildStepPlan(g, CpuConfig(Precision::kBf16Autocast));
  const ValueId logits = g.nodes()[1].outputs[0];
  EXPECT_EQ(fp32.value_dtypes[static_cast<size_t>(logits.index)], DType::kF32);
  EXPECT_EQ(amp.value_dtypes[static_cast<size_t>(logits.index)], DType::kBF16);  // linear runs in bf16
  EXPECT_EQ(amp.ops.size(), g.nodes().size());
}

}  // namespace
}  // namespace llmem::sim
