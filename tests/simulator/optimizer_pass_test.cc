// Optimizer states and step temporaries, against the sizes docs/OPTIMIZER_STATES.md measured for one parameter.
#include <gtest/gtest.h>

#include <algorithm>

#include "graph/error.h"
#include "simulator/memory_estimate.h"
#include "simulator/step_plan_builder.h"
#include "simulator/training_step_simulator.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using testing::CpuConfig;
using testing::GpuConfig;

// x [2,512] -> linear(w [1024,512]) -> loss: one parameter of the measured shape.
Graph OneMatrix(DType dtype = DType::kF32) {
  testing::TestGraphBuilder b;
  ValueId x = b.Input("x", {2, 512}, dtype);
  ValueId labels = b.Input("labels", {2});
  ValueId w = b.Param("w", {1024, 512}, dtype);
  b.SetLayer(0);
  ValueId logits = b.Op("aten::linear", {testing::T(x), testing::T(w), testing::None()}, {2, 1024});
  return b.Build(testing::CrossEntropy(b, logits, labels));
}

int64_t StateBytes(const Graph& g, const TrainingConfig& c) { return EstimateMemory(g, c).optimizer_state_bytes; }

// The largest sum of temporaries the optimizer phase has alive at once.
int64_t StepTemporaryPeak(const Graph& g, const TrainingConfig& c) {
  const StepSimulation sim = SimulateTrainingStep(g, c);
  int64_t live = 0, peak = 0;
  for (const MemoryEvent& e : sim.timeline.events) {
    if (e.phase != Phase::kOptimizer) continue;
    live += e.is_alloc ? e.bytes : -e.bytes;
    peak = std::max(peak, live);
  }
  return peak;
}

TEST(OptimizerPassTest, AdafactorKeepsFactoredFp32States) {
  // Measured 1024x512: 6,148 B (row 1024 x 4 + column 512 x 4 + the 0-d RMS).
  EXPECT_EQ(StateBytes(OneMatrix(), CpuConfig(Precision::kFp32, OptimizerKind::kAdafactor)), 6148);
  // Measured peak of the step: 4,200,448 B fp32, 8,394,752 B bf16.
  EXPECT_EQ(StepTemporaryPeak(OneMatrix(), CpuConfig(Precision::kFp32, OptimizerKind::kAdafactor)), 4200448);
  EXPECT_EQ(StepTemporaryPeak(OneMatrix(DType::kBF16), CpuConfig(Precision::kBf16, OptimizerKind::kAdafactor)),
            8394752);
}

TEST(OptimizerPassTest, Bitsandbytes8bitStatesHaveBlockwiseAbsmaxAndSharedMaps) {
  // Measured 1024x512: 1,067,008 B = 2 N + 2 x 2048 blocks x 4 B + the two shared 256-entry maps.
  EXPECT_EQ(StateBytes(OneMatrix(), CpuConfig(Precision::kFp32, OptimizerKind::kAdamW8bit)), 1067008);
  // CPU reference step: 5 x 4N (fp32), 6 x 4N (bf16); measured 10,485,772 B and 12,582,924 B (12 B of scalars).
  EXPECT_EQ(StepTemporaryPeak(OneMatrix(), CpuConfig(Precision::kFp32, OptimizerKind::kAdamW8bit)), 10485760);
  EXPECT_EQ(StepTemporaryPeak(OneMatrix(DType::kBF16), CpuConfig(Precision::kBf16, OptimizerKind::kAdamW8bit)),
            12582912);
  // The CUDA kernel allocates nothing.
  EXPECT_EQ(StepTemporaryPeak(OneMatrix(), GpuConfig("a100-80", Precision::kFp32, OptimizerKind::kAdamW8bit)), 0);
}

TEST(OptimizerPassTest, EmbeddingsAndSmallParametersGet32BitBitsandbytesStates) {
  testing::TestGraphBuilder b;
  ValueId ids = b.Input("ids", {2, 3});
  ValueId labels = b.Input("labels", {6});
  ValueId wte = b.Param("wte", {64, 128});  // 8192 elements: 8-bit size, but an nn.Embedding
  ValueId norm = b.Param("norm", {128});    // below 4096 elements
  ValueId w = b.Param("w", {64, 128});
  b.SetRegion(Region{RegionKind::kEmbedding, -1});
  ValueId e = b.Op("aten::embedding", {testing::T(wte), testing::T(ids), testing::I(-1), testing::B(false),
                                       testing::B(false)}, {2, 3, 128});
  b.SetLayer(0);
  ValueId h = b.Op("aten::mul", {testing::T(e), testing::T(norm)}, {2, 3, 128});
  ValueId logits = b.Op("aten::linear", {testing::T(h), testing::T(w), testing::None()}, {2, 3, 64});
  ValueId flat = b.Op("aten::view", {testing::T(logits), testing::I(6)}, {6, 64});
  const Graph g = b.Build(testing::CrossEntropy(b, flat, labels));
  const int64_t fp32_states = 2 * 4 * (8192 + 128);
  const int64_t eight_bit = 2 * 8192 + 2 * 32 * 4 + 2 * 256 * 4;
  EXPECT_EQ(StateBytes(g, CpuConfig(Precision::kFp32, OptimizerKind::kAdamW8bit)), fp32_states + eight_bit);
}

TEST(OptimizerPassTest, PagedStatesLeaveTheAllocatorOnCudaOnly) {
  const Graph g = OneMatrix();  // 524,288 elements: paged from 1e5
  const MemoryEstimate plain = EstimateMemory(g, GpuConfig("a100-80", Precision::kFp32, OptimizerKind::kAdamW8bit));
  const MemoryEstimate paged =
      EstimateMemory(g, GpuConfig("a100-80", Precision::kFp32, OptimizerKind::kPagedAdamW8bit));
  EXPECT_EQ(paged.managed_optimizer_state_bytes, 2 * 524288);  // the two uint8 states
  EXPECT_EQ(paged.optimizer_state_bytes, plain.optimizer_state_bytes);
  EXPECT_LT(paged.peak_allocated_bytes, plain.peak_allocated_bytes);
  EXPECT_EQ(paged.fixed_overhead_bytes, plain.fixed_overhead_bytes + 2 * 524288);
  const MemoryEstimate cpu = EstimateMemory(g, CpuConfig(Precision::kFp32, OptimizerKind::kPagedAdamW8bit));
  EXPECT_EQ(cpu.managed_optimizer_state_bytes, 0);  // no paging on CPU: bitsandbytes falls back
}

TEST(OptimizerPassTest, SgdWithoutMomentumKeepsNothing) {
  EXPECT_EQ(StateBytes(OneMatrix(), CpuConfig(Precision::kFp32, OptimizerKind::kSgdNoMomentum)), 0);
}

TEST(OptimizerPassTest, AdamWImplementationChoiceSetsTheTemporaries) {
  TrainingConfig fused = CpuConfig();
  fused.optimizer_impl = OptimizerImplChoice::kFused;
  EXPECT_TRUE(BuildStepPlan(OneMatrix(), fused).optimizer_step.temporaries.empty());
  TrainingConfig foreach = CpuConfig();
  foreach.optimizer_impl = OptimizerImplChoice::kForeach;
  EXPECT_TRUE(BuildStepPlan(OneMatrix(), foreach).optimizer_step.whole_group);
  TrainingConfig loop = GpuConfig("a100-80");
  loop.optimizer_impl = OptimizerImplChoice::kForLoop;
  EXPECT_EQ(BuildStepPlan(OneMatrix(), loop).optimizer_step.temporaries.size(), 2u);
}

TEST(OptimizerPassTest, ImplementationChoiceOfAnotherLibraryIsRefused) {
  TrainingConfig c = CpuConfig(Precision::kFp32, OptimizerKind::kAdafactor);
  c.optimizer_impl = OptimizerImplChoice::kFused;
  EXPECT_THROW(BuildStepPlan(OneMatrix(), c), ConfigError);
}

}  // namespace
}  // namespace llmem::sim
