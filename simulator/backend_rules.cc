#include "simulator/backend_rules.h"

#include "graph/op_registry.h"

namespace llmem::sim {

// The simulator has no fp32_set_opt_dtype step of its own: such ops are simulated as fp32 ops, which cast a 16-bit
// input to float32 where PyTorch passes dtype=float to the kernel instead (the same result, one copy more).
AutocastClass BackendRules::Autocast(std::string_view op_kind) const {
  const OpInfo* op = FindOp(op_kind);
  if (op == nullptr) return AutocastClass::kNone;
  switch (cuda ? op->autocast_cuda : op->autocast_cpu) {
    case AutocastPolicy::kLowerPrecision:
      return AutocastClass::kLowerPrecision;
    case AutocastPolicy::kFp32:
    case AutocastPolicy::kFp32SetOptDtype:
      return AutocastClass::kFp32;
    case AutocastPolicy::kNone:
      break;
  }
  return AutocastClass::kNone;
}

AttentionKernel BackendRules::Attention(bool sixteen_bit, bool has_mask) const {
  if (!cuda) return AttentionKernel::kCpuFlash;
  return sixteen_bit && !has_mask ? AttentionKernel::kCudaFlash : AttentionKernel::kCudaEfficient;
}

DType BackendRules::LayerNormStats(DType input, bool fp32_params) const {
  if (cuda) return DType::kF32;
  return fp32_params && ElementSize(input) == 2 ? DType::kF32 : input;
}

BackendRules RulesFor(const Target& target) {
  BackendRules rules;
  rules.cuda = !target.is_cpu;
  rules.dropout = rules.cuda ? DropoutImpl::kBoolMask : DropoutImpl::kNoiseTensor;
  rules.optimizer = rules.cuda ? OptimizerImpl::kForeach : OptimizerImpl::kPerParameter;
  rules.library_workspaces = rules.cuda;
  rules.caching_allocator = rules.cuda;
  rules.cpu_threads = target.is_cpu ? std::max(1, target.cpu_threads) : 1;
  return rules;
}

}  // namespace llmem::sim
