#include "simulator/dispatched_kernels.h"

#include <cstdint>
#include <vector>

namespace llmem::sim {
namespace {

bool IsContiguous(const TensorValue& v) {
  const std::vector<int64_t> strides = StridesOf(v);
  int64_t expected = 1;
  for (size_t i = v.shape.size(); i-- > 0;) {
    if (v.shape[i] == 1) continue;
    if (strides[i] != expected) return false;
    expected *= v.shape[i];
  }
  return true;
}

// at::matmul (aten/src/ATen/native/LinearAlgebra.cpp, _matmul_impl and should_fold): 2-D x 2-D is mm; a >= 3-D
// operand times a 2-D one folds its leading dims into one mm when the 2-D operand requires grad or the fold
// needs no copy; everything else runs bmm (or mv / dot for 1-D operands).
std::string_view MatmulKernel(const TensorValue& a, const TensorValue& b) {
  const size_t da = a.shape.size(), db = b.shape.size();
  if (da == 2 && db == 2) return "aten::mm";
  const bool a_larger = da >= db;
  const TensorValue& larger = a_larger ? a : b;
  const TensorValue& smaller = a_larger ? b : a;
  const size_t dl = larger.shape.size(), ds = smaller.shape.size();
  if (dl >= 3 && ds == 2 && (smaller.requires_grad || CanMergeDims(larger, 0, dl - 1))) return "aten::mm";
  if (ds == 1) return dl == 1 ? "aten::dot" : dl == 2 ? "aten::mv" : "aten::bmm";
  return "aten::bmm";
}

}  // namespace

std::string_view AttentionKernelName(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kCpuFlash: return "aten::_scaled_dot_product_flash_attention_for_cpu";
    case AttentionKernel::kCudaFlash: return "aten::_scaled_dot_product_flash_attention";
    case AttentionKernel::kCudaEfficient: return "aten::_scaled_dot_product_efficient_attention";
  }
  return "aten::scaled_dot_product_attention";
}

std::string_view DispatchedKernel(const Graph& graph, const OpNode& node, const BackendRules& backend,
                                  bool sixteen_bit_attention) {
  const auto& inputs = graph.tensor_inputs(node.id);
  if (node.kind == "aten::linear" && inputs.size() >= 2) {
    // at::linear (aten/src/ATen/native/Linear.cpp): with a bias, a 2-D input, or a contiguous one flattened to
    // 2-D (_flatten_nd_linear), runs addmm; otherwise matmul(input, weight.t()), then the bias added in place.
    const TensorValue& input = graph.value(inputs[0]);
    const bool has_bias = inputs.size() >= 3;
    if (has_bias && (input.shape.size() == 2 || IsContiguous(input))) return "aten::addmm";
    return MatmulKernel(input, graph.value(inputs[1]));
  }
  if (node.kind == "aten::matmul" && inputs.size() >= 2) {
    return MatmulKernel(graph.value(inputs[0]), graph.value(inputs[1]));
  }
  if (node.kind == "aten::scaled_dot_product_attention") {
    // The same choice as the op's memory rule: the mask is the fourth tensor input when there is one.
    return AttentionKernelName(backend.Attention(sixteen_bit_attention, inputs.size() >= 4));
  }
  if (node.kind == "aten::max") {
    // max(Tensor) reduces everything (max.default); max(Tensor, Tensor) is max.other, max(Tensor, dim, keepdim)
    // max.dim.
    if (node.args.size() == 1) return "aten::max";
    return inputs.size() == 2 ? std::string_view("aten::max.other") : std::string_view("aten::max.dim");
  }
  return node.kind;
}

}  // namespace llmem::sim
