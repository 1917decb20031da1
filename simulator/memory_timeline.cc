#include "simulator/memory_timeline.h"

namespace llmem::sim {

std::string_view CategoryName(MemoryCategory c) {
  switch (c) {
    case MemoryCategory::kWeights: return "weights";
    case MemoryCategory::kGradients: return "gradients";
    case MemoryCategory::kOptimizerState: return "optimizer states";
    case MemoryCategory::kInputs: return "inputs";
    case MemoryCategory::kActivations: return "activations (body)";
    case MemoryCategory::kCheckpointInputs: return "checkpoint inputs";
    case MemoryCategory::kRecomputed: return "recomputed activations";
    case MemoryCategory::kHeadActivations: return "LM head + loss";
    case MemoryCategory::kAutocastCopies: return "autocast copies";
    case MemoryCategory::kActivationGrads: return "activation grads";
    case MemoryCategory::kTransient: return "workspaces";
    case MemoryCategory::kLibraryWorkspace: return "cuBLAS workspaces";
    case MemoryCategory::kGatheredParams: return "gathered params";
    case MemoryCategory::kCommBuffers: return "comm buffers";
    case MemoryCategory::kKvCache: return "KV cache";
  }
  return "?";
}

bool RecipeOnlyCategory(MemoryCategory c) {
  return c == MemoryCategory::kCheckpointInputs || c == MemoryCategory::kRecomputed || c == MemoryCategory::kKvCache;
}

std::string_view PhaseName(Phase p) {
  switch (p) {
    case Phase::kSetup: return "setup";
    case Phase::kForward: return "forward";
    case Phase::kBackward: return "backward";
    case Phase::kOptimizer: return "optimizer";
  }
  return "?";
}

}  // namespace llmem::sim
