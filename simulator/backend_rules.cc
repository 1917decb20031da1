#include "simulator/backend_rules.h"

#include <algorithm>
#include <array>

namespace llmem::sim {
namespace {
// Ops of the decoder graphs this project handles, classified per aten/src/ATen/autocast_mode.cpp.
// CPU lower_precision_fp list (subset that decoders use).
constexpr std::array<std::string_view, 9> kCpuLower = {"aten::linear",  "aten::matmul", "aten::mm",
                                                       "aten::bmm",     "aten::addmm",  "aten::baddbmm",
                                                       "aten::addbmm",  "aten::conv1d", "aten::scaled_dot_product_attention"};
// CPU fp32 list: losses (the decoder-relevant members).
constexpr std::array<std::string_view, 3> kCpuFp32 = {"aten::cross_entropy_loss", "aten::nll_loss", "aten::mse_loss"};
// CUDA lower_precision_fp list.
constexpr std::array<std::string_view, 9> kCudaLower = {"aten::linear",  "aten::matmul", "aten::mm",
                                                        "aten::bmm",     "aten::addmm",  "aten::baddbmm",
                                                        "aten::addbmm",  "aten::conv1d", "aten::scaled_dot_product_attention"};
// CUDA fp32 list (decoder-relevant members), including the fp32_set_opt_dtype softmax family.
constexpr std::array<std::string_view, 12> kCudaFp32 = {
    "aten::pow",         "aten::rsqrt",       "aten::layer_norm",       "aten::native_layer_norm",
    "aten::softmax",     "aten::log_softmax", "aten::cross_entropy_loss", "aten::nll_loss",
    "aten::exp",         "aten::log",         "aten::mse_loss",         "aten::cumsum"};

template <size_t N>
bool Contains(const std::array<std::string_view, N>& list, std::string_view kind) {
  return std::find(list.begin(), list.end(), kind) != list.end();
}
}  // namespace

AutocastClass BackendRules::Autocast(std::string_view op_kind) const {
  if (cuda) {
    if (Contains(kCudaLower, op_kind)) return AutocastClass::kLowerPrecision;
    if (Contains(kCudaFp32, op_kind)) return AutocastClass::kFp32;
  } else {
    if (Contains(kCpuLower, op_kind)) return AutocastClass::kLowerPrecision;
    if (Contains(kCpuFp32, op_kind)) return AutocastClass::kFp32;
  }
  return AutocastClass::kNone;
}

AttentionKernel BackendRules::Attention(bool sixteen_bit, bool has_mask) const {
  if (!cuda) return AttentionKernel::kCpuFlash;
  return sixteen_bit && !has_mask ? AttentionKernel::kCudaFlash : AttentionKernel::kCudaEfficient;
}

BackendRules RulesFor(const Target& target) {
  BackendRules rules;
  rules.cuda = !target.is_cpu;
  rules.dropout = rules.cuda ? DropoutImpl::kBoolMask : DropoutImpl::kNoiseTensor;
  rules.optimizer = rules.cuda ? OptimizerImpl::kForeach : OptimizerImpl::kPerParameter;
  rules.library_workspaces = rules.cuda;
  rules.caching_allocator = rules.cuda;
  return rules;
}

}  // namespace llmem::sim
