#include "simulator/step_hooks.h"

namespace llmem::sim {

std::string LoopFeature(const LoopPlan& loop) {
  return loop.optimizer_in_backward ? "--optimizer-in-backward" : "--grad-accum > 1";
}

std::string StepHooks::UnmodelledLoop(const LoopPlan& loop) const {
  if (loop.simulated_micro_batches == 1 && !loop.optimizer_in_backward) return "";
  return LoopFeature(loop) + " is not modelled with this parallel engine";
}

}  // namespace llmem::sim
