#include "simulator/passes/parameter_pass.h"

#include <set>

namespace llmem::sim {

StepPlan ParameterPass(const Graph& graph, StepPlan plan, const TrainingConfig&) {
  plan.params.clear();
  std::set<int32_t> seen_roots;  // tied weights are one tensor to the optimizer
  for (size_t i = 0; i < graph.params().size(); ++i) {
    const Parameter& p = graph.params()[i];
    ParamPlan pp;
    pp.param = static_cast<int32_t>(i);
    pp.trainable = p.trainable;
    pp.optimized = p.trainable && p.used_in_forward && seen_roots.insert(graph.StorageRoot(p.value).index).second;
    plan.params.push_back(std::move(pp));
  }
  return plan;
}

}  // namespace llmem::sim
