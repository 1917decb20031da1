// The activation checkpointing pass: which decoder layers torch.utils.checkpoint wraps, and that their ops save
// nothing for backward (they are recomputed).
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

// Throws ConfigError for every-K with K outside 1..layers, or a model with no decoder layers to checkpoint.
StepPlan CheckpointingPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
