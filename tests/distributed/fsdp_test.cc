// FSDP2 memory lifetimes (fsdp.h) on TwoLayerLm (distributed_test_graphs.h) over 2 ranks, fp32 + AdamW, cpu
// target (exact request sizes). Sizes over 2 ranks (FsdpGroupsTest works them out):
//   resident shards: wte 80, w0 48, w1 40, wh 80 = 248 B; AdamW states of the shards 2 * 248 = 496 B
//   all-gather output / unsharded params: root 320 (wte 160 + wh 160), layer 0 96 (w0), layer 1 80 (w1)
//   reduce-scatter input = unsharded bytes; sharded gradients: root 160, layer 0 48, layer 1 40
// Unsharded gradients are the IR's full tensors: d wte 144, d w0 80, d w1 80, d wh 144.
//
// Space x time sketch of the gathered memory (ZeRO-3; # = gathered params, = = flat all-gather output):
//   forward:  root ####==== | L0 ##== (root flat freed) | L0 freed, L1 ##== (L0 flat freed) | head: L1 flat freed
//   backward: L1 ## prefetched at the loss | L0 ## prefetched when L1 starts | L1 reduced | L0 reduced | root reduced
#include "distributed/fsdp.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <optional>

#include "distributed/sharded_params.h"
#include "graph/error.h"
#include "simulator/memory_estimate.h"
#include "simulator/training_step_simulator.h"
#include "tests/distributed/distributed_test_graphs.h"

namespace llmem::dist {
namespace {

using namespace llmem::dist::testing;  // NOLINT
using sim::MemoryCategory;
using sim::Phase;
using sim::testing::BlocksLabelled;
using sim::testing::Replay;
using sim::testing::ReplayExact;

constexpr size_t kSetup = static_cast<size_t>(Phase::kSetup);
constexpr size_t kForward = static_cast<size_t>(Phase::kForward);
constexpr size_t kBackward = static_cast<size_t>(Phase::kBackward);
constexpr size_t kOptimizer = static_cast<size_t>(Phase::kOptimizer);

Fsdp2Hooks MakeHooks(const Graph& g, bool reshard_after_forward) {
  return Fsdp2Hooks(FsdpGroups(ManagedParams(g, sim::Precision::kFp32), 2, g.num_layers()), 2,
                    reshard_after_forward);
}

bool FsdpBlock(MemoryCategory c) {
  return c == MemoryCategory::kCommBuffers || c == MemoryCategory::kGatheredParams ||
         c == MemoryCategory::kGradients;
}

// Every block freed once, only after its allocation; returns the blocks alive at the end.
std::map<int64_t, const sim::MemoryEvent*> CheckWellFormed(const sim::Timeline& tl) {
  std::map<int64_t, const sim::MemoryEvent*> live;
  for (const auto& e : tl.events) {
    const std::string& label = tl.block_labels.at(static_cast<size_t>(e.block));
    if (e.is_alloc) {
      EXPECT_TRUE(live.emplace(e.block, &e).second) << "allocated twice: " << label;
    } else {
      EXPECT_EQ(live.erase(e.block), 1u) << "freed while not live: " << label;
    }
  }
  return live;
}

size_t IndexOf(const std::vector<std::string>& trace, const std::string& line) {
  auto it = std::find(trace.begin(), trace.end(), line);
  EXPECT_NE(it, trace.end()) << "missing: " << line;
  return static_cast<size_t>(it - trace.begin());
}

// The engine's events, in order, for both stages (shared between them: everything but the marked lines).
const std::vector<std::string> kZero3Trace = {
    // forward: the root's pre-forward gathers wte and wh before the embedding
    "forward +FSDP2 all-gather output (root) 320",
    "forward +unsharded param #0 160",
    "forward +unsharded param #3 160",
    // layer 0: its all-gather, then the root's flat buffer goes, then its copy-out
    "forward +FSDP2 all-gather output (layer 0) 96",
    "forward -FSDP2 all-gather output (root)",
    "forward +unsharded param #1 96",
    "forward -unsharded param #1",  // ZeRO-3: post-forward reshard of layer 0
    "forward +FSDP2 all-gather output (layer 1) 80",
    "forward -FSDP2 all-gather output (layer 0)",
    "forward +unsharded param #2 80",
    "forward -unsharded param #2",  // ZeRO-3: post-forward reshard of layer 1
    "forward -FSDP2 all-gather output (layer 1)",  // the root's post-forward frees the last flat buffer
    // backward: the root's pre-backward (at the loss) prefetches the last layer: only its all-gather starts
    // (_prefetch_unshard); the copy-out and the flat buffer's release wait for layer 1's own pre-backward
    "backward +FSDP2 all-gather output (layer 1) 80",  // ZeRO-3 only
    "backward +d wh 144",
    "backward +unsharded param #2 80",                 // ZeRO-3 only
    "backward -FSDP2 all-gather output (layer 1)",     // ZeRO-3 only
    // layer 1's pre-backward prefetches layer 0 (its all-gather only)
    "backward +FSDP2 all-gather output (layer 0) 96",  // ZeRO-3 only
    "backward +d w1 80",
    // layer 1's post-backward: reshard, reduce-scatter input (padded [4,5] = 80); its only gradient is the last
    // one, held by foreach_reduce until the reduce-scatter returns
    "backward -unsharded param #2",
    "backward +FSDP2 reduce-scatter input (layer 1) 80",
    "backward +FSDP2 sharded gradients (layer 1) 40",
    "backward -d w1",
    // layer 0's pre-backward (the gradient reached its output after layer 1's post-backward): copy-out
    "backward +unsharded param #1 96",                 // ZeRO-3 only
    "backward -FSDP2 all-gather output (layer 0)",     // ZeRO-3 only
    "backward +d w0 80",
    // layer 0's post-backward: the previous reduce-scatter input is freed before the new one (padded [6,4] = 96)
    "backward -unsharded param #1",
    "backward -FSDP2 reduce-scatter input (layer 1)",
    "backward +FSDP2 reduce-scatter input (layer 0) 96",
    "backward +FSDP2 sharded gradients (layer 0) 48",
    "backward -d w0",
    "backward +d wte 144",
    // the final callback: the root's post-backward (the copy-in frees d wte; d wh, the last, lives through the
    // reduce-scatter), then the last reduce-scatter input
    "backward -unsharded param #0",
    "backward -unsharded param #3",
    "backward -FSDP2 reduce-scatter input (layer 0)",
    "backward +FSDP2 reduce-scatter input (root) 320",
    "backward -d wte",
    "backward +FSDP2 sharded gradients (root) 160",
    "backward -d wh",
    "backward -FSDP2 reduce-scatter input (root)",
};

std::vector<std::string> Zero2Trace() {
  // ZeRO-2 keeps the layers gathered from forward to backward: no post-forward reshard, no backward all-gather.
  std::vector<std::string> t;
  for (const auto& line : kZero3Trace) {
    const bool zero3_only = line == "forward -unsharded param #1" || line == "forward -unsharded param #2" ||
                            (line.rfind("backward", 0) == 0 &&
                             (line.find("all-gather output (layer") != std::string::npos ||
                              line == "backward +unsharded param #2 80" || line == "backward +unsharded param #1 96"));
    if (!zero3_only) t.push_back(line);
  }
  return t;
}

TEST(Fsdp2HooksTest, ResidentWeightsAndOptimizerStatesAreShards) {
  Graph g = TwoLayerLm();
  Fsdp2Hooks hooks = MakeHooks(g, true);
  sim::StepSimulation sim = sim::SimulateTrainingStep(g, CpuConfig(), &hooks);
  // Padded dim-0 shards: wte 5 rows, w0 3 rows, w1 2 rows, wh 5 rows (of 4, 4, 5, 4 floats).
  EXPECT_EQ(BlocksLabelled(sim.timeline, "wte"), (std::vector<int64_t>{80}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w0"), (std::vector<int64_t>{48}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w1"), (std::vector<int64_t>{40}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "wh"), (std::vector<int64_t>{80}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "wte state"), (std::vector<int64_t>{80}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "wte exp_avg_sq"), (std::vector<int64_t>{80}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w1 exp_avg_sq"), (std::vector<int64_t>{40}));
  // setup: shards 248 + states 496 + inputs 96 = 840 (a single GPU holds 448 + 896 + 96 = 1440).
  EXPECT_EQ(ReplayExact(sim.timeline).phase_peak[kSetup], 840);
  // Nothing of the engine exists before forward.
  for (const auto& e : sim.timeline.events) {
    if (e.phase != Phase::kSetup || !e.is_alloc) continue;
    EXPECT_NE(e.category, MemoryCategory::kGatheredParams);
    EXPECT_NE(e.category, MemoryCategory::kCommBuffers);
  }
}

TEST(Fsdp2HooksTest, Zero3EventOrder) {
  Graph g = TwoLayerLm();
  Fsdp2Hooks hooks = MakeHooks(g, /*reshard_after_forward=*/true);
  sim::StepSimulation sim = sim::SimulateTrainingStep(g, CpuConfig(), &hooks);
  const auto trace = TraceOf(sim.timeline, FsdpBlock);
  EXPECT_EQ(trace, kZero3Trace);
  // The claims one by one, so a failure names the broken one.
  // The root is gathered before the embedding's output exists.
  const std::string e_name = g.value(g.node(NodeId{0}).outputs[0]).name;
  const auto all = TraceOf(sim.timeline, [](MemoryCategory) { return true; });
  EXPECT_LT(IndexOf(all, "forward +unsharded param #0 160"), IndexOf(all, "forward +" + e_name + " = aten::embedding 96"));
  // Each layer's flat output stays alive until the next group's copy-out.
  EXPECT_LT(IndexOf(trace, "forward +FSDP2 all-gather output (layer 1) 80"),
            IndexOf(trace, "forward -FSDP2 all-gather output (layer 0)"));
  EXPECT_LT(IndexOf(trace, "forward -FSDP2 all-gather output (layer 0)"),
            IndexOf(trace, "forward +unsharded param #2 80"));
  // Layers are freed after their forward (ZeRO-3).
  EXPECT_LT(IndexOf(trace, "forward -unsharded param #1"), IndexOf(trace, "forward +unsharded param #2 80"));
  // In backward the last layer is gathered first, before any gradient exists.
  // The prefetch at the loss only starts the all-gather; the copy-out waits for layer 1's pre-backward.
  EXPECT_LT(IndexOf(trace, "backward +FSDP2 all-gather output (layer 1) 80"), IndexOf(trace, "backward +d wh 144"));
  EXPECT_GT(IndexOf(trace, "backward +unsharded param #2 80"), IndexOf(trace, "backward +d wh 144"));
  // The reduce-scatter input of layer 1 is freed right before layer 0's is allocated.
  EXPECT_EQ(IndexOf(trace, "backward -FSDP2 reduce-scatter input (layer 1)") + 1,
            IndexOf(trace, "backward +FSDP2 reduce-scatter input (layer 0) 96"));
  // An unsharded gradient is freed after the copy into the reduce-scatter input; the group's last one only once
  // the reduce-scatter has produced the sharded gradient.
  EXPECT_EQ(IndexOf(trace, "backward +FSDP2 reduce-scatter input (root) 320") + 1, IndexOf(trace, "backward -d wte"));
  EXPECT_EQ(IndexOf(trace, "backward +FSDP2 sharded gradients (root) 160") + 1, IndexOf(trace, "backward -d wh"));
}

TEST(Fsdp2HooksTest, Zero2KeepsLayersGatheredFromForwardToBackward) {
  Graph g = TwoLayerLm();
  Fsdp2Hooks hooks = MakeHooks(g, /*reshard_after_forward=*/false);
  sim::StepSimulation sim = sim::SimulateTrainingStep(g, CpuConfig(), &hooks);
  const auto trace = TraceOf(sim.timeline, FsdpBlock);
  EXPECT_EQ(trace, Zero2Trace());
  for (const auto& line : trace) EXPECT_NE(line, "forward -unsharded param #1");
  int backward_gathers = 0;
  for (const auto& line : trace) backward_gathers += line.rfind("backward +FSDP2 all-gather", 0) == 0;
  EXPECT_EQ(backward_gathers, 0);
}

TEST(Fsdp2HooksTest, ShardedGradientsRemainAtTheEnd) {
  for (bool zero3 : {true, false}) {
    SCOPED_TRACE(zero3 ? "ZeRO-3" : "ZeRO-2");
    Graph g = TwoLayerLm();
    Fsdp2Hooks hooks = MakeHooks(g, zero3);
    sim::StepSimulation sim = sim::SimulateTrainingStep(g, CpuConfig(), &hooks);
    const auto live = CheckWellFormed(sim.timeline);
    std::map<std::string, int64_t> left;
    for (const auto& [block, e] : live) {
      EXPECT_TRUE(e->category == MemoryCategory::kWeights || e->category == MemoryCategory::kOptimizerState ||
                  e->category == MemoryCategory::kInputs || e->category == MemoryCategory::kGradients)
          << "still alive: " << sim.timeline.block_labels[static_cast<size_t>(block)];
      if (e->category == MemoryCategory::kGradients) left[sim.timeline.block_labels[static_cast<size_t>(block)]] = e->bytes;
    }
    // One shard of each group's gradients; no unsharded gradient survives.
    EXPECT_EQ(left, (std::map<std::string, int64_t>{{"FSDP2 sharded gradients (layer 0)", 48},
                                                    {"FSDP2 sharded gradients (layer 1)", 40},
                                                    {"FSDP2 sharded gradients (root)", 160}}));
    // End of the step: 840 (setup) + 40 + 48 + 160 = 1088.
    EXPECT_EQ(ReplayExact(sim.timeline).end, 1088);
  }
}

// Block by block (cpu, exact sizes), ZeRO-3:
//   setup 840.
//   forward:  root flat 320 + wte 160 + wh 160 = 1480; e 96 = 1576; layer 0 flat 96 = 1672; root flat freed 1352;
//             w0 96 = 1448; h0 120 = 1568; w0 freed 1472; layer 1 flat 80 = 1552; layer 0 flat freed 1456;
//             w1 80 = 1536; h1 96 = 1632; w1 freed 1552; logits 216 = 1768; loss 4 = 1772;
//             log-probs 216 = 1988 (forward peak); logits freed 1772; layer 1 flat freed -> 1692.
//   backward: d loss 4 = 1696; prefetch layer 1 (all-gather only): flat 80 = 1776;
//             CE workspace 216 = 1992; d logits 216 = 2208 (peak); then workspace, d loss, log-probs freed: 1772.
//             head linear: d h1 96 = 1868; d wh 144 = 2012; d logits freed 1796; h1 freed 1700.
//             layer 1 start: copy-out w1 80 = 1780, its flat freed 1700; prefetch layer 0: flat 96 = 1796
//             (w0 is copied out from it at layer 0's start: same bytes);
//             d h0 120 = 1916; d w1 80 = 1996; d h1 freed 1900; h0 freed 1780.
//             layer 1 post-backward: w1 freed 1700; RS input 80 = 1780; d w1 freed 1700; shard 40 = 1740.
//             layer 0: d e 96 = 1836; d w0 80 = 1916; d h0 freed 1796; e freed 1700.
//             layer 0 post-backward: w0 freed 1604; RS input (layer 1) freed 1524; RS input 96 = 1620;
//             d w0 freed 1540; shard 48 = 1588.
//             embedding: d wte 144 = 1732; d e freed 1636. loss freed 1632.
//             root: wte, wh freed 1312; RS input (layer 0) freed 1216; RS input 320 = 1536; d wte, d wh freed 1248;
//             shard 160 = 1408; RS input freed -> 1088.
//   optimizer (cpu, torch.optim single-tensor, shards wte 80, w0 48, w1 40, wh 80): a shard's sqrt and denom while
//   the loop's `denom` still holds the previous shard's: largest for wh, 2 * 80 + w1's 40: 1088 + 200 = 1288.
// ZeRO-2: layers 0 and 1 stay gathered through forward: forward peak 1988 + 96 (w0) + 80 (w1) = 2164;
//   backward peak at the same moment 2208 + 96 (w0 still gathered; w1 was prefetched under ZeRO-3 too) = 2304.
TEST(Fsdp2HooksTest, PeaksMatchTheHandCount) {
  Graph g = TwoLayerLm();
  {
    Fsdp2Hooks hooks = MakeHooks(g, true);
    Replay r = ReplayExact(sim::SimulateTrainingStep(g, CpuConfig(), &hooks).timeline);
    EXPECT_EQ(r.phase_peak[kSetup], 840);
    EXPECT_EQ(r.phase_start[kForward], 840);
    EXPECT_EQ(r.phase_peak[kForward], 1988);
    EXPECT_EQ(r.phase_start[kBackward], 1692);
    EXPECT_EQ(r.phase_peak[kBackward], 2208);
    EXPECT_EQ(r.phase_start[kOptimizer], 1088);
    EXPECT_EQ(r.phase_peak[kOptimizer], 1288);
    EXPECT_EQ(r.peak, 2208);
  }
  {
    Fsdp2Hooks hooks = MakeHooks(g, false);
    Replay r = ReplayExact(sim::SimulateTrainingStep(g, CpuConfig(), &hooks).timeline);
    EXPECT_EQ(r.phase_peak[kForward], 2164);
    EXPECT_EQ(r.phase_start[kBackward], 1868);
    EXPECT_EQ(r.phase_peak[kBackward], 2304);
    EXPECT_EQ(r.phase_start[kOptimizer], 1088);
    EXPECT_EQ(r.peak, 2304);
  }
}

TEST(Fsdp2HooksTest, EstimateMemoryReportsTheHandCountedPeak) {
  Graph g = TwoLayerLm();
  // Hooks hold the engine's state for one step: a fresh set per simulation.
  Fsdp2Hooks zero3 = MakeHooks(g, true);
  sim::MemoryEstimate est3 = sim::EstimateMemory(g, CpuConfig(), &zero3);
  EXPECT_EQ(est3.peak_allocated_bytes, 2208);
  EXPECT_EQ(est3.peak_reserved_bytes, 2208);
  EXPECT_EQ(est3.peak_phase, Phase::kBackward);
  EXPECT_EQ(est3.peak_op, "aten::cross_entropy_loss (head)");
  // At the peak: root gathered (320); layer 1's prefetch is still its all-gather output (80), not copied out.
  EXPECT_EQ(est3.at_peak[static_cast<size_t>(MemoryCategory::kGatheredParams)], 320);
  EXPECT_EQ(est3.at_peak[static_cast<size_t>(MemoryCategory::kCommBuffers)], 80);
  EXPECT_EQ(est3.weights_bytes, 248);
  EXPECT_EQ(est3.optimizer_state_bytes, 496);

  Fsdp2Hooks zero2 = MakeHooks(g, false);
  sim::MemoryEstimate est2 = sim::EstimateMemory(g, CpuConfig(), &zero2);
  EXPECT_EQ(est2.peak_allocated_bytes, 2304);
  EXPECT_EQ(est2.at_peak[static_cast<size_t>(MemoryCategory::kGatheredParams)], 496);  // root + both layers
}

// gloo (CPU ranks): all_gather_into_tensor makes two transient output-sized buffers one after the other, and
// reduce_scatter_tensor a transient copy of its input; NCCL makes neither. The first all-gather in forward is
// the root's (320 B): its first gloo buffer brings the live bytes to 840 + 320 + 320 = 1480.
TEST(Fsdp2HooksTest, GlooCollectivesAddTheirTransientBuffers) {
  Graph g = TwoLayerLm();
  Fsdp2Hooks gloo(FsdpGroups(ManagedParams(g, sim::Precision::kFp32), 2, g.num_layers()), 2, true, true);
  const auto tl = sim::SimulateTrainingStep(g, CpuConfig(), &gloo).timeline;
  int all_gather_copies = 0, reduce_scatter_copies = 0;
  int64_t live = 0, peak_before_first_op = 0;
  for (const auto& e : tl.events) {
    live += e.is_alloc ? e.bytes : -e.bytes;
    const std::string& label = tl.block_labels[static_cast<size_t>(e.block)];
    if (e.is_alloc && label == "gloo all-gather buffer") {
      ++all_gather_copies;
      if (all_gather_copies == 1) peak_before_first_op = live;
    }
    if (e.is_alloc && label == "gloo reduce-scatter input copy") ++reduce_scatter_copies;
  }
  // Forward: root + 2 layers; backward: 2 layers again; 2 buffers each. Reduce-scatters: 2 layers + root.
  EXPECT_EQ(all_gather_copies, 2 * (3 + 2));
  EXPECT_EQ(reduce_scatter_copies, 3);
  EXPECT_EQ(peak_before_first_op, 840 + 320 + 320);  // setup, the root's flat output, one gloo buffer
}

// ZeRO-3 over 2 ranks with two micro-batches per step.
sim::StepSimulation SimulateTwoMicroBatches(bool reduce_every_micro_batch) {
  Graph g = TwoLayerLm();
  sim::TrainingConfig config = CpuConfig();
  config.grad_accum = 2;
  Fsdp2Hooks hooks(FsdpGroups(ManagedParams(g, sim::Precision::kFp32), 2, g.num_layers()), 2, true, false, {},
                   FsdpLoop{.accumulating = true, .reduce_every_micro_batch = reduce_every_micro_batch});
  return sim::SimulateTrainingStep(g, config, &hooks);
}

// Gradient accumulation, accelerate's no_sync() (gradient sync off until the last micro-batch): the first
// micro-batch's post-backwards only reshard, so its unsharded gradients (d wte 144, d w0 80, d w1 80, d wh 144 =
// 448 B) stay through the second, whose backward adds into them and reduce-scatters as the plain step does:
//   forward peak 1988 + 448 = 2436, backward peak 2208 + 448 = 2656, 1088 after backward as without accumulation.
TEST(Fsdp2HooksTest, AccumulationUnderNoSyncKeepsTheUnshardedGradientsUntilTheLastMicroBatch) {
  const sim::StepSimulation sim = SimulateTwoMicroBatches(/*reduce_every_micro_batch=*/false);
  const Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kForward], 2436);
  EXPECT_EQ(r.phase_peak[kBackward], 2656);
  EXPECT_EQ(r.phase_start[kOptimizer], 1088);
  // One reduce-scatter per group in the step, all in the last micro-batch: the plain step's backward events.
  const auto trace = TraceOf(sim.timeline, FsdpBlock);
  std::vector<std::string> reduce_scatters, plain;
  for (const auto& line : trace) {
    if (line.find("reduce-scatter input") != std::string::npos && line[9] == '+') reduce_scatters.push_back(line);
  }
  for (const auto& line : kZero3Trace) {
    if (line.find("reduce-scatter input") != std::string::npos && line[9] == '+') plain.push_back(line);
  }
  EXPECT_EQ(reduce_scatters, plain);
  EXPECT_EQ(std::vector<std::string>(trace.end() - 8, trace.end()),
            std::vector<std::string>(kZero3Trace.end() - 8, kZero3Trace.end()));
}

// Gradient accumulation, torchtitan's loop (every micro-batch reduce-scatters). The second micro-batch starts with
// the first one's sharded gradients (160 + 48 + 40 = 248 B) and runs the first one's events again, except that
// each reduce-scatter output is added into the sharded gradient and freed:
//   forward peak 1988 + 248 = 2236, backward peak 2208 + 248 = 2456, 1088 again after backward.
TEST(Fsdp2HooksTest, AccumulationReduceScattersEveryMicroBatchIntoTheShardedGradients) {
  const sim::StepSimulation sim = SimulateTwoMicroBatches(/*reduce_every_micro_batch=*/true);
  const Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.phase_peak[kForward], 2236);
  EXPECT_EQ(r.phase_peak[kBackward], 2456);
  EXPECT_EQ(r.phase_start[kOptimizer], 1088);
  const auto trace = TraceOf(sim.timeline, FsdpBlock);
  // The first micro-batch is the plain step's; the second reduce-scatters into a transient output.
  ASSERT_GT(trace.size(), kZero3Trace.size());
  EXPECT_EQ(std::vector<std::string>(trace.begin(), trace.begin() + static_cast<int64_t>(kZero3Trace.size())),
            kZero3Trace);
  const std::vector<std::string> second(trace.begin() + static_cast<int64_t>(kZero3Trace.size()), trace.end());
  // Between them foreach_reduce returns and lets go of the group's last unsharded gradient (its loop variable).
  const size_t output = IndexOf(second, "backward +FSDP2 reduce-scatter output (layer 1) 40");
  EXPECT_EQ(second.at(output + 1).rfind("backward -d w1", 0), 0u) << second.at(output + 1);
  EXPECT_EQ(output + 2, IndexOf(second, "backward -FSDP2 reduce-scatter output (layer 1)"));
  for (const auto& line : second) EXPECT_EQ(line.find("sharded gradients"), std::string::npos) << line;
  // Still one shard of each group's gradients at the end.
  std::map<std::string, int64_t> left;
  for (const auto& [block, e] : CheckWellFormed(sim.timeline)) {
    if (e->category == MemoryCategory::kGradients) left[sim.timeline.block_labels[static_cast<size_t>(block)]] = e->bytes;
  }
  EXPECT_EQ(left.size(), 3u);
}

// Optimizer in backward: each group's post-backward steps its parameters right after the reduce-scatter (AdamW on
// the cpu target: sqrt + denom, 2 x the shard, one parameter at a time), then frees the sharded gradients. From
// the hand count above: layer 1: shard 40 = 1740, w1's step +80 = 1820, back, shard freed: 1700 (40 below the
// plain step from here on); layer 0: 1548 with its shard, w0's step +96 = 1644, shard freed: 1500; root: 1320
// with its shard, wte's and wh's steps +160 each (1480), shard freed 1160, its input freed 840. Peak 2208 as
// before (at the loss); nothing left after backward but setup's 840; no optimizer phase.
TEST(Fsdp2HooksTest, OptimizerInBackwardStepsEachShardAfterItsReduceScatter) {
  Graph g = TwoLayerLm();
  sim::TrainingConfig config = CpuConfig();
  config.optimizer_in_backward = true;
  Fsdp2Hooks hooks(FsdpGroups(ManagedParams(g, sim::Precision::kFp32), 2, g.num_layers()), 2, true, false, {},
                   FsdpLoop{.optimizer_in_backward = true});
  const sim::StepSimulation sim = sim::SimulateTrainingStep(g, config, &hooks);
  const Replay r = ReplayExact(sim.timeline);
  EXPECT_EQ(r.peak, 2208);
  EXPECT_EQ(r.end, 840);
  for (const auto& e : sim.timeline.events) EXPECT_NE(e.phase, Phase::kOptimizer);
  int64_t live = 0, at_root_steps = 0;
  for (const auto& e : sim.timeline.events) {
    live += e.is_alloc ? e.bytes : -e.bytes;
    const std::string& label = sim.timeline.block_labels[static_cast<size_t>(e.block)];
    if (e.is_alloc && label.rfind("wh ", 0) == 0) at_root_steps = std::max(at_root_steps, live);
  }
  EXPECT_EQ(at_root_steps, 1480);
  // The step temporaries of a shard, after its reduce-scatter (w1: 40 B each).
  const auto all = TraceOf(sim.timeline, [](MemoryCategory) { return true; });
  const size_t shard = IndexOf(all, "backward +FSDP2 reduce-scatter output (layer 1) 40");
  // foreach_reduce returns first, freeing the group's last unsharded gradient its loop variable held.
  EXPECT_EQ(all.at(shard + 1).rfind("backward -d w1", 0), 0u) << all.at(shard + 1);
  EXPECT_EQ(all.at(shard + 2).rfind("backward +w1 ", 0), 0u) << all.at(shard + 2);
  EXPECT_EQ(IndexOf(all, "backward -FSDP2 reduce-scatter output (layer 1)"), shard + 6);
}

// MixedPrecisionPolicy (docs/FSDP2_MIXED_PRECISION.md): fp32 shards, gradients and states; the all-gather in
// param_dtype from a cast of the shard; the reduce-scatter in reduce_dtype, cast back to fp32 per parameter.
sim::StepSimulation SimulateWithPolicy(const Graph& g, std::optional<DType> param, std::optional<DType> reduce,
                                       bool gloo_copies = false) {
  sim::TrainingConfig config = CpuConfig();
  config.fsdp_param_dtype = param;
  config.fsdp_reduce_dtype = reduce;
  const sim::FsdpPrecision precision = sim::FsdpPrecisionOf(config);
  Fsdp2Hooks hooks(FsdpGroups(ManagedParams(g, sim::Precision::kFp32), 2, g.num_layers(), precision), 2,
                   /*reshard_after_forward=*/true, gloo_copies, precision);
  return sim::SimulateTrainingStep(g, config, &hooks);
}

TEST(Fsdp2MixedPrecisionTest, Bf16ParamsGatherHalfTheBytesAndKeepFp32ShardsAndStates) {
  Graph g = TwoLayerLm();
  const sim::StepSimulation sim = SimulateWithPolicy(g, DType::kBF16, DType::kF32);
  const auto trace = TraceOf(sim.timeline, FsdpBlock);
  // The root's shards (wte 80 + wh 80 fp32) are cast to one 80-byte bf16 input, then gathered into 160 bytes.
  EXPECT_EQ(IndexOf(trace, "forward +FSDP2 all-gather input cast 80") + 1,
            IndexOf(trace, "forward +FSDP2 all-gather output (root) 160"));
  EXPECT_EQ(IndexOf(trace, "forward +FSDP2 all-gather output (root) 160") + 1,
            IndexOf(trace, "forward -FSDP2 all-gather input cast"));
  IndexOf(trace, "forward +unsharded param #0 80");
  IndexOf(trace, "forward +unsharded param #1 48");
  // Autograd's unsharded gradients are bf16 (d w1: 80 fp32 bytes -> 40); reduce fp32: the input is fp32 (80)
  // and the output is the sharded fp32 gradient.
  IndexOf(trace, "backward +d w1 40");
  IndexOf(trace, "backward +FSDP2 reduce-scatter input (layer 1) 80");
  IndexOf(trace, "backward +FSDP2 sharded gradients (layer 1) 40");
  EXPECT_EQ(BlocksLabelled(sim.timeline, "wte"), (std::vector<int64_t>{80}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "wte state"), (std::vector<int64_t>{80}));
  EXPECT_EQ(BlocksLabelled(sim.timeline, "w1 exp_avg_sq"), (std::vector<int64_t>{40}));
}

TEST(Fsdp2MixedPrecisionTest, Bf16ReductionCastsTheOutputBackToTheParameterDtype) {
  Graph g = TwoLayerLm();
  // param bf16 / reduce bf16 (and bf16 / not given, the same policy): a bf16 reduce-scatter of 40 bytes, its
  // 20-byte output, then the 40-byte fp32 sharded gradient.
  for (const std::optional<DType> reduce : {std::optional<DType>(DType::kBF16), std::optional<DType>()}) {
    const auto trace = TraceOf(SimulateWithPolicy(g, DType::kBF16, reduce).timeline, FsdpBlock);
    const size_t output = IndexOf(trace, "backward +FSDP2 reduce-scatter output (layer 1) 20");
    EXPECT_EQ(IndexOf(trace, "backward +FSDP2 reduce-scatter input (layer 1) 40") + 1, output);
    EXPECT_EQ(output + 1, IndexOf(trace, "backward +FSDP2 sharded gradients (layer 1) 40"));
    EXPECT_EQ(output + 2, IndexOf(trace, "backward -FSDP2 reduce-scatter output (layer 1)"));
    // The gradient, the last of its group, is freed when foreach_reduce returns, after the cast.
    EXPECT_EQ(output + 3, IndexOf(trace, "backward -d w1"));
  }
  // fp32 parameters with a bf16 reduction: fp32 gathers and gradients, a bf16 reduce-scatter.
  const auto trace = TraceOf(SimulateWithPolicy(g, DType::kF32, DType::kBF16).timeline, FsdpBlock);
  IndexOf(trace, "forward +FSDP2 all-gather output (root) 320");
  for (const auto& line : trace) EXPECT_EQ(line.find("all-gather input cast"), std::string::npos) << line;
  IndexOf(trace, "backward +d w1 80");
  IndexOf(trace, "backward +FSDP2 reduce-scatter input (layer 1) 40");
  IndexOf(trace, "backward +FSDP2 reduce-scatter output (layer 1) 20");
}

TEST(Fsdp2MixedPrecisionTest, CpuCopyInToAnotherDtypeCopiesEachGradientFirst) {
  Graph g = TwoLayerLm();
  // bf16 gradients into an fp32 reduce-scatter input: d w1 (40 bf16 bytes) is copied once; it is the last
  // gradient of its group, freed after the reduce-scatter (output 40 bytes, gloo's copy of the 80-byte input).
  const auto trace = TraceOf(SimulateWithPolicy(g, DType::kBF16, DType::kF32, /*gloo_copies=*/true).timeline,
                             [](MemoryCategory) { return true; });
  const size_t input = IndexOf(trace, "backward +FSDP2 reduce-scatter input (layer 1) 80");
  EXPECT_EQ(trace.at(input + 1), "backward +reduce-scatter copy-in cast 40");
  EXPECT_EQ(trace.at(input + 2), "backward -reduce-scatter copy-in cast");
  EXPECT_EQ(trace.at(input + 3), "backward +FSDP2 sharded gradients (layer 1) 40");
  EXPECT_EQ(trace.at(input + 6), "backward -d w1");
  // The same dtype on both sides copies nothing.
  for (const auto& line : TraceOf(SimulateWithPolicy(g, DType::kBF16, DType::kBF16, true).timeline, FsdpBlock)) {
    EXPECT_EQ(line.find("copy-in cast"), std::string::npos) << line;
  }
}

TEST(Fsdp2MixedPrecisionTest, ThePolicyNeedsFp32Precision) {
  Graph g = TwoLayerLm();
  sim::TrainingConfig config = CpuConfig(sim::Precision::kBf16Autocast);
  config.fsdp_param_dtype = DType::kBF16;
  EXPECT_THROW(sim::SimulateTrainingStep(g, config, nullptr), ConfigError);
}

}  // namespace
}  // namespace llmem::dist
