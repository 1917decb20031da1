#include "distributed/rank_estimate.h"

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <optional>

#include "distributed/chunk_manager.h"
#include "distributed/ddp.h"
#include "distributed/fsdp.h"
#include "distributed/model_dims.h"
#include "distributed/nccl_memory.h"
#include "distributed/sharded_params.h"
#include "distributed/tensor_parallel.h"
#include "distributed/zero_redundancy.h"
#include "graph/error.h"

namespace llmem::dist {
namespace {

// The tensor-parallel collectives' copies plus the data-parallel engine's memory, as one set of hooks.
class CombinedHooks : public sim::StepHooks {
 public:
  CombinedHooks(const TensorParallelHooks& tp, sim::StepHooks& dp) : tp_(tp), dp_(dp) {}
  int64_t ResidentParamBytes(const Parameter& p, int64_t full) const override {
    return dp_.ResidentParamBytes(p, full);
  }
  int64_t OptimizedBytes(const Parameter& p, int64_t full) const override { return dp_.OptimizedBytes(p, full); }
  bool ComputesWithLowPrecisionWeights() const override { return dp_.ComputesWithLowPrecisionWeights(); }
  void OnSetup(sim::StepMemory& mem) override { dp_.OnSetup(mem); }
  void OnRegionStart(sim::Phase ph, const Region& r, sim::StepMemory& mem) override { dp_.OnRegionStart(ph, r, mem); }
  void OnRegionEnd(sim::Phase ph, const Region& r, sim::StepMemory& mem) override { dp_.OnRegionEnd(ph, r, mem); }
  bool OutputReplacedByCollective(const OpNode& n) const override { return tp_.OutputReplacedByCollective(n); }
  bool InputGradReplacedByCollective(const OpNode& n, size_t i) const override {
    return tp_.InputGradReplacedByCollective(n, i);
  }
  int64_t ExtraTransientBytes(const OpNode& n, sim::Phase ph) const override { return tp_.ExtraTransientBytes(n, ph); }
  int64_t InputGradBytes(const OpNode& n, size_t i, int64_t bytes) const override {
    return tp_.InputGradBytes(n, i, bytes);
  }
  void OnModelForwardEnd(sim::StepMemory& mem) override { dp_.OnModelForwardEnd(mem); }
  void OnModelOutputsGrad(sim::StepMemory& mem) override { dp_.OnModelOutputsGrad(mem); }
  void OnBackwardEnd(sim::StepMemory& mem) override { dp_.OnBackwardEnd(mem); }
  void OnOptimizerStepEnd(sim::StepMemory& mem) override { dp_.OnOptimizerStepEnd(mem); }
  std::string UnmodelledLoop(const sim::LoopPlan& loop) const override {
    const std::string dp = dp_.UnmodelledLoop(loop);
    return dp.empty() ? tp_.UnmodelledLoop(loop) : dp;
  }
  std::string UnmodelledLoss(const sim::LossPlan& loss) const override {
    const std::string dp = dp_.UnmodelledLoss(loss);
    return dp.empty() ? tp_.UnmodelledLoss(loss) : dp;
  }
  void OnNextMicroBatch(sim::StepMemory& mem) override { dp_.OnNextMicroBatch(mem); }
  bool RunsPostAccumulateGradHooks() const override { return dp_.RunsPostAccumulateGradHooks(); }

 private:
  const TensorParallelHooks& tp_;
  sim::StepHooks& dp_;
};

}  // namespace

bool RunsFsdp2(const ParallelPlan& plan) {
  return plan.dp > 1 &&
         (plan.engine == DataParallelEngine::kFsdp2Zero2 || plan.engine == DataParallelEngine::kFsdp2Zero3);
}

void CheckFsdpMixedPrecision(const sim::Recipe& recipe, const ParallelPlan& plan) {
  if ((recipe.fsdp_param_dtype || recipe.fsdp_reduce_dtype) && !RunsFsdp2(plan)) {
    throw ConfigError("--fsdp-param-dtype and --fsdp-reduce-dtype set FSDP2's MixedPrecisionPolicy: they need "
                      "--engine zero2 or zero3 with --dp 2 or more");
  }
}

std::string DataParallelLoopAssumption(const sim::Recipe& recipe, const std::vector<DataParallelEngine>& engines) {
  const auto has = [&](std::initializer_list<DataParallelEngine> some) {
    return std::any_of(engines.begin(), engines.end(),
                       [&](DataParallelEngine e) { return std::find(some.begin(), some.end(), e) != some.end(); });
  };
  const bool ddp = has({DataParallelEngine::kDdp, DataParallelEngine::kZero1});
  const bool fsdp = has({DataParallelEngine::kFsdp2Zero2, DataParallelEngine::kFsdp2Zero3});
  std::vector<std::string> parts;
  if (recipe.grad_accum > 1 && ddp) {
    parts.push_back("DDP and ZeRO-1 run every micro-batch but the last under no_sync() (accelerate's accumulate(), "
                    "as HF Trainer does): the gradients accumulate unreduced in .grad");
  }
  if (recipe.grad_accum > 1 && fsdp && recipe.fsdp_reduce_every_micro_batch) {
    parts.push_back("FSDP2 reduce-scatters every micro-batch into the sharded gradients (torchtitan's loop)");
  } else if (recipe.grad_accum > 1 && fsdp) {
    parts.push_back("FSDP2 runs every micro-batch but the last with set_requires_gradient_sync(False) "
                    "(accelerate's no_sync(), as HF Trainer does): the unsharded gradients accumulate until the last "
                    "backward reduce-scatters them (--fsdp-reduce-every-micro-batch: torchtitan's loop)");
  }
  if (recipe.optimizer_in_backward && fsdp) {
    parts.push_back("with --optimizer-in-backward, FSDP2 steps each shard in its post-accumulate-grad hook right "
                    "after the reduce-scatter (torchtune)");
  }
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : "; ") + p;
  return out;
}

RankEstimate EstimateRank(const Graph& graph, const sim::TrainingConfig& config, const ParallelPlan& plan,
                          const DistributedOptions& options, const TensorParallelRank* tp_rank) {
  if (plan.dp < 1 || plan.tp < 1) {
    throw ConfigError("parallel degrees must be at least 1 (got dp " + std::to_string(plan.dp) + ", tp " +
                      std::to_string(plan.tp) + ")");
  }
  if (plan.tp > 1) {
    const std::string why = CheckTensorParallelDegree(ReadModelDims(graph), plan.tp, options.tp_vocab_parallel);
    if (!why.empty()) throw ConfigError(why);
    if (options.gpus_per_node > 0 && plan.tp > options.gpus_per_node) {
      throw ConfigError("tensor-parallel degree " + std::to_string(plan.tp) + " exceeds the " +
                        std::to_string(options.gpus_per_node) + " GPUs of a node");
    }
  }
  CheckFsdpMixedPrecision(config, plan);
  RankEstimate out;
  out.plan = plan;
  std::optional<TensorParallelRank> made;
  if (plan.tp > 1 && !tp_rank) made = ShardForTensorParallel(graph, plan.tp, options.tp_vocab_parallel);
  const TensorParallelRank* tp = plan.tp > 1 ? (tp_rank ? tp_rank : &*made) : nullptr;
  const Graph& rank_graph = tp ? tp->graph : graph;
  TensorParallelHooks tp_hooks(tp);
  const auto params = ManagedParams(rank_graph, config.precision);
  // The data-parallel group spans nodes when the GPUs do not fit in one node.
  const bool dp_crosses_nodes = options.gpus_per_node > 0 && plan.gpus() > options.gpus_per_node;
  std::unique_ptr<sim::StepHooks> dp_hooks;
  const int dp = plan.dp;
  switch (plan.engine) {
    case DataParallelEngine::kDdp: {
      auto buckets = dp > 1 ? DdpBucketBytes(params) : std::vector<int64_t>{};
      out.collectives = DdpCollectives(buckets, dp, dp_crosses_nodes);
      dp_hooks = std::make_unique<DdpHooks>(std::move(buckets));
      break;
    }
    case DataParallelEngine::kZero1: {
      auto buckets = DdpBucketBytes(params);
      out.collectives = DdpCollectives(buckets, dp, dp_crosses_nodes);
      // After its local step each rank broadcasts the parameters it owns: an all-gather's volume in all.
      int64_t param_bytes = 0;
      for (const auto& p : params) param_bytes += p.bytes();
      out.collectives.push_back(Collective{.kind = CollectiveKind::kAllGather,
                                           .bytes = param_bytes,
                                           .group_size = dp,
                                           .crosses_nodes = dp_crosses_nodes,
                                           .phase = StepPhase::kOptimizer,
                                           .overlapped = false,
                                           .count = 1,
                                           .what = "ZeRO-1 broadcast of updated parameters"});
      dp_hooks = std::make_unique<ZeroRedundancyHooks>(std::move(buckets), params, dp);
      break;
    }
    case DataParallelEngine::kFsdp2Zero2:
    case DataParallelEngine::kFsdp2Zero3: {
      const bool zero3 = plan.engine == DataParallelEngine::kFsdp2Zero3;
      const sim::FsdpPrecision precision = sim::FsdpPrecisionOf(config);
      // fully_shard shards every parameter of a module, frozen ones too (a LoRA base); only gradients are reduced.
      auto groups = FsdpGroups(ManagedParams(rank_graph, config.precision, /*with_frozen=*/true), dp,
                               rank_graph.num_layers(), precision);
      out.collectives = FsdpCollectives(groups, dp, zero3, dp_crosses_nodes);
      const FsdpLoop loop{.accumulating = config.grad_accum > 1,
                          .reduce_every_micro_batch = config.fsdp_reduce_every_micro_batch,
                          .optimizer_in_backward = config.optimizer_in_backward};
      dp_hooks = std::make_unique<Fsdp2Hooks>(std::move(groups), dp, zero3, /*gloo_copies=*/config.target.is_cpu,
                                              precision, loop);
      break;
    }
    case DataParallelEngine::kGemini: {
      if (plan.tp > 1) throw ConfigError("chunk-based ZeRO is modelled without tensor parallelism");
      if (config.precision == sim::Precision::kFp32) {
        throw ConfigError("chunk-based ZeRO (Gemini) trains in 16-bit: use a bf16 or fp16 precision");
      }
      ChunkSearchConfig search;
      search.search_interval = ReadModelDims(rank_graph).hidden;
      auto layout = PackChunks(rank_graph, params, dp, search);
      out.collectives = ChunkCollectives(layout, dp, dp_crosses_nodes);
      dp_hooks = std::make_unique<GeminiHooks>(rank_graph, params, std::move(layout), dp, config.optimizer);
      break;
    }
  }
  CombinedHooks hooks(tp_hooks, *dp_hooks);
  out.nccl_bytes = config.target.is_cpu ? 0 : NcclBytesPerRank(plan, config.target.gpu);
  out.memory = sim::EstimateMemory(rank_graph, config, &hooks, out.nccl_bytes);
  if (tp) {  // sized by the dtypes of the simulated step (16-bit partial outputs under autocast)
    const CollectiveList tp_collectives = TensorParallelCollectives(*tp, out.memory.simulation->value_dtypes);
    out.collectives.insert(out.collectives.end(), tp_collectives.begin(), tp_collectives.end());
  }
  return out;
}

}  // namespace llmem::dist
