// The work of every op of the IR: floating-point operations and device-memory bytes, forward and backward. It is
// the input of the step-time model (distributed/step_time_model.h), which turns it into seconds with a roofline.
//
// Usage:
//   GraphCost cost = SumCosts(graph);                       // per op, and totals split matmul-like / other
//   double flops = cost.total().fwd_flops + cost.total().bwd_flops;
//   CostOptions tp;                                         // cost a value at another shape, e.g. column-sharded
//   tp.shape_overrides = ScaledShapes(graph, {w, y}, 0, 2); // halve dim 0 of w and y
//
// Inputs: the Graph (shapes, dtypes, which values require grad, which outputs alias an input). Outputs: OpCost per
// op. Conventions (Note [Counting FLOPs]):
// - A multiply-add is 2 FLOPs; an [M, K] x [K, N] product is 2*M*K*N, whatever the kernel.
// - Elementwise ops count 1 FLOP per output element whatever the function (gelu, exp, ...): they are memory-bound,
//   so the count barely matters; their bytes do.
// - Attention counts its two matmuls only (Q*K^T and P*V), as FlashAttention's benchmarks do; softmax is not counted.
// - Bytes are what a kernel reads plus writes in device memory: each distinct tensor input once (an expanded,
//   stride-0 operand costs its storage, not its logical size), each output once. Views cost nothing.
// - Backward work exists only when an output requires grad, and only for the inputs that require grad; the factor
//   of each op family, and why, is stated where it is computed (op_flops.cc).
//
// What it does not do: time, GPUs, memory policy, tensor parallelism (a per-rank Graph, or shape_overrides, carries
// the sharding), kernel-launch overheads.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "graph/dtype.h"
#include "graph/graph.h"

namespace llmem {

struct OpCost {
  double fwd_flops = 0;      // FLOPs of the forward kernel(s); multiply-add = 2
  double bwd_flops = 0;      // FLOPs of the backward kernels autograd runs for this op; 0 if no output needs grad
  double fwd_bytes = 0;      // device-memory bytes the forward reads plus writes
  double bwd_bytes = 0;      // device-memory bytes the backward reads plus writes
  bool matmul_like = false;  // a GEMM-class kernel (linear, matmul, bmm, addmm, einsum, conv1d, attention): runs on
                             // tensor cores where the precision allows, so it is held to the matmul peak
};

// Sums of OpCost fields over a set of ops.
struct CostTotals {
  double fwd_flops = 0;
  double bwd_flops = 0;
  double fwd_bytes = 0;
  double bwd_bytes = 0;
  CostTotals& operator+=(const OpCost& c);
  CostTotals& operator+=(const CostTotals& c);
};

struct GraphCost {
  std::vector<OpCost> ops;                 // one per node, indexed by NodeId::index
  CostTotals matmul;                       // over matmul-like ops
  CostTotals other;                        // over every other op
  std::vector<std::string> generic_kinds;  // op kinds no rule knows, costed as elementwise; sorted, unique
  CostTotals total() const;                // matmul + other
};

struct CostOptions {
  // Read TensorValue::dtype_bf16_weights instead of dtype: the dtypes of pure-bf16 training.
  bool bf16_weights = false;
  // Autocast: matmul-like ops compute in this dtype. They read and write their floating operands in it, and each
  // operand of another dtype is cast first (read in its own dtype, written in this one), as autocast does. Other
  // ops keep the recorded dtypes, so ops that read a matmul's 16-bit output are costed a little high.
  std::optional<DType> matmul_dtype;
  // Cost these values at these shapes instead of the recorded ones (e.g. a tensor-parallel shard).
  std::map<ValueId, std::vector<int64_t>> shape_overrides;
};

// The cost of one op of `graph`.
OpCost CostOf(const Graph& graph, const OpNode& node, const CostOptions& options = {});

// Costs of every op of `graph` and their totals.
GraphCost SumCosts(const Graph& graph, const CostOptions& options = {});

// Shape overrides that divide dimension `dim` (negative counts from the end) of each of `values` by `divisor`
// (rounding up), for CostOptions::shape_overrides. Throws ConfigError when a value has no such dimension.
std::map<ValueId, std::vector<int64_t>> ScaledShapes(const Graph& graph, const std::vector<ValueId>& values, int dim,
                                                     int64_t divisor);

}  // namespace llmem
