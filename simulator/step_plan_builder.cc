#include "simulator/step_plan_builder.h"

#include <string>

#include "graph/error.h"

#include "simulator/passes/fsdp_mixed_precision_pass.h"
#include "simulator/passes/loop_pass.h"
#include "simulator/passes/checkpointing_pass.h"
#include "simulator/passes/optimizer_pass.h"
#include "simulator/passes/parameter_pass.h"
#include "simulator/passes/precision_pass.h"

namespace llmem::sim {
namespace {

// Recipe features that no pass models yet are refused, never ignored.
void RefuseUnmodelled(const TrainingConfig& c) {
  auto refuse = [](const std::string& what) { throw ConfigError(what + " is not modelled yet"); };
  if (c.checkpointing.mode == CheckpointingMode::kSelective) refuse("--checkpointing selective");
  if (c.loss != LossVariant::kStandard) refuse("--loss " + LossName(c.loss, c.loss_chunks));
}

}  // namespace

StepPlan BuildStepPlan(const Graph& graph, const TrainingConfig& config) {
  RefuseUnmodelled(config);
  StepPlan plan;
  plan.ops.resize(graph.nodes().size());
  plan = PrecisionPass(graph, std::move(plan), config);
  plan = ParameterPass(graph, std::move(plan), config);
  plan = OptimizerPass(graph, std::move(plan), config);
  plan = FsdpMixedPrecisionPass(graph, std::move(plan), config);
  plan = LoopPass(graph, std::move(plan), config);
  plan = CheckpointingPass(graph, std::move(plan), config);
  return plan;
}

}  // namespace llmem::sim
