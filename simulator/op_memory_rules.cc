#include "simulator/op_memory_rules.h"

#include <algorithm>
#include <set>

namespace llmem::sim {
namespace {

double ArgNumber(const OpNode& n, size_t i, double fallback) {
  if (i >= n.args.size()) return fallback;
  const auto& a = n.args[i];
  if (a.kind == OpArg::Kind::kDouble) return a.double_value;
  if (a.kind == OpArg::Kind::kInt || a.kind == OpArg::Kind::kBool) return static_cast<double>(a.int_value);
  return fallback;
}

// A rule where every tensor input gets `kind` and nothing is saved.
OpMemoryRule Uniform(size_t n_inputs, GradKind kind) {
  OpMemoryRule r;
  r.input_grads.assign(n_inputs, kind);
  return r;
}

// Number of rows of a [.., D] tensor: all dims but the last.
int64_t Rows(const TensorValue& v) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < v.shape.size(); ++i) rows *= v.shape[i];
  return rows;
}

const std::set<std::string>& ViewOps() {
  // Ops whose output is a view of their first input: backward returns a view of the gradient
  // (derivatives.yaml: view, reshape/_reshape_alias, transpose, permute, unsqueeze, squeeze, t, alias, detach).
  static const std::set<std::string> ops = {"aten::view",    "aten::reshape",  "aten::transpose", "aten::permute",
                                            "aten::unsqueeze", "aten::squeeze", "aten::t",        "aten::flatten",
                                            "aten::unflatten", "aten::contiguous", "aten::alias", "aten::clone",
                                            "aten::view_as", "aten::reshape_as", "aten::unsafe_view", "aten::_unsafe_view"};
  return ops;
}

const std::set<std::string>& NonDifferentiableOps() {
  static const std::set<std::string> ops = {
      "aten::arange", "aten::full",    "aten::ones",    "aten::zeros",     "aten::new_ones", "aten::new_zeros",
      "aten::empty",  "aten::eq",      "aten::ne",      "aten::le",        "aten::lt",       "aten::ge",
      "aten::gt",     "aten::__and__", "aten::__or__",  "aten::bitwise_and", "aten::bitwise_or", "aten::bitwise_not",
      "aten::logical_not", "aten::logical_and", "aten::cumsum", "aten::diff", "aten::floor_divide", "aten::triu",
      "aten::tril",   "aten::detach",  "aten::Int",     "aten::ScalarImplicit", "aten::size", "aten::copy_",
      "aten::full_like", "aten::zeros_like", "aten::ones_like", "aten::remainder", "aten::argmax", "aten::any",
      "aten::all", "aten::max", "aten::min"};
  return ops;
}

}  // namespace

bool IsKnownNonDifferentiable(const std::string& kind) { return NonDifferentiableOps().count(kind) > 0; }

std::optional<OpMemoryRule> RuleFor(const OpNode& node, const RuleContext& ctx) {
  const std::string& k = node.kind;
  const auto& inputs = ctx.graph.tensor_inputs(node.id);
  const size_t n = inputs.size();
  auto input_bytes = [&](size_t i) { return ctx.bytes(inputs.at(i)); };
  auto output_bytes = [&](size_t i) { return ctx.bytes(node.outputs.at(i)); };

  if (IsKnownNonDifferentiable(k)) return Uniform(n, GradKind::kNone);
  if (ViewOps().count(k)) {
    // clone/contiguous/reshape may copy (the IR knows); either way the gradient passes through as a view.
    return Uniform(n, GradKind::kView);
  }
  if (k == "aten::to" || k == "aten::type_as" || k == "aten::_to_copy") {
    // _to_copy backward: grad.to(self's dtype) -- a view when the dtypes match, else a new tensor.
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    if (n >= 1) r.input_grads[0] = GradKind::kPassThrough;
    return r;
  }
  if (k == "aten::expand" || k == "aten::expand_as") {
    // sum_to(grad, self.sizes()): the gradient itself when nothing was broadcast, else a reduced new tensor.
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    r.input_grads[0] = GradKind::kPassThrough;
    return r;
  }
  if (k == "aten::slice" || k == "aten::select" || k == "aten::narrow" || k == "aten::index" ||
      k == "aten::split" || k == "aten::split_with_sizes" || k == "aten::chunk" || k == "aten::unbind" ||
      k == "aten::pad" || k == "aten::constant_pad_nd" || k == "aten::repeat_interleave" || k == "aten::gather") {
    // slice_backward / select_backward / index_put into zeros / cat of the pieces: a new input-sized tensor.
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    r.input_grads[0] = GradKind::kNew;
    return r;
  }
  if (k == "aten::cat" || k == "aten::stack") return Uniform(n, GradKind::kView);  // grads are slices of grad
  if (k == "aten::add" || k == "aten::add_") return Uniform(n, GradKind::kPassThrough);
  if (k == "aten::sub" || k == "aten::sub_") {
    OpMemoryRule r = Uniform(n, GradKind::kPassThrough);
    if (n >= 2) r.input_grads[1] = GradKind::kNew;  // -grad
    return r;
  }
  if (k == "aten::neg") return Uniform(n, GradKind::kNew);
  if (k == "aten::mul" || k == "aten::mul_") {
    // mul: self grad = grad * other, other grad = grad * self; each input saved only for the other's gradient.
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    if (n == 2) {
      const bool g0 = ctx.graph.value(inputs[0]).requires_grad, g1 = ctx.graph.value(inputs[1]).requires_grad;
      if (g1) r.saved_inputs.push_back(0);
      if (g0) r.saved_inputs.push_back(1);
      // A broadcast operand's gradient is computed full-size, then summed down (sum_to).
      for (int i = 0; i < 2; ++i) {
        if (ctx.graph.value(inputs[i]).requires_grad && input_bytes(i) < output_bytes(0)) {
          r.backward_workspace_bytes = std::max(r.backward_workspace_bytes, output_bytes(0));
        }
      }
    }
    return r;
  }
  if (k == "aten::div" || k == "aten::div_") {
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    if (n == 2) {
      r.saved_inputs = {1};                                                   // grad / other
      if (ctx.graph.value(inputs[1]).requires_grad) r.saved_inputs.push_back(0);  // -grad * self / other^2
    }
    return r;
  }
  if (k == "aten::pow") {
    // pow_backward: grad * (exponent * self.pow(exponent - 1)): two input-sized temporaries alive at once.
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.saved_inputs = {0};
    r.backward_workspace_bytes = 2 * input_bytes(0);
    return r;
  }
  if (k == "aten::rsqrt") {
    // rsqrt: -0.5 * grad * result.pow(3): saves the result; two output-sized temporaries.
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.saved_outputs = {0};
    r.backward_workspace_bytes = 2 * output_bytes(0);
    return r;
  }
  if (k == "aten::sqrt" || k == "aten::tanh" || k == "aten::sigmoid" || k == "aten::relu" || k == "aten::exp") {
    OpMemoryRule r = Uniform(n, GradKind::kNew);  // backward from the result (tanh_backward, threshold_backward...)
    r.saved_outputs = {0};
    return r;
  }
  if (k == "aten::gelu" || k == "aten::silu" || k == "aten::log") {
    OpMemoryRule r = Uniform(n, GradKind::kNew);  // gelu_backward(grad, self), silu_backward(grad, self)
    r.saved_inputs = {0};
    return r;
  }
  if (k == "aten::cos" || k == "aten::sin") {
    // cos: grad * -self.sin(); sin: grad * self.cos(): saves self, one or two temporaries.
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.saved_inputs = {0};
    r.backward_workspace_bytes = (k == "aten::cos" ? 2 : 1) * input_bytes(0);
    return r;
  }
  if (k == "aten::mean") {
    return Uniform(n, GradKind::kNew);  // grad.expand(sizes) / numel: a new input-sized tensor
  }
  if (k == "aten::sum") return Uniform(n, GradKind::kView);  // grad.expand(sizes): a view
  if (k == "aten::masked_fill" || k == "aten::masked_fill_") {
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    r.input_grads[0] = GradKind::kNew;  // grad.masked_fill(mask, 0)
    if (n >= 2) r.saved_inputs = {1};   // the mask
    return r;
  }
  if (k == "aten::where") {
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.input_grads[0] = GradKind::kNone;
    r.saved_inputs = {0};  // the condition
    return r;
  }
  if (k == "aten::softmax" || k == "aten::log_softmax" || k == "aten::_softmax" || k == "aten::_log_softmax") {
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.saved_outputs = {0};
    return r;
  }
  if (k == "aten::dropout") {
    const double p = ArgNumber(node, 1, 0.0);
    const bool train = ArgNumber(node, 2, 1.0) != 0.0;
    if (p == 0.0 || !train) return Uniform(n, GradKind::kView);  // returns its input
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    const int64_t elems = output_bytes(0) / ElementSize(ctx.dtype(node.outputs[0]));
    if (ctx.backend.dropout == DropoutImpl::kBoolMask) {
      r.forward_extra.push_back({elems, true});  // native_dropout: 1-byte mask
    } else {
      r.forward_extra.push_back({output_bytes(0), true});  // input * noise: noise in the input dtype
    }
    return r;
  }
  if (k == "aten::linear" || k == "aten::matmul" || k == "aten::mm" || k == "aten::bmm") {
    // Saves both operands (or their autocast copies); the gradients are new. Note [matmul reshapes]: matmul and
    // linear run as mm/bmm on operands reshaped to 2-D (folding the leading dims) or 3-D (flattening the batch
    // dims, after broadcasting them); when those dims cannot merge as a view (a permuted or broadcast operand),
    // reshape makes a contiguous copy, and that copy, not the operand, is what mm/bmm saves
    // (aten/src/ATen/native/LinearAlgebra.cpp _matmul_impl).
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    const bool batched = k == "aten::matmul" && n >= 2 && ctx.graph.value(inputs[0]).shape.size() >= 3 &&
                         ctx.graph.value(inputs[1]).shape.size() >= 3;
    const size_t out_dims = ctx.graph.value(node.outputs.at(0)).shape.size();
    for (int i = 0; i < std::min<int>(2, static_cast<int>(n)); ++i) {
      const auto& v = ctx.graph.value(inputs[static_cast<size_t>(i)]);
      const size_t dims = v.shape.size();
      bool copies = false;
      if (batched) {
        // Batch dims: all but the last two, broadcast to the output's batch shape.
        const auto& out = ctx.graph.value(node.outputs.at(0)).shape;
        bool broadcast = dims != out_dims;
        for (size_t d = 0; !broadcast && d + 2 < dims; ++d) broadcast = v.shape[d] != out[d];
        copies = broadcast || !CanMergeDims(v, 0, dims - 2);
      } else if (i == 0 && dims >= 3) {
        copies = !CanMergeDims(v, 0, dims - 1);  // folded to [N, K]
      }
      if (copies) {
        r.forward_extra.push_back({input_bytes(static_cast<size_t>(i)), true});
      } else {
        r.saved_inputs.push_back(i);
      }
    }
    return r;
  }
  if (k == "aten::addmm" || k == "aten::baddbmm") {
    // self grad = grad (summed to the bias shape), mat1/mat2 grads new; mat1 and mat2 saved.
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.input_grads[0] = GradKind::kPassThrough;
    r.saved_inputs = {1, 2};
    return r;
  }
  if (k == "aten::embedding") {
    // embedding_dense_backward: a new [num_weights, dim] gradient; saves the indices.
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    r.input_grads[0] = GradKind::kNew;
    r.saved_inputs = {1};
    return r;
  }
  if (k == "aten::layer_norm") {
    // native_layer_norm saves input, weight, bias and mean/rstd: one float per row each (acc type is float).
    OpMemoryRule r = Uniform(n, GradKind::kNew);
    r.saved_inputs = {0};
    for (size_t i = 1; i < n; ++i) r.saved_inputs.push_back(static_cast<int>(i));
    const int64_t row_stats = Rows(ctx.graph.value(inputs[0])) * ElementSize(DType::kF32);
    r.forward_extra.push_back({row_stats, true});
    r.forward_extra.push_back({row_stats, true});
    return r;
  }
  if (k == "aten::cross_entropy_loss") {
    // log_softmax(x) is kept for backward; nll_loss_backward makes a zero-filled x-sized gradient, then
    // log_softmax_backward makes the x gradient while that one is alive.
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    r.input_grads[0] = GradKind::kNew;
    r.forward_extra.push_back({input_bytes(0), true});
    r.backward_workspace_bytes = input_bytes(0);
    return r;
  }
  if (k == "aten::scaled_dot_product_attention") {
    OpMemoryRule r = Uniform(n, GradKind::kNone);
    const DType qd = ctx.dtype(inputs[0]);
    const auto& q = ctx.graph.value(inputs[0]);
    for (size_t i = 0; i < std::min<size_t>(3, n); ++i) r.input_grads[i] = GradKind::kNew;
    r.saved_inputs = {0, 1, 2};
    r.saved_outputs = {0};
    // logsumexp: float32 [B, H, L] (q is [B, H, L, E]).
    int64_t lse_rows = 1;
    for (size_t i = 0; i + 1 < q.shape.size(); ++i) lse_rows *= q.shape[i];
    const bool has_mask = n >= 4;
    const AttentionKernel kernel = ctx.backend.Attention(ElementSize(qd) == 2, has_mask);
    if (kernel == AttentionKernel::kCudaEfficient && !q.shape.empty()) {
      const int64_t l = q.shape[q.shape.size() - 2];
      lse_rows = lse_rows / l * ((l + 31) / 32 * 32);  // kAlignLSE = 32 rows
    }
    r.forward_extra.push_back({lse_rows * ElementSize(DType::kF32), true});
    if (has_mask) {
      // A bool mask becomes a float mask in q's dtype (convert_boolean_attn_mask) that the kernel saves for
      // backward; measured on CPU: no further temporary.
      const auto& mask = ctx.graph.value(inputs[3]);
      if (mask.dtype == DType::kBool) r.forward_extra.push_back({NumElements(mask.shape) * ElementSize(qd), true});
    }
    return r;
  }
  return std::nullopt;
}

}  // namespace llmem::sim
