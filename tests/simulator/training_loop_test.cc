// The training loop around the step (LoopPlan): gradient accumulation, kept outputs, an optimizer stepped in
// backward, gradient clipping. Every expected figure is summed block by block in the comment above it, from the
// plain step of the same graph (training_step_simulator_test.cc: Graph A setup 1696, forward peak 2212, backward
// peak 2472, 2208 after backward, optimizer peak 3232).
#include <gtest/gtest.h>

#include <algorithm>

#include "graph/error.h"
#include "simulator/training_step_simulator.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

constexpr size_t kForward = static_cast<size_t>(Phase::kForward);
constexpr size_t kBackward = static_cast<size_t>(Phase::kBackward);
constexpr size_t kOptimizer = static_cast<size_t>(Phase::kOptimizer);

// Graph A with the linear in a module named lm_head, as HF causal LMs name it: its output is what the model returns.
Graph LmHeadCrossEntropy() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {16, 8});
  b.SetHead();
  ValueId logits = b.OpOut("aten::linear", {T(x), T(w), None()}, Out({4, 16}), "lm_head");
  return b.Build(CrossEntropy(b, logits, labels));
}

TEST(TrainingLoopTest, LaterMicroBatchesRunWithTheGradientsOfTheEarlierOnes) {
  // Second micro-batch: d w (512) is alive from the start.
  //   forward:  2212 + 512                                                                      = 2724
  //   backward: d loss, workspace and d logits on top of it: 2472 + 512                          = 2984;
  //             the new d w (+512) is added into the old one and freed: back to 2208 after backward
  //   optimizer: as without accumulation                                                         = 3232
  TrainingConfig c = CpuConfig();
  c.grad_accum = 4;
  const Replay r = ReplayExact(SimulateTrainingStep(LinearCrossEntropy(), c).timeline);
  EXPECT_EQ(r.phase_peak[kForward], 2724);
  EXPECT_EQ(r.phase_peak[kBackward], 2984);
  EXPECT_EQ(r.phase_start[kOptimizer], 2208);
  EXPECT_EQ(r.phase_peak[kOptimizer], 3232);
}

TEST(TrainingLoopTest, OptimizerInBackwardStepsEachParameterWhenItsGradientIsDone) {
  // Graph B (TwoLinears), backward as in the plain step up to linear 2's end (w2's gradient done): 3108, then w2's
  // sqrt + denom (+1024) = 4132 (peak), then they and d w2 go: 2596. Linear 1: d w1 +256 = 2852, -d h = 2724,
  // w1's sqrt + denom +512 = 3236, then they and d w1 go: 2468; the loss goes: 2464. No optimizer phase, no
  // gradient left.
  TrainingConfig c = CpuConfig();
  c.optimizer_in_backward = true;
  const StepSimulation sim = SimulateTrainingStep(TwoLinears(), c);
  const Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kBackward], 4132);
  EXPECT_EQ(r.peak, 4132);
  EXPECT_EQ(r.end, 2464);
  for (const auto& e : sim.timeline.events) EXPECT_NE(e.phase, Phase::kOptimizer);
}

TEST(TrainingLoopTest, OptimizerInBackwardRefusesAccumulationAndClipping) {
  TrainingConfig accum = CpuConfig();
  accum.optimizer_in_backward = true;
  accum.grad_accum = 2;
  EXPECT_THROW(SimulateTrainingStep(TwoLinears(), accum), ConfigError);
  TrainingConfig clip = CpuConfig();
  clip.optimizer_in_backward = true;
  clip.grad_clip = 1.0;
  EXPECT_THROW(SimulateTrainingStep(TwoLinears(), clip), ConfigError);
}

TEST(TrainingLoopTest, KeptOutputsLiveThroughBackwardAndTheNextForward) {
  // The previous step's logits (256) and loss (4) are alive until this forward returns: setup 1696 + 260 = 1956,
  // forward peak 2212 + 260 = 2472. This step's logits stay instead of going after the loss: backward peak
  // 2472 + 256 = 2728; the optimizer starts at 2208 + 256 + 4 = 2468 and peaks at 2468 + 1024 = 3492.
  TrainingConfig c = CpuConfig();
  c.keep_outputs = true;
  const Replay r = ReplayExact(SimulateTrainingStep(LmHeadCrossEntropy(), c).timeline);
  EXPECT_EQ(r.phase_peak[kForward], 2472);
  EXPECT_EQ(r.phase_peak[kBackward], 2728);
  EXPECT_EQ(r.phase_start[kOptimizer], 2468);
  EXPECT_EQ(r.phase_peak[kOptimizer], 3492);
}

TEST(TrainingLoopTest, KeptOutputsOfAModelWithoutAnLmHeadAreItsLoss) {
  // Graph A returns only the loss: the previous step's loss (4) is alive until this forward returns: setup
  // 1696 + 4 = 1700, forward peak 2212 + 4 = 2216. This step's loss is alive at the backward peak anyway (2472) and
  // stays past it: the optimizer starts at 2208 + 4 = 2212 and peaks at 3232 + 4 = 3236.
  TrainingConfig c = CpuConfig();
  c.keep_outputs = true;
  const Replay r = ReplayExact(SimulateTrainingStep(LinearCrossEntropy(), c).timeline);
  EXPECT_EQ(r.phase_peak[kForward], 2216);
  EXPECT_EQ(r.phase_peak[kBackward], 2472);
  EXPECT_EQ(r.phase_start[kOptimizer], 2212);
  EXPECT_EQ(r.phase_peak[kOptimizer], 3236);
}

TEST(TrainingLoopTest, GradientClippingMakesOneNormPerGradientBeforeTheStep) {
  // Graph B before the step: 3232 with d w1 and d w2. Two 4-byte norms + their stack (8) + the total norm (4)
  // = 3252 before the step's first temporary (w1's sqrt, 256 B).
  TrainingConfig c = CpuConfig();
  c.grad_clip = 1.0;
  const StepSimulation sim = SimulateTrainingStep(TwoLinears(), c);
  const Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_start[kOptimizer], 3232);
  int64_t live = 0, before_step = 0;
  bool stepping = false;
  for (const auto& e : sim.timeline.events) {
    if (e.phase == Phase::kOptimizer && e.is_alloc && e.bytes >= 256) stepping = true;
    live += e.is_alloc ? e.bytes : -e.bytes;
    if (e.phase == Phase::kOptimizer && !stepping) before_step = std::max(before_step, live);
  }
  EXPECT_EQ(before_step, 3252);
  // The norms are gone before the step's temporaries: w2's sqrt and denom with w1's denom, 3232 + 1280.
  EXPECT_EQ(r.phase_peak[kOptimizer], 4512);
}

}  // namespace
}  // namespace llmem::sim
