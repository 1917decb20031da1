// The optimizer pass: the state tensors each updated parameter owns and the step's temporaries, per optimizer
// and implementation. Needs the precision and parameter passes first.
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

StepPlan OptimizerPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
