#include "simulator/passes/fsdp_mixed_precision_pass.h"

#include "graph/error.h"

namespace llmem::sim {

FsdpPrecision FsdpPrecisionOf(const Recipe& recipe, DType storage) {
  FsdpPrecision p;
  if (recipe.fsdp_param_dtype && *recipe.fsdp_param_dtype != storage) p.param_dtype = recipe.fsdp_param_dtype;
  if (recipe.fsdp_reduce_dtype && *recipe.fsdp_reduce_dtype != p.Compute(storage)) {
    p.reduce_dtype = recipe.fsdp_reduce_dtype;
  }
  return p;
}

void CheckFsdpPolicyPrecision(const Recipe& recipe) {
  if ((recipe.fsdp_param_dtype || recipe.fsdp_reduce_dtype) && recipe.precision != Precision::kFp32) {
    throw ConfigError("FSDP2's MixedPrecisionPolicy (--fsdp-param-dtype, --fsdp-reduce-dtype) replaces autocast: "
                      "use --precision fp32");
  }
}

StepPlan FsdpMixedPrecisionPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  CheckFsdpPolicyPrecision(config);
  const FsdpPrecision policy = FsdpPrecisionOf(config);
  if (!policy.param_dtype) return plan;  // fp32 compute: only the reduce-scatter changes
  if (!graph.runs_with_bf16_weights()) {
    throw ConfigError("this export cannot compute with 16-bit parameters (its trace bakes fp32 casts in), as "
                      "--fsdp-param-dtype needs: export the model traced with 16-bit weights (models/export_hf.py "
                      "--dtype bfloat16; the policy keeps its parameters in fp32)");
  }
  // The unsharded parameters are 16-bit tensors, so every value follows the 16-bit-weights run of the graph.
  const DType low = *policy.param_dtype;
  for (const auto& v : graph.values()) {
    // Buffers (rotary tables, masks) are not FSDP parameters: the policy leaves them as they are.
    const bool buffer = v.param >= 0 && !graph.params()[static_cast<size_t>(v.param)].trainable;
    DType d = buffer ? v.dtype : v.dtype_bf16_weights;
    if (d == DType::kBF16) d = low;
    plan.value_dtypes[static_cast<size_t>(v.id.index)] = d;
  }
  // The optimizer steps the sharded parameters in their storage dtype: its states and temporaries follow the
  // storage (torch.optim's zeros_like of the fp32 shard), not the compute dtype.
  for (ParamPlan& pp : plan.params) {
    for (PerParamBlock& state : pp.states) state.dtype.reset();
  }
  for (PerParamBlock& temp : plan.optimizer_step.temporaries) temp.dtype.reset();
  return plan;
}

}  // namespace llmem::sim
