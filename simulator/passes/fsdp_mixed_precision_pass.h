// The FSDP2 mixed-precision pass: what MixedPrecisionPolicy(param_dtype, reduce_dtype) on every fully_shard unit
// makes of the step (docs/FSDP2_MIXED_PRECISION.md). The sharded parameters, their gradients and the optimizer
// states keep the export's dtype; the gathered parameters are in param_dtype and the forward and backward compute
// in it without autocast, so activations, activation gradients and the unsharded parameter gradients are 16-bit.
// The reduce dtype only changes the engine's buffers (distributed/fsdp.h reads FsdpPrecisionOf).
#pragma once

#include <optional>

#include "graph/dtype.h"
#include "graph/graph.h"
#include "simulator/recipe.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

// The policy as FSDP2 applies it to parameters stored in `storage` (FSDPParam.init_dtype_attrs, torch 2.11
// _fsdp_param.py): a param_dtype equal to the storage dtype is no cast, and a reduce_dtype equal to the param dtype
// is no cast.
struct FsdpPrecision {
  std::optional<DType> param_dtype;   // gathered parameters and compute; none: the storage dtype
  std::optional<DType> reduce_dtype;  // reduce-scatter; none: the gradients' dtype (= the compute dtype)
  DType Compute(DType storage) const { return param_dtype.value_or(storage); }
  DType Reduce(DType storage) const { return reduce_dtype.value_or(Compute(storage)); }
};
FsdpPrecision FsdpPrecisionOf(const Recipe& recipe, DType storage = DType::kF32);

// Throws ConfigError for a policy with an autocast or pure-16-bit precision: the policy casts the fp32 parameters
// itself and replaces autocast (the real runs use --precision fp32).
void CheckFsdpPolicyPrecision(const Recipe& recipe);

// Needs the precision and optimizer passes first. Throws ConfigError for an export that cannot compute in 16 bits.
StepPlan FsdpMixedPrecisionPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
