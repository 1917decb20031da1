// The executor: turns a step plan (step_plan.h) into the memory timeline of one rank's step, following autograd
// op by op (Note [What a step holds] in training_step_simulator.h). It decides nothing the plan decides.
#pragma once

#include "graph/graph.h"
#include "simulator/step_hooks.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"
#include "simulator/training_step_simulator.h"

namespace llmem::sim {

// Throws UnsupportedOpError for an op kind without a rule (unless config.allow_unknown_ops).
StepSimulation ExecuteStepPlan(const Graph& graph, const StepPlan& plan, const TrainingConfig& config,
                               StepHooks* hooks);

}  // namespace llmem::sim
