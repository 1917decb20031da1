// Sharding arithmetic of the data-parallel engines, against hand-worked cases: which parameters a rank manages
// and in what order (sharded_params), DDP's gradient buckets (ddp), ZeroRedundancyOptimizer's partition
// (zero_redundancy), FSDP2's padded dim-0 shards and its groups (fsdp), and the collectives each engine lists.
#include <gtest/gtest.h>

#include <numeric>

#include "distributed/ddp.h"
#include "distributed/fsdp.h"
#include "distributed/sharded_params.h"
#include "distributed/zero_redundancy.h"
#include "simulator/training_step_simulator.h"
#include "tests/distributed/distributed_test_graphs.h"

namespace llmem::dist {
namespace {

using namespace llmem::dist::testing;  // NOLINT

constexpr int64_t kKiB = 1024;
constexpr int64_t kMiB = 1024 * kKiB;

// A managed f32 parameter of `bytes` bytes (a 1-D tensor), tagged with `value` so hooks can recognise it.
ManagedParam F32(int64_t bytes, int32_t value = -1) {
  ManagedParam p;
  p.index = value;
  p.value = value;
  p.numel = bytes / 4;
  p.dim0 = p.numel;
  p.element_size = 4;
  return p;
}

// A managed parameter of the given shape and element size.
ManagedParam Shaped(std::vector<int64_t> shape, int64_t element_size = 4) {
  ManagedParam p;
  p.numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  p.dim0 = shape.empty() ? 1 : shape[0];
  p.element_size = element_size;
  return p;
}

int64_t TotalBytes(const std::vector<ManagedParam>& ps) {
  int64_t total = 0;
  for (const auto& p : ps) total += p.bytes();
  return total;
}

// ---- DDP buckets ----

TEST(DdpBucketBytesTest, ReverseOrderFirstBucketOneMibThenTwentyFiveMib) {
  // First-use order (MiB): p0 0.25, p1 0.5, p2 30, p3 10, p4 20, p5 0.5, p6 0.75 (62 MiB in all).
  // Gradient-ready order is the reverse: p6 0.75, p5 0.5, p4 20, p3 10, p2 30, p1 0.5, p0 0.25.
  //   bucket 0 (cap 1 MiB):  0.75 < 1; + 0.5 = 1.25 >= 1 -> closes with p5 in it        = 1.25 MiB
  //   bucket 1 (cap 25 MiB): 20 < 25;  + 10  = 30   >= 25 -> closes with p3 in it        = 30 MiB
  //   bucket 2 (cap 25 MiB): p2 30 >= 25 on its own -> a big parameter alone            = 30 MiB
  //   bucket 3:              0.5 + 0.25 = 0.75, never reaches the cap, closed at the end = 0.75 MiB
  const std::vector<ManagedParam> params = {F32(256 * kKiB), F32(512 * kKiB), F32(30 * kMiB), F32(10 * kMiB),
                                            F32(20 * kMiB),  F32(512 * kKiB), F32(768 * kKiB)};
  const auto buckets = DdpBucketBytes(params);
  EXPECT_EQ(buckets, (std::vector<int64_t>{1280 * kKiB, 30 * kMiB, 30 * kMiB, 768 * kKiB}));
  EXPECT_EQ(std::accumulate(buckets.begin(), buckets.end(), int64_t{0}), TotalBytes(params));
  EXPECT_EQ(TotalBytes(params), 62 * kMiB);
}

TEST(DdpBucketBytesTest, ReachingTheCapExactlyClosesTheBucket) {
  // First-use order: q0 1 MiB, q1 24 MiB, q2 25 MiB, q3 1 MiB. Reverse: q3 1 MiB reaches the 1 MiB first cap ->
  // [1]; q2 25 MiB reaches 25 -> [25]; q1 24 < 25, + q0 1 = 25 reaches it -> [25]. Nothing left over.
  const std::vector<ManagedParam> params = {F32(1 * kMiB), F32(24 * kMiB), F32(25 * kMiB), F32(1 * kMiB)};
  EXPECT_EQ(DdpBucketBytes(params), (std::vector<int64_t>{1 * kMiB, 25 * kMiB, 25 * kMiB}));
  // One byte short of each cap never closes: 1 MiB - 4 B, then 25 MiB - 4 B, stay open and merge.
  const std::vector<ManagedParam> short_of = {F32(25 * kMiB - 4), F32(1 * kMiB - 4)};
  // Reverse: (1 MiB - 4) < 1 MiB; + (25 MiB - 4) = 26 MiB - 8 >= 1 MiB -> one bucket with both.
  EXPECT_EQ(DdpBucketBytes(short_of), (std::vector<int64_t>{26 * kMiB - 8}));
}

TEST(DdpBucketBytesTest, BigLastParameterFillsTheFirstBucketAlone) {
  // Reverse order starts with a 40 MiB parameter: it passes the 1 MiB first cap alone; the next two (10 + 20 MiB)
  // then share a 25 MiB-cap bucket: 10 < 25, 30 >= 25.
  const std::vector<ManagedParam> params = {F32(20 * kMiB), F32(10 * kMiB), F32(40 * kMiB)};
  EXPECT_EQ(DdpBucketBytes(params), (std::vector<int64_t>{40 * kMiB, 30 * kMiB}));
}

TEST(DdpBucketBytesTest, CustomCapsElementSizesAndNoParameters) {
  EXPECT_TRUE(DdpBucketBytes({}).empty());
  // bf16 parameters of 100, 60, 60, 30 elements: 200, 120, 120, 60 B. Caps 150 then 250.
  // Reverse: 60 < 150; + 120 = 180 >= 150 -> [180]; 120 < 250; + 200 = 320 >= 250 -> [320].
  std::vector<ManagedParam> params = {Shaped({100}, 2), Shaped({60}, 2), Shaped({60}, 2), Shaped({30}, 2)};
  EXPECT_EQ(DdpBucketBytes(params, 150, 250), (std::vector<int64_t>{180, 320}));
  // Constants with units: 1 MiB first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES), 25 MiB (bucket_cap_mb=25).
  EXPECT_EQ(kDdpFirstBucketBytes, 1'048'576);
  EXPECT_EQ(kDdpBucketCapBytes, 26'214'400);
}

TEST(DdpCollectivesTest, OneOverlappedAllReducePerBucket) {
  const auto cs = DdpCollectives({1 * kMiB, 25 * kMiB}, 4, /*crosses_nodes=*/true);
  ASSERT_EQ(cs.size(), 2u);
  EXPECT_EQ(cs[0].kind, CollectiveKind::kAllReduce);
  EXPECT_EQ(cs[0].bytes, 1 * kMiB);
  EXPECT_EQ(cs[1].bytes, 25 * kMiB);
  for (const auto& c : cs) {
    EXPECT_EQ(c.group_size, 4);
    EXPECT_TRUE(c.crosses_nodes);
    EXPECT_TRUE(c.overlapped);
    EXPECT_EQ(c.phase, StepPhase::kBackward);
    EXPECT_EQ(c.count, 1);
  }
  EXPECT_TRUE(DdpCollectives({1 * kMiB}, 1, false).empty());  // a single replica communicates nothing
}

// ---- ZeroRedundancyOptimizer partition ----

TEST(ZeroRedundancyTest, GreedyLargestFirstToTheLeastLoadedRank) {
  // numel: i0 10, i1 40, i2 30, i3 20, i4 30. Sorted largest first, stable: i1 40, i2 30, i4 30, i3 20, i0 10.
  // world 2 (loads in elements):
  //   i1 -> r0 (0,0 tie: lowest)  [40, 0]     i2 -> r1 [40, 30]     i4 -> r1 [40, 60]
  //   i3 -> r0 [60, 60]                        i0 -> r0 (60,60 tie: lowest) [70, 60]
  std::vector<ManagedParam> params = {F32(40, 100), F32(160, 101), F32(120, 102), F32(80, 103), F32(120, 104)};
  EXPECT_EQ(ZeroRedundancyOwners(params, 2), (std::vector<int>{0, 0, 1, 0, 1}));
  // Rank 0 holds 70 elements = 280 B, rank 1 60 elements = 240 B.
  EXPECT_EQ(LargestZeroRedundancyRank(params, ZeroRedundancyOwners(params, 2), 2), 0);
  // world 3: i1 -> r0 [40,0,0]; i2 -> r1 [40,30,0]; i4 -> r2 [40,30,30]; i3 -> r1 (30,30 tie: lowest) [40,50,30];
  //          i0 -> r2 [40,50,40]. Rank 1 holds the most (50 elements).
  const auto owners3 = ZeroRedundancyOwners(params, 3);
  EXPECT_EQ(owners3, (std::vector<int>{2, 0, 1, 1, 2}));
  EXPECT_EQ(LargestZeroRedundancyRank(params, owners3, 3), 1);
  // More ranks than parameters: each parameter alone, the rest of the ranks own nothing.
  EXPECT_EQ(ZeroRedundancyOwners(params, 8), (std::vector<int>{4, 0, 1, 3, 2}));
}

TEST(ZeroRedundancyTest, TiedLoadsPickTheLowestRank) {
  // Four equal parameters over 2 ranks: r0, r1, r0, r1 (each time the lowest of the least loaded).
  std::vector<ManagedParam> params = {F32(64, 1), F32(64, 2), F32(64, 3), F32(64, 4)};
  const auto owners = ZeroRedundancyOwners(params, 2);
  EXPECT_EQ(owners, (std::vector<int>{0, 1, 0, 1}));
  EXPECT_EQ(LargestZeroRedundancyRank(params, owners, 2), 0);  // 128 B each: the lowest rank
}

TEST(ZeroRedundancyTest, HooksStepOnlyTheLargestRanksParameters) {
  // The partition above (world 2): rank 0 (the largest) owns values 100, 101 and 103.
  std::vector<ManagedParam> params = {F32(40, 100), F32(160, 101), F32(120, 102), F32(80, 103), F32(120, 104)};
  ZeroRedundancyHooks hooks({1 * kMiB}, params, 2);
  auto param_with_value = [](int32_t v) {
    Parameter p;
    p.value = ValueId{v};
    return p;
  };
  EXPECT_EQ(hooks.OptimizedBytes(param_with_value(100), 40), 40);
  EXPECT_EQ(hooks.OptimizedBytes(param_with_value(101), 160), 160);
  EXPECT_EQ(hooks.OptimizedBytes(param_with_value(102), 120), 0);
  EXPECT_EQ(hooks.OptimizedBytes(param_with_value(103), 80), 80);
  EXPECT_EQ(hooks.OptimizedBytes(param_with_value(104), 120), 0);
  // Weights stay whole (ZeRO-1 shards only the optimizer states).
  EXPECT_EQ(hooks.ResidentParamBytes(param_with_value(102), 120), 120);
}

TEST(ZeroRedundancyTest, StatesAndStepTemporariesOfOwnedParametersOnly) {
  // TwoLayerLm over 2 ranks (numel): wte 36 -> r0, wh 36 -> r1, w0 20 -> r0, w1 20 -> r1; both ranks hold
  // 224 B, the reported one is rank 0: wte and w0. Weights and the DDP bucket (448 B) stay whole.
  Graph g = TwoLayerLm();
  const auto params = ManagedParams(g, sim::Precision::kFp32);
  ZeroRedundancyHooks hooks(DdpBucketBytes(params), params, 2);
  sim::StepSimulation step = sim::SimulateTrainingStep(g, CpuConfig(), &hooks);
  using sim::testing::BlocksLabelled;
  EXPECT_EQ(BlocksLabelled(step.timeline, "wte state"), (std::vector<int64_t>{144}));
  EXPECT_EQ(BlocksLabelled(step.timeline, "wte exp_avg_sq"), (std::vector<int64_t>{144}));
  EXPECT_EQ(BlocksLabelled(step.timeline, "w0 state"), (std::vector<int64_t>{80}));
  EXPECT_TRUE(BlocksLabelled(step.timeline, "w1 state").empty());
  EXPECT_TRUE(BlocksLabelled(step.timeline, "wh exp_avg_sq").empty());
  EXPECT_EQ(BlocksLabelled(step.timeline, "wte sqrt(exp_avg_sq)"), (std::vector<int64_t>{144}));
  EXPECT_TRUE(BlocksLabelled(step.timeline, "wh sqrt(exp_avg_sq)").empty());
  EXPECT_EQ(BlocksLabelled(step.timeline, "wh"), (std::vector<int64_t>{144}));
  EXPECT_EQ(BlocksLabelled(step.timeline, "DDP gradient bucket 0"), (std::vector<int64_t>{448}));
}

TEST(DdpHooksTest, BucketsAreAllocatedAtSetupAndLiveThroughTheStep) {
  Graph g = TwoLayerLm();
  DdpHooks hooks({100, 200});
  sim::StepSimulation step = sim::SimulateTrainingStep(g, CpuConfig(), &hooks);
  using sim::testing::BlocksLabelled;
  EXPECT_EQ(BlocksLabelled(step.timeline, "DDP gradient bucket 0"), (std::vector<int64_t>{100}));
  EXPECT_EQ(BlocksLabelled(step.timeline, "DDP gradient bucket 1"), (std::vector<int64_t>{200}));
  for (const auto& e : step.timeline.events) {
    if (e.category != sim::MemoryCategory::kCommBuffers) continue;
    EXPECT_TRUE(e.is_alloc);  // never freed
    EXPECT_EQ(e.phase, sim::Phase::kSetup);
  }
  // The single-GPU step plus 300 B throughout: the end of the step is 1888 + 300 (rank_estimate_test.cc).
  EXPECT_EQ(sim::testing::ReplayExact(step.timeline).end, 2188);
}

// ---- Managed parameters ----

TEST(ManagedParamsTest, FirstUseOrderOneEntryPerStorageTrainableAndUsedOnly) {
  // Declared: wte (embedding), w_late, w_early (layer 0), mask (a buffer), unused, head (tied to wte).
  // Used: embedding(wte) -> linear(w_early) -> mul(mask) -> linear(w_late) -> linear(head).
  // Managed, in first-use order: wte (node 0), w_early (node 1), w_late (node 3); the tied head shares wte's
  // storage, the buffer is not trainable, `unused` is never read.
  TestGraphBuilder b;
  ValueId ids = b.Input("input_ids", {6});
  ValueId labels = b.Input("labels", {6});
  ValueId wte = b.Param("wte", {9, 4});
  ValueId e = b.Op("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, {6, 4});
  b.SetLayer(0);
  ValueId w_late = b.Param("w_late", {4, 4});
  ValueId w_early = b.Param("w_early", {4, 4});
  ValueId mask = b.Param("mask", {6, 4}, DType::kF32, /*trainable=*/false);
  b.Param("unused", {8, 8}, DType::kF32, true, /*used_in_forward=*/false);
  ValueId h = b.Op("aten::linear", {T(e), T(w_early), None()}, {6, 4});
  ValueId m = b.Op("aten::mul", {T(h), T(mask)}, {6, 4});
  ValueId h2 = b.Op("aten::linear", {T(m), T(w_late), None()}, {6, 4});
  b.SetHead();
  ValueId head = b.TiedParam("lm_head", wte);
  ValueId logits = b.Op("aten::linear", {T(h2), T(head), None()}, {6, 9});
  Graph g = b.Build(CrossEntropy(b, logits, labels), 1, 6);

  const auto fp32 = ManagedParams(g, sim::Precision::kFp32);
  ASSERT_EQ(fp32.size(), 3u);
  EXPECT_EQ(fp32[0].index, 0);  // wte
  EXPECT_EQ(fp32[1].index, 2);  // w_early
  EXPECT_EQ(fp32[2].index, 1);  // w_late
  EXPECT_EQ(fp32[0].value, wte.index);
  EXPECT_EQ(fp32[1].value, w_early.index);
  EXPECT_EQ(fp32[2].value, w_late.index);
  EXPECT_EQ(fp32[0].numel, 36);
  EXPECT_EQ(fp32[0].dim0, 9);
  EXPECT_EQ(fp32[0].bytes(), 144);
  EXPECT_EQ(fp32[0].region.kind, RegionKind::kEmbedding);
  EXPECT_EQ(fp32[1].region, (Region{RegionKind::kDecoderLayer, 0}));
  // Pure bf16 stores weights in 2 bytes; autocast keeps fp32 weights.
  const auto bf16 = ManagedParams(g, sim::Precision::kBf16);
  EXPECT_EQ(bf16[0].element_size, 2);
  EXPECT_EQ(bf16[0].bytes(), 72);
  EXPECT_EQ(ManagedParams(g, sim::Precision::kBf16Autocast)[0].element_size, 4);
}

// ---- FSDP2 padded shards and groups ----

TEST(PaddedShardNumelTest, CeilOfDimZeroOverWorldRowsTimesRowSize) {
  // [10,6] over 4: torch.chunk gives 3,3,3,1 rows; every shard is padded to 3 rows: 3 * 6 = 18 elements.
  EXPECT_EQ(PaddedShardNumel(Shaped({10, 6}), 4), 18);
  // [8,6] over 4: 2 rows each, no padding: 12.
  EXPECT_EQ(PaddedShardNumel(Shaped({8, 6}), 4), 12);
  // [3,5] over 4: chunks of 1 row and one empty chunk, padded to 1 row: 5.
  EXPECT_EQ(PaddedShardNumel(Shaped({3, 5}), 4), 5);
  // [6,2,3] over 4: ceil(6/4) = 2 rows of 2*3: 12.
  EXPECT_EQ(PaddedShardNumel(Shaped({6, 2, 3}), 4), 12);
  // 1-D: [10] over 4 -> 3; [7] over 2 -> 4; [8] over 8 -> 1.
  EXPECT_EQ(PaddedShardNumel(Shaped({10}), 4), 3);
  EXPECT_EQ(PaddedShardNumel(Shaped({7}), 2), 4);
  EXPECT_EQ(PaddedShardNumel(Shaped({8}), 8), 1);
  // One rank holds everything.
  EXPECT_EQ(PaddedShardNumel(Shaped({10, 6}), 1), 60);
}

TEST(FsdpGroupsTest, RootHoldsEverythingOutsideTheLayersOneGroupPerLayer) {
  // TwoLayerLm over 2 ranks (f32):
  //   wte [9,4]: ceil(9/2) = 5 rows * 4 = 20 elements = 80 B    wh [9,4]: 80 B     -> root shard 160, gathered 320
  //   w0  [5,4]: 3 rows * 4 = 12 elements = 48 B                                  -> layer 0: 48, gathered 96
  //   w1  [4,5]: 2 rows * 5 = 10 elements = 40 B                                  -> layer 1: 40, gathered 80
  Graph g = TwoLayerLm();
  const auto params = ManagedParams(g, sim::Precision::kFp32);
  const auto groups = FsdpGroups(params, 2, g.num_layers());
  ASSERT_EQ(groups.size(), 3u);
  ASSERT_EQ(groups[0].params.size(), 2u);
  EXPECT_EQ(groups[0].params[0].index, 0);  // wte
  EXPECT_EQ(groups[0].params[1].index, 3);  // wh
  ASSERT_EQ(groups[1].params.size(), 1u);
  EXPECT_EQ(groups[1].params[0].index, 1);  // w0
  ASSERT_EQ(groups[2].params.size(), 1u);
  EXPECT_EQ(groups[2].params[0].index, 2);  // w1
  EXPECT_EQ(groups[0].shard_bytes, 160);
  EXPECT_EQ(groups[0].unsharded_bytes, 320);
  EXPECT_EQ(groups[1].shard_bytes, 48);
  EXPECT_EQ(groups[1].unsharded_bytes, 96);
  EXPECT_EQ(groups[2].shard_bytes, 40);
  EXPECT_EQ(groups[2].unsharded_bytes, 80);

  // Over 4 ranks: wte/wh 3 rows * 4 * 4 B = 48 each (root 96, gathered 384); w0 2 rows = 32 (128);
  // w1 1 row of 5 = 20 (80).
  const auto four = FsdpGroups(params, 4, g.num_layers());
  EXPECT_EQ(four[0].shard_bytes, 96);
  EXPECT_EQ(four[0].unsharded_bytes, 384);
  EXPECT_EQ(four[1].shard_bytes, 32);
  EXPECT_EQ(four[1].unsharded_bytes, 128);
  EXPECT_EQ(four[2].shard_bytes, 20);
  EXPECT_EQ(four[2].unsharded_bytes, 80);

  // Pure bf16 halves every figure: root 80 / 160 over 2 ranks.
  const auto bf16 = FsdpGroups(ManagedParams(g, sim::Precision::kBf16), 2, g.num_layers());
  EXPECT_EQ(bf16[0].shard_bytes, 80);
  EXPECT_EQ(bf16[0].unsharded_bytes, 160);
}

TEST(FsdpGroupsTest, ParametersOfLayersBeyondTheCountGoToTheRoot) {
  ManagedParam in_layer = Shaped({4, 4});
  in_layer.region = Region{RegionKind::kDecoderLayer, 0};
  ManagedParam beyond = Shaped({2, 4});
  beyond.region = Region{RegionKind::kDecoderLayer, 3};
  const auto groups = FsdpGroups({in_layer, beyond}, 2, /*num_layers=*/1);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0].params.size(), 1u);
  EXPECT_EQ(groups[0].shard_bytes, 16);  // [2,4] over 2: 1 row of 4 f32
  EXPECT_EQ(groups[1].shard_bytes, 32);  // [4,4] over 2: 2 rows of 4 f32
}

TEST(FsdpGroupsTest, FrozenParametersAreShardedAndGatheredButNotReduced) {
  // A LoRA-style layer: a frozen [4,4] base weight and a trainable [2,4] adapter, over 2 ranks.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {3, 4}, DType::kF32);
  ValueId labels = b.Input("labels", {3});
  b.SetLayer(0);
  ValueId base = b.Param("base", {4, 4}, DType::kF32, /*trainable=*/false);
  ValueId adapter = b.Param("adapter", {2, 4});
  ValueId h = b.Op("aten::linear", {T(x), T(base), None()}, {3, 4});
  ValueId a = b.Op("aten::linear", {T(h), T(adapter), None()}, {3, 2});
  b.SetHead();
  ValueId head = b.Param("head", {5, 2});
  ValueId logits = b.Op("aten::linear", {T(a), T(head), None()}, {3, 5});
  Graph built = b.Build(CrossEntropy(b, logits, labels), 1, 3);
  // The builder's trainable=false is a buffer; mark the base a frozen parameter, as ApplyLora does.
  std::vector<Parameter> params = built.params();
  params[static_cast<size_t>(built.value(base).param)].frozen = true;
  Graph g(built.values(), built.nodes(), params, built.inputs(), built.loss(), 1, 3);

  EXPECT_EQ(ManagedParams(g, sim::Precision::kFp32).size(), 2u);  // adapter, head: what the optimizer and DDP see
  const auto with_frozen = ManagedParams(g, sim::Precision::kFp32, /*with_frozen=*/true);
  ASSERT_EQ(with_frozen.size(), 3u);
  EXPECT_FALSE(with_frozen[0].trainable);  // the base, first used
  const auto groups = FsdpGroups(with_frozen, 2, g.num_layers());
  // Layer 0: base 2 rows of 4 f32 (32 B) + adapter 1 row of 4 (16 B) per rank, gathered 96 B; only the adapter's
  // gradient (32 B unsharded) goes into the reduce-scatter.
  EXPECT_EQ(groups[1].shard_bytes, 48);
  EXPECT_EQ(groups[1].unsharded_bytes, 96);
  EXPECT_EQ(groups[1].reduce_bytes, 32);
}

TEST(FsdpCollectivesTest, AllGathersAndReduceScatterPerStep) {
  // TwoLayerLm over 2 ranks: root gathered 320, layers 96 + 80 = 176.
  //   forward all-gather: 320 + 176 = 496; backward all-gather (ZeRO-3 only, the root stays gathered): 176;
  //   reduce-scatter of all gradients: 496.
  Graph g = TwoLayerLm();
  const auto groups = FsdpGroups(ManagedParams(g, sim::Precision::kFp32), 2, g.num_layers());
  const auto zero3 = FsdpCollectives(groups, 2, /*reshard_after_forward=*/true, false);
  ASSERT_EQ(zero3.size(), 3u);
  EXPECT_EQ(zero3[0].kind, CollectiveKind::kAllGather);
  EXPECT_EQ(zero3[0].phase, StepPhase::kForward);
  EXPECT_EQ(zero3[0].bytes, 496);
  EXPECT_EQ(zero3[1].kind, CollectiveKind::kAllGather);
  EXPECT_EQ(zero3[1].phase, StepPhase::kBackward);
  EXPECT_EQ(zero3[1].bytes, 176);
  EXPECT_EQ(zero3[2].kind, CollectiveKind::kReduceScatter);
  EXPECT_EQ(zero3[2].bytes, 496);
  for (const auto& c : zero3) EXPECT_EQ(c.group_size, 2);
  const auto zero2 = FsdpCollectives(groups, 2, /*reshard_after_forward=*/false, false);
  ASSERT_EQ(zero2.size(), 2u);
  EXPECT_EQ(zero2[0].kind, CollectiveKind::kAllGather);
  EXPECT_EQ(zero2[1].kind, CollectiveKind::kReduceScatter);
  EXPECT_TRUE(FsdpCollectives(groups, 1, true, false).empty());
}

}  // namespace
}  // namespace llmem::dist
