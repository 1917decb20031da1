// The memory timeline of one training step: a sequence of block allocations and frees, each tagged with what the
// block holds, the phase and the op that made it. Produced by SimulateTrainingStep, consumed by the allocator
// models (EstimateMemory). Plain data.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "graph/graph.h"

namespace llmem::sim {

enum class MemoryCategory : uint8_t {
  kWeights,          // parameters and buffers
  kGradients,        // parameter gradients (.grad)
  kOptimizerState,   // exp_avg / exp_avg_sq / momentum buffers
  kInputs,           // token ids and labels
  kActivations,      // forward values of the transformer body (embeddings + decoder layers), incl. saved ones
  kCheckpointInputs, // what a checkpointed layer keeps through the forward: its inputs and the stashed RNG state
  kRecomputed,       // values and saved buffers a checkpointed layer's recompute re-creates in backward
  kHeadActivations,  // forward values of the LM head and loss (logits, their fp32 copy, log-probs)
  kAutocastCopies,   // 16-bit copies of weights and activations made by autocast
  kActivationGrads,  // gradients of activations during backward
  kTransient,        // op workspaces and temporaries (forward, backward, optimizer)
  kLibraryWorkspace, // cuBLAS / cuBLASLt workspaces
  kGatheredParams,   // parameters a sharded engine gathered for computation (FSDP all-gather, Gemini chunks)
  kCommBuffers,      // buffers of the parallel engine: DDP buckets, reduce-scatter input/output, collective copies
  kKvCache,          // generation: the key/value cache entries
};
constexpr size_t kNumCategories = 15;
std::string_view CategoryName(MemoryCategory c);
// Categories only a recipe option creates (activation checkpointing): reports that list every category list these
// only when they hold bytes, so a step without the option reads as before.
// Categories only some steps have (checkpointing's, generation's): listed only when they hold bytes.
bool RecipeOnlyCategory(MemoryCategory c);

enum class Phase : uint8_t { kSetup, kForward, kBackward, kOptimizer };
std::string_view PhaseName(Phase p);

struct MemoryEvent {
  bool is_alloc = true;
  int64_t block = 0;     // unique id of the block (allocation)
  int64_t bytes = 0;     // requested bytes (exact tensor nbytes)
  MemoryCategory category = MemoryCategory::kTransient;
  Phase phase = Phase::kSetup;
  int32_t node = -1;     // IR node index responsible, -1 for none
};

struct Timeline {
  std::vector<MemoryEvent> events;
  std::vector<std::string> block_labels;  // indexed by block id: what the block is ("%57 saved by aten::linear")
};

}  // namespace llmem::sim
