// IR + training config -> the memory timeline of one steady-state training step (forward, backward, optimizer
// step), as a pure function: the passes build the step plan (step_plan_builder.h, Note [Step plan]), the executor
// runs it (step_executor.h), and the timeline's invariants are checked (timeline_invariants.h).
//
// Note [What a step holds]
// The step starts with weights, optimizer states (steady state: they exist from step 1 on) and the input batch
// live; gradients were set to None. Forward frees each value when the program drops it (forward_lifetimes.h:
// eager Python frames by default, or at its last use as the TorchScript interpreter does), unless autograd saved
// it (op_memory_rules). Backward visits ops in reverse order: it allocates each input's
// gradient, accumulates gradients that arrive more than once in place, then drops the output gradients and the
// saved tensors of that op. Parameter gradients stay for the optimizer step, whose temporaries depend on the
// backend (backend_rules).
//
// Parallel engines change the step through StepHooks (step_hooks.h).
#pragma once

#include <vector>

#include "graph/graph.h"
#include "simulator/memory_timeline.h"
#include "simulator/step_hooks.h"
#include "simulator/training_config.h"

namespace llmem::sim {

struct StepSimulation {
  Timeline timeline;
  std::vector<DType> value_dtypes;  // dtype of every IR value under the simulated precision
  std::vector<std::string> unknown_ops;  // op kinds estimated conservatively (only with allow_unknown_ops)
  int64_t managed_bytes = 0;  // optimizer states in CUDA managed memory, outside the allocator's timeline
};

// Throws UnsupportedOpError for an op kind without a rule (unless config.allow_unknown_ops) and ConfigError for
// a precision the export cannot run in.
// `hooks` (optional) is the parallel engine of a multi-GPU method; the step is then one rank's.
StepSimulation SimulateTrainingStep(const Graph& graph, const TrainingConfig& config, StepHooks* hooks = nullptr);

}  // namespace llmem::sim
