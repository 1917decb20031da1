// The precision pass: the dtype of every IR value under the recipe's precision, in the program the recipe's
// lifetimes name (autocast's op classes, explicit casts, type promotion).
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

// Throws ConfigError for a precision the export cannot run in.
StepPlan PrecisionPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
