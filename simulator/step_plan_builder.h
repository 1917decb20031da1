// Runs the passes, in order, that turn a graph and a recipe into a step plan (Note [Step plan]).
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

StepPlan BuildStepPlan(const Graph& graph, const TrainingConfig& config);

}  // namespace llmem::sim
