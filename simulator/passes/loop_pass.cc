#include "simulator/passes/loop_pass.h"

#include <algorithm>

#include "graph/error.h"

namespace llmem::sim {

StepPlan LoopPass(const Graph&, StepPlan plan, const TrainingConfig& config) {
  // An optimizer stepped per parameter in backward never sees the whole set of gradients (torchtune's recipes
  // refuse it with gradient accumulation and with clipping for that reason).
  if (config.optimizer_in_backward && config.grad_accum > 1) {
    throw ConfigError("--optimizer-in-backward cannot be combined with --grad-accum > 1");
  }
  if (config.optimizer_in_backward && config.grad_clip) {
    throw ConfigError("--optimizer-in-backward cannot be combined with --grad-clip");
  }
  plan.loop.simulated_micro_batches = std::min(config.grad_accum, 2);
  plan.loop.keep_outputs = config.keep_outputs;
  plan.loop.optimizer_in_backward = config.optimizer_in_backward;
  plan.loop.clip_grad_norm = config.grad_clip.has_value();
  return plan;
}

}  // namespace llmem::sim
