#include "simulator/step_hooks.h"

namespace llmem::sim {

std::string LoopFeature(const LoopPlan& loop) {
  return loop.optimizer_in_backward ? "--optimizer-in-backward" : "--grad-accum > 1";
}

std::string StepHooks::UnmodelledLoop(const LoopPlan& loop) const {
  if (loop.simulated_micro_batches == 1 && !loop.optimizer_in_backward) return "";
  return LoopFeature(loop) + " is not modelled with this parallel engine";
}

std::string LossFeature(const LossPlan& loss) {
  if (loss.chunk_lengths.empty()) return "";
  return loss.fused_linear ? "--loss fused-linear" : "--loss chunked-" + std::to_string(loss.chunk_lengths.size());
}

std::string StepHooks::UnmodelledLoss(const LossPlan& loss) const {
  if (!loss.fused_linear) return "";
  return LossFeature(loss) + " is not modelled with a parallel engine: it computes the LM head's gradients in "
         "forward, which the engine's gradient hooks would see at another point of the step";
}

}  // namespace llmem::sim
