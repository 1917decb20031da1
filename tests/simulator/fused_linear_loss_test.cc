// The fused linear cross-entropy (LossPlan, Note [Fused linear cross-entropy]): Liger-Kernel's
// LigerFusedLinearCrossEntropyFunction in place of the graph's LM head and loss. Liger's kernels are Triton (GPU)
// only, so nothing here is measured: the chunk rule is checked against the source's own worked example and the
// byte counts are summed by hand, block by block, from what the source allocates.
#include <gtest/gtest.h>

#include <string>

#include "graph/error.h"
#include "simulator/passes/loss_pass.h"
#include "simulator/training_step_simulator.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT
using llmem::testing::Ints;

constexpr size_t kForward = static_cast<size_t>(Phase::kForward);
constexpr size_t kBackward = static_cast<size_t>(Phase::kBackward);
constexpr size_t kOptimizer = static_cast<size_t>(Phase::kOptimizer);

// h = mul(x, x) [2, 4, 8] (256 B) in model.body.norm; lm_head linear(h, w [16, 8] = 512 B) -> logits [2, 4, 16],
// viewed to [8, 16]; cross-entropy against labels [2, 4] (i64, 64 B) viewed to [8].
Graph Head() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {2, 4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {2, 4});
  ValueId w = b.Param("w", {16, 8});
  b.SetHead();
  ValueId h = b.OpOut("aten::mul", {T(x), T(x)}, Out({2, 4, 8}).RequiresGrad(true), "model.body.norm");
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w), None()}, Out({2, 4, 16}), "model.lm_head");
  ValueId flat = b.OpOut("aten::view", {T(logits), Ints({-1, 16})}, Out({8, 16}).AliasOf(logits), "model");
  ValueId targets = b.OpOut("aten::view", {T(labels), Ints({-1})}, Out({8}, DType::kI64).AliasOf(labels), "model");
  return b.Build(b.OpOut("aten::cross_entropy_loss", {T(flat), T(targets), None(), I(1), I(-100), D(0.0)}, Out({}),
                         "model"),
                 2, 4);
}

TrainingConfig Fused(const char* gpu, Precision precision) {
  TrainingConfig c = GpuConfig(gpu, precision);
  c.loss = LossVariant::kFusedLinear;
  return c;
}

TEST(FusedLinearLossTest, ChunkRowsFollowLigersRule) {
  // The source's comment: BT = 4096*4, V = 32000, H = 4096 ==> inc_factor = 8, chunk_size = 2048.
  EXPECT_EQ(FusedLinearChunkRows(4096 * 4, 32000, 4096), 2048);
  // inc_factor = cdiv(128256, 4096) = 32; cdiv(8192, 32) = 256, a power of two.
  EXPECT_EQ(FusedLinearChunkRows(8192, 128256, 4096), 256);
  // inc_factor = cdiv(50257, 768) = 66; cdiv(300, 66) = 5, rounded up to 8.
  EXPECT_EQ(FusedLinearChunkRows(300, 50257, 768), 8);
}

TEST(FusedLinearLossTest, Fp32ComputesTheGradientsInForward) {
  // BT = 8, inc_factor = cdiv(16, 8) = 2, chunk_size = next_power_of_2(4) = 4: two chunks of 4 rows. Above setup:
  // Forward: h 256; padded labels 2 x 5 x 8 = 80, shifted 64 (400); grad_input 256, grad_weight 512, loss_1d 32,
  //   target_mask 8 (1208; its sum +8 -8); chunk 0: logits 4 x 16 x 4 = 256, grad_input's product 128 (freed), the
  //   weight gradient's product 512 = 1976 (peak), freed: 1464; chunk 1: logits 256, then chunk 0's go, and the
  //   same: 1976; loss 4, -loss_1d -mask -logits -labels, -h: 772 = grad_input + grad_weight + loss.
  // Backward: d loss 4, torch.tensor(1.0) 4 = 780 (peak), -4 -4; grad_input is h's gradient and goes after h's
  //   op, the loss goes: 512 = grad_weight, now w's .grad.
  const Replay r = ReplayExact(SimulateTrainingStep(Head(), Fused("a100-80", Precision::kFp32)).timeline);
  const int64_t setup = r.phase_start[kForward];
  EXPECT_EQ(r.phase_peak[kForward] - setup, 1976);
  EXPECT_EQ(r.phase_start[kBackward] - setup, 772);
  EXPECT_EQ(r.phase_peak[kBackward] - setup, 780);
  EXPECT_EQ(r.phase_start[kOptimizer] - setup, 512);
}

TEST(FusedLinearLossTest, AutocastAccumulatesTheWeightGradientByAddmmFromAmpere) {
  // As fp32 up to the loop (1208: grad_input and grad_weight stay fp32). Chunk 0: weight.t()'s copy 16 x 8 x 2 =
  //   256, the chunk's copy 4 x 8 x 2 = 64, bf16 logits 128 (1656), -64 -256, the cached weight copy 256 (1592),
  //   grad_input's bf16 product 64 and addmm's bf16 chunk 64 (each freed); chunk 1: +256 +64 +128 = 2040 (peak),
  //   -64 -256 -128 (chunk 0's logits), then as chunk 0: 1592; the loss and frees as fp32 leave the weight copy:
  //   1028, freed when autocast exits: 772.
  const Replay r = ReplayExact(SimulateTrainingStep(Head(), Fused("a100-80", Precision::kBf16Autocast)).timeline);
  const int64_t setup = r.phase_start[kForward];
  EXPECT_EQ(r.phase_peak[kForward] - setup, 2040);
  EXPECT_EQ(r.phase_start[kBackward] - setup, 772);
}

TEST(FusedLinearLossTest, AutocastBeforeAmpereTakesTheWeightGradientThroughAnFp32Copy) {
  // Volta (capability 7.0): mm(grad_logits_chunk.t(), input_chunk) casts the chunk (64), makes a bf16 [16, 8]
  // (256), then .float() an fp32 one (512): 1592 + 64 + 256 - 64 + 512 = 2360 (peak) in each chunk.
  const Replay r = ReplayExact(SimulateTrainingStep(Head(), Fused("v100-32", Precision::kBf16Autocast)).timeline);
  EXPECT_EQ(r.phase_peak[kForward] - r.phase_start[kForward], 2360);
}

TEST(FusedLinearLossTest, RefusesTheCpuTarget) {
  TrainingConfig cpu = CpuConfig();
  cpu.loss = LossVariant::kFusedLinear;
  try {
    SimulateTrainingStep(Head(), cpu);
    ADD_FAILURE() << "the cpu target was not refused";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("need a GPU target"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace llmem::sim
