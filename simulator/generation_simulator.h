// Hugging Face generation (greedy GenerationMixin.generate with a DynamicCache, transformers 4.57) as memory
// timelines: the prefill of B x P prompt tokens and the last decode step, where the cache is longest.
//
// Each forward is graph/generation_forward.h's rewrite of the export's graph, run by the step executor under
// torch.no_grad() (nothing saved, eager lifetimes); the cache entries of earlier steps are its inputs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "graph/generation_forward.h"
#include "graph/graph.h"
#include "simulator/memory_estimate.h"
#include "simulator/step_hooks.h"
#include "simulator/training_config.h"

namespace llmem::sim {

struct GenerationRequest {
  int64_t batch = 1;
  int64_t prompt = 0;      // tokens per sequence
  int64_t new_tokens = 0;  // generated per sequence (min_new_tokens = max_new_tokens)
  GenerationLoop loop;      // what the model's loop does around its forward (graph/generation_forward.h)
};

struct GenerationEstimate {
  MemoryEstimate prefill;                // the prompt's forward
  std::optional<MemoryEstimate> decode;  // the last decode step (P + N - 2 tokens cached); none for N = 1
  Graph prefill_graph;                   // the forwards simulated (graph/generation_forward.h), for their costs
  std::optional<Graph> decode_graph;
  int64_t cache_bytes = 0;               // the cache after the last step: P + N - 1 tokens per sequence
  std::vector<ValueId> cache_values;     // prefill_graph's cache entries after the prompt: each layer's keys, then
                                         // values, as the forward made them ([B, kv_heads, P, D])
  // The phase with the higher allocated peak.
  const MemoryEstimate& peak() const {
    return decode && decode->peak_allocated_bytes > prefill.peak_allocated_bytes ? *decode : prefill;
  }
  // The caching allocator keeps the prefill's segments through the decode steps (generate() never empties its
  // cache), so the process reserves at least the larger phase's reserved peak; each phase is simulated on a fresh
  // allocator, so this is a lower bound of the run's reserved peak.
  int64_t peak_reserved_bytes() const {
    return decode ? std::max(prefill.peak_reserved_bytes, decode->peak_reserved_bytes) : prefill.peak_reserved_bytes;
  }
  int64_t nvidia_smi_bytes() const { return peak_reserved_bytes() + prefill.fixed_overhead_bytes; }
  bool fits() const {
    return prefill.fits && (!decode || decode->fits) &&
           (prefill.capacity_bytes == 0 || nvidia_smi_bytes() <= prefill.capacity_bytes);
  }
};

// One forward of the loop on one device: the step executor's timeline of `fw` with `hooks` (a parallel engine's; null
// for one GPU), its invariants checked; `outside_allocator_bytes` as EstimateFromSimulation's.
MemoryEstimate SimulateGenerationForward(const GenerationForward& fw, const TrainingConfig& config,
                                         StepHooks* hooks = nullptr, int64_t outside_allocator_bytes = 0);

// How each forward is simulated: one GPU's SimulateGenerationForward by default; a parallel method first rewrites
// fw.graph to one rank's shapes (keeping its values' ids), so the estimate, the cache and the graphs kept are the
// rank's.
using GenerationForwardSimulator = std::function<MemoryEstimate(GenerationForward& fw, const TrainingConfig& config)>;

// The export's graph of one generation forward: `tokens` new tokens per sequence after `past` cached ones
// (DecoderModel::BuildGenerationGraph). Only a graph that carries its cache (Graph::kv_cache) depends on `past`.
using GenerationGraphAt = std::function<Graph(int64_t batch, int64_t tokens, int64_t past)>;

// `graph_at` builds each forward's graph. config.precision is the weights'
// dtype (fp32, or bf16 on a bf16 export). Throws ConfigError for a request out of range or a graph the generation
// rewrite does not take.
GenerationEstimate EstimateGeneration(const GenerationGraphAt& graph_at,
                                      const GenerationRequest& request, const TrainingConfig& config,
                                      const GenerationForwardSimulator& simulate = {});

}  // namespace llmem::sim
