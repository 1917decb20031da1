// The parameter pass: which parameters train (requires_grad as the file has it; never forced) and which the
// optimizer updates.
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

StepPlan ParameterPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
