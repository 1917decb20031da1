// One rank's estimate under a parallel plan (rank_estimate.h), and what it checks first: the model's dimensions
// (model_dims.h), the tensor-parallel degree, NCCL's memory outside the allocator (nccl_memory.h). Memory figures
// are hand-counted on TwoLayerLm (distributed_test_graphs.h), cpu target, fp32 + AdamW.
#include "distributed/rank_estimate.h"

#include <gtest/gtest.h>

#include "distributed/model_dims.h"
#include "distributed/nccl_memory.h"
#include "graph/dtype.h"
#include "graph/error.h"
#include "simulator/gpu_catalog.h"
#include "simulator/memory_estimate.h"
#include "tests/distributed/distributed_test_graphs.h"

namespace llmem::dist {
namespace {

using namespace llmem::dist::testing;  // NOLINT
using sim::Phase;

constexpr size_t kForward = static_cast<size_t>(Phase::kForward);
constexpr size_t kBackward = static_cast<size_t>(Phase::kBackward);
constexpr size_t kOptimizer = static_cast<size_t>(Phase::kOptimizer);

ParallelPlan Plan(int dp, int tp, DataParallelEngine engine = DataParallelEngine::kDdp) {
  return ParallelPlan{.dp = dp, .tp = tp, .engine = engine};
}

// ---- Model dimensions ----

TEST(ModelDimsTest, ReadsTheTokenEmbeddingAndLayerZero) {
  // TpBlock: the position embedding (indexed by arange) comes first and is skipped; wte [10,8] is the token
  // embedding; q enters attention as [1,2,3,4]: 2 heads; k has 2 heads all along; the widest layer-0 linear is
  // up [32,8].
  const ModelDims dims = ReadModelDims(MakeTpBlock().graph);
  EXPECT_EQ(dims.vocab, 10);
  EXPECT_EQ(dims.hidden, 8);
  EXPECT_EQ(dims.heads, 2);
  EXPECT_EQ(dims.kv_heads, 2);
  EXPECT_EQ(dims.intermediate, 32);
  EXPECT_EQ(dims.layers, 1);
}

TEST(ModelDimsTest, GroupedQueryAttentionCountsTheHeadsBeforeRepeatKv) {
  // H = 8, S = 3, 4 query heads of 2, 2 key/value heads: k = linear(x, [4,8]) [1,3,4] -> view [1,3,2,2] ->
  // transpose [1,2,3,2] -> unsqueeze [1,2,1,3,2] -> expand [1,2,2,3,2] -> reshape [1,4,3,2] (HF repeat_kv).
  TestGraphBuilder b;
  ValueId ids = b.Input("input_ids", {1, 3});
  ValueId labels = b.Input("labels", {1, 3});
  ValueId wte = b.Param("wte", {10, 8});
  ValueId x = b.Op("aten::embedding", {T(wte), T(ids), I(-1), B(false), B(false)}, {1, 3, 8});
  b.SetLayer(0);
  ValueId wq = b.Param("wq", {8, 8});
  ValueId q = b.Op("aten::linear", {T(x), T(wq), None()}, {1, 3, 8});
  ValueId qv = b.OpOut("aten::view", {T(q), Ints({1, 3, 4, 2})}, Out({1, 3, 4, 2}).AliasOf(q));
  ValueId qt = b.OpOut("aten::transpose", {T(qv), I(1), I(2)}, Out({1, 4, 3, 2}).AliasOf(q));
  ValueId wk = b.Param("wk", {4, 8});
  ValueId k = b.Op("aten::linear", {T(x), T(wk), None()}, {1, 3, 4});
  ValueId kv = b.OpOut("aten::view", {T(k), Ints({1, 3, 2, 2})}, Out({1, 3, 2, 2}).AliasOf(k));
  ValueId kt = b.OpOut("aten::transpose", {T(kv), I(1), I(2)}, Out({1, 2, 3, 2}).AliasOf(k));
  ValueId ku = b.OpOut("aten::unsqueeze", {T(kt), I(2)}, Out({1, 2, 1, 3, 2}).AliasOf(k));
  ValueId ke = b.OpOut("aten::expand", {T(ku), Ints({1, 2, 2, 3, 2}), B(false)}, Out({1, 2, 2, 3, 2}).AliasOf(k));
  ValueId kr = b.Op("aten::reshape", {T(ke), Ints({1, 4, 3, 2})}, {1, 4, 3, 2});
  ValueId a = b.Op("aten::scaled_dot_product_attention", {T(qt), T(kr), T(kr), None(), D(0.0), B(true)},
                   {1, 4, 3, 2});
  ValueId ar = b.Op("aten::reshape", {T(a), Ints({1, 3, 8})}, {1, 3, 8});
  ValueId w1 = b.Param("up", {24, 8});
  ValueId up = b.Op("aten::linear", {T(ar), T(w1), None()}, {1, 3, 24});
  b.SetHead();
  ValueId wh = b.Param("wh", {10, 24});
  ValueId logits = b.Op("aten::linear", {T(up), T(wh), None()}, {1, 3, 10});
  const ModelDims dims = ReadModelDims(b.Build(CrossEntropy(b, logits, labels), 1, 3));
  EXPECT_EQ(dims.heads, 4);
  EXPECT_EQ(dims.kv_heads, 2);
  EXPECT_EQ(dims.hidden, 8);
  EXPECT_EQ(dims.intermediate, 24);
  EXPECT_EQ(dims.vocab, 10);
}

TEST(ModelDimsTest, MissingEmbeddingOrAttentionIsAModelLoadError) {
  // x is a float input, no embedding of token ids.
  EXPECT_THROW(ReadModelDims(sim::testing::LinearCrossEntropy()), ModelLoadError);
  // An embedding of the ids, but no attention in layer 0.
  try {
    ReadModelDims(TwoLayerLm());
    FAIL() << "expected ModelLoadError";
  } catch (const ModelLoadError& e) {
    EXPECT_EQ(std::string(e.what()), "the graph has no attention in decoder layer 0");
  }
}

TEST(CheckTensorParallelDegreeTest, NamesTheFirstDimensionThatDoesNotDivide) {
  const ModelDims llama_like{.vocab = 32000, .hidden = 4096, .heads = 32, .kv_heads = 8, .intermediate = 11008,
                             .layers = 32};
  EXPECT_EQ(CheckTensorParallelDegree(llama_like, 1, true), "");
  EXPECT_EQ(CheckTensorParallelDegree(llama_like, 8, true), "");
  EXPECT_EQ(CheckTensorParallelDegree(llama_like, 3, true),
            "tensor-parallel degree 3 does not divide the 32 attention heads");
  // 16 divides the 32 query heads but not the 8 key/value heads.
  EXPECT_EQ(CheckTensorParallelDegree(llama_like, 16, true),
            "tensor-parallel degree 16 does not divide the 8 key/value heads");
  // Heads fine, hidden not: 4 heads of 3 would give hidden 12; here hidden 6.
  EXPECT_EQ(CheckTensorParallelDegree({.vocab = 8, .hidden = 6, .heads = 4, .kv_heads = 4, .intermediate = 16}, 4,
                                      true),
            "tensor-parallel degree 4 does not divide the hidden size 6");
  EXPECT_EQ(CheckTensorParallelDegree({.vocab = 8, .hidden = 8, .heads = 2, .kv_heads = 2, .intermediate = 21}, 2,
                                      true),
            "tensor-parallel degree 2 does not divide the MLP width 21");
  // The vocabulary matters only when the embedding and the head are split by it.
  const ModelDims odd_vocab{.vocab = 50257, .hidden = 768, .heads = 12, .kv_heads = 12, .intermediate = 3072};
  EXPECT_EQ(CheckTensorParallelDegree(odd_vocab, 2, true),
            "tensor-parallel degree 2 does not divide the vocabulary of 50257");
  EXPECT_EQ(CheckTensorParallelDegree(odd_vocab, 2, false), "");
  EXPECT_EQ(CheckTensorParallelDegree(llama_like, 0, true),
            "the tensor-parallel degree must be at least 1 (got 0)");
  EXPECT_EQ(CheckTensorParallelDegree(llama_like, -4, false),
            "the tensor-parallel degree must be at least 1 (got -4)");
}

// ---- Errors of EstimateRank ----

TEST(EstimateRankTest, BadPlansAreConfigErrors) {
  const Graph g = MakeTpBlock().graph;  // 2 heads, vocabulary 10
  const auto cfg = CpuConfig();
  EXPECT_THROW(EstimateRank(g, cfg, Plan(0, 1)), ConfigError);
  EXPECT_THROW(EstimateRank(g, cfg, Plan(-1, 1)), ConfigError);
  EXPECT_THROW(EstimateRank(g, cfg, Plan(1, 0)), ConfigError);
  try {
    EstimateRank(g, cfg, Plan(1, 4));
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "tensor-parallel degree 4 does not divide the 2 attention heads");
  }
  // tp within a node only.
  EXPECT_THROW(EstimateRank(g, cfg, Plan(1, 2), DistributedOptions{.gpus_per_node = 1}), ConfigError);
  EXPECT_THROW(EstimateRank(g, cfg, Plan(2, 1, DataParallelEngine::kGemini)), ConfigError);
  // An odd vocabulary stops vocab-parallel tp only.
  const Graph odd = MakeTpBlock(9).graph;
  EXPECT_THROW(EstimateRank(odd, cfg, Plan(1, 2)), ConfigError);
  EXPECT_NO_THROW(EstimateRank(odd, cfg, Plan(1, 2), DistributedOptions{.tp_vocab_parallel = false}));
  // Tensor parallelism needs the attention to split; the graph without one is not a decoder LM.
  EXPECT_THROW(EstimateRank(TwoLayerLm(), cfg, Plan(1, 2)), ModelLoadError);
}

// ---- NCCL buffers ----

TEST(NcclMemoryTest, CommunicatorsTimesChannelsTimesTwoConnections) {
  // Per connection: SIMPLE 4 MiB + LL 8*512*8*16 = 524,288 + LL128 120*640*8*8 = 4,915,200 -> 9,633,792 B.
  EXPECT_EQ(kNcclBytesPerConnection, 4'194'304 + 524'288 + 4'915'200);
  EXPECT_EQ(kNcclBytesPerConnection, 9'633'792);
  const auto a100 = *sim::FindGpu("a100-80");
  const auto h100 = *sim::FindGpu("h100-80");
  const auto l4 = *sim::FindGpu("l4-24");
  EXPECT_EQ(NcclChannels(a100), 32);
  EXPECT_EQ(NcclChannels(h100), 32);
  EXPECT_EQ(NcclChannels(l4), 4);
  EXPECT_EQ(CommunicatorsPerRank(Plan(1, 1)), 0);
  EXPECT_EQ(CommunicatorsPerRank(Plan(8, 1)), 1);
  EXPECT_EQ(CommunicatorsPerRank(Plan(1, 8)), 1);
  EXPECT_EQ(CommunicatorsPerRank(Plan(4, 2)), 2);
  EXPECT_EQ(NcclBytesPerRank(Plan(1, 1), a100), 0);
  EXPECT_EQ(NcclBytesPerRank(Plan(8, 1), a100), 616'562'688);     // 1 * 32 * 2 * 9,633,792
  EXPECT_EQ(NcclBytesPerRank(Plan(4, 2), h100), 1'233'125'376);   // 2 * 32 * 2 * 9,633,792
  EXPECT_EQ(NcclBytesPerRank(Plan(2, 1), l4), 77'070'336);        // 1 *  4 * 2 * 9,633,792
}

TEST(NcclMemoryTest, TheAssumptionStatesTheFiguresItCounts) {
  const auto l4 = *sim::FindGpu("l4-24");
  const auto a100 = *sim::FindGpu("a100-80");
  const std::string words = NcclAssumption(l4);
  EXPECT_NE(words.find(FormatBytes(NcclBytesPerRank(Plan(2, 1), l4)) + " per communicator"), std::string::npos)
      << words;
  EXPECT_NE(words.find("4 channels x 2 ring connections x " + FormatBytes(kNcclBytesPerConnection)), std::string::npos)
      << words;
  for (const char* env : {"NCCL_BUFFSIZE", "NCCL_LL_BUFFSIZE", "NCCL_LL128_BUFFSIZE", "NCCL_MAX_NCHANNELS"}) {
    EXPECT_NE(words.find(env), std::string::npos) << env;
  }
  EXPECT_NE(NcclAssumption(a100).find("32 channels"), std::string::npos);
  EXPECT_EQ(NcclRankAssumption(Plan(4, 2), a100).rfind("2 NCCL communicators on this rank, " +
                                                          FormatBytes(NcclBytesPerRank(Plan(4, 2), a100)),
                                                      0),
            0u);
}

TEST(EstimateRankTest, NcclBuffersAreFixedOverheadOnGpusOnly) {
  const Graph g = TwoLayerLm();
  const auto gpu = sim::testing::GpuConfig("a100-80");
  const RankEstimate est = EstimateRank(g, gpu, Plan(2, 1));
  EXPECT_EQ(est.nccl_bytes, 616'562'688);
  EXPECT_EQ(est.memory.fixed_overhead_bytes, gpu.target.gpu.cuda_context_bytes + 616'562'688);
  EXPECT_EQ(est.memory.nvidia_smi_bytes, est.memory.peak_reserved_bytes + est.memory.fixed_overhead_bytes);
  EXPECT_EQ(EstimateRank(g, CpuConfig(), Plan(2, 1)).nccl_bytes, 0);
}

// ---- Memory of a rank on TwoLayerLm (cpu, fp32, AdamW) ----
//
// One GPU: weights wte 144 + w0 80 + w1 80 + wh 144 = 448; states 896; inputs 96: setup 1440.
//   forward: e 96, h0 120, h1 96, logits 216, loss 4, log-probs 216: 2188; logits freed -> 1972.
//   backward: d loss 4, CE workspace 216, d logits 216: 2408 (peak); ... end: 1440 + gradients 448 = 1888.
//   optimizer (torch.optim single-tensor AdamW, in parameter order wte, w0, w1, wh): a parameter's sqrt and denom
//   while the loop's `denom` still holds the previous one's: largest for wh, 2 * 144 + w1's 80: 1888 + 368 = 2256.

TEST(EstimateRankTest, SingleGpuPlanIsTheSingleGpuEstimate) {
  const Graph g = TwoLayerLm();
  const sim::MemoryEstimate single = sim::EstimateMemory(g, CpuConfig());
  EXPECT_EQ(single.peak_allocated_bytes, 2408);
  EXPECT_EQ(single.phase_peak_bytes[kOptimizer], 2256);
  const RankEstimate one = EstimateRank(g, CpuConfig(), Plan(1, 1));
  EXPECT_EQ(one.memory.peak_allocated_bytes, 2408);
  EXPECT_TRUE(one.collectives.empty());
  EXPECT_EQ(one.plan.gpus(), 1);
}

TEST(EstimateRankTest, DdpAddsItsBucketsToTheSingleGpuPeak) {
  // dp = 2: one bucket of all gradients (448 B never reaches the 1 MiB first cap), alive for the whole step:
  // peak 2408 + 448 = 2856; optimizer peak 2256 + 448 = 2704.
  const Graph g = TwoLayerLm();
  const RankEstimate ddp = EstimateRank(g, CpuConfig(), Plan(2, 1));
  EXPECT_EQ(ddp.memory.peak_allocated_bytes, 2856);
  EXPECT_EQ(ddp.memory.phase_peak_bytes[kOptimizer], 2704);
  EXPECT_EQ(ddp.memory.at_peak[static_cast<size_t>(sim::MemoryCategory::kCommBuffers)], 448);
  EXPECT_EQ(ddp.memory.optimizer_state_bytes, 896);
  ASSERT_EQ(ddp.collectives.size(), 1u);
  EXPECT_EQ(ddp.collectives[0].kind, CollectiveKind::kAllReduce);
  EXPECT_EQ(ddp.collectives[0].bytes, 448);
  EXPECT_EQ(ddp.collectives[0].group_size, 2);
  EXPECT_FALSE(ddp.collectives[0].crosses_nodes);
  // 16 ranks of 8 GPUs: the data-parallel group spans nodes.
  EXPECT_TRUE(EstimateRank(g, CpuConfig(), Plan(16, 1)).collectives.at(0).crosses_nodes);
}

TEST(EstimateRankTest, DdpAccumulatesAsOneGpuDoesBesideItsBuckets) {
  // Every micro-batch but the last runs under no_sync(): the gradients of the first (448 B) are alive through
  // the second, as on one GPU, whose backward peak becomes 2408 + 448 = 2856; DDP adds its bucket (448): 3304.
  const Graph g = TwoLayerLm();
  sim::TrainingConfig accum = CpuConfig();
  accum.grad_accum = 2;
  const sim::MemoryEstimate single = sim::EstimateMemory(g, accum);
  EXPECT_EQ(single.peak_allocated_bytes, 2856);
  const RankEstimate ddp = EstimateRank(g, accum, Plan(2, 1));
  EXPECT_EQ(ddp.memory.peak_allocated_bytes, 3304);
  for (size_t phase : {kForward, kBackward, kOptimizer}) {
    EXPECT_EQ(ddp.memory.phase_peak_bytes[phase], single.phase_peak_bytes[phase] + 448) << phase;
  }
  // ZeRO-1 is DDP's gradient path: the same accumulation, rank 0's states (448 B fewer than DDP's).
  const RankEstimate z1 = EstimateRank(g, accum, Plan(2, 1, DataParallelEngine::kZero1));
  EXPECT_EQ(z1.memory.peak_allocated_bytes, 2856);
}

// The message names the engine and why, in one line.
std::string LoopRefusal(const sim::TrainingConfig& config, const ParallelPlan& plan) {
  try {
    EstimateRank(TwoLayerLm(), config, plan);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(EstimateRankTest, OptimizerInBackwardIsRefusedWhereTheEngineReducesAfterTheHook) {
  sim::TrainingConfig c = CpuConfig();
  c.optimizer_in_backward = true;
  const std::string ddp = LoopRefusal(c, Plan(2, 1));
  EXPECT_NE(ddp.find("under DDP"), std::string::npos) << ddp;
  EXPECT_NE(ddp.find("before DDP's all-reduce"), std::string::npos) << ddp;
  const std::string zero1 = LoopRefusal(c, Plan(2, 1, DataParallelEngine::kZero1));
  EXPECT_NE(zero1.find("ZeroRedundancyOptimizer"), std::string::npos) << zero1;
  for (const std::string& why : {ddp, zero1}) EXPECT_EQ(why.find('\n'), std::string::npos) << why;
  // One rank without data parallelism has no reducer: the single-GPU step.
  EXPECT_EQ(EstimateRank(TwoLayerLm(), c, Plan(1, 1)).memory.peak_allocated_bytes,
            sim::EstimateMemory(TwoLayerLm(), c).peak_allocated_bytes);
}

sim::TrainingConfig ChunkedLoss(int chunks) {
  sim::TrainingConfig c = CpuConfig();
  c.loss = sim::LossVariant::kChunked;
  c.loss_chunks = chunks;
  return c;
}

TEST(EstimateRankTest, DdpRunsTheChunkedLossAsOneGpuDoesBesideItsBuckets) {
  // TpBlock (3 positions) with 3 loss chunks: DDP adds its one bucket of all gradients (3808 B) to every phase.
  const TpBlock t = MakeTpBlock();
  const sim::TrainingConfig c = ChunkedLoss(3);
  const sim::MemoryEstimate single = sim::EstimateMemory(t.graph, c);
  const RankEstimate ddp = EstimateRank(t.graph, c, Plan(2, 1));
  for (size_t phase : {kForward, kBackward, kOptimizer}) {
    EXPECT_EQ(ddp.memory.phase_peak_bytes[phase], single.phase_peak_bytes[phase] + 3808) << phase;
  }
  EXPECT_EQ(EstimateRank(t.graph, c, Plan(2, 1, DataParallelEngine::kZero1)).memory.gradients_bytes,
            single.gradients_bytes);
}

TEST(EstimateRankTest, FsdpReducesTheChunkedLossHeadGradientOnce) {
  // The chunks' LM head weight gradients are summed before the root group's post-backward: one reduce-scatter
  // input of the root, and the optimizer steps the same sharded gradients as after the graph's own loss.
  const TpBlock t = MakeTpBlock();
  const RankEstimate chunked = EstimateRank(t.graph, ChunkedLoss(3), Plan(2, 1, DataParallelEngine::kFsdp2Zero3));
  const RankEstimate standard = EstimateRank(t.graph, CpuConfig(), Plan(2, 1, DataParallelEngine::kFsdp2Zero3));
  EXPECT_EQ(chunked.memory.phase_peak_bytes[kOptimizer], standard.memory.phase_peak_bytes[kOptimizer]);
  const auto trace = TraceOf(chunked.memory.simulation->timeline,
                             [](sim::MemoryCategory c) { return c == sim::MemoryCategory::kCommBuffers; });
  int root_reductions = 0;
  for (const auto& line : trace) root_reductions += line.starts_with("backward +FSDP2 reduce-scatter input (root)");
  EXPECT_EQ(root_reductions, 1);
}

TEST(EstimateRankTest, FsdpRootReshardsBeforeAChunkedLossAndGathersAgainAfterItsBackward) {
  // The chunked loss runs after the model returns: the root's post-forward (reshard_after_forward=True) frees its
  // unsharded parameters before the labels are shifted, and its pre-backward (a hook on the logit chunks) gathers
  // them again only once every chunk's cross-entropy backward has run.
  const TpBlock t = MakeTpBlock();
  const RankEstimate z3 = EstimateRank(t.graph, ChunkedLoss(3), Plan(2, 1, DataParallelEngine::kFsdp2Zero3));
  const auto trace = TraceOf(z3.memory.simulation->timeline, [](sim::MemoryCategory) { return true; });
  auto first = [&](const std::string& prefix) {
    for (size_t i = 0; i < trace.size(); ++i) {
      if (trace[i].starts_with(prefix)) return static_cast<int>(i);
    }
    return -1;
  };
  auto last = [&](const std::string& prefix) {
    for (size_t i = trace.size(); i-- > 0;) {
      if (trace[i].starts_with(prefix)) return static_cast<int>(i);
    }
    return -1;
  };
  const int labels = first("forward +shifted labels");
  ASSERT_GE(labels, 0);
  int gathered = 0;  // unsharded parameters live when the loss starts
  for (int i = 0; i < labels; ++i) {
    if (trace[i].starts_with("forward +unsharded param")) ++gathered;
    if (trace[i].starts_with("forward -unsharded param")) --gathered;
  }
  EXPECT_EQ(gathered, 0);
  const int root_gather = first("backward +FSDP2 all-gather output (root)");
  EXPECT_GT(root_gather, last("backward +d log_softmax chunk"));
  EXPECT_GT(root_gather, 0);
}

TEST(EstimateRankTest, ChunkedLossIsRefusedWhereTheLmHeadIsNotLocal) {
  const TpBlock t = MakeTpBlock();
  auto refusal = [&](const sim::TrainingConfig& c, const ParallelPlan& plan) -> std::string {
    try {
      EstimateRank(t.graph, c, plan);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "";
  };
  const std::string tp = refusal(ChunkedLoss(3), Plan(1, 2));
  EXPECT_NE(tp.find("--loss chunked-3 is not modelled with tensor parallelism"), std::string::npos) << tp;
  EXPECT_NE(tp.find("vocab-split"), std::string::npos) << tp;
  sim::TrainingConfig fused = sim::testing::GpuConfig("a100-80");  // Liger's kernels run on GPUs only
  fused.loss = sim::LossVariant::kFusedLinear;
  const std::string ddp = refusal(fused, Plan(2, 1));
  EXPECT_NE(ddp.find("--loss fused-linear is not modelled with a parallel engine"), std::string::npos) << ddp;
  for (const std::string& why : {tp, ddp}) EXPECT_EQ(why.find('\n'), std::string::npos) << why;
}

TEST(EstimateRankTest, ZeroOneKeepsStatesOfTheOwnedParametersOnly) {
  // Partition over 2 ranks (numel): wte 36 -> r0, wh 36 -> r1, w0 20 -> r0, w1 20 -> r1; both ranks hold
  // 224 B, so the reported rank is rank 0: states of wte and w0 only, 2 * (144 + 80) = 448 B (DDP: 896).
  //   setup: weights 448 + bucket 448 + states 448 + inputs 96 = 1440, the single-GPU setup again:
  //   peak 2408; optimizer: end 1888; the owned parameters wte then w0: w0's sqrt and denom (160) with wte's denom
  //   (144) still held -> 2192.
  const Graph g = TwoLayerLm();
  const RankEstimate z1 = EstimateRank(g, CpuConfig(), Plan(2, 1, DataParallelEngine::kZero1));
  EXPECT_EQ(z1.memory.optimizer_state_bytes, 448);
  EXPECT_EQ(z1.memory.weights_bytes, 448);
  EXPECT_EQ(z1.memory.peak_allocated_bytes, 2408);
  EXPECT_EQ(z1.memory.phase_peak_bytes[kOptimizer], 2192);
  // The DDP bucket all-reduce, then the owners' broadcast of updated parameters (an all-gather's volume: 448 B).
  ASSERT_EQ(z1.collectives.size(), 2u);
  EXPECT_EQ(z1.collectives[1].kind, CollectiveKind::kAllGather);
  EXPECT_EQ(z1.collectives[1].bytes, 448);
  EXPECT_EQ(z1.collectives[1].phase, StepPhase::kOptimizer);
  // 4 ranks: wte, wh, w0, w1 one each; the largest is rank 0 (wte): states 2 * 144 = 288.
  EXPECT_EQ(EstimateRank(g, CpuConfig(), Plan(4, 1, DataParallelEngine::kZero1)).memory.optimizer_state_bytes, 288);
}

TEST(EstimateRankTest, FsdpRankMatchesTheHooksHandCount) {
  // See fsdp_test.cc: ZeRO-3 peaks at 2208, ZeRO-2 at 2304 over 2 ranks.
  const Graph g = TwoLayerLm();
  const RankEstimate z3 = EstimateRank(g, CpuConfig(), Plan(2, 1, DataParallelEngine::kFsdp2Zero3));
  EXPECT_EQ(z3.memory.peak_allocated_bytes, 2208);
  EXPECT_EQ(z3.memory.weights_bytes, 248);
  EXPECT_EQ(z3.collectives.size(), 3u);  // forward all-gather, backward all-gather, reduce-scatter
  const RankEstimate z2 = EstimateRank(g, CpuConfig(), Plan(2, 1, DataParallelEngine::kFsdp2Zero2));
  EXPECT_EQ(z2.memory.peak_allocated_bytes, 2304);
  EXPECT_EQ(z2.collectives.size(), 2u);
}

TEST(EstimateRankTest, TensorParallelAppendsItsCollectives) {
  // TpBlock with tp = 2 (vocab-parallel): 8 all-reduces (tensor_parallel_test.cc), after the (empty) dp list.
  const TpBlock t = MakeTpBlock();
  const RankEstimate est = EstimateRank(t.graph, CpuConfig(), Plan(1, 2));
  EXPECT_EQ(est.collectives.size(), 8u);
  // The rank's weights: wpe 96 + wte 160 + q/k/v/o 4 * 128 + up 512 + down 512 + head 160 = 1952
  // (one GPU: 96 + 320 + 4 * 256 + 1024 + 1024 + 320 = 3808).
  EXPECT_EQ(est.memory.weights_bytes, 1952);
  EXPECT_EQ(sim::EstimateMemory(t.graph, CpuConfig()).weights_bytes, 3808);
  // dp = 2 x tp = 2 with DDP adds one bucket of the rank's gradients (1952 B) and its all-reduce.
  const RankEstimate hybrid = EstimateRank(t.graph, CpuConfig(), Plan(2, 2));
  EXPECT_EQ(hybrid.collectives.size(), 9u);
  EXPECT_EQ(hybrid.collectives[0].bytes, 1952);
  EXPECT_EQ(hybrid.memory.peak_allocated_bytes, est.memory.peak_allocated_bytes + 1952);
}

TEST(EstimateRankTest, TensorParallelAllReducesFollowTheAutocastDtype) {
  // The row-parallel o_proj's partial output, [1,3,8]: fp32 (96 B) in an fp32 step, bf16 (48 B) under autocast.
  const TpBlock t = MakeTpBlock();
  auto o_proj_bytes = [&](sim::Precision precision) {
    sim::TrainingConfig config = CpuConfig();
    config.precision = precision;
    for (const Collective& c : EstimateRank(t.graph, config, Plan(1, 2)).collectives) {
      if (c.what.find("o_proj") != std::string::npos) return c.bytes;
    }
    ADD_FAILURE() << "no o_proj all-reduce";
    return int64_t{0};
  };
  EXPECT_EQ(o_proj_bytes(sim::Precision::kFp32), 96);
  EXPECT_EQ(o_proj_bytes(sim::Precision::kBf16Autocast), 48);
}

// TpBlock as an export traced with 16-bit weights records it: every floating value is bf16 in that run.
Graph TpBlockRunInBf16() {
  const Graph g = MakeTpBlock().graph;
  std::vector<TensorValue> values = g.values();
  for (TensorValue& v : values) {
    if (IsFloating(v.dtype)) v.dtype_bf16_weights = DType::kBF16;
  }
  return Graph(values, g.nodes(), g.params(), g.inputs(), g.loss(), g.batch(), g.seq());
}

TEST(EstimateRankTest, FsdpMixedPrecisionAppliesUnderTensorParallelism) {
  // FSDP2 x TP (dp 2 x tp 2) with param bf16 / reduce fp32: the rank computes in bf16, so the tensor-parallel
  // all-reduces move bf16 (o_proj's partial output 48 B instead of 96) and the FSDP2 all-gathers half the bytes;
  // the resident shards stay fp32.
  const Graph g = TpBlockRunInBf16();
  const ParallelPlan plan = Plan(2, 2, DataParallelEngine::kFsdp2Zero3);
  sim::TrainingConfig policy = CpuConfig();
  policy.fsdp_param_dtype = DType::kBF16;
  policy.fsdp_reduce_dtype = DType::kF32;
  const RankEstimate plain = EstimateRank(g, CpuConfig(), plan);
  const RankEstimate mixed = EstimateRank(g, policy, plan);
  auto bytes_of = [](const RankEstimate& e, const std::string& what) {
    for (const Collective& c : e.collectives) {
      if (c.what.find(what) != std::string::npos) return c.bytes;
    }
    ADD_FAILURE() << "no collective " << what;
    return int64_t{0};
  };
  EXPECT_EQ(bytes_of(plain, "o_proj"), 96);
  EXPECT_EQ(bytes_of(mixed, "o_proj"), 48);
  EXPECT_EQ(bytes_of(mixed, "all-gather (forward)") * 2, bytes_of(plain, "all-gather (forward)"));
  EXPECT_EQ(mixed.memory.weights_bytes, plain.memory.weights_bytes);
  EXPECT_LT(mixed.memory.peak_allocated_bytes, plain.memory.peak_allocated_bytes);
}

}  // namespace
}  // namespace llmem::dist
