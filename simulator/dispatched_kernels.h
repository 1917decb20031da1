// Which ATen kernel an op of the IR runs once autograd has dispatched it: the op that a TorchDispatchMode (and so
// torch.utils.checkpoint's selective-checkpoint policies) sees. TorchScript records composite ops (aten::linear,
// aten::matmul, aten::scaled_dot_product_attention) that decompose, below autograd, into the kernel named here,
// and that kernel depends on the arguments and on the backend.
//
// Usage:
//   const std::string_view kernel = DispatchedKernel(graph, node, backend, sixteen_bit_attention);
//   if (kernel == "aten::mm") ...
//
// Inputs: an op node, the target's backend rules, and whether its attention inputs are 16-bit after autocast.
// Output: the kernel as torch.ops names it with its overload ("aten::mm", "aten::max.dim"); for an op that is
// its own kernel, its kind. What it does not do: kernels a composite op runs besides its main one (views, the
// transpose of a weight, a bias add), which no policy here keeps.
#pragma once

#include <string_view>

#include "graph/graph.h"
#include "simulator/backend_rules.h"

namespace llmem::sim {

std::string_view DispatchedKernel(const Graph& graph, const OpNode& node, const BackendRules& backend,
                                  bool sixteen_bit_attention);

// The kernel aten::scaled_dot_product_attention dispatches to.
std::string_view AttentionKernelName(AttentionKernel kernel);

}  // namespace llmem::sim
