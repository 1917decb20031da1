#include "simulator/passes/optimizer_pass.h"

#include <optional>

#include "simulator/backend_rules.h"

namespace llmem::sim {

StepPlan OptimizerPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  const BackendRules backend = RulesFor(config.target);
  for (ParamPlan& pp : plan.params) {
    pp.states.clear();
    if (!pp.optimized) continue;
    // torch.optim keeps the states in the parameter's dtype (zeros_like / torch.zeros_like(p) in _init_group).
    const DType d = plan.value_dtypes[static_cast<size_t>(graph.params()[static_cast<size_t>(pp.param)].value.index)];
    switch (config.optimizer) {
      case OptimizerKind::kAdamW:
        pp.states = {{"state", d}, {"exp_avg_sq", d}};
        break;
      case OptimizerKind::kSgdMomentum:
        pp.states = {{"state", d}};
        break;
    }
  }
  plan.optimizer_step = {};
  if (config.optimizer == OptimizerKind::kAdamW) {
    // Every temporary has the parameter's dtype: the step runs in it.
    if (backend.optimizer == OptimizerImpl::kForeach) {
      // _multi_tensor_adamw: exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs) for the whole group, freed after
      // addcdiv_.
      plan.optimizer_step.whole_group = true;
      plan.optimizer_step.temporaries = {{"sqrt(exp_avg_sq)", std::nullopt}};
    } else {
      // torch::optim::AdamW: denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps): the sqrt temporary and
      // the quotient are alive together; the quotient (denom) lives until addcdiv_.
      plan.optimizer_step.temporaries = {{"sqrt(exp_avg_sq)", std::nullopt}, {"denom", std::nullopt}};
    }
  }
  // SGD with momentum updates in place.
  return plan;
}

}  // namespace llmem::sim
