// The facts llmem knows about each aten op, in one table with one row per op kind: whether it returns a view or
// writes in place, how autocast treats it on CPU and on CUDA, which autograd formula family its gradient follows,
// and which cost family its FLOPs and bytes belong to. Every part of llmem that branches on an op kind's nature
// (memory rules, autocast, FLOP counting, index-range tracking, tensor-parallel split propagation, forward
// lifetimes) asks this table instead of keeping a list of its own.
//
// Usage:
//   if (const OpInfo* op = FindOp(node.kind); op && op->grad == GradFormula::kMatmul) { ... }
//   const bool cast = IsCast(node.kind);                   // false for a kind with no row
//
// Inputs: an op kind as TorchScript spells it ("aten::add"); TorchScript nodes carry no overload name, so a row
// holds for the overloads it names (every overload when it names none). Output: the row, or nullptr.
//
// What it does not do: memory sizes, saved tensors or costs themselves (simulator/op_memory_rules.h and
// graph/op_flops.h compute those from the families named here), and per-op argument semantics (which argument
// is a dim or a mask stays with the code that reads it).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

namespace llmem {

// How autocast treats an op (aten/src/ATen/autocast_mode.h AT_FORALL_* lists for CUDA, autocast_mode.cpp
// TORCH_LIBRARY_IMPL(aten, AutocastCPU, m) for CPU).
enum class AutocastPolicy : uint8_t {
  kNone,             // not registered: runs in its inputs' dtypes
  kLowerPrecision,   // lower_precision_fp: floating inputs cast to the autocast dtype
  kFp32,             // fp32: floating inputs cast to float32
  kFp32SetOptDtype,  // fp32_set_opt_dtype / fp32_append_dtype: computes and returns float32 (dtype=float passed
                     // to the kernel when the caller gave none)
};

// The autograd formula family of an op's gradient (tools/autograd/derivatives.yaml): what memory rules key on.
enum class GradFormula : uint8_t {
  kUnmodelled,           // no memory rule: the simulator refuses the op unless told to guess
  kNone,                 // never differentiable: integer or boolean results, factories, detach
  kViewOfGrad,           // the gradient is a view of the output gradient (view, reshape, transpose, clone, ...)
  kCast,                 // grad.to(self's dtype): the output gradient itself when the dtypes match
  kSumTo,                // at::sum_to(grad, self.sizes()): expand
  kScatterBack,          // a zero-filled input-sized gradient the output gradient is written into (slice, split)
  kSlicesOfGrad,         // every input's gradient is a slice of the output gradient (cat, stack)
  kAdd,                  // grad to every input
  kSub,                  // grad to self, -grad to other
  kFromGradOnly,         // a new gradient computed from grad alone (neg, cumsum, triu, diff)
  kRemainder,            // grad to self, -grad * floor(self / other) to other
  kIndexAdd,             // index_add_: grad to self, grad.index_select(dim, index) to source (reads the index)
  kMul,                  // each input's gradient reads the other input
  kDiv,                  // grad / other; -grad * self / other^2
  kPow,                  // grad * exponent * self^(exponent - 1)
  kRsqrt,                // -0.5 * grad * result^3
  kFromResult,           // backward reads the result (sqrt, tanh, sigmoid, relu, exp)
  kFromInput,            // backward reads the input (gelu, silu, log)
  kCos,                  // grad * -self.sin()
  kSin,                  // grad * self.cos()
  kMean,                 // grad.expand(sizes) / numel
  kSum,                  // grad.expand(sizes)
  kSelectingReduction,   // max / min: the gradient goes to the selected elements (reads indices or input+result)
  kMaskedFill,           // grad.masked_fill(mask, 0)
  kWhere,                // where(condition, grad, 0)
  kSoftmax,              // backward reads the result
  kDropout,              // grad * mask
  kMatmul,               // both operands saved, both gradients new
  kQuantizedMatmul,      // bitsandbytes MatMul4Bit: the weight dequantized in forward and again in backward
  kAddmm,                // matmul plus a broadcast addend
  kEmbedding,            // embedding_dense_backward
  kLayerNorm,            // native_layer_norm_backward
  kCrossEntropy,         // log_softmax + nll_loss backward
  kAttention,            // scaled_dot_product_attention backward
  kCopy,                 // copy_: zeros to self, grad to src
  kGenerationLoop,       // the generation loop's own step (no gradient): its temporaries per its rule
};

// Which cost model counts an op's FLOPs and bytes (graph/op_flops.cc).
enum class CostFamily : uint8_t {
  kNoKernel,      // shape queries, scalar conversions, aliases: no device kernel
  kContraction,   // GEMM-class: linear, matmul, bmm, addmm, einsum, conv1d
  kAttention,     // fused or math scaled-dot-product attention
  kSoftmax,
  kCrossEntropy,
  kNllLoss,
  kLayerNorm,
  kRmsNorm,
  kEmbedding,
  kReduction,
  kDataMovement,  // copies, casts, gathers, factories: bytes, no arithmetic
  kElementwise,   // one FLOP per output element
  kGeneric,       // no cost rule of its own: costed as elementwise and reported as such
};

// Bit flags of OpInfo::flags.
enum OpFlag : uint32_t {
  kView = 1u << 0,            // the output always shares input 0's storage
  kViewOrCopy = 1u << 1,      // a view when the strides allow it, else a contiguous copy (reshape, contiguous)
  kReshape = 1u << 2,         // changes the shape only, keeping the elements in order (view, reshape, unsqueeze)
  kInPlace = 1u << 3,         // writes into its first argument
  kCastOp = 1u << 4,          // converts dtype (Tensor.to, type_as)
  kKeepsValues = 1u << 5,     // every output element is an unchanged element of input 0 (views, copies, casts)
  kSlicesAlongDim = 1u << 6,  // every output is a range of input 0 along one dim (slice, narrow, split, chunk)
  kAutocastInside = 1u << 7,  // an autograd Function whose own code runs autocast-wrapped ops: autocast decides its
                              // output dtype, the dispatcher casts none of its inputs (its rule models the casts)
};

struct OpInfo {
  std::string_view kind;       // "aten::add"
  std::string_view overloads;  // overloads the row holds for, comma-separated; empty: every overload
  uint32_t flags = 0;          // OpFlag bits
  AutocastPolicy autocast_cpu = AutocastPolicy::kNone;
  AutocastPolicy autocast_cuda = AutocastPolicy::kNone;
  GradFormula grad = GradFormula::kUnmodelled;
  CostFamily cost = CostFamily::kGeneric;

  bool Has(OpFlag f) const { return (flags & f) != 0; }
  bool never_differentiable() const { return grad == GradFormula::kNone; }
};

// The row of `kind`, or nullptr when the table has none.
const OpInfo* FindOp(std::string_view kind);

// Every row, in table order.
std::span<const OpInfo> AllOps();

// True when `kind` has a row with flag `f`.
bool OpHas(std::string_view kind, OpFlag f);

// True when `kind` writes into its first argument: its row, or ATen's naming convention for a kind with no row
// (a trailing underscore, as in "add_"; "__and__" is not in place).
bool IsInPlace(std::string_view kind);

}  // namespace llmem
