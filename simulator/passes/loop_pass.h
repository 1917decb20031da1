// The loop pass: what the training loop around the step changes: micro-batches, kept outputs, an optimizer stepped
// in backward, gradient clipping. Refuses the combinations no loop runs.
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

StepPlan LoopPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
