// Chunk-based ZeRO-3 as in Colossal-AI Gemini (the engine the LLMem paper measured), as one rank sees it.
// Sources: ../shared/reference/gpu-memory-facts.md §4.5 (ColossalAI colossalai/zero/gemini/chunk/search_utils.py,
// GeminiPlugin defaults, GeminiDDP / GeminiOptimizer), placement "static" with shard_param_frac 1.0.
//
// Parameters are packed, in first-use order, into chunks of one size found by a search: start at the larger of
// the minimum chunk size (32 Mi elements) and the largest parameter (ignoring outliers beyond mean + 3 sigma),
// rounded up to the search interval (the hidden size), try every size up to 32 Mi elements more in steps of the
// interval, keep the one wasting the fewest elements in chunk tails (a parameter that does not fit opens a new
// chunk), and round it up to a multiple of the data-parallel degree. A model smaller than the minimum chunk is
// one chunk kept gathered on every rank.
//
// Per rank: each chunk's 16-bit shard (chunk / N), its fp32 master shard, and the fused Adam's two fp32 states
// per master element (HybridAdam: no step temporaries beyond one fp32 gradient shard at a time). Compute uses the
// 16-bit parameters directly (no autocast weight copies). A chunk is all-gathered (16-bit, whole chunk) when the
// first region using it starts and freed when the last one ends, in forward and again in backward; each gradient
// is copied into the gathered chunk as soon as autograd produces it (reuse_fp16_chunk), and the chunk is
// reduce-scattered into its shard once all its gradients are in.
#pragma once

#include <cstdint>
#include <set>
#include <vector>

#include "distributed/collective.h"
#include "distributed/sharded_params.h"
#include "simulator/step_hooks.h"
#include "simulator/training_config.h"

namespace llmem::dist {

struct ChunkSearchConfig {
  int64_t min_chunk_numel = int64_t{32} << 20;     // min_chunk_size_m = 32
  int64_t search_range_numel = int64_t{32} << 20;  // search_range_m = 32
  int64_t search_interval = 1024;                  // the hidden size when known
  bool filter_outliers = true;                     // ignore params beyond mean + 3 sigma in the search
};

struct Chunk {
  std::vector<size_t> params;  // indices into the ManagedParam list, in packing order
  int64_t numel = 0;           // the chunk size (all chunks share it, except a dedicated chunk of a huge param)
  int first_region = 0;        // forward region order of its first and last use (embedding 0, layer i = i + 1,
  int last_region = 0;         // head = layers + 1)
};

struct ChunkLayout {
  int64_t chunk_numel = 0;
  bool keep_gathered = false;  // the whole model is smaller than one chunk: replicated, never sharded
  std::vector<Chunk> chunks;
  int64_t wasted_numel = 0;    // unused tail elements over all chunks
};

// The chunk size the search picks for parameters of these sizes (first-use order).
int64_t SearchChunkNumel(const std::vector<int64_t>& numels, int dp, const ChunkSearchConfig& config);

// Packs `params` into chunks; regions come from the graph's uses of each parameter.
ChunkLayout PackChunks(const Graph& graph, const std::vector<ManagedParam>& params, int dp,
                       const ChunkSearchConfig& config);

CollectiveList ChunkCollectives(const ChunkLayout& layout, int dp, bool crosses_nodes);

// Gemini's own optimizers (HybridAdam, SGD over the fp32 master chunks) are the ones modelled.
bool GeminiModelsOptimizer(sim::OptimizerKind optimizer);

class GeminiHooks : public sim::StepHooks {
 public:
  GeminiHooks(const Graph& graph, std::vector<ManagedParam> params, ChunkLayout layout, int dp,
              sim::OptimizerKind optimizer);

  int64_t ResidentParamBytes(const Parameter& p, int64_t full_bytes) const override;
  int64_t OptimizedBytes(const Parameter& p, int64_t full_bytes) const override;
  bool ComputesWithLowPrecisionWeights() const override { return true; }
  void OnSetup(sim::StepMemory& mem) override;
  void OnRegionStart(sim::Phase phase, const Region& region, sim::StepMemory& mem) override;
  void OnRegionEnd(sim::Phase phase, const Region& region, sim::StepMemory& mem) override;
  void OnOptimizerStepEnd(sim::StepMemory& mem) override;
  std::string UnmodelledLoop(const sim::LoopPlan& loop) const override;
  std::string UnmodelledLoss(const sim::LossPlan& loss) const override;

 private:
  int RegionOrder(const Region& r) const;
  int64_t ShardNumel(const Chunk& c) const;

  std::vector<ManagedParam> params_;
  ChunkLayout layout_;
  int dp_;
  int num_layers_;
  int optimizer_states_;
  std::set<int32_t> managed_values_;
  std::vector<int64_t> gathered_;  // per chunk: live gathered block, -1 if none
};

}  // namespace llmem::dist
