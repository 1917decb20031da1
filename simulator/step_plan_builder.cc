#include "simulator/step_plan_builder.h"

#include "simulator/passes/optimizer_pass.h"
#include "simulator/passes/parameter_pass.h"
#include "simulator/passes/precision_pass.h"

namespace llmem::sim {

StepPlan BuildStepPlan(const Graph& graph, const TrainingConfig& config) {
  StepPlan plan;
  plan.ops.resize(graph.nodes().size());
  plan = PrecisionPass(graph, std::move(plan), config);
  plan = ParameterPass(graph, std::move(plan), config);
  plan = OptimizerPass(graph, std::move(plan), config);
  return plan;
}

}  // namespace llmem::sim
