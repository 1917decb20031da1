#include "simulator/op_memory_rules.h"

#include <algorithm>
#include <string>

#include "graph/error.h"
#include "graph/op_registry.h"

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

// NF4Tensor.get_original_weight (torchao 0.18 nf4_tensor.py) of a weight of n elements in dtype `d`: the two
// nibble planes unpacked into uint8, then int64 index tensors; the NF4 table looked up per plane; the scalers
// dequantized (int8 / factor, + mean) and repeated by flatten() copies; the planes scaled; torch.stack makes the
// weight. Its locals (index tensors, planes, scalers) die when it returns; the weight is the last step's block.
void AppendNf4Dequantize(int64_t n, DType d, std::vector<TransientStep>& s) {
  const int base = static_cast<int>(s.size());
  auto at = [&](int i) { return base + i; };
  const int64_t half = n / 2, blocks = n / 64, e = ElementSize(d);
  s.push_back({half});                  // 0: quantized_data >> 4
  s.push_back({half * 8});              // 1: .to(torch.long)
  s.push_back({0, at(0)});              // 2
  s.push_back({half});                  // 3: quantized_data & 0b1111
  s.push_back({half * 8});              // 4: .to(torch.long)
  s.push_back({0, at(3)});              // 5
  s.push_back({half * e});              // 6: nf4[first]
  s.push_back({half * e});              // 7: nf4[second]
  s.push_back({blocks * e});            // 8: quantized_scalers / quantization_factor
  s.push_back({blocks * e});            // 9: + scaler_mean
  s.push_back({0, at(8)});              // 10
  s.push_back({half * e});              // 11: repeated.flatten()
  s.push_back({half * e});              // 12: scaled_first
  s.push_back({0, at(11)});             // 13
  s.push_back({half * e});              // 14: repeated.flatten()
  s.push_back({half * e});              // 15: scaled_second
  s.push_back({0, at(14)});             // 16
  s.push_back({n * e});                 // 17: torch.stack(...): the weight
  for (int i : {1, 4, 6, 7, 9, 12, 15}) s.push_back({0, at(i)});
}

// torchao's LinearNF4 (nf4_tensor.py): forward F.linear(x, weight.to(x.dtype)), saving only the NF4 weight; backward
// grad_output @ weight.to(grad_output.dtype). Args: x, the packed codes, the NF4 table (its dtype is the
// weight's), out_features, in_features.
OpMemoryRule LinearNf4Rule(const OpNode& node, const RuleContext& ctx) {
  const auto& inputs = ctx.graph.tensor_inputs(node.id);
  OpMemoryRule r = Uniform(inputs.size(), GradKind::kNone);
  if (inputs.size() < 3 || node.outputs.empty()) return r;
  r.input_grads[0] = GradKind::kNew;
  const int64_t n = static_cast<int64_t>(ArgNumber(node, 3, 0)) * static_cast<int64_t>(ArgNumber(node, 4, 0));
  const DType weight = ctx.dtype(inputs[2]), x = ctx.dtype(inputs[0]), out = ctx.dtype(node.outputs[0]);
  // `dequantized.to(dtype)`: a copy when the dtypes differ, the dequantized weight freed then.
  auto dequantize_to = [&](DType want, std::vector<TransientStep>& s) {
    AppendNf4Dequantize(n, weight, s);
    if (want == weight) return;
    const int w = static_cast<int>(s.size()) - 8;  // the weight: the block before the seven frees
    s.push_back({n * ElementSize(want)});
    s.push_back({0, w});
  };
  dequantize_to(x, r.forward_prelude);
  if (out != x) {  // autocast inside F.linear: 16-bit copies of the input and the weight
    r.forward_prelude.push_back({NumElements(ctx.graph.value(inputs[0]).shape) * ElementSize(out)});
    r.forward_prelude.push_back({n * ElementSize(out)});
  }
  dequantize_to(out, r.backward_prelude);  // grad_output has the output's dtype
  return r;
}

// bitsandbytes 0.50's LLM.int8() linear (autograd/_functions.py) as Linear8bitLt runs it for training; args: x, the
// int8 weight CB [N, K], bias, out_features N, in_features K. CB is dequantized as
// `CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1 / 127))`: an N x K copy in x's dtype and an [N, 1] fp32 scale that dies
// in the multiply. Both Functions keep x itself as a ctx attribute (ctx.A, ctx.tensors), not a saved tensor.
// - CPU (matmul() picks MatMul8bitFp in training): the dequantized weight, then F.linear, which autocast casts
//   (16-bit copies of x, the weight and the bias).
// - CUDA (MatMul8bitLt, the weight frozen): int8_vectorwise_quant of x.to(float16) (row stats, the int8 rows, and
//   for the default threshold 6.0 the `abs() >= threshold` outlier test), the int32 product, its fp16 dequant, then
//   `.to(x's dtype)`: the output. Outlier columns are data-dependent; none are assumed (each one would add M fp16
//   values kept for backward, subA).
// Backward (both): the weight dequantized again in x's dtype, grad_output cast to it, grad_A = grad @ CB.
OpMemoryRule Int8MatmulRule(const OpNode& node, const RuleContext& ctx) {
  const auto& inputs = ctx.graph.tensor_inputs(node.id);
  OpMemoryRule r = Uniform(inputs.size(), GradKind::kNone);
  if (inputs.size() < 2 || node.outputs.empty()) return r;
  r.input_grads[0] = GradKind::kNew;
  r.graph_held_inputs = {0};
  const int64_t out_f = static_cast<int64_t>(ArgNumber(node, 3, 0)), in_f = static_cast<int64_t>(ArgNumber(node, 4, 0));
  const int64_t weight = out_f * in_f;
  const int64_t tokens = in_f > 0 ? NumElements(ctx.graph.value(inputs[0]).shape) / in_f : 0;
  const DType a = ctx.dtype(inputs[0]), out = ctx.dtype(node.outputs[0]);
  const bool bias = inputs.size() > 2;
  auto dequantize = [&](std::vector<TransientStep>& s) {
    s.push_back({weight * ElementSize(a)});
    s.push_back({out_f * ElementSize(DType::kF32)});
    s.push_back({0, static_cast<int>(s.size()) - 1});
  };
  if (!ctx.backend.cuda) {
    dequantize(r.forward_prelude);
    if (out != a) {  // autocast inside F.linear
      r.forward_prelude.push_back({tokens * in_f * ElementSize(out)});
      r.forward_prelude.push_back({weight * ElementSize(out)});
      if (bias) r.forward_prelude.push_back({out_f * ElementSize(out)});
    }
  } else {
    auto& s = r.forward_prelude;
    const int64_t rows = tokens * in_f;
    const int half = a == DType::kF16 ? -1 : static_cast<int>(s.size());
    if (half >= 0) s.push_back({rows * 2});  // x.to(float16)
    const int abs = static_cast<int>(s.size());
    s.push_back({rows * 2});  // A.abs()
    s.push_back({rows});      // >= threshold
    s.push_back({0, abs});
    s.push_back({tokens * ElementSize(DType::kF32)});  // row_stats (SCA)
    s.push_back({rows});                               // CA
    if (half >= 0) s.push_back({0, half});
    s.push_back({0, abs + 1});
    s.push_back({tokens * out_f * 4});                            // int32 product
    if (out != DType::kF16) s.push_back({tokens * out_f * 2});  // the fp16 dequant, then `.to(dtype)`
  }
  dequantize(r.backward_prelude);
  if (out != a) r.backward_prelude.push_back({tokens * out_f * ElementSize(a)});  // grad_output.to(dtype_A)
  return r;
}

// gptqmodel 5.0's trainable GPTQ kernels (nn_modules/qlinear torch.py _forward_eager; TritonV2 falls back to it in
// training): `weights = dequantize_weight().to(x.dtype)`, `torch.matmul(x, weights)`, `out.add_(bias)`. Args: x,
// qweight, bias, out_features N, in_features K, bits, group size. The dequantized weight is kept by autograd for the
// input gradient when x requires grad (autocast: its 16-bit copy), so backward only multiplies.
// - CPU: BaseQuantLinear.dequantize_weight in torch ops: the zero points and the weight unpacked by int32 shifts
//   into int8 (4-bit) or int16 (8-bit) planes, the per-row scales and zero points gathered through g_idx.long(),
//   scales * (weight - zeros) in fp16.
// - CUDA: the Triton dequantizer, which writes the fp16 weight alone.
OpMemoryRule GptqLinearRule(const OpNode& node, const RuleContext& ctx) {
  const auto& inputs = ctx.graph.tensor_inputs(node.id);
  OpMemoryRule r = Uniform(inputs.size(), GradKind::kNone);
  if (inputs.size() < 2 || node.outputs.empty()) return r;
  r.input_grads[0] = GradKind::kNew;
  const int64_t n = static_cast<int64_t>(ArgNumber(node, 3, 0)), k = static_cast<int64_t>(ArgNumber(node, 4, 0));
  const int bits = static_cast<int>(ArgNumber(node, 5, 4));
  const int64_t group = static_cast<int64_t>(ArgNumber(node, 6, 128));
  const int64_t groups = group <= 0 || k == 0 ? 1 : (k + group - 1) / group;
  const int64_t plane = bits == 8 ? 2 : 1;  // dequant_dtype: int16 for 8 bits, int8 below
  const int64_t weight = k * n;
  const int64_t tokens = k > 0 ? NumElements(ctx.graph.value(inputs[0]).shape) / k : 0;
  const DType x = ctx.dtype(inputs[0]), out = ctx.dtype(node.outputs[0]);
  const bool keeps = ctx.graph.value(inputs[0]).requires_grad;
  auto& s = r.forward_prelude;
  auto at = [&] { return static_cast<int>(s.size()); };
  int dequantized;
  if (!ctx.backend.cuda) {
    // x >> wf in int32, .to(dequant_dtype), & maxq: each step frees the one before it.
    auto unpack = [&](int64_t values) {
      const int shifted = at();
      s.push_back({values * 4});
      s.push_back({values * plane});
      s.push_back({0, shifted});
      const int masked = at();
      s.push_back({values * plane});
      s.push_back({0, shifted + 1});
      return masked;
    };
    const int zeros = unpack(groups * n);
    const int unpacked = unpack(weight);
    s.push_back({k * 8});                // g_idx.long()
    const int scales = at();
    s.push_back({weight * 2});           // scales[g_idx]
    s.push_back({0, scales - 1});
    s.push_back({k * 8});                // g_idx.long()
    const int gathered = at();
    s.push_back({weight * plane});       // zeros[g_idx]
    s.push_back({0, gathered - 1});
    const int diff = at();
    s.push_back({weight * plane});       // weight - zeros
    s.push_back({0, gathered});
    dequantized = at();
    s.push_back({weight * 2});           // scales * (...): fp16
    s.push_back({0, scales});
    s.push_back({0, diff});
    s.push_back({0, zeros});             // the locals go when dequantize_weight returns
    s.push_back({0, unpacked});
  } else {
    dequantized = at();
    s.push_back({weight * 2});
  }
  if (x != DType::kF16) {  // .to(x.dtype)
    s.push_back({weight * ElementSize(x)});
    s.push_back({0, dequantized});
    dequantized = at() - 2;
  }
  if (out != x) {  // autocast inside torch.matmul: 16-bit copies of x and of the weight, which is what is kept
    s.push_back({tokens * k * ElementSize(out)});
    s.push_back({weight * ElementSize(out), -1, keeps});
  } else {
    s[static_cast<size_t>(dequantized)].saved = keeps;
  }
  if (out != x) r.backward_prelude.push_back({tokens * k * ElementSize(out)});  // the copy's gradient, then cast
  return r;
}

// What GenerationMixin._sample (transformers 4.57, greedy, min_new_tokens set) runs after a forward, in order.
// Tensor inputs: the logits [B, 1, V]; in a decode step the previous iteration's next_token_logits and
// next_token_scores [B, V] fp32; the attention mask and the generated ids [B, L] int64. The four last args:
// whether the previous tensors are there, B, V, L.
//   _update_model_kwargs_for_generation: attention_mask = cat([mask, mask.new_ones((B, 1))]);
//   next_token_logits = logits[:, -1, :].to(copy=True, dtype=float32)   (rebinding drops the previous one);
//   MinLengthLogitsProcessor: arange(V), isin(eos) [V] bool, scores.clone(), where(mask, -inf, scores);
//   MinNewTokensLengthLogitsProcessor: scores.clone(), arange(V), isin, where (the first one's output goes as the
//   list rebinds `scores`);
//   next_token_scores rebinds (the previous one goes); input_ids = cat([input_ids, next_tokens[:, None]]).
// Values of a few bytes per sequence (argmax, the stopping criteria, cache_position) are left out.
OpMemoryRule GenerateNextTokenRule(const OpNode& node, const RuleContext& ctx) {
  const auto& inputs = ctx.graph.tensor_inputs(node.id);
  OpMemoryRule r = Uniform(inputs.size(), GradKind::kNone);
  if (node.args.size() < 5) return r;
  const size_t last = node.args.size() - 5;  // the five ints follow the tensors
  const bool previous = ArgNumber(node, last, 0) != 0;
  const int64_t b = static_cast<int64_t>(ArgNumber(node, last + 1, 1));
  const int64_t v = static_cast<int64_t>(ArgNumber(node, last + 2, 0));
  const int64_t l = static_cast<int64_t>(ArgNumber(node, last + 3, 0));
  const bool processors = ArgNumber(node, last + 4, 2) != 0;  // the min-length pair, present with an eos token
  // The previous step's next_token_logits and next_token_scores: one tensor when no processor ran (an empty
  // LogitsProcessorList returns its input).
  const int carried = previous ? (processors ? 2 : 1) : 0;
  const int mask_input = 1 + carried, ids_input = 2 + carried;
  const int64_t scores = b * v * 4;
  auto& s = r.forward_prelude;
  auto at = [&] { return static_cast<int>(s.size()); };
  const int ones = at();
  s.push_back({b * 8});
  s.push_back({b * (l + 1) * 8});  // the longer attention mask
  s.push_back({0, ones});
  s.push_back({0, -1, false, mask_input});
  s.push_back({scores});           // next_token_logits
  if (previous) s.push_back({0, -1, false, 1});
  auto processor = [&](bool clone_first) {
    const int first = at();
    s.push_back({clone_first ? scores : v * 8});
    s.push_back({clone_first ? v * 8 : v});
    s.push_back({clone_first ? v : scores});
    const int clone = clone_first ? first : first + 2, arange = clone_first ? first + 1 : first;
    const int mask = clone_first ? first + 2 : first + 1;
    s.push_back({4});                // the -inf scalar
    const int out = at();
    s.push_back({scores});           // torch.where(...)
    s.push_back({0, out - 1});
    s.push_back({0, clone});
    s.push_back({0, arange});
    s.push_back({0, mask});
    return out;
  };
  if (processors) {
    const int min_length = processor(false);
    processor(true);
    s.push_back({0, min_length});
  }
  if (carried == 2) s.push_back({0, -1, false, 2});  // the previous next_token_scores
  s.push_back({b * (l + 1) * 8});    // the longer input_ids
  s.push_back({0, -1, false, ids_input});
  return r;
}

// The per-thread buffers cpu_flash_attention allocates for the kernel's run (PyTorch's
// aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): queries split into blocks of 32 rows (64 from 192 rows, 256
// from 768) and keys into blocks of up to 512; each thread holds in fp32 a block's scores, its row max and sum and
// its output rows, and for 16-bit inputs a 16-bit copy of the scores. Measured on CPU (torch 2.11): exact for
// bf16 and fp32, [1..4, 4, 32..256, 64].
int64_t CpuFlashAttentionBuffers(const TensorValue& q, const TensorValue& k, const TensorValue& v, int64_t elem,
                                 int threads) {
  const int64_t q_rows = q.shape[2], kv_rows = k.shape.size() == 4 ? k.shape[2] : q_rows;
  const int64_t v_dim = v.shape.empty() ? q.shape[3] : v.shape.back();
  const int64_t q_split = std::min<int64_t>(q_rows >= 768 ? 256 : q_rows >= 192 ? 64 : 32, q_rows);
  const int64_t kv_split = std::min<int64_t>(512, kv_rows);
  const int64_t per_thread = q_split * kv_split + 2 * q_split + q_split * v_dim;
  const int64_t reduced = elem == 2 ? q_split * kv_split * elem : 0;
  return threads * (per_thread * 4 + reduced);
}

// Number of rows of a [.., D] tensor: all dims but the last.
int64_t Rows(const TensorValue& v) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < v.shape.size(); ++i) rows *= v.shape[i];
  return rows;
}

}  // namespace

bool IsKnownNonDifferentiable(const std::string& kind) {
  const OpInfo* op = FindOp(kind);
  return op != nullptr && op->never_differentiable();
}

std::optional<OpMemoryRule> RuleFor(const OpNode& node, const RuleContext& ctx) {
  const OpInfo* op = FindOp(node.kind);
  if (op == nullptr) return std::nullopt;
  const std::string& k = node.kind;
  const auto& inputs = ctx.graph.tensor_inputs(node.id);
  const size_t n = inputs.size();
  auto input_bytes = [&](size_t i) { return ctx.bytes(inputs.at(i)); };
  auto output_bytes = [&](size_t i) { return ctx.bytes(node.outputs.at(i)); };
  auto requires_grad = [&](size_t i) { return ctx.graph.value(inputs[i]).requires_grad; };

  switch (op->grad) {
    case GradFormula::kUnmodelled:
      return std::nullopt;
    case GradFormula::kNone:
      return Uniform(n, GradKind::kNone);
    case GradFormula::kViewOfGrad:
      // clone/contiguous/reshape may copy (the IR knows); either way the gradient passes through as a view.
      return Uniform(n, GradKind::kView);
    case GradFormula::kCast: {
      // _to_copy backward: grad.to(self's dtype) -- a view when the dtypes match, else a new tensor.
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      if (n >= 1) r.input_grads[0] = GradKind::kPassThrough;
      return r;
    }
    case GradFormula::kSumTo: {
      // sum_to(grad, self.sizes()): the gradient itself when nothing was broadcast, else a reduced new tensor.
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      r.input_grads[0] = GradKind::kPassThrough;
      return r;
    }
    case GradFormula::kScatterBack: {
      // slice_backward / select_backward / index_put into zeros / cat of the pieces: a new input-sized tensor.
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      r.input_grads[0] = GradKind::kNew;
      // index.Tensor's IndexBackward0 keeps the index tensors for index_put (torch 2.11: _saved_indices).
      if (node.kind == "aten::index" && requires_grad(0)) {
        for (size_t i = 1; i < n; ++i) r.saved_inputs.push_back(static_cast<int>(i));
      }
      return r;
    }
    case GradFormula::kSlicesOfGrad:
      return Uniform(n, GradKind::kView);
    case GradFormula::kAdd:
      return Uniform(n, GradKind::kPassThrough);
    case GradFormula::kSub: {
      OpMemoryRule r = Uniform(n, GradKind::kPassThrough);
      if (n >= 2) r.input_grads[1] = GradKind::kNew;  // -grad
      return r;
    }
    case GradFormula::kFromGradOnly:
      return Uniform(n, GradKind::kNew);  // -grad, cumsum_backward(grad), grad.triu(): nothing saved
    case GradFormula::kIndexAdd: {
      // index_add_(self, dim, index, source): self's gradient is grad, source's a new grad.index_select(dim,
      // index).expand_as(source) (a pass-through whose shape differs is new). IndexAddBackward0 keeps the index and
      // the source itself (torch 2.11: _saved_index, _saved_source), so every expert's rows live until backward.
      OpMemoryRule r = Uniform(n, GradKind::kPassThrough);
      if (n >= 3) {
        r.input_grads[1] = GradKind::kNone;
        if (requires_grad(2)) r.saved_inputs = {1, 2};
      }
      return r;
    }
    case GradFormula::kRemainder: {
      // self: grad; other: -grad * self.div(other, rounding_mode="floor"), which reads both inputs.
      OpMemoryRule r = Uniform(n, GradKind::kPassThrough);
      if (n >= 2) {
        r.input_grads[1] = GradKind::kNew;
        if (requires_grad(1)) r.saved_inputs = {0, 1};
      }
      return r;
    }
    case GradFormula::kMul: {
      // mul: self grad = grad * other, other grad = grad * self; each input saved only for the other's gradient.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      if (n == 2) {
        const bool g0 = requires_grad(0), g1 = requires_grad(1);
        if (g1) r.saved_inputs.push_back(0);
        if (g0) r.saved_inputs.push_back(1);
        // A broadcast operand's gradient is computed full-size, then summed down (sum_to).
        for (size_t i = 0; i < 2; ++i) {
          if (requires_grad(i) && input_bytes(i) < output_bytes(0)) {
            r.backward_workspace_bytes = std::max(r.backward_workspace_bytes, output_bytes(0));
          }
        }
      }
      return r;
    }
    case GradFormula::kDiv: {
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      if (n == 2) {
        r.saved_inputs = {1};                           // grad / other
        if (requires_grad(1)) r.saved_inputs.push_back(0);  // -grad * self / other^2
      }
      return r;
    }
    case GradFormula::kPow: {
      // pow_backward: grad * (exponent * self.pow(exponent - 1)): two input-sized temporaries alive at once.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      r.saved_inputs = {0};
      r.backward_workspace_bytes = 2 * input_bytes(0);
      return r;
    }
    case GradFormula::kRsqrt: {
      // rsqrt: -0.5 * grad * result.pow(3): saves the result; two output-sized temporaries.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      r.saved_outputs = {0};
      r.backward_workspace_bytes = 2 * output_bytes(0);
      return r;
    }
    case GradFormula::kFromResult:
    case GradFormula::kSoftmax: {
      OpMemoryRule r = Uniform(n, GradKind::kNew);  // tanh_backward, threshold_backward, _softmax_backward_data...
      r.saved_outputs = {0};
      return r;
    }
    case GradFormula::kFromInput: {
      OpMemoryRule r = Uniform(n, GradKind::kNew);  // gelu_backward(grad, self), silu_backward(grad, self)
      r.saved_inputs = {0};
      return r;
    }
    case GradFormula::kCos:
    case GradFormula::kSin: {
      // cos: grad * -self.sin(); sin: grad * self.cos(): saves self, one or two temporaries.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      r.saved_inputs = {0};
      r.backward_workspace_bytes = (op->grad == GradFormula::kCos ? 2 : 1) * input_bytes(0);
      return r;
    }
    case GradFormula::kMean:
      return Uniform(n, GradKind::kNew);  // grad.expand(sizes) / numel: a new input-sized tensor
    case GradFormula::kSum:
      return Uniform(n, GradKind::kView);  // grad.expand(sizes): a view
    case GradFormula::kSelectingReduction: {
      // max.dim / min.dim: value_selecting_reduction_backward(grad, dim, indices, ...) reads the indices; the
      // full reduction, evenly_distribute_backward(grad, self, result), reads the input and the result.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      if (node.outputs.size() >= 2) {
        r.saved_outputs = {1};
      } else {
        for (size_t i = 0; i < n; ++i) r.saved_inputs.push_back(static_cast<int>(i));
        r.saved_outputs = {0};
      }
      return r;
    }
    case GradFormula::kMaskedFill: {
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      r.input_grads[0] = GradKind::kNew;  // grad.masked_fill(mask, 0)
      if (n >= 2) r.saved_inputs = {1};   // the mask
      return r;
    }
    case GradFormula::kWhere: {
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      r.input_grads[0] = GradKind::kNone;
      r.saved_inputs = {0};  // the condition
      return r;
    }
    case GradFormula::kDropout: {
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
    case GradFormula::kMatmul: {
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
        // Autograd keeps an operand only for the other operand's gradient (the derivative formulas of mm and
        // linear; the generated code saves `self` only when `mat2`/`weight` requires grad and vice versa): a
        // frozen weight's linear keeps the weight alone, and its input is not kept.
        const bool needed = n < 2 || requires_grad(static_cast<size_t>(1 - i));
        if (copies) {
          r.forward_extra.push_back({input_bytes(static_cast<size_t>(i)), needed});
        } else if (needed) {
          r.saved_inputs.push_back(i);
        }
      }
      return r;
    }
    case GradFormula::kQuantizedMatmul: {
      if (k == "torchao::linear_nf4") return LinearNf4Rule(node, ctx);
      if (k == "bnb::matmul_int8") return Int8MatmulRule(node, ctx);
      if (k == "gptq::linear") return GptqLinearRule(node, ctx);
      // bitsandbytes 0.50 MatMul4Bit (autograd/_functions.py) around gemm_4bit; args: x, packed weight, bias,
      // out_features, in_features, blocksize, nested (double quantization), the load dtype (c10 ScalarType).
      // Forward saves nothing but the packed weight (a parameter). Inside gemm_4bit, per backend:
      // - the default kernel (backends/default/ops.py, what CPU runs): with double quantization the per-block
      //   absmax is dequantized into fp32 and the offset added (a second fp32 copy; the first dies at once), then
      //   the weight is dequantized into x's dtype and F.linear runs; absmax and weight live until it returns;
      // - CUDA (backends/cuda/ops.py): a fused kernel that allocates only the output for M <= 4 tokens (fp32: M < 8),
      //   the same dequantize + F.linear fallback for M > 1536 (both absmax copies stay alive there, being locals);
      //   in between an arch heuristic picks either, and the fallback is assumed (an upper bound).
      // Backward: grad_A = grad_output @ dequantize_4bit(weight).to(grad dtype): functional.dequantize_4bit
      // dequantizes the absmax (fp32, freed on return), then the weight in the load dtype.
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      if (n >= 1) r.input_grads[0] = GradKind::kNew;
      const int64_t out_f = static_cast<int64_t>(ArgNumber(node, 3, 0)), in_f = static_cast<int64_t>(ArgNumber(node, 4, 0));
      const int64_t block = std::max<int64_t>(1, static_cast<int64_t>(ArgNumber(node, 5, 64)));
      const bool nested = ArgNumber(node, 6, 0) != 0;
      const DType load = DTypeOfScalarType(static_cast<int64_t>(ArgNumber(node, 7, 6))).value_or(DType::kF32);
      const DType compute = n >= 1 ? ctx.dtype(inputs[0]) : load;
      const int64_t elems = out_f * in_f;
      const int64_t absmax_bytes = (elems + block - 1) / block * ElementSize(DType::kF32);
      const int64_t tokens = n >= 1 && in_f > 0 ? NumElements(ctx.graph.value(inputs[0]).shape) / in_f : 0;
      const bool fused = ctx.backend.cuda && (tokens <= 4 || (compute == DType::kF32 && tokens < 8)) &&
                         in_f % block == 0;
      if (!fused && nested && ctx.backend.cuda) {
        r.forward_prelude = {{absmax_bytes}, {absmax_bytes}};  // absmax_dq, then absmax_dq + offset: both locals
      } else if (!fused && nested) {
        r.forward_prelude = {{absmax_bytes}, {absmax_bytes}, {0, 0}};  // the dequantized absmax dies in the add
      }
      if (!fused) r.forward_prelude.push_back({elems * ElementSize(compute)});  // B_dq, alive through F.linear
      // dequantize_4bit: the absmax (nested), freed on return, the weight in the load dtype, then its cast.
      if (nested) r.backward_prelude = {{absmax_bytes}};
      r.backward_prelude.push_back({elems * ElementSize(load)});
      if (nested) r.backward_prelude.push_back({0, 0});
      if (load != compute) {
        r.backward_prelude.push_back({elems * ElementSize(compute)});
        r.backward_prelude.push_back({0, static_cast<int>(r.backward_prelude.size()) - 2});
      }
      return r;
    }
    case GradFormula::kAddmm: {
      // self grad = grad (summed to the bias shape), mat1/mat2 grads new; mat1 and mat2 saved.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      r.input_grads[0] = GradKind::kPassThrough;
      r.saved_inputs = {1, 2};
      return r;
    }
    case GradFormula::kEmbedding: {
      // embedding_dense_backward: a new [num_weights, dim] gradient; saves the indices.
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      r.input_grads[0] = GradKind::kNew;
      r.saved_inputs = {1};
      return r;
    }
    case GradFormula::kLayerNorm: {
      // native_layer_norm saves input, weight, bias and mean/rstd: one value per row each, in the backend's dtype.
      OpMemoryRule r = Uniform(n, GradKind::kNew);
      r.saved_inputs = {0};
      bool fp32_params = false;
      for (size_t i = 1; i < n; ++i) {
        r.saved_inputs.push_back(static_cast<int>(i));
        fp32_params |= ctx.dtype(inputs[i]) == DType::kF32;
      }
      const DType stats = ctx.backend.LayerNormStats(ctx.dtype(inputs[0]), fp32_params);
      const int64_t row_stats = Rows(ctx.graph.value(inputs[0])) * ElementSize(stats);
      r.forward_extra.push_back({row_stats, true});
      r.forward_extra.push_back({row_stats, true});
      return r;
    }
    case GradFormula::kCrossEntropy: {
      // log_softmax(x) is kept for backward; nll_loss_backward makes a zero-filled x-sized gradient, then
      // log_softmax_backward makes the x gradient while that one is alive.
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      r.input_grads[0] = GradKind::kNew;
      r.forward_extra.push_back({input_bytes(0), true});
      r.backward_workspace_bytes = input_bytes(0);
      return r;
    }
    case GradFormula::kAttention: {
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      const DType qd = ctx.dtype(inputs[0]);
      const auto& q = ctx.graph.value(inputs[0]);
      // Keys with fewer heads than the queries, broadcast without enable_gqa (Falcon-7B's multi-query attention):
      // every fused kernel refuses them (sdp_utils_cpp.h check_batch_size_and_num_heads_dense), so PyTorch runs
      // its composite math attention, which keeps the [B, H, L, S] probabilities and expanded key/value copies.
      const bool enable_gqa = ArgNumber(node, 7, 0.0) != 0.0;
      if (n >= 2 && q.shape.size() == 4 && ctx.graph.value(inputs[1]).shape.size() == 4 && !enable_gqa &&
          ctx.graph.value(inputs[1]).shape[1] != q.shape[1]) {
        throw ConfigError("this model's attention broadcasts " + std::to_string(ctx.graph.value(inputs[1]).shape[1]) +
                          " key/value head(s) over " + std::to_string(q.shape[1]) +
                          " query heads in scaled_dot_product_attention, which runs PyTorch's math attention "
                          "(no fused kernel takes it): not modelled yet");
      }
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
        if (mask.dtype == DType::kBool) {
          r.forward_extra.push_back({NumElements(mask.shape) * ElementSize(qd), true, /*before_kernel=*/true});
        }
      }
      // The kernel's own buffers, freed when it returns.
      if (kernel == AttentionKernel::kCpuFlash && q.shape.size() == 4 && n >= 3) {
        r.forward_extra.push_back({CpuFlashAttentionBuffers(q, ctx.graph.value(inputs[1]), ctx.graph.value(inputs[2]),
                                                            ElementSize(qd), ctx.backend.cpu_threads),
                                   false});
      }
      return r;
    }
    case GradFormula::kGenerationLoop:
      return GenerateNextTokenRule(node, ctx);
    case GradFormula::kCopy: {
      // copy_: self gets zeros_like(grad) (its old value is overwritten); src gets grad, cast and summed to its
      // shape (VariableTypeManual.cpp copy_).
      OpMemoryRule r = Uniform(n, GradKind::kNone);
      r.input_grads[0] = GradKind::kNew;
      if (n >= 2) r.input_grads[1] = GradKind::kPassThrough;
      return r;
    }
  }
  return std::nullopt;
}

}  // namespace llmem::sim
