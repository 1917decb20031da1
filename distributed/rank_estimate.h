// One rank's memory under a parallel plan: the tensor-parallel split of the graph, then the data-parallel
// engine's hooks, run through the single-GPU simulator and allocator models. The rank reported is the one
// that peaks (rank 0 for FSDP's padded shards; the largest optimizer partition for ZeRO-1).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distributed/collective.h"
#include "distributed/parallel_plan.h"
#include "distributed/tensor_parallel.h"
#include "graph/graph.h"
#include "simulator/memory_estimate.h"
#include "simulator/training_config.h"

namespace llmem::dist {

struct DistributedOptions {
  bool tp_vocab_parallel = true;  // split the token embedding and the LM head by vocabulary
  int gpus_per_node = 8;          // ranks of one node; tensor-parallel groups stay within a node
};

struct RankEstimate {
  ParallelPlan plan;
  sim::MemoryEstimate memory;
  CollectiveList collectives;
  int64_t nccl_bytes = 0;  // outside the allocator, included in memory.fixed_overhead_bytes
};

// True when the plan's data parallelism is FSDP2 (ZeRO-2 or ZeRO-3), the only engine MixedPrecisionPolicy exists
// for; CheckFsdpMixedPrecision throws ConfigError for a policy on any other plan (one GPU included). With tensor
// parallelism the policy applies unchanged: fully_shard gathers each DTensor parameter's local (tensor-parallel)
// shard over the data-parallel ranks in param_dtype and wraps it back into a DTensor of the tensor-parallel
// placements (torch 2.11 _fsdp_param.py init_unsharded_param), so the rank graph computes in param_dtype and its
// collectives move 16-bit activations and activation gradients.
bool RunsFsdp2(const ParallelPlan& plan);
void CheckFsdpMixedPrecision(const sim::Recipe& recipe, const ParallelPlan& plan);

// The training loop the data-parallel `engines` are estimated with under the recipe's gradient accumulation or
// optimizer in backward, in one line ("" when the recipe has neither or no engine loops differently).
std::string DataParallelLoopAssumption(const sim::Recipe& recipe, const std::vector<DataParallelEngine>& engines);

// Throws ConfigError for a plan the model or the engine cannot run (degrees that do not divide the model).
// `tp_rank`: the tensor-parallel split of `graph` for plan.tp when the caller already made it (a sweep reuses
// one per degree); made here otherwise.
RankEstimate EstimateRank(const Graph& graph, const sim::TrainingConfig& config, const ParallelPlan& plan,
                          const DistributedOptions& options = {}, const TensorParallelRank* tp_rank = nullptr);

}  // namespace llmem::dist
