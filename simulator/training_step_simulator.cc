#include "simulator/training_step_simulator.h"

#include "simulator/step_executor.h"
#include "simulator/step_plan_builder.h"
#include "simulator/timeline_invariants.h"

namespace llmem::sim {

StepSimulation SimulateTrainingStep(const Graph& graph, const TrainingConfig& config, StepHooks* hooks) {
  const StepPlan plan = BuildStepPlan(graph, config);
  StepSimulation sim = ExecuteStepPlan(graph, plan, config, hooks);
  CheckTimelineInvariants(sim.timeline);
  return sim;
}

}  // namespace llmem::sim
