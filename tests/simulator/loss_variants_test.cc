// The loss variants (LossPlan) in place of the graph's LM head and loss: torchtune's chunked output and
// CEWithChunkedOutputLoss (Note [Chunked loss]) and Liger-Kernel's fused linear cross-entropy (Note [Fused linear
// cross-entropy]). Every expected figure is summed block by block in the comment above it. Liger's kernels are
// Triton (GPU) only, so its figures are not measured: its chunk rule is checked against the source's own worked
// example and its byte counts are worked by hand from what the source allocates.
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

// A causal-LM head on a [B, 4, 8] hidden state: h = mul(x, x) in model.body.norm (B = 2: 256 B), lm_head
// linear(h, w [16,8] = 512 B) -> logits [B, 4, 16] (B = 2: 512 B), viewed to [4B, 16], cross-entropy against
// labels [B, 4] (i64, B = 2: 64 B) viewed to [4B].
Graph HeadOnHiddenState(int64_t batch) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {batch, 4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {batch, 4});
  ValueId w = b.Param("w", {16, 8});
  b.SetHead();
  ValueId h = b.OpOut("aten::mul", {T(x), T(x)}, Out({batch, 4, 8}).RequiresGrad(true), "model.body.norm");
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w), None()}, Out({batch, 4, 16}), "model.lm_head");
  ValueId flat = b.OpOut("aten::view", {T(logits), Ints({-1, 16})}, Out({batch * 4, 16}).AliasOf(logits), "model");
  ValueId targets = b.OpOut("aten::view", {T(labels), Ints({-1})}, Out({batch * 4}, DType::kI64).AliasOf(labels),
                            "model");
  return b.Build(b.OpOut("aten::cross_entropy_loss", {T(flat), T(targets), None(), I(1), I(-100), D(0.0)}, Out({}),
                         "model"),
                 batch, 4);
}

TrainingConfig Chunked(int chunks, Precision precision = Precision::kFp32) {
  TrainingConfig c = CpuConfig(precision);
  c.loss = LossVariant::kChunked;
  c.loss_chunks = chunks;
  return c;
}

TEST(ChunkedLossTest, Fp32ChunksCopyTheHiddenStateAndAccumulateTheWeightGradient) {
  // Setup: x 256 + labels 64 + w 512 + AdamW states 1024 = 1856. B = 2, two chunks of 2 positions (rows 4).
  // Forward: h +256 = 2112; per chunk a reshape copy 128 and logits 256: 2880; h goes when the chunks exist: 2624;
  //   shifted labels +64, mask +8, count +8, int64 mask +64 (2768), -72: 2696; label chunks 2 x 32: 2760;
  //   chunk 0: log_softmax +256, loss +4, total_weight +4, sum +4, -4: 3024; chunk 1: +256 +4 +4 -4: 3284;
  //   loss +4 = 3288 (peak), -sum 4, -shifted 64, -logits 512: 2708.
  // Backward: d loss +4, d sum +4, -4, -count 8: 2704; per chunk nll grad +256, -labels 32, -total_weight 4,
  //   log_softmax grad +256, -256, -log_softmax 256: 2668, 2632; -d sum: 2628.
  //   mm chunk 1: d w +512, d x +128, -d logits 256, -copy 128: 2884; chunk 0: +512 +128 -256 -128 = 3140, the
  //   transposed d w cannot take the second: sum +512 = 3652 (peak), -1024: 2628.
  //   SliceBackward: +256 -128, +256 -128 -256: 2628; then d h and the loss go: 2368 = setup + d w.
  // Optimizer: AdamW's two temporaries of w: 2368 + 1024 = 3392.
  const StepSimulation sim = SimulateTrainingStep(HeadOnHiddenState(2), Chunked(2));
  const Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kForward], 3288);
  EXPECT_EQ(r.phase_peak[kBackward], 3652);
  EXPECT_EQ(r.phase_start[kOptimizer], 2368);
  EXPECT_EQ(r.phase_peak[kOptimizer], 3392);
  EXPECT_EQ(BlocksLabelled(sim.timeline, "hidden chunk reshape copy 0"), std::vector<int64_t>{128});
}

TEST(ChunkedLossTest, AutocastSavesEachChunksCopyAndOneWeightCopy) {
  // Setup 1856. Forward: h +256 = 2112; chunk 0: weight copy 256 (bf16), chunk copy 64, logits 128: 2560; chunk 1:
  //   +64 +128: 2752; -h: 2496; labels as above: 2568, label chunks: 2632; chunk 0: fp32 upcast +256,
  //   log_softmax +256, +4 +4 (3152), -upcast, sum +4, -4: 2896; chunk 1: +256 +256 +4 +4 = 3416 (peak), -256 -4:
  //   3156; loss +4, -sum: 3156; -shifted 64, -logits 256: 2836.
  // Backward: 2836 + 4 + 4 - 4 - 8 = 2832; chunk 1: nll grad +256 (3088), -36, log_softmax grad +256 = 3308
  //   (peak), -512, cast back to bf16 +128, -256: 2668; chunk 0 likewise: 2504; -d sum: 2500.
  //   mm chunk 1: d w 256 + d x 64, -d logits 128, -chunk copy 64, d x to fp32 +128 -64: 2692; chunk 0: +256 +64
  //   -128, -weight copy 256, -chunk copy 64 (2564), sum +256 -512, d x +128 -64: 2372; d w to fp32 +512 -256:
  //   2628; SliceBackward as in fp32: 2628.
  const Replay r =
      ReplayExact(SimulateTrainingStep(HeadOnHiddenState(2), Chunked(2, Precision::kBf16Autocast)).timeline);
  EXPECT_EQ(r.phase_peak[kForward], 3416);
  EXPECT_EQ(r.phase_peak[kBackward], 3308);
  EXPECT_EQ(r.phase_start[kOptimizer], 2368);
}

TEST(ChunkedLossTest, OneSequenceChunksAreViewsOfTheHiddenState) {
  // B = 1: a chunk of dim 1 is contiguous, so reshape is a view and mm saves the hidden state itself.
  const StepSimulation sim = SimulateTrainingStep(HeadOnHiddenState(1), Chunked(2));
  EXPECT_TRUE(BlocksLabelled(sim.timeline, "hidden chunk reshape copy 0").empty());
  EXPECT_TRUE(BlocksLabelled(sim.timeline, "labels chunk 0").empty());
  EXPECT_EQ(BlocksLabelled(sim.timeline, "logits chunk 1"), std::vector<int64_t>{128});
}

TEST(ChunkedLossTest, KeptOutputsAreTheLogitChunks) {
  // The loop keeps the returned list of logit chunks (2 x 256), not the loss: the previous step's through this
  // forward, this step's from the end of the forward on. Forward 3288 + 512 = 3800; backward 3652 + 512 = 4164;
  // the optimizer starts at 2368 + 512 = 2880.
  TrainingConfig kept = Chunked(2);
  kept.keep_outputs = true;
  const Replay r = ReplayExact(SimulateTrainingStep(HeadOnHiddenState(2), kept).timeline);
  EXPECT_EQ(r.phase_peak[kForward], 3800);
  EXPECT_EQ(r.phase_peak[kBackward], 4164);
  EXPECT_EQ(r.phase_start[kOptimizer], 2880);
}

// The ConfigError's message of simulating `graph` with `config` ("" when it simulates).
std::string Refusal(const Graph& graph, const TrainingConfig& config) {
  try {
    SimulateTrainingStep(graph, config);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(ChunkedLossTest, RefusesWhatItCannotChunk) {
  EXPECT_NE(Refusal(HeadOnHiddenState(2), Chunked(5)).find("between 1 and the sequence length 4"), std::string::npos);
  EXPECT_NE(Refusal(LinearCrossEntropy(), Chunked(2)).find("no LM head"), std::string::npos);
}

// The fused-linear step of HeadOnHiddenState(2) on `gpu`, in bytes above its setup (the GPU target's cuBLAS
// workspaces included there).
struct AboveSetup {
  int64_t forward_peak = 0, backward_start = 0, backward_peak = 0, optimizer_start = 0;
};
AboveSetup FusedLinearStep(const char* gpu, Precision precision, bool keep_outputs = false) {
  TrainingConfig c = GpuConfig(gpu, precision);
  c.loss = LossVariant::kFusedLinear;
  c.keep_outputs = keep_outputs;
  const Replay r = ReplayExact(SimulateTrainingStep(HeadOnHiddenState(2), c).timeline);
  const int64_t setup = r.phase_start[kForward];
  return {r.phase_peak[kForward] - setup, r.phase_start[kBackward] - setup, r.phase_peak[kBackward] - setup,
          r.phase_start[kOptimizer] - setup};
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
  //   target_mask 8 (1208; its sum +8 and the int64 mask it reduces +64, freed); chunk 0: logits 4 x 16 x 4 = 256, grad_input's product 128 (freed), the
  //   weight gradient's product 512 = 1976 (peak), freed: 1464; chunk 1: logits 256, then chunk 0's go, and the
  //   same: 1976; loss 4, -loss_1d -mask -logits -labels, -h: 772 = grad_input + grad_weight + loss.
  // Backward: d loss 4, torch.tensor(1.0) 4 = 780 (peak), -4 -4; grad_input is h's gradient and goes after h's
  //   op, the loss goes: 512 = grad_weight, now w's .grad.
  const AboveSetup step = FusedLinearStep("a100-80", Precision::kFp32);
  EXPECT_EQ(step.forward_peak, 1976);
  EXPECT_EQ(step.backward_start, 772);
  EXPECT_EQ(step.backward_peak, 780);
  EXPECT_EQ(step.optimizer_start, 512);
}

TEST(FusedLinearLossTest, AutocastAccumulatesTheWeightGradientByAddmmFromAmpere) {
  // As fp32 up to the loop (1208: grad_input and grad_weight stay fp32). Chunk 0: weight.t()'s copy 16 x 8 x 2 =
  //   256, the chunk's copy 4 x 8 x 2 = 64, bf16 logits 128 (1656), -64 -256, the cached weight copy 256 (1592),
  //   grad_input's bf16 product 64 (freed), addmm's bf16 chunk 64, kept by its local: 1656; chunk 1: +256 +64
  //   +128 = 2104 (peak), -64 -256 -128 (chunk 0's logits), +64 -64, the local rebound -64 +64: 1656; loss +4,
  //   -loss_1d -mask -logits -the chunk -labels -h leave the weight copy: 1028, freed when autocast exits: 772.
  const AboveSetup step = FusedLinearStep("a100-80", Precision::kBf16Autocast);
  EXPECT_EQ(step.forward_peak, 2104);
  EXPECT_EQ(step.backward_start, 772);
}

TEST(FusedLinearLossTest, AutocastBeforeAmpereTakesTheWeightGradientThroughAnFp32Copy) {
  // Volta (capability 7.0): mm(grad_logits_chunk.t(), input_chunk) casts the chunk (64), makes a bf16 [16, 8]
  // (256), then .float() an fp32 one (512): 1592 + 64 + 256 - 64 + 512 = 2360 (peak) in each chunk.
  const AboveSetup step = FusedLinearStep("v100-32", Precision::kBf16Autocast);
  EXPECT_EQ(step.forward_peak, 2360);
}

TEST(FusedLinearLossTest, KeptOutputsAreOnlyTheLoss) {
  // Liger's forward returns no logits: the loop keeps the previous loss (4 B, part of the setup here) through the
  // forward, then this one: the forward as without (1976), the backward starts 4 B lower (772 - 4).
  const AboveSetup step = FusedLinearStep("a100-80", Precision::kFp32, /*keep_outputs=*/true);
  EXPECT_EQ(step.forward_peak, 1976);
  EXPECT_EQ(step.backward_start, 768);
}

TEST(FusedLinearLossTest, RefusesTheCpuTarget) {
  TrainingConfig cpu = CpuConfig();
  cpu.loss = LossVariant::kFusedLinear;
  EXPECT_NE(Refusal(HeadOnHiddenState(2), cpu).find("need a GPU target"), std::string::npos);
}

}  // namespace
}  // namespace llmem::sim
