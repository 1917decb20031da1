// EstimateMemory: the allocator models run over the step timeline, the peak and its breakdown, and the
// nvidia-smi / fits figures.
#include "simulator/memory_estimate.h"

#include <gtest/gtest.h>

#include "simulator/caching_allocator_model.h"

#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

int64_t At(const MemoryEstimate& est, MemoryCategory c) { return est.at_peak[static_cast<size_t>(c)]; }

TEST(MemoryEstimateTest, CpuTargetCountsExactBytes) {
  // Graph A (see training_step_simulator_test): phase peaks 1696 / 2212 / 2472 / 3232; the peak is the optimizer
  // step: w 512 + states 1024 + inputs 160 + d w 512 + sqrt and denom 1024 = 3232.
  Graph g = LinearCrossEntropy();
  MemoryEstimate est = EstimateMemory(g, CpuConfig());
  EXPECT_EQ(est.target, "cpu");
  EXPECT_EQ(est.peak_allocated_bytes, 3232);
  EXPECT_EQ(est.peak_reserved_bytes, 3232);
  EXPECT_EQ(est.fixed_overhead_bytes, 0);
  EXPECT_EQ(est.nvidia_smi_bytes, 3232);
  EXPECT_EQ(est.capacity_bytes, 0);
  EXPECT_TRUE(est.fits);
  EXPECT_EQ(est.peak_phase, Phase::kOptimizer);
  EXPECT_EQ(est.peak_op, "optimizer step");
  EXPECT_EQ(est.phase_peak_bytes, (std::array<int64_t, 4>{1696, 2212, 2472, 3232}));
  EXPECT_EQ(At(est, MemoryCategory::kWeights), 512);
  EXPECT_EQ(At(est, MemoryCategory::kOptimizerState), 1024);
  EXPECT_EQ(At(est, MemoryCategory::kInputs), 160);
  EXPECT_EQ(At(est, MemoryCategory::kGradients), 512);
  EXPECT_EQ(At(est, MemoryCategory::kTransient), 1024);
  EXPECT_EQ(At(est, MemoryCategory::kActivations), 0);
  EXPECT_EQ(est.weights_bytes, 512);
  EXPECT_EQ(est.gradients_bytes, 512);
  EXPECT_EQ(est.optimizer_state_bytes, 1024);
  // Live at the peak: six 512 B blocks (w, 2 states, d w, sqrt, denom), x 128, labels 32.
  ASSERT_EQ(est.largest_at_peak.size(), 8u);
  EXPECT_EQ(est.largest_at_peak[0].bytes, 512);
  EXPECT_EQ(est.largest_at_peak[0].label, "d w");  // ties broken by label
  EXPECT_EQ(est.largest_at_peak[6].bytes, 128);
  EXPECT_EQ(est.largest_at_peak[7].bytes, 32);
  EXPECT_TRUE(est.unknown_ops.empty());
}

TEST(MemoryEstimateTest, PeakInBackwardNamesTheOp) {
  // SGD on graph A: no optimizer temporaries, so the peak is in backward at the cross_entropy node:
  // w 512 + momentum 512 + inputs 160 + loss 4 + log-probs 256 + d loss 4 + ws 256 + d logits 256 = 1960.
  Graph g = LinearCrossEntropy();
  MemoryEstimate est = EstimateMemory(g, CpuConfig(Precision::kFp32, OptimizerKind::kSgdMomentum));
  EXPECT_EQ(est.peak_allocated_bytes, 1960);
  EXPECT_EQ(est.peak_phase, Phase::kBackward);
  EXPECT_EQ(est.peak_op, "aten::cross_entropy_loss (head)");
  EXPECT_EQ(At(est, MemoryCategory::kHeadActivations), 4 + 256);
  EXPECT_EQ(At(est, MemoryCategory::kActivationGrads), 4 + 256);
  EXPECT_EQ(At(est, MemoryCategory::kTransient), 256);
  // SGD updates in place: the optimizer phase allocates nothing and holds what backward left, w + momentum +
  // inputs + d w = 1696.
  EXPECT_EQ(est.phase_peak_bytes[static_cast<size_t>(Phase::kOptimizer)], 1696);
  // Each phase's breakdown is taken at its own peak: the backward's is the step peak's; the optimizer phase peaks
  // as it begins (no op), with the gradient of w alive.
  const size_t backward = static_cast<size_t>(Phase::kBackward), optimizer = static_cast<size_t>(Phase::kOptimizer);
  EXPECT_EQ(est.phase_peak_op[backward], "aten::cross_entropy_loss (head)");
  EXPECT_EQ(est.phase_at_peak[backward], est.at_peak);
  EXPECT_EQ(est.phase_peak_op[optimizer], "");
  std::array<int64_t, kNumCategories> at_optimizer{};
  at_optimizer[static_cast<size_t>(MemoryCategory::kWeights)] = 512;
  at_optimizer[static_cast<size_t>(MemoryCategory::kOptimizerState)] = 512;
  at_optimizer[static_cast<size_t>(MemoryCategory::kInputs)] = 160;
  at_optimizer[static_cast<size_t>(MemoryCategory::kGradients)] = 512;
  EXPECT_EQ(est.phase_at_peak[optimizer], at_optimizer);
}

TEST(MemoryEstimateTest, CachingAllocatorTarget) {
  // Graph B on a100-80. Lower bound: every block rounded to 512 B. The largest moment is cross_entropy's
  // backward with 14 blocks alive (w1, w2, 4 states, x, labels, h, loss, log-probs, d loss, ws, d logits),
  // all <= 512 B: 14 * 512 = 7168, plus the cuBLAS 8,519,680 and cuBLASLt 1,048,576 workspaces = 9,575,424.
  // Every block splits off a cached segment, so allocated equals the bound. Reserved: one 2 MiB small segment
  // (cuBLASLt 1 MiB + the small blocks) and one 20 MiB segment for the cuBLAS workspace = 22 MiB.
  Graph g = TwoLinears();
  MemoryEstimate est = EstimateMemory(g, GpuConfig("a100-80"));
  EXPECT_EQ(est.target, "a100-80");
  EXPECT_EQ(est.lower_bound_bytes, 9'575'424);
  EXPECT_EQ(est.peak_allocated_bytes, 9'575'424);
  EXPECT_EQ(est.peak_reserved_bytes, 22 * kMiB);
  EXPECT_GE(est.peak_reserved_bytes, est.peak_allocated_bytes);
  EXPECT_GE(est.peak_allocated_bytes, est.lower_bound_bytes);
  EXPECT_EQ(est.fixed_overhead_bytes, 400 * kMiB);
  EXPECT_EQ(est.nvidia_smi_bytes, est.peak_reserved_bytes + 400 * kMiB);
  EXPECT_EQ(est.capacity_bytes, 80 * kGiB - 512 * kMiB);
  EXPECT_TRUE(est.fits);
  EXPECT_EQ(At(est, MemoryCategory::kLibraryWorkspace), 8'519'680 + 1'048'576);
}

// x [4,16384] -> linear(w [65536,16384] f32 = 4 GiB) -> logits [4,65536] -> cross_entropy.
// AdamW steady state: w 4 GiB + states 8 GiB + d w 4 GiB = 16 GiB before any activation.
Graph HugeLinear() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 16384}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {65536, 16384});
  b.SetLayer(0);
  ValueId logits = b.Op("aten::linear", {T(x), T(w), None()}, {4, 65536});
  return b.Build(CrossEntropy(b, logits, labels));
}

TEST(MemoryEstimateTest, DoesNotFitWhenCapacityIsExceeded) {
  // v100-16: 15.5 GiB, less the 400 MiB context for the allocator: 16 GiB of model states cannot fit.
  Graph g = HugeLinear();
  MemoryEstimate small = EstimateMemory(g, GpuConfig("v100-16"));
  EXPECT_FALSE(small.fits);
  EXPECT_EQ(small.capacity_bytes, 16 * kGiB - 512 * kMiB);
  // a100-80: fits; the optimizer peak, 16 GiB + the foreach sqrt copy 4 GiB = 20 GiB, is far below 79.5 GiB.
  MemoryEstimate big = EstimateMemory(g, GpuConfig("a100-80"));
  EXPECT_TRUE(big.fits);
  EXPECT_LE(big.nvidia_smi_bytes, big.capacity_bytes);
  EXPECT_GE(big.peak_allocated_bytes, 16 * kGiB);
  EXPECT_GE(big.peak_reserved_bytes, big.peak_allocated_bytes);
  EXPECT_GE(big.peak_allocated_bytes, big.lower_bound_bytes);
  EXPECT_EQ(big.weights_bytes, 4 * kGiB);
  EXPECT_EQ(big.optimizer_state_bytes, 8 * kGiB);
  EXPECT_EQ(big.gradients_bytes, 4 * kGiB);
}

// Whether a step fits is decided without replaying the GPU-limited allocator when the unfragmented peak alone
// passes the device; the answer must be the one a full replay on the limited caching allocator gives, on either
// side of the smallest device that fits.
TEST(MemoryEstimateTest, FitsAgreesWithAFullReplayOnTheLimitedAllocator) {
  Graph g = HugeLinear();
  const MemoryEstimate unlimited = EstimateMemory(g, GpuConfig("a100-80"));
  const int64_t context = unlimited.fixed_overhead_bytes;
  const auto& events = unlimited.simulation->timeline.events;
  auto replay_fits = [&](int64_t free_bytes) {
    CudaCachingAllocatorModel limited(CachingAllocatorConfig{.capacity_bytes = free_bytes});
    for (const MemoryEvent& e : events) {
      if (e.bytes == 0) continue;
      if (e.is_alloc && !limited.Alloc(e.block, e.bytes)) return false;
      if (!e.is_alloc) limited.Free(e.block);
    }
    return limited.Stats().peak_reserved_bytes <= free_bytes;
  };
  auto estimate_fits = [&](int64_t free_bytes) {
    TrainingConfig c = GpuConfig("a100-80");
    c.target.gpu.capacity_bytes = free_bytes + context;
    return EstimateMemory(g, c).fits;
  };
  // The smallest free memory (in 512 B steps) on which the replay fits.
  int64_t lo = unlimited.lower_bound_bytes - 512, hi = unlimited.peak_reserved_bytes;
  ASSERT_FALSE(replay_fits(lo));
  ASSERT_TRUE(replay_fits(hi));
  while (hi - lo > 512) {
    const int64_t mid = lo + (hi - lo) / 1024 * 512;
    (replay_fits(mid) ? hi : lo) = mid;
  }
  for (int64_t free_bytes : {unlimited.lower_bound_bytes - kMiB, lo, hi, hi + 512, unlimited.peak_reserved_bytes}) {
    EXPECT_EQ(estimate_fits(free_bytes), replay_fits(free_bytes)) << "free bytes " << free_bytes;
  }
  EXPECT_FALSE(estimate_fits(lo));
  EXPECT_TRUE(estimate_fits(hi));
}

TEST(MemoryEstimateTest, NvidiaSmiIsReservedPlusContextOnEveryGpu) {
  Graph g = TwoLinears();
  for (const auto& gpu : GpuCatalog()) {
    MemoryEstimate est = EstimateMemory(g, GpuConfig(gpu.name.c_str()));
    EXPECT_EQ(est.nvidia_smi_bytes, est.peak_reserved_bytes + gpu.cuda_context_bytes) << gpu.name;
    EXPECT_GE(est.peak_reserved_bytes, est.peak_allocated_bytes) << gpu.name;
    EXPECT_GE(est.peak_allocated_bytes, est.lower_bound_bytes) << gpu.name;
    EXPECT_EQ(At(est, MemoryCategory::kLibraryWorkspace), gpu.cublas_workspace_bytes + gpu.cublaslt_workspace_bytes)
        << gpu.name;
    EXPECT_TRUE(est.fits) << gpu.name;
  }
}

}  // namespace
}  // namespace llmem::sim
