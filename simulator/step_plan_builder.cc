#include "simulator/step_plan_builder.h"

#include "simulator/passes/fsdp_mixed_precision_pass.h"
#include "simulator/passes/loop_pass.h"
#include "simulator/passes/loss_pass.h"
#include "simulator/passes/checkpointing_pass.h"
#include "simulator/passes/optimizer_pass.h"
#include "simulator/passes/parameter_pass.h"
#include "simulator/passes/precision_pass.h"

namespace llmem::sim {

// Every recipe feature is modelled by one of these passes; a value a pass cannot take (a mode the model has no
// layers for, a loss the head does not allow) is refused there, never ignored.
StepPlan BuildStepPlan(const Graph& graph, const TrainingConfig& config) {
  StepPlan plan;
  plan.ops.resize(graph.nodes().size());
  plan = PrecisionPass(graph, std::move(plan), config);
  plan = ParameterPass(graph, std::move(plan), config);
  plan = OptimizerPass(graph, std::move(plan), config);
  plan = FsdpMixedPrecisionPass(graph, std::move(plan), config);
  plan = LoopPass(graph, std::move(plan), config);
  plan = CheckpointingPass(graph, std::move(plan), config);
  plan = LossPass(graph, std::move(plan), config);
  return plan;
}

}  // namespace llmem::sim
