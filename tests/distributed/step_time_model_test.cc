// The step-time model, case by case with hand-worked figures: the matmul peak of each precision, the roofline per
// op, the ring formulas of NCCL collectives, overlap with compute, the optimizer pass count, and the printed
// assumptions.
#include "distributed/step_time_model.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "graph/dtype.h"
#include "tests/simulator/test_graph_builder.h"

namespace llmem::dist {
namespace {

constexpr double kGiBd = static_cast<double>(kGiB);

// A link with round figures: `bandwidth` B/s per direction, NCCL reaching `fraction` of it.
Interconnect TestLink(const std::string& name, double bandwidth, double fraction, double base_latency = 0,
                      double step_latency = 0, bool between_nodes = false) {
  Interconnect l;
  l.name = name;
  l.description = name;
  l.bandwidth_bytes_per_s = bandwidth;
  l.bus_bandwidth_fraction = fraction;
  l.fraction_source = "test";
  l.base_latency_s = base_latency;
  l.step_latency_s = step_latency;
  l.between_nodes = between_nodes;
  return l;
}

Collective MakeCollective(CollectiveKind kind, double bytes, int group, StepPhase phase, bool overlapped,
                          int count = 1, bool crosses_nodes = false) {
  Collective c;
  c.kind = kind;
  c.bytes = static_cast<int64_t>(bytes);
  c.group_size = group;
  c.phase = phase;
  c.overlapped = overlapped;
  c.count = count;
  c.crosses_nodes = crosses_nodes;
  c.what = "test collective";
  return c;
}

OpCost MatmulOp(double fwd_flops, double bwd_flops) {
  OpCost c;
  c.matmul_like = true;
  c.fwd_flops = fwd_flops;
  c.bwd_flops = bwd_flops;
  return c;
}

// a100-80 under bf16 autocast: matmuls at 0.6 x 312 TFLOP/s = 187.2e12 FLOP/s; memory at 0.8 x 2039 GB/s.
constexpr double kA100MatmulRate = 0.6 * 312e12;
constexpr double kA100ByteRate = 0.8 * 2039e9;

StepTimeInputs A100Inputs() {
  StepTimeInputs in;
  in.gpu = *sim::FindGpu("a100-80");
  in.precision = sim::Precision::kBf16Autocast;
  in.intra_node = *FindInterconnect("nvlink3");
  in.inter_node = *FindInterconnect("ib-hdr");
  return in;
}

TEST(StepTimeModelTest, GpuThroughputFromDatasheets) {
  const auto a100 = *sim::FindGpu("a100-80");
  EXPECT_DOUBLE_EQ(a100.bf16_tflops, 312);
  EXPECT_DOUBLE_EQ(a100.tf32_tflops, 156);
  EXPECT_DOUBLE_EQ(a100.fp32_tflops, 19.5);
  EXPECT_DOUBLE_EQ(a100.memory_bandwidth_gb_per_s, 2039);
  EXPECT_DOUBLE_EQ(sim::FindGpu("a100-40")->memory_bandwidth_gb_per_s, 1555);
  EXPECT_DOUBLE_EQ(sim::FindGpu("h100-80")->memory_bandwidth_gb_per_s, 3350);
  EXPECT_DOUBLE_EQ(sim::FindGpu("h200-141")->memory_bandwidth_gb_per_s, 4800);
  EXPECT_DOUBLE_EQ(sim::FindGpu("h200-141")->fp32_tflops, 67);
  EXPECT_DOUBLE_EQ(sim::FindGpu("l4-24")->tf32_tflops, 60);  // 120 with sparsity
  EXPECT_DOUBLE_EQ(sim::FindGpu("v100-16")->tf32_tflops, 0);
  EXPECT_FALSE(sim::FindGpu("v100-16")->bf16_tensor_cores);
  for (const auto& g : sim::GpuCatalog()) {
    EXPECT_GT(g.fp32_tflops, 0) << g.name;
    EXPECT_GT(g.fp16_tflops, g.fp32_tflops) << g.name;  // tensor cores beat CUDA cores everywhere
    EXPECT_GT(g.memory_bandwidth_gb_per_s, 0) << g.name;
  }
}

TEST(StepTimeModelTest, MatmulPeakFollowsPrecision) {
  const auto a100 = *sim::FindGpu("a100-80");
  // fp32 stays on the CUDA cores: allow_tf32 is off by default.
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(a100, sim::Precision::kFp32), 19.5e12);
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(a100, sim::Precision::kBf16Autocast), 312e12);
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(a100, sim::Precision::kFp16Autocast), 312e12);
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(a100, sim::Precision::kBf16), 312e12);
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(*sim::FindGpu("h100-80"), sim::Precision::kBf16), 989e12);
  // V100: fp16 on tensor cores, bf16 without them.
  const auto v100 = *sim::FindGpu("v100-32");
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(v100, sim::Precision::kFp16Autocast), 125e12);
  EXPECT_DOUBLE_EQ(MatmulPeakFlops(v100, sim::Precision::kBf16Autocast), 15.7e12);
}

TEST(StepTimeModelTest, CostOptionsFollowPrecision) {
  EXPECT_FALSE(CostOptionsFor(sim::Precision::kFp32).matmul_dtype.has_value());
  EXPECT_FALSE(CostOptionsFor(sim::Precision::kFp32).bf16_weights);
  EXPECT_EQ(CostOptionsFor(sim::Precision::kBf16Autocast).matmul_dtype, DType::kBF16);
  EXPECT_EQ(CostOptionsFor(sim::Precision::kFp16Autocast).matmul_dtype, DType::kF16);
  EXPECT_TRUE(CostOptionsFor(sim::Precision::kBf16).bf16_weights);
  EXPECT_FALSE(CostOptionsFor(sim::Precision::kBf16).matmul_dtype.has_value());
}

TEST(StepTimeModelTest, RooflineTakesTheSlowerSide) {
  EXPECT_DOUBLE_EQ(RooflineSeconds(2e12, 1e9, 1e12, 1e12), 2.0);   // compute-bound
  EXPECT_DOUBLE_EQ(RooflineSeconds(1e9, 3e12, 1e12, 1e12), 3.0);   // memory-bound
  EXPECT_DOUBLE_EQ(RooflineSeconds(0, 0, 1e12, 1e12), 0.0);
}

TEST(StepTimeModelTest, AllReduceRingFormula) {
  // 1 GiB over 8 ranks on a 100 GB/s link whose bus bandwidth reaches 80%: 2 * 7/8 * 1 GiB / 80 GB/s.
  const Collective c = MakeCollective(CollectiveKind::kAllReduce, kGiBd, 8, StepPhase::kBackward, false);
  const double bandwidth_term = 2.0 * 7 / 8 * kGiBd / (100e9 * 0.8);
  EXPECT_DOUBLE_EQ(CollectiveSeconds(c, TestLink("l", 100e9, 0.8)), bandwidth_term);  // ~23.5 ms
  EXPECT_NEAR(bandwidth_term, 0.02348, 1e-5);
  // NCCL's latency: 8.4 us once, plus 3.4 us for each of the 2 * (8 - 1) ring steps.
  EXPECT_DOUBLE_EQ(CollectiveSeconds(c, TestLink("l", 100e9, 0.8, 8.4e-6, 3.4e-6)),
                   bandwidth_term + 8.4e-6 + 14 * 3.4e-6);
}

TEST(StepTimeModelTest, GatherScatterBroadcastAndCounts) {
  const Interconnect link = TestLink("l", 100e9, 0.5, 1e-5, 1e-6);  // bus bandwidth 50 GB/s
  const double gib = kGiBd;
  auto seconds = [&](CollectiveKind kind, int group, int count = 1) {
    return CollectiveSeconds(MakeCollective(kind, gib, group, StepPhase::kForward, false, count), link);
  };
  EXPECT_DOUBLE_EQ(seconds(CollectiveKind::kAllGather, 4), 1e-5 + 3 * 1e-6 + 0.75 * gib / 50e9);
  EXPECT_DOUBLE_EQ(seconds(CollectiveKind::kReduceScatter, 4), seconds(CollectiveKind::kAllGather, 4));
  EXPECT_DOUBLE_EQ(seconds(CollectiveKind::kBroadcast, 4), 1e-5 + 3 * 1e-6 + gib / 50e9);
  // An all-reduce moves what a reduce-scatter and an all-gather move together.
  EXPECT_NEAR(seconds(CollectiveKind::kAllReduce, 4) - 1e-5 - 6e-6,
              2 * (seconds(CollectiveKind::kAllGather, 4) - 1e-5 - 3e-6), 1e-12);
  EXPECT_DOUBLE_EQ(seconds(CollectiveKind::kAllGather, 4, 3), 3 * seconds(CollectiveKind::kAllGather, 4));
  EXPECT_DOUBLE_EQ(seconds(CollectiveKind::kAllReduce, 1), 0);  // a group of one communicates nothing
}

TEST(StepTimeModelTest, ComputeIsARooflinePerOp) {
  StepTimeInputs in = A100Inputs();
  OpCost matmul = MatmulOp(kA100MatmulRate, 2 * kA100MatmulRate);  // 1 s forward, 2 s backward
  matmul.fwd_bytes = 1e9;                                          // 0.6 ms of reading: hidden by the FLOPs
  OpCost copy;                                                     // memory-bound: 1 s forward, 2 s backward
  copy.fwd_flops = 1e9;
  copy.fwd_bytes = kA100ByteRate;
  copy.bwd_bytes = 2 * kA100ByteRate;
  in.per_rank_cost.ops = {matmul, copy};
  StepTime t = EstimateStepTime(in);
  // Per op, then summed: 1 + 1 (a roofline over the totals would say max(1, 1.0006) = ~1 s).
  EXPECT_DOUBLE_EQ(t.forward_s, 2.0);
  EXPECT_DOUBLE_EQ(t.backward_s, 4.0);
  EXPECT_DOUBLE_EQ(t.optimizer_s, 0.0);
  EXPECT_DOUBLE_EQ(t.comm_s, 0.0);
  EXPECT_DOUBLE_EQ(t.total_s, 6.0);
}

TEST(StepTimeModelTest, Fp32MatmulsRunOnTheCudaCores) {
  StepTimeInputs in = A100Inputs();
  in.precision = sim::Precision::kFp32;
  in.per_rank_cost.ops = {MatmulOp(kA100MatmulRate, 0)};
  // 312 / 19.5 = 16 times slower than under bf16 autocast.
  EXPECT_DOUBLE_EQ(EstimateStepTime(in).forward_s, 16.0);
}

TEST(StepTimeModelTest, NonMatmulFlopsUseTheFp32Peak) {
  StepTimeInputs in = A100Inputs();
  OpCost op;
  op.fwd_flops = 0.6 * 19.5e12;  // 1 s at 60% of the CUDA cores' peak
  in.per_rank_cost.ops = {op};
  EXPECT_DOUBLE_EQ(EstimateStepTime(in).forward_s, 1.0);
}

TEST(StepTimeModelTest, OptimizerStepIsMemoryBound) {
  StepTimeInputs in = A100Inputs();
  in.optimizer_param_bytes = kGiB;
  EXPECT_EQ(OptimizerPasses(sim::OptimizerKind::kAdamW), 20);
  EXPECT_EQ(OptimizerPasses(sim::OptimizerKind::kSgdMomentum), 8);
  EXPECT_DOUBLE_EQ(EstimateStepTime(in).optimizer_s, 20 * kGiBd / kA100ByteRate);
  in.optimizer = sim::OptimizerKind::kSgdMomentum;
  EXPECT_DOUBLE_EQ(EstimateStepTime(in).optimizer_s, 8 * kGiBd / kA100ByteRate);
}

// Backward compute 2 s; gradient all-reduces of 0.5 s each over a 2-rank group (traffic 2 * 1/2 * 0.5 GB at
// 1 GB/s).
StepTimeInputs OverlapCase(int buckets, bool overlapped) {
  StepTimeInputs in = A100Inputs();
  in.intra_node = TestLink("slow", 2e9, 0.5);  // 1 GB/s bus bandwidth
  in.per_rank_cost.ops = {MatmulOp(0, 2 * kA100MatmulRate)};
  in.collectives = {MakeCollective(CollectiveKind::kAllReduce, 0.5e9, 2, StepPhase::kBackward, overlapped, buckets)};
  return in;
}

TEST(StepTimeModelTest, OverlapHidesCommUpToCompute) {
  // 1 s of buckets behind 2 s of backward: all hidden but the last bucket (0.5 s), which has nothing after it.
  StepTime t = EstimateStepTime(OverlapCase(2, true));
  EXPECT_DOUBLE_EQ(t.backward_s, 2.0);
  EXPECT_DOUBLE_EQ(t.comm_s, 1.0);
  EXPECT_DOUBLE_EQ(t.exposed_comm_s, 0.5);
  EXPECT_DOUBLE_EQ(t.total_s, 2.5);
  ASSERT_EQ(t.collectives.size(), 1u);
  EXPECT_DOUBLE_EQ(t.collectives[0].seconds, 1.0);
  EXPECT_EQ(t.collectives[0].link, "slow");
  // Without that rule, compute hides it all.
  StepTimeInputs in = OverlapCase(2, true);
  in.efficiency.expose_one_overlapped_collective = false;
  EXPECT_DOUBLE_EQ(EstimateStepTime(in).exposed_comm_s, 0.0);
  // 3 s of buckets behind 2 s of backward: 1 s sticks out.
  EXPECT_DOUBLE_EQ(EstimateStepTime(OverlapCase(6, true)).exposed_comm_s, 1.0);
  // Not overlapped: all of it adds.
  StepTime blocking = EstimateStepTime(OverlapCase(2, false));
  EXPECT_DOUBLE_EQ(blocking.exposed_comm_s, 1.0);
  EXPECT_DOUBLE_EQ(blocking.total_s, 3.0);
}

TEST(StepTimeModelTest, OverlapOnlyWithTheComputeOfItsOwnPhase) {
  // The buckets run in backward, but the compute is all forward: nothing hides them.
  StepTimeInputs in = OverlapCase(2, true);
  in.per_rank_cost.ops = {MatmulOp(2 * kA100MatmulRate, 0)};
  EXPECT_DOUBLE_EQ(EstimateStepTime(in).exposed_comm_s, 1.0);
}

TEST(StepTimeModelTest, GroupsAcrossNodesUseTheNetwork) {
  StepTimeInputs in = A100Inputs();
  in.collectives = {MakeCollective(CollectiveKind::kAllReduce, kGiBd, 16, StepPhase::kBackward, false, 1, true),
                    MakeCollective(CollectiveKind::kAllReduce, kGiBd, 8, StepPhase::kBackward, false)};
  StepTime t = EstimateStepTime(in);
  ASSERT_EQ(t.collectives.size(), 2u);
  EXPECT_EQ(t.collectives[0].link, "ib-hdr");
  EXPECT_EQ(t.collectives[1].link, "nvlink3");
  EXPECT_DOUBLE_EQ(t.collectives[0].seconds, CollectiveSeconds(in.collectives[0], *FindInterconnect("ib-hdr")));
  // 24 GB/s against 235 GB/s, and twice the ranks: the network is the bottleneck.
  EXPECT_GT(t.collectives[0].seconds, 9 * t.collectives[1].seconds);
  EXPECT_DOUBLE_EQ(t.comm_s, t.collectives[0].seconds + t.collectives[1].seconds);
}

bool Mentions(const std::vector<std::string>& lines, const std::string& text) {
  return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(text) != l.npos; });
}

TEST(StepTimeModelTest, AssumptionsNameTheFiguresUsed) {
  StepTimeInputs in = A100Inputs();
  in.optimizer_param_bytes = 2 * kGiB;
  in.collectives = {MakeCollective(CollectiveKind::kAllReduce, kGiBd, 8, StepPhase::kBackward, true)};
  StepTime t = EstimateStepTime(in);
  EXPECT_TRUE(Mentions(t.assumptions, "60% of peak"));
  EXPECT_TRUE(Mentions(t.assumptions, "80% of memory bandwidth"));
  EXPECT_TRUE(Mentions(t.assumptions, "312.0 TFLOP/s bf16 tensor cores"));
  EXPECT_TRUE(Mentions(t.assumptions, "2039 GB/s"));
  EXPECT_TRUE(Mentions(t.assumptions, "20 memory-bound passes over the 2.00 GiB"));
  EXPECT_TRUE(Mentions(t.assumptions, "nvlink3"));
  EXPECT_TRUE(Mentions(t.assumptions, "NCCL bus bandwidth 78%"));
  EXPECT_TRUE(Mentions(t.assumptions, "except the largest one"));
  EXPECT_FALSE(Mentions(t.assumptions, "ib-hdr"));  // no group crosses nodes
  EXPECT_TRUE(Mentions(t.assumptions, "kernel launch"));

  in.precision = sim::Precision::kFp32;
  in.collectives.push_back(MakeCollective(CollectiveKind::kAllGather, kGiBd, 16, StepPhase::kForward, false, 1, true));
  in.per_rank_cost.generic_kinds = {"aten::mystery"};
  t = EstimateStepTime(in);
  EXPECT_TRUE(Mentions(t.assumptions, "allow_tf32"));
  EXPECT_TRUE(Mentions(t.assumptions, "ib-hdr"));
  EXPECT_TRUE(Mentions(t.assumptions, "one NIC per GPU"));
  EXPECT_TRUE(Mentions(t.assumptions, "aten::mystery"));

  in.gpu = *sim::FindGpu("v100-16");
  in.precision = sim::Precision::kBf16Autocast;
  EXPECT_TRUE(Mentions(EstimateStepTime(in).assumptions, "has no bf16 tensor cores"));
}

TEST(StepTimeModelTest, FromAGraph) {
  // x [2048, 1024] -> linear(w [4096, 1024]) under bf16 autocast on an a100-80.
  testing::TestGraphBuilder b;
  ValueId x = b.Input("x", {2048, 1024}, DType::kF32);
  b.value(x).requires_grad = true;
  ValueId w = b.Param("w", {4096, 1024});
  ValueId y = b.Op("aten::linear", {testing::T(x), testing::T(w), testing::None()}, {2048, 4096});
  Graph g = b.Build(b.Op("aten::sum", {testing::T(y), testing::None()}, {}));
  StepTimeInputs in = A100Inputs();
  in.per_rank_cost = SumCosts(g, CostOptionsFor(in.precision));
  StepTime t = EstimateStepTime(in);
  // The matmul: 2 * 2048 * 1024 * 4096 FLOPs = 17.2 GFLOP, 91.8 us at 187.2 TFLOP/s; compute-bound.
  const double matmul_s = 2.0 * 2048 * 1024 * 4096 / kA100MatmulRate;
  const OpCost& linear = in.per_rank_cost.ops[0];
  ASSERT_TRUE(linear.matmul_like);
  EXPECT_LT(linear.fwd_bytes / kA100ByteRate, matmul_s);
  // The sum reads 32 MiB of y as recorded (fp32; only matmul-like ops see autocast's dtype) and writes 4 bytes.
  const double sum_s = (2048.0 * 4096 * 4 + 4) / kA100ByteRate;
  EXPECT_NEAR(t.forward_s, matmul_s + sum_s, 1e-12);
  EXPECT_NEAR(t.backward_s, 2 * matmul_s, 1e-12);  // dX and dW; the sum's gradient is a view
}

TEST(StepTimeModelTest, CheckpointingRecomputesTheLayersForwardInBackward) {
  // x [2048, 1024] -> layer 0: linear(w1 [1024, 1024]) -> LM head: linear(w2 [4096, 1024]) -> sum, under bf16
  // autocast on an a100-80. Full checkpointing recomputes layer 0 in backward, not the head.
  testing::TestGraphBuilder b;
  ValueId x = b.Input("x", {2048, 1024}, DType::kF32);
  b.value(x).requires_grad = true;
  ValueId w1 = b.Param("w1", {1024, 1024});
  ValueId w2 = b.Param("w2", {4096, 1024});
  b.SetLayer(0);
  ValueId h = b.Op("aten::linear", {testing::T(x), testing::T(w1), testing::None()}, {2048, 1024});
  b.SetHead();
  ValueId y = b.Op("aten::linear", {testing::T(h), testing::T(w2), testing::None()}, {2048, 4096});
  Graph g = b.Build(b.Op("aten::sum", {testing::T(y), testing::None()}, {}));
  StepTimeInputs in = A100Inputs();
  in.per_rank_cost = SumCosts(g, CostOptionsFor(in.precision));
  sim::TrainingConfig config;
  config.precision = in.precision;
  config.target.gpu = in.gpu;
  EXPECT_TRUE(RecomputedOps(g, config).empty());
  const StepTime plain = EstimateStepTime(in);
  config.checkpointing.mode = sim::CheckpointingMode::kFull;
  in.recomputed_ops = RecomputedOps(g, config);
  EXPECT_EQ(in.recomputed_ops, (std::vector<bool>{true, false, false}));
  const StepTime checkpointed = EstimateStepTime(in);
  // Layer 0's forward: 2 * 2048 * 1024 * 1024 FLOPs at 187.2 TFLOP/s, compute-bound.
  const double layer_s = 2.0 * 2048 * 1024 * 1024 / kA100MatmulRate;
  ASSERT_LT(in.per_rank_cost.ops[0].fwd_bytes / kA100ByteRate, layer_s);
  EXPECT_NEAR(checkpointed.recompute_s, layer_s, 1e-12);
  EXPECT_NEAR(checkpointed.backward_s, plain.backward_s + layer_s, 1e-12);
  EXPECT_DOUBLE_EQ(checkpointed.forward_s, plain.forward_s);
  EXPECT_NEAR(checkpointed.total_s, plain.total_s + layer_s, 1e-12);
  EXPECT_TRUE(Mentions(checkpointed.assumptions, "activation checkpointing"));
  EXPECT_FALSE(Mentions(plain.assumptions, "activation checkpointing"));
  EXPECT_FALSE(Mentions(checkpointed.assumptions, "recomputation"));
}

}  // namespace
}  // namespace llmem::dist
