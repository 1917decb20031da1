// The training-step timeline on hand-worked graphs: every expected figure below is summed block by block in the
// comment above its assertion (cpu target: exact request sizes, so a replay of the events is what the CPU
// allocator would count). Sizes: x [4,8] f32 = 128 B, labels [4] i64 = 32 B, loss = 4 B.
//
// Ends with property tests: on every simulated timeline no block is freed twice or used after its free, and the
// only blocks alive after the step are the persistent ones.
#include "simulator/training_step_simulator.h"

#include <gtest/gtest.h>

#include <random>
#include <set>

#include "graph/error.h"
#include "simulator/memory_estimate.h"
#include "simulator/op_memory_rules.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

constexpr size_t kSetup = static_cast<size_t>(Phase::kSetup);
constexpr size_t kForward = static_cast<size_t>(Phase::kForward);
constexpr size_t kBackward = static_cast<size_t>(Phase::kBackward);
constexpr size_t kOptimizer = static_cast<size_t>(Phase::kOptimizer);

bool Persistent(MemoryCategory c) {
  return c == MemoryCategory::kWeights || c == MemoryCategory::kOptimizerState || c == MemoryCategory::kGradients ||
         c == MemoryCategory::kInputs || c == MemoryCategory::kLibraryWorkspace;
}

// Style item 24: no double free, no free of an unknown block, no block id reused, current >= 0, peak = max(current),
// and after the step only persistent blocks are alive; exactly one gradient per trainable parameter storage.
void CheckTimelineInvariants(const Graph& graph, const Timeline& tl) {
  std::map<int64_t, const MemoryEvent*> live;
  std::set<int64_t> ever;
  int64_t cur = 0, peak = 0;
  for (size_t i = 0; i < tl.events.size(); ++i) {
    const auto& e = tl.events[i];
    ASSERT_GE(e.block, 0) << "event " << i;
    ASSERT_LT(static_cast<size_t>(e.block), tl.block_labels.size()) << "event " << i;
    const std::string& label = tl.block_labels[static_cast<size_t>(e.block)];
    if (e.is_alloc) {
      ASSERT_GE(e.bytes, 0) << label;
      ASSERT_TRUE(ever.insert(e.block).second) << "block allocated twice: " << label;
      live[e.block] = &e;
      cur += e.bytes;
    } else {
      auto it = live.find(e.block);
      ASSERT_NE(it, live.end()) << (ever.count(e.block) ? "double free of " : "free of never-allocated ") << label;
      ASSERT_EQ(e.bytes, it->second->bytes) << label;
      cur -= it->second->bytes;
      live.erase(it);
    }
    ASSERT_GE(cur, 0);
    peak = std::max(peak, cur);
  }
  EXPECT_EQ(ever.size(), tl.block_labels.size());  // every labelled block was allocated
  EXPECT_EQ(peak, ReplayExact(tl).peak);
  int64_t grads = 0;
  for (const auto& [block, e] : live) {
    EXPECT_TRUE(Persistent(e->category))
        << "never freed: " << tl.block_labels[static_cast<size_t>(block)] << " (" << CategoryName(e->category) << ")";
    if (e->category == MemoryCategory::kGradients) ++grads;
  }
  // Parameters the loss depends on through differentiable ops: each ends with exactly one gradient.
  std::vector<bool> reaches_loss(graph.values().size(), false);
  reaches_loss[static_cast<size_t>(graph.loss().index)] = true;
  for (auto it = graph.nodes().rbegin(); it != graph.nodes().rend(); ++it) {
    bool out_reaches = false;
    for (ValueId o : it->outputs) out_reaches = out_reaches || reaches_loss[static_cast<size_t>(o.index)];
    if (!out_reaches || IsKnownNonDifferentiable(it->kind)) continue;
    for (ValueId in : graph.tensor_inputs(it->id)) reaches_loss[static_cast<size_t>(in.index)] = true;
  }
  std::set<int32_t> trainable_roots;
  for (const auto& p : graph.params()) {
    if (p.trainable && p.used_in_forward && reaches_loss[static_cast<size_t>(p.value.index)]) {
      trainable_roots.insert(graph.StorageRoot(p.value).index);
    }
  }
  EXPECT_EQ(grads, static_cast<int64_t>(trainable_roots.size())) << "parameter gradients alive after backward";
}

StepSimulation SimulateChecked(const Graph& g, const TrainingConfig& c) {
  StepSimulation sim = SimulateTrainingStep(g, c);
  CheckTimelineInvariants(g, sim.timeline);
  return sim;
}

TEST(TrainingStepSimulatorTest, LinearCrossEntropyFp32AdamW) {
  // setup:     w 512 + exp_avg 512 + exp_avg_sq 512 + x 128 + labels 32                          = 1696
  // forward:   logits +256 = 1952; loss +4 = 1956; log-probs +256 = 2212 (peak); logits freed   -> 1956
  // backward:  d loss +4 = 1960; workspace +256 = 2216; d logits +256 = 2472 (peak);
  //            -workspace -d loss -log-probs = 1956; d w +512 = 2468; -d logits = 2212; -loss    -> 2208
  // optimizer: sqrt(exp_avg_sq) +512 and denom +512 of the one parameter: 2208 + 1024             = 3232
  Graph g = LinearCrossEntropy();
  StepSimulation sim = SimulateChecked(g, CpuConfig());
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 1696);
  EXPECT_EQ(r.phase_peak[kForward], 2212);
  EXPECT_EQ(r.phase_peak[kBackward], 2472);
  EXPECT_EQ(r.phase_start[kOptimizer], 2208);
  EXPECT_EQ(r.phase_peak[kOptimizer], 3232);
  EXPECT_EQ(r.peak, 3232);
  EXPECT_EQ(r.end, 2208);  // w + states + inputs + d w
  EXPECT_TRUE(sim.unknown_ops.empty());
  // The cpu target adds no library workspaces.
  for (const auto& e : sim.timeline.events) EXPECT_NE(e.category, MemoryCategory::kLibraryWorkspace);
}

TEST(TrainingStepSimulatorTest, TwoLinearsFp32AdamW) {
  // setup:    w1 256 + w2 512 + states 2*(256+512) = 1536 + inputs 160                             = 2464
  // forward:  h +128 = 2592; logits +256 = 2848 (h stays: saved by linear 2); loss +4 = 2852;
  //           log-probs +256 = 3108 (peak); logits freed -> 2852
  // backward: d loss 2856; ws 3112; d logits 3368; -ws -d loss -log-probs = 2852;
  //           linear 2: d h +128 = 2980; d w2 +512 = 3492 (peak); -d logits = 3236; h freed = 3108
  //           linear 1: d w1 +256 = 3364; -d h = 3236; loss freed                                  -> 3232
  // optimizer (torch.optim single-tensor, one parameter at a time): w2's sqrt and denom (2 * 512) while the loop's
  // `denom` still holds w1's (256): 3232 + 1280                                                   = 4512
  Graph g = TwoLinears();
  StepSimulation sim = SimulateChecked(g, CpuConfig());
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 2464);
  EXPECT_EQ(r.phase_peak[kForward], 3108);
  EXPECT_EQ(r.phase_peak[kBackward], 3492);
  EXPECT_EQ(r.phase_start[kOptimizer], 3232);
  EXPECT_EQ(r.phase_peak[kOptimizer] - r.phase_start[kOptimizer], 1280);
  EXPECT_EQ(r.peak, 4512);
  // The TorchScript step's C++ optimizer scopes denom to one parameter: 2 * 512.
  TrainingConfig torchscript = CpuConfig();
  torchscript.lifetimes = Lifetimes::kTorchScript;
  Replay t = ReplayExact(SimulateChecked(g, torchscript).timeline);
  EXPECT_EQ(t.phase_peak[kOptimizer] - t.phase_start[kOptimizer], 1024);
}

TEST(TrainingStepSimulatorTest, GpuForeachOptimizerHoldsSqrtOfEveryParameter) {
  // Same graph on a100-80: setup adds cuBLAS 8,519,680 + cuBLASLt 1,048,576 = 9,568,256 B.
  // _foreach_sqrt over the group: w1 256 + w2 512 = 768 B at once (cpu would hold 2 * 512 = 1024).
  // End of backward: 3232 + 9,568,256 = 9,571,488; optimizer peak 9,571,488 + 768 = 9,572,256.
  Graph g = TwoLinears();
  StepSimulation sim = SimulateChecked(g, GpuConfig("a100-80"));
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 2464 + 9'568'256);
  EXPECT_EQ(r.phase_start[kOptimizer], 9'571'488);
  EXPECT_EQ(r.phase_peak[kOptimizer], 9'572'256);
  EXPECT_EQ(BlocksLabelled(sim.timeline, "cuBLAS workspace"), (std::vector<int64_t>{8'519'680}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "cuBLASLt workspace"), (std::vector<int64_t>{1'048'576}));
  // Hopper: 32 MiB cuBLAS workspace instead.
  StepSimulation h100 = SimulateChecked(g, GpuConfig("h100-80"));
  EXPECT_EQ(BlocksLabelled(h100.timeline, "cuBLAS workspace"), (std::vector<int64_t>{33'554'432}));
}

TEST(TrainingStepSimulatorTest, SgdKeepsOneStateAndNoTemporaries) {
  // Two-linear graph with SGD momentum: states 256 + 512 = 768 instead of 1536, so every figure of the AdamW
  // case drops by 768: setup 1696, backward peak 3492 - 768 = 2724, end 2464; the optimizer step allocates nothing.
  Graph g = TwoLinears();
  StepSimulation sim = SimulateChecked(g, CpuConfig(Precision::kFp32, OptimizerKind::kSgdMomentum));
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 1696);
  EXPECT_EQ(r.phase_peak[kBackward], 2724);
  EXPECT_EQ(r.peak, 2724);
  EXPECT_EQ(r.end, 2464);
  int states = 0;
  for (const auto& e : sim.timeline.events) {
    EXPECT_NE(e.phase, Phase::kOptimizer);
    if (e.is_alloc && e.category == MemoryCategory::kOptimizerState) ++states;
  }
  EXPECT_EQ(states, 2);  // one momentum buffer per parameter
}

TEST(TrainingStepSimulatorTest, GradientOfAValueUsedTwiceAccumulatesInPlace) {
  // h = linear(x, w1 [8,8]); t = tanh(h); s = sigmoid(h); m = add(t, s); logits = linear(m, w2 [16,8]); CE.
  // Backward reaches h twice with new tensors (sigmoid first, then tanh): the first lands in h's buffer, the
  // second (128 B) is added in place and freed, so tanh's backward holds at most one extra 128 B block.
  //   setup 2464. forward: h 2592, t 2720 (saved), s 2848 (saved), h freed 2720, m 2848, logits 3104,
  //   loss 3108, log-probs 3364 (peak), logits freed 3108.
  //   backward: d loss 3112, ws 3368, d logits 3624; -ws -d loss -log-probs = 3108.
  //   linear 2: d m +128 = 3236, d w2 +512 = 3748 (peak); d logits freed 3492; m freed 3364.
  //   add: both inputs take d m itself. sigmoid: d h +128 = 3492; s freed 3364.
  //   tanh: contribution +128 = 3492 (peak of the node), added in place and freed (no sum block) = 3364;
  //   d m freed 3236; t freed 3108. linear 1: d w1 +256 = 3364; d h freed 3236; loss freed -> 3232.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w1 = b.Param("w1", {8, 8});
  ValueId w2 = b.Param("w2", {16, 8});
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {T(x), T(w1), None()}, {4, 8});
  ValueId t = b.Op("aten::tanh", {T(h)}, {4, 8});
  ValueId s = b.Op("aten::sigmoid", {T(h)}, {4, 8});
  ValueId m = b.Op("aten::add", {T(t), T(s), I(1)}, {4, 8});
  ValueId logits = b.Op("aten::linear", {T(m), T(w2), None()}, {4, 16});
  Graph g = b.Build(CrossEntropy(b, logits, labels));

  StepSimulation sim = SimulateChecked(g, CpuConfig());
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kForward], 3364);
  EXPECT_EQ(r.phase_peak[kBackward], 3748);
  EXPECT_EQ((r.node_peak[{Phase::kBackward, 2}]), 3492);  // sigmoid
  EXPECT_EQ((r.node_peak[{Phase::kBackward, 1}]), 3492);  // tanh: no extra sum block
  EXPECT_TRUE(BlocksLabelled(sim.timeline, "d " + g.value(h).name + " (sum)").empty());
  EXPECT_EQ(r.end, 3232);
}

TEST(TrainingStepSimulatorTest, WeightUsedByTwoMatmulsSumsGradientsOutOfPlace) {
  // Note [Gradient accumulation]: a matmul's weight gradient is a transposed view, so the second gradient of w is
  // added out of place, after linear 1 has returned (its output gradient d h freed).
  //   setup: w 256 + states 512 + inputs 160 = 928. forward: h 128, y 128, loss 4, log-probs 128: peak 1316.
  //   backward: d loss, ws 128, d y 128: 1448; after CE 1188. linear 2: d h +128 = 1316, d w +256 = 1572;
  //   d y freed 1444; h freed 1316. linear 1: d w' +256 = 1572; d h freed = 1444; sum +256 = 1700 (peak); old
  //   d w and d w' freed = 1188; loss freed -> 1184. optimizer: +2 * 256 = 1696.
  Graph g = SharedWeight();
  StepSimulation sim = SimulateChecked(g, CpuConfig());
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 928);
  EXPECT_EQ(r.phase_peak[kForward], 1316);
  EXPECT_EQ(r.phase_peak[kBackward], 1700);
  EXPECT_EQ((r.node_peak[{Phase::kBackward, 0}]), 1700);
  EXPECT_EQ(BlocksLabelled(sim.timeline, "d w (sum)"), (std::vector<int64_t>{256}));
  EXPECT_EQ(r.phase_peak[kOptimizer], 1696);
  EXPECT_EQ(r.peak, 1700);
  EXPECT_EQ(r.end, 1184);
}

TEST(TrainingStepSimulatorTest, TiedParameterNamesShareOneStorage) {
  // Two parameter names on one storage (w and w_tied [8,8] = 256 B): one weight, one pair of AdamW states, one
  // set of optimizer temporaries. setup: 256 + 512 + 160 = 928.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {8, 8});
  ValueId w_tied = b.TiedParam("w_tied", w);
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {T(x), T(w), None()}, {4, 8});
  ValueId y = b.Op("aten::linear", {T(h), T(w_tied), None()}, {4, 8});
  Graph g = b.Build(CrossEntropy(b, y, labels));
  StepSimulation sim = SimulateTrainingStep(g, CpuConfig());
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 928);
  int weights = 0, states = 0;
  for (const auto& e : sim.timeline.events) {
    if (e.is_alloc && e.category == MemoryCategory::kWeights) ++weights;
    if (e.is_alloc && e.category == MemoryCategory::kOptimizerState) ++states;
  }
  EXPECT_EQ(weights, 1);
  EXPECT_EQ(states, 2);
  EXPECT_EQ(r.phase_peak[kOptimizer] - r.phase_start[kOptimizer], 512);  // sqrt + denom of one 256 B parameter
}

// Graph D: the norm output h and the logits are returned to the model's forward, whose loss function upcasts the
// logits (Note [Eager lifetimes]).
//   fp32: h is saved by the linear and the upcast is a view of the logits: both lifetimes give the same step.
//   bf16 autocast: the linear reads a 16-bit copy of h, so the TorchScript interpreter frees h (128 B) after the
//   linear and the bf16 logits (4*16*2 = 128 B) after their fp32 copy; eager Python holds both until the model's
//   forward returns, i.e. across the cross entropy, where the forward peaks: +256 B, and nothing else changes.
TEST(TrainingStepSimulatorTest, EagerFramesHoldTheHeadsSixteenBitLogitsAcrossTheLoss) {
  Graph g = CausalLmHead();
  for (Precision p : {Precision::kFp32, Precision::kBf16Autocast}) {
    TrainingConfig eager = CpuConfig(p), torchscript = CpuConfig(p);
    eager.lifetimes = Lifetimes::kEager;
    torchscript.lifetimes = Lifetimes::kTorchScript;
    Replay e = ReplayExact(SimulateChecked(g, eager).timeline);
    Replay t = ReplayExact(SimulateChecked(g, torchscript).timeline);
    const int64_t held = p == Precision::kFp32 ? 0 : 128 + 128;
    EXPECT_EQ(e.phase_peak[kForward], t.phase_peak[kForward] + held) << PrecisionName(p);
    EXPECT_EQ(e.phase_peak[kBackward], t.phase_peak[kBackward]) << PrecisionName(p);
    EXPECT_EQ(e.phase_peak[kOptimizer], t.phase_peak[kOptimizer]) << PrecisionName(p);
    EXPECT_EQ(e.end, t.end) << PrecisionName(p);
  }
}

TEST(TrainingStepSimulatorTest, Bf16AutocastSavesSixteenBitCopies) {
  // Two-linear graph, cpu, bf16 autocast. h [4,8] and logits [4,16] come out of the linears in bf16 (64 / 128 B).
  //   setup 2464 (weights, grads and states stay f32).
  //   linear 1: x copy bf16 64 (saved for w1's gradient), w1 copy bf16 128 (cached for the forward, not saved:
  //   the graph input x needs no gradient), h 64.
  //   linear 2: w2 copy bf16 256 (cached, saved for d h), logits 128.
  //   cross_entropy (fp32 list): logits f32 copy 256 (temporary), loss 4, f32 log-probs 256; the end of the forward
  //   clears autocast's cache, which drops w1's copy: 3108.
  //   backward: d loss 4 = 3112; CE: workspace 256 + d (f32 copy) 256 = 3624 (peak).
  //   optimizer: w2's sqrt and denom (2 * 512) with w1's denom (256) on top of 3232 = 4512.
  Graph g = TwoLinears();
  StepSimulation sim = SimulateChecked(g, CpuConfig(Precision::kBf16Autocast));
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 2464);
  EXPECT_EQ(r.phase_peak[kBackward], 3624);
  EXPECT_EQ(r.end, 3232);
  EXPECT_EQ(r.peak, 4512);
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w1 autocast copy"), (std::vector<int64_t>{128}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w2 autocast copy"), (std::vector<int64_t>{256}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "x autocast copy for aten::linear"), (std::vector<int64_t>{64}));
  EXPECT_EQ(sim.value_dtypes[static_cast<size_t>(g.node(NodeId{0}).outputs[0].index)], DType::kBF16);
  EXPECT_EQ(sim.value_dtypes[static_cast<size_t>(g.loss().index)], DType::kF32);
  // The 16-bit copy of x is saved by linear 1: freed in backward, at node 0, not in forward.
  for (const auto& e : sim.timeline.events) {
    if (!e.is_alloc && sim.timeline.block_labels[static_cast<size_t>(e.block)] == "x autocast copy for aten::linear") {
      EXPECT_EQ(e.phase, Phase::kBackward);
      EXPECT_EQ(e.node, 0);
    }
  }
}

// Autocast runs cross_entropy on an fp32 copy of 16-bit logits, so the log-probs it keeps and its backward
// workspace are fp32 (gpu-memory-facts.md §3.1.8: N x V x 4 bytes). Two-linear graph: saved log-probs 4*16*4 =
// 256 B and forward peak 2464 + x copy 64 + w1 copy 128 + h 64 + w2 copy 256 + logits 128 + f32 copy 256
// + loss 4 + log-probs 256 = 3620.
TEST(TrainingStepSimulatorTest, AutocastCrossEntropyKeepsFp32LogProbs) {
  Graph g = TwoLinears();
  StepSimulation sim = SimulateChecked(g, CpuConfig(Precision::kBf16Autocast));
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(BlocksLabelled(sim.timeline, "aten::cross_entropy_loss saved buffer"), (std::vector<int64_t>{256}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "aten::cross_entropy_loss backward"), (std::vector<int64_t>{256}));
  EXPECT_EQ(r.phase_peak[kForward], 3620);
}

TEST(TrainingStepSimulatorTest, AutocastCastsAWeightOncePerForward) {
  // w [8,8] used by two linears: one bf16 copy (8*8*2 = 128 B), reused by the second linear.
  Graph g = SharedWeight();
  StepSimulation sim = SimulateChecked(g, CpuConfig(Precision::kBf16Autocast));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w autocast copy"), (std::vector<int64_t>{128}));
}

TEST(TrainingStepSimulatorTest, PureBf16HalvesWeightsStatesAndGrads) {
  // Graph A in bf16: w 16*8*2 = 256, states 2 * 256, x 128 (stays f32), labels 32: setup 928.
  // forward: logits bf16 128, loss bf16 2, log-probs 128: 928 + 258 + 128 = 1186.
  // backward: d loss 2, ws 128, d logits 128: 1316 (peak); ...; end w + states + inputs + d w 256 = 1184.
  // optimizer: 2 * 256 = 1696.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {16, 8});
  b.SetLayer(0);
  ValueId logits = b.OpOut("aten::linear", {T(x), T(w), None()}, Out({4, 16}).WithBf16Weights(DType::kBF16));
  b.SetHead();
  ValueId loss = b.OpOut("aten::cross_entropy_loss", {T(logits), T(labels), None(), I(1), I(-100), D(0.0)},
                         Out({}).WithBf16Weights(DType::kBF16));
  Graph g = b.Build(loss);
  StepSimulation sim = SimulateChecked(g, CpuConfig(Precision::kBf16));
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kSetup], 928);
  EXPECT_EQ(r.phase_peak[kForward], 1186);
  EXPECT_EQ(r.phase_peak[kBackward], 1316);
  EXPECT_EQ(r.end, 1184);
  EXPECT_EQ(r.peak, 1696);
}

TEST(TrainingStepSimulatorTest, PureBf16OnAnExportThatCannotRunItIsAConfigError) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {16, 8});
  ValueId logits = b.Op("aten::linear", {T(x), T(w), None()}, {4, 16});
  Graph g = b.Build(CrossEntropy(b, logits, labels), 1, 1, /*runs_with_bf16_weights=*/false);
  EXPECT_THROW(SimulateTrainingStep(g, CpuConfig(Precision::kBf16)), ConfigError);
  EXPECT_THROW(SimulateTrainingStep(g, GpuConfig("a100-80", Precision::kBf16)), ConfigError);
  // The other precisions do not need the bf16-weights run.
  EXPECT_NO_THROW(SimulateTrainingStep(g, CpuConfig(Precision::kBf16Autocast)));
  EXPECT_NO_THROW(SimulateTrainingStep(g, CpuConfig(Precision::kFp32)));
}

// x [4,8] -> linear(w [8,8]) -> h -> aten::frobnicate -> u [4,8] -> cross_entropy.
Graph WithUnknownOp() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  ValueId w = b.Param("w", {8, 8});
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {T(x), T(w), None()}, {4, 8});
  ValueId u = b.OpOut("aten::frobnicate", {T(h)}, Out({4, 8}), "model.layers.0.odd");
  return b.Build(CrossEntropy(b, u, labels));
}

TEST(TrainingStepSimulatorTest, UnknownOpIsUnsupported) {
  Graph g = WithUnknownOp();
  try {
    SimulateTrainingStep(g, CpuConfig());
    FAIL() << "expected UnsupportedOpError";
  } catch (const UnsupportedOpError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("aten::frobnicate"), std::string::npos) << msg;
    EXPECT_NE(msg.find("layer 0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("model.layers.0.odd"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(TrainingStepSimulatorTest, AllowUnknownOpsEstimatesConservatively) {
  // The unknown op saves its input and output and makes a new input gradient.
  //   setup 256 + 512 + 160 = 928; forward: h 128, u 128 (h and u saved), loss 4, log-probs 128: 1316.
  //   backward: d loss 4, ws 128, d u 128: 1576 (peak); after CE 1316; frobnicate: d h +128 = 1444, d u freed
  //   1316, h and u freed 1060; linear: d w +256 = 1316; d h freed 1188; loss freed -> 1184.
  Graph g = WithUnknownOp();
  TrainingConfig c = CpuConfig();
  c.allow_unknown_ops = true;
  StepSimulation sim = SimulateChecked(g, c);
  EXPECT_EQ(sim.unknown_ops, (std::vector<std::string>{"aten::frobnicate"}));
  Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kForward], 1316);
  EXPECT_EQ(r.phase_peak[kBackward], 1576);
  EXPECT_EQ(r.end, 1184);
  MemoryEstimate est = EstimateMemory(g, c);
  EXPECT_EQ(est.unknown_ops, (std::vector<std::string>{"aten::frobnicate"}));
}

TEST(TrainingStepSimulatorTest, EmbeddingGradientIsTheFullTable) {
  // embedding(wte [100,8] = 3200 B, ids [2,3]) -> e [2,3,8] -> linear(w [16,8]) -> logits [2,3,16] -> CE.
  // backward allocates d wte as a whole [100,8] f32 tensor = 3200 B, not 6 rows.
  TestGraphBuilder b;
  ValueId ids = b.Input("input_ids", {2, 3});
  ValueId labels = b.Input("labels", {2, 3});
  ValueId wte = b.Param("wte", {100, 8});
  ValueId w = b.Param("w", {16, 8});
  ValueId e = b.Op("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, {2, 3, 8});
  b.SetLayer(0);
  ValueId logits = b.Op("aten::linear", {T(e), T(w), None()}, {2, 3, 16});
  Graph g = b.Build(CrossEntropy(b, logits, labels));
  StepSimulation sim = SimulateChecked(g, CpuConfig());
  EXPECT_EQ(BlocksLabelled(sim.timeline, "d wte"), (std::vector<int64_t>{3200}));
  // End: weights 3200 + 512, states 2 * 3712, inputs 48 + 48, grads 3712: 3712 * 4 + 96 = 14,944.
  EXPECT_EQ(ReplayExact(sim.timeline).end, 14'944);
}

// ---- Property tests over seeded random graphs ----

// A random straight-line decoder-like graph: embedding, `n_ops` random ops on [2,3,8] activations, an LM head
// (optionally tied to the embedding) and cross_entropy. Floating values are bf16 in the bf16-weights run.
Graph RandomGraph(std::mt19937& rng, int n_ops) {
  TestGraphBuilder b;
  auto pick = [&rng](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  auto coin = [&rng](double p) { return std::bernoulli_distribution(p)(rng); };
  const std::vector<int64_t> act{2, 3, 8};
  auto out = [&](std::vector<int64_t> shape, ValueId alias = ValueId{}) {
    Out o(std::move(shape));
    o.alias_of = alias;
    return o.WithBf16Weights(DType::kBF16);
  };
  ValueId ids = b.Input("input_ids", {2, 3});
  ValueId labels = b.Input("labels", {2, 3});
  ValueId wte = b.Param("wte", {16, 8});
  std::vector<ValueId> acts{b.OpOut("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, out(act))};
  int params = 0;
  auto param = [&](std::vector<int64_t> shape) { return b.Param("p" + std::to_string(params++), std::move(shape)); };
  for (int i = 0; i < n_ops; ++i) {
    b.SetLayer(i * 2 / n_ops);
    const ValueId a = acts[pick(acts.size())];
    const ValueId c = acts[pick(acts.size())];
    ValueId y;
    switch (pick(11)) {
      case 0: y = b.OpOut("aten::linear", {T(a), T(param({8, 8})), coin(0.5) ? T(param({8})) : None()}, out(act)); break;
      case 1: y = b.OpOut("aten::add", {T(a), T(c), I(1)}, out(act)); break;
      case 2: y = b.OpOut("aten::mul", {T(a), T(c)}, out(act)); break;
      case 3: y = b.OpOut("aten::mul", {T(a), T(param({8}))}, out(act)); break;
      case 4: y = b.OpOut(coin(0.5) ? "aten::tanh" : "aten::silu", {T(a)}, out(act)); break;
      case 5: y = b.OpOut("aten::view", {T(a), llmem::testing::Ints({6, 8})}, out({6, 8}, a)); break;
      case 6: {
        const bool p0 = coin(0.5);
        y = b.OpOut("aten::dropout", {T(a), D(p0 ? 0.0 : 0.1), B(true)}, p0 ? out(act, a) : out(act));
        break;
      }
      case 7:
        y = b.OpOut("aten::layer_norm",
                    {T(a), llmem::testing::Ints({8}), T(param({8})), T(param({8})), D(1e-5), B(true)}, out(act));
        break;
      case 8: y = b.OpOut("aten::softmax", {T(a), I(-1), None()}, out(act)); break;
      case 9: {
        ValueId p = b.OpOut("aten::pow", {T(a), I(2)}, out(act));
        ValueId mean = b.OpOut("aten::mean", {T(p), llmem::testing::Ints({-1}), B(true), None()}, out({2, 3, 1}));
        ValueId r = b.OpOut("aten::rsqrt", {T(mean)}, out({2, 3, 1}));
        y = b.OpOut("aten::mul", {T(a), T(r)}, out(act));
        break;
      }
      default: {  // attention over [2, 1, 3, 8] views
        ValueId q = b.OpOut("aten::unsqueeze", {T(a), I(1)}, out({2, 1, 3, 8}, a));
        ValueId k = b.OpOut("aten::unsqueeze", {T(c), I(1)}, out({2, 1, 3, 8}, c));
        ValueId o = b.OpOut("aten::scaled_dot_product_attention", {T(q), T(k), T(k), None(), D(0.0), B(true)},
                            out({2, 1, 3, 8}));
        y = b.OpOut("aten::squeeze", {T(o), I(1)}, out(act, o));
        break;
      }
    }
    acts.push_back(y);
  }
  b.SetHead();
  const ValueId head_w = coin(0.5) ? wte : param({16, 8});
  ValueId logits = b.OpOut("aten::linear", {T(acts.back()), T(head_w), None()}, out({2, 3, 16}));
  ValueId f = b.OpOut("aten::to", {T(logits), I(6), B(false), B(false), None()}, out({2, 3, 16}));
  b.value(f).dtype_bf16_weights = DType::kF32;  // the loss runs on fp32 logits, as the exports do
  ValueId loss = b.OpOut("aten::cross_entropy_loss", {T(f), T(labels), None(), I(1), I(-100), D(0.0)},
                         Out({}));
  return b.Build(loss, 2, 3);
}

TEST(TrainingStepSimulatorTest, PropertyTimelineInvariantsOnRandomGraphs) {
  std::mt19937 rng(20240611);
  const std::vector<TrainingConfig> configs = {
      CpuConfig(),
      CpuConfig(Precision::kBf16Autocast),
      CpuConfig(Precision::kBf16, OptimizerKind::kSgdMomentum),
      GpuConfig("a100-80"),
      GpuConfig("h100-80", Precision::kBf16Autocast),
      GpuConfig("a100-40", Precision::kFp16Autocast, OptimizerKind::kSgdMomentum),
      GpuConfig("v100-16", Precision::kBf16),
  };
  for (int trial = 0; trial < 40; ++trial) {
    Graph g = RandomGraph(rng, 2 + trial % 12);
    for (size_t c = 0; c < configs.size(); ++c) {
      SCOPED_TRACE("trial " + std::to_string(trial) + " config " + std::to_string(c));
      StepSimulation sim = SimulateTrainingStep(g, configs[c]);
      CheckTimelineInvariants(g, sim.timeline);
      if (::testing::Test::HasFatalFailure()) return;
      MemoryEstimate est = EstimateMemory(g, configs[c]);
      EXPECT_GE(est.peak_reserved_bytes, est.peak_allocated_bytes);
      if (configs[c].target.is_cpu) {
        EXPECT_EQ(est.peak_allocated_bytes, ReplayExact(sim.timeline).peak);
      } else {
        EXPECT_GE(est.peak_allocated_bytes, est.lower_bound_bytes);
      }
    }
  }
}

}  // namespace
}  // namespace llmem::sim
