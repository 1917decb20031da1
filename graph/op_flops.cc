#include "graph/op_flops.h"

#include <algorithm>
#include <array>
#include <set>
#include <string_view>

#include "graph/error.h"
#include "graph/op_registry.h"

namespace llmem {
namespace {

// --- Factors, each with its reason ------------------------------------------------------------------------------

// Fused attention (flash, memory-efficient, cuDNN) recomputes Q*K^T in backward: five matmuls against the
// forward's two, so backward is 2.5x forward (the convention of Dao-AILab/flash-attention
// benchmarks/benchmark_flash_attention.py, flops(mode="bwd")).
constexpr double kFusedAttentionBackwardFactor = 2.5;
// The math kernel keeps the attention probabilities: backward is two matmuls per forward matmul.
constexpr double kMathAttentionBackwardFactor = 2.0;
// (Log-)softmax per element: max, subtract, exp, sum, normalize. Backward: exp (log_softmax) or multiply, a row
// sum, subtract, multiply. Our own count of the steps; these ops are memory-bound, so it hardly matters.
constexpr double kSoftmaxFlopsPerElement = 5;
constexpr double kSoftmaxBackwardFlopsPerElement = 4;
// LayerNorm per element: mean (add), variance (subtract, square, add), normalize (subtract, multiply); RMSNorm:
// square, add, multiply. Weight and bias add one each.
constexpr double kLayerNormFlopsPerElement = 6;
constexpr double kRmsNormFlopsPerElement = 3;
// A normalization's backward takes two row reductions (of g*w and of g*w*x_hat) plus an elementwise combine:
// about twice the forward's work.
constexpr double kNormBackwardFactor = 2;
// Row statistics (mean, rstd) are float32 whatever the input dtype (ATen's acc_type).
constexpr double kStatBytes = 4;

// --- The graph as one op's cost sees it -------------------------------------------------------------------------

class CostContext {
 public:
  CostContext(const Graph& graph, const CostOptions& options) : graph_(graph), options_(options) {}

  const Graph& graph() const { return graph_; }

  const std::vector<int64_t>& Shape(ValueId v) const {
    auto it = options_.shape_overrides.find(v);
    return it != options_.shape_overrides.end() ? it->second : graph_.value(v).shape;
  }
  double Elements(ValueId v) const { return ElementsOf(Shape(v)); }
  int64_t Dim(ValueId v, int d) const {  // negative d counts from the end; 1 when out of range
    const auto& s = Shape(v);
    const int rank = static_cast<int>(s.size());
    if (d < 0) d += rank;
    return d >= 0 && d < rank ? s[static_cast<size_t>(d)] : 1;
  }
  DType Dtype(ValueId v) const {
    const TensorValue& t = graph_.value(v);
    return options_.bf16_weights ? t.dtype_bf16_weights : t.dtype;
  }
  // Dtype a matmul-like op computes `v` in: the autocast dtype for floating values, else its own.
  DType MatmulDtype(ValueId v) const {
    const DType d = Dtype(v);
    return options_.matmul_dtype && IsFloating(d) ? *options_.matmul_dtype : d;
  }
  bool RequiresGrad(ValueId v) const { return graph_.value(v).requires_grad; }

  // Logical size in `dtype` (what a kernel writes, or reads of a dense value).
  double Bytes(ValueId v, DType dtype) const { return Elements(v) * static_cast<double>(ElementSize(dtype)); }
  double Bytes(ValueId v) const { return Bytes(v, Dtype(v)); }
  // What a kernel reads of `v`: its logical size, capped by the storage behind it (an expanded, stride-0 view
  // is read from its small storage; caches serve the repeats).
  double ReadBytes(ValueId v, DType dtype) const {
    return std::min(Elements(v), StorageElements(v)) * static_cast<double>(ElementSize(dtype));
  }
  double ReadBytes(ValueId v) const { return ReadBytes(v, Dtype(v)); }

  static double ElementsOf(const std::vector<int64_t>& shape) {
    double n = 1;
    for (int64_t d : shape) n *= static_cast<double>(d);
    return n;
  }

 private:
  double StorageElements(ValueId v) const {
    const ValueId root = graph_.StorageRoot(v);
    if (options_.shape_overrides.count(root)) return Elements(root);
    const int64_t numel = graph_.value(root).storage_numel;
    return numel > 0 ? static_cast<double>(numel) : Elements(v);
  }

  const Graph& graph_;
  const CostOptions& options_;
};

// --- Argument helpers -------------------------------------------------------------------------------------------

const OpArg* ArgAt(const OpNode& node, int i) {
  return i >= 0 && static_cast<size_t>(i) < node.args.size() ? &node.args[static_cast<size_t>(i)] : nullptr;
}
std::optional<ValueId> TensorArg(const OpNode& node, int i) {
  const OpArg* a = ArgAt(node, i);
  if (a == nullptr || a->kind != OpArg::Kind::kTensor || a->tensors.empty()) return std::nullopt;
  return a->tensors[0];
}
bool BoolArg(const OpNode& node, int i, bool fallback) {
  const OpArg* a = ArgAt(node, i);
  if (a == nullptr || (a->kind != OpArg::Kind::kBool && a->kind != OpArg::Kind::kInt)) return fallback;
  return a->int_value != 0;
}
double NumberArg(const OpNode& node, int i, double fallback) {
  const OpArg* a = ArgAt(node, i);
  if (a == nullptr) return fallback;
  if (a->kind == OpArg::Kind::kDouble) return a->double_value;
  if (a->kind == OpArg::Kind::kInt || a->kind == OpArg::Kind::kBool) return static_cast<double>(a->int_value);
  return fallback;
}
// Every tensor the op reads, each once, in argument order.
std::vector<ValueId> DistinctTensorInputs(const OpNode& node) {
  std::vector<ValueId> out;
  for (const auto& a : node.args) {
    for (ValueId v : a.tensors) {
      if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
    }
  }
  return out;
}
bool AnyOutputRequiresGrad(const CostContext& ctx, const OpNode& node) {
  return std::any_of(node.outputs.begin(), node.outputs.end(), [&](ValueId v) { return ctx.RequiresGrad(v); });
}
double OutputBytes(const CostContext& ctx, const OpNode& node) {
  double b = 0;
  for (ValueId v : node.outputs) b += ctx.Bytes(v);
  return b;
}
double OutputElements(const CostContext& ctx, const OpNode& node) {
  double n = 0;
  for (ValueId v : node.outputs) n += ctx.Elements(v);
  return n;
}
// The op's row: its gradient formula and cost family (graph/op_registry.h).
GradFormula GradOf(const OpNode& node) {
  const OpInfo* op = FindOp(node.kind);
  return op == nullptr ? GradFormula::kUnmodelled : op->grad;
}

// --- Matmul-like ops --------------------------------------------------------------------------------------------

// A contraction of `operands` (each one's gradient is one product of the same size) plus an optional addend
// broadcast onto the output (a bias, addmm's self).
struct Contraction {
  std::vector<ValueId> operands;
  std::optional<ValueId> addend;
  double product_flops = 0;  // 2 * output elements * contracted length
};

// Operand read in the compute dtype, plus autocast's cast of it when its dtype differs (read, then write).
double OperandReadBytes(const CostContext& ctx, ValueId v) {
  const DType compute = ctx.MatmulDtype(v);
  double bytes = ctx.ReadBytes(v, compute);
  if (compute != ctx.Dtype(v)) bytes += ctx.ReadBytes(v) + ctx.Bytes(v, compute);
  return bytes;
}

OpCost CostContraction(const CostContext& ctx, const OpNode& node, const Contraction& c) {
  OpCost cost;
  cost.matmul_like = true;
  if (node.outputs.empty()) return cost;
  const ValueId out = node.outputs[0];
  const double out_bytes = ctx.Bytes(out, ctx.MatmulDtype(out));
  cost.fwd_flops = c.product_flops + (c.addend ? ctx.Elements(out) : 0);
  for (ValueId v : c.operands) cost.fwd_bytes += OperandReadBytes(ctx, v);
  if (c.addend) cost.fwd_bytes += ctx.ReadBytes(*c.addend);
  cost.fwd_bytes += out_bytes;
  if (!AnyOutputRequiresGrad(ctx, node)) return cost;
  // Backward: the gradient of each operand is one product of the same size (dA = dC*B^T, dB = A^T*dC): it reads
  // the output gradient and the other operands and writes its gradient, cast back to the operand's dtype.
  for (size_t i = 0; i < c.operands.size(); ++i) {
    const ValueId v = c.operands[i];
    if (!ctx.RequiresGrad(v)) continue;
    cost.bwd_flops += c.product_flops;
    cost.bwd_bytes += out_bytes + ctx.Bytes(v, ctx.MatmulDtype(v));
    for (size_t j = 0; j < c.operands.size(); ++j) {
      if (j != i) cost.bwd_bytes += ctx.ReadBytes(c.operands[j], ctx.MatmulDtype(c.operands[j]));
    }
    if (ctx.MatmulDtype(v) != ctx.Dtype(v)) cost.bwd_bytes += ctx.Bytes(v, ctx.MatmulDtype(v)) + ctx.Bytes(v);
  }
  if (c.addend && ctx.RequiresGrad(*c.addend)) {  // bias gradient: the output gradient summed over rows
    cost.bwd_flops += ctx.Elements(out);
    cost.bwd_bytes += out_bytes + ctx.Bytes(*c.addend);
  }
  return cost;
}

// Einsum FLOPs, contracting left to right as torch.einsum does without opt_einsum. Labels: letters as
// themselves, ellipsis dims as 256 + k, right-aligned. nullopt when the equation does not parse.
std::optional<double> EinsumProductFlops(const CostContext& ctx, std::string_view equation,
                                         const std::vector<ValueId>& operands) {
  std::string eq;
  for (char ch : equation) {
    if (ch != ' ') eq += ch;
  }
  const size_t arrow = eq.find("->");
  const std::string lhs = eq.substr(0, arrow);
  std::vector<std::string> specs;
  for (size_t start = 0;;) {
    const size_t comma = lhs.find(',', start);
    specs.push_back(lhs.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (specs.size() != operands.size() || operands.empty()) return std::nullopt;
  constexpr int kEllipsisBase = 256;
  auto letters = [](const std::string& s) {
    return static_cast<int>(std::count_if(s.begin(), s.end(), [](char ch) { return ch != '.'; }));
  };
  int ellipsis_rank = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const int rank = static_cast<int>(ctx.Shape(operands[i]).size());
    if (specs[i].find("...") != std::string::npos) ellipsis_rank = std::max(ellipsis_rank, rank - letters(specs[i]));
  }
  std::map<int, int64_t> sizes;
  std::vector<std::set<int>> labels;
  std::map<int, int> occurrences;
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& shape = ctx.Shape(operands[i]);
    const std::string& s = specs[i];
    const bool has_ellipsis = s.find("...") != std::string::npos;
    const int covered = static_cast<int>(shape.size()) - letters(s);
    if (covered < 0 || (!has_ellipsis && covered != 0)) return std::nullopt;
    std::set<int> mine;
    size_t dim = 0;
    for (size_t p = 0; p < s.size(); ++p) {
      std::vector<int> here;
      if (s.compare(p, 3, "...") == 0) {
        for (int k = 0; k < covered; ++k) here.push_back(kEllipsisBase + ellipsis_rank - covered + k);
        p += 2;
      } else {
        here.push_back(static_cast<unsigned char>(s[p]));
      }
      for (int label : here) {
        if (dim >= shape.size()) return std::nullopt;  // more labels than dims (e.g. two ellipses)
        sizes[label] = std::max(sizes[label], shape[dim++]);
        if (mine.insert(label).second) ++occurrences[label];
      }
    }
    labels.push_back(std::move(mine));
  }
  std::set<int> output;
  if (arrow != std::string::npos) {
    for (char ch : eq.substr(arrow + 2)) {
      if (ch != '.') output.insert(static_cast<unsigned char>(ch));
    }
    if (eq.find("...", arrow) != std::string::npos) {
      for (int k = 0; k < ellipsis_rank; ++k) output.insert(kEllipsisBase + k);
    }
  } else {  // implicit output: the ellipsis dims and every letter used once
    for (int k = 0; k < ellipsis_rank; ++k) output.insert(kEllipsisBase + k);
    for (const auto& [label, n] : occurrences) {
      if (n == 1) output.insert(label);
    }
  }
  auto product = [&](const std::set<int>& ls) {
    double p = 1;
    for (int l : ls) p *= static_cast<double>(sizes[l]);
    return p;
  };
  if (labels.size() == 1) {  // a reduction (or a plain permutation, no work)
    const bool reduces = std::any_of(labels[0].begin(), labels[0].end(), [&](int l) { return !output.count(l); });
    return reduces ? ctx.Elements(operands[0]) : 0.0;
  }
  double flops = 0;
  std::set<int> current = labels[0];
  for (size_t i = 1; i < labels.size(); ++i) {
    std::set<int> all = current;
    all.insert(labels[i].begin(), labels[i].end());
    std::set<int> needed = output;
    for (size_t j = i + 1; j < labels.size(); ++j) needed.insert(labels[j].begin(), labels[j].end());
    std::set<int> kept;
    for (int l : all) {
      if (needed.count(l)) kept.insert(l);
    }
    flops += (kept.size() < all.size() ? 2.0 : 1.0) * product(all);  // a contraction multiplies and adds
    current = std::move(kept);
  }
  return flops;
}

std::optional<OpCost> CostMatmulLike(const CostContext& ctx, const OpNode& node) {
  const std::string& k = node.kind;
  if (node.outputs.empty()) return std::nullopt;
  const double out_elems = ctx.Elements(node.outputs[0]);
  auto contract = [&](int a, int b, int addend, double extra_factor) -> std::optional<OpCost> {
    auto ta = TensorArg(node, a), tb = TensorArg(node, b);
    if (!ta || !tb) return std::nullopt;
    Contraction c;
    c.operands = {*ta, *tb};
    c.addend = TensorArg(node, addend);
    // Every output element is a dot product over the last dim of the first operand (its only dim for a vector).
    c.product_flops = 2 * out_elems * static_cast<double>(ctx.Dim(*ta, -1)) * extra_factor;
    return CostContraction(ctx, node, c);
  };
  if (k == "aten::linear" || k == "bnb::matmul_4bit" || k == "bnb::matmul_int8" || k == "gptq::linear" ||
      k == "torchao::linear_nf4") {
    return contract(0, 1, 2, 1);  // quantized: the stored weight's bytes
  }
  if (k == "aten::matmul" || k == "aten::mm" || k == "aten::bmm") return contract(0, 1, -1, 1);
  if (k == "aten::addmm" || k == "aten::baddbmm") return contract(1, 2, 0, 1);
  if (k == "aten::addbmm") {  // [b, n, k] x [b, k, p] summed over b into [n, p]
    auto b1 = TensorArg(node, 1);
    return b1 ? contract(1, 2, 0, static_cast<double>(ctx.Dim(*b1, 0))) : std::nullopt;
  }
  if (k == "aten::conv1d") {  // weight [C_out, C_in / groups, kernel]
    auto in = TensorArg(node, 0), w = TensorArg(node, 1);
    if (!in || !w) return std::nullopt;
    Contraction c;
    c.operands = {*in, *w};
    c.addend = TensorArg(node, 2);
    c.product_flops = 2 * out_elems * static_cast<double>(ctx.Dim(*w, 1) * ctx.Dim(*w, 2));
    return CostContraction(ctx, node, c);
  }
  if (k == "aten::einsum") {
    const OpArg* eq = ArgAt(node, 0);
    const OpArg* list = ArgAt(node, 1);
    if (eq == nullptr || list == nullptr || eq->kind != OpArg::Kind::kString) return std::nullopt;
    auto flops = EinsumProductFlops(ctx, eq->text, list->tensors);
    if (!flops) return std::nullopt;
    Contraction c;
    c.operands = list->tensors;
    c.product_flops = *flops;
    return CostContraction(ctx, node, c);
  }
  return std::nullopt;
}

// --- Attention --------------------------------------------------------------------------------------------------

// Where each attention op keeps its mask and is_causal arguments (schemas of torch 2.11's native_functions.yaml).
struct AttentionSchema {
  std::string_view kind;
  int mask_arg;     // -1: the op takes no mask
  int causal_arg;
  bool recomputes;  // fused kernel: backward recomputes the scores
};
// aten::scaled_dot_product_attention is the composite: on CUDA it dispatches to flash or memory-efficient
// attention (simulator/backend_rules.h), both fused.
constexpr std::array<AttentionSchema, 6> kAttentionSchemas{{
    {"aten::scaled_dot_product_attention", 3, 5, true},
    {"aten::_scaled_dot_product_flash_attention", -1, 4, true},
    {"aten::_scaled_dot_product_efficient_attention", 3, 6, true},
    {"aten::_scaled_dot_product_cudnn_attention", 3, 6, true},
    {"aten::_scaled_dot_product_flash_attention_for_cpu", 5, 4, true},
    {"aten::_scaled_dot_product_attention_math", 3, 5, false},
}};

// (query, key) pairs a causal kernel computes: is_causal masks with tril(ones(Lq, Lk)), aligned top-left, so query
// i sees min(i + 1, Lk) keys; about half of Lq * Lk.
double CausalPairs(double lq, double lk) {
  if (lq <= lk) return lq * (lq + 1) / 2;
  return lk * (lk + 1) / 2 + (lq - lk) * lk;
}

std::optional<OpCost> CostAttention(const CostContext& ctx, const OpNode& node) {
  const auto schema = std::find_if(kAttentionSchemas.begin(), kAttentionSchemas.end(),
                                   [&](const AttentionSchema& s) { return s.kind == node.kind; });
  if (schema == kAttentionSchemas.end() || node.outputs.empty()) return std::nullopt;
  auto q = TensorArg(node, 0), k = TensorArg(node, 1), v = TensorArg(node, 2);
  if (!q || !k || !v) return std::nullopt;
  const double lq = static_cast<double>(ctx.Dim(*q, -2)), e = static_cast<double>(ctx.Dim(*q, -1));
  const double lk = static_cast<double>(ctx.Dim(*k, -2)), ev = static_cast<double>(ctx.Dim(*v, -1));
  const double heads = lq * e > 0 ? ctx.Elements(*q) / (lq * e) : 0;  // batch x query heads
  // The IR records is_causal as traced: an explicit mask (is_causal=False) makes the kernel compute every pair.
  const bool causal = BoolArg(node, schema->causal_arg, false);
  const double pairs = causal ? CausalPairs(lq, lk) : lq * lk;
  const auto mask = TensorArg(node, schema->mask_arg);

  OpCost cost;
  cost.matmul_like = true;
  cost.fwd_flops = 2 * heads * pairs * e + 2 * heads * pairs * ev;  // Q*K^T, then P*V
  const double qkv_bytes = OperandReadBytes(ctx, *q) + OperandReadBytes(ctx, *k) + OperandReadBytes(ctx, *v);
  const double mask_bytes = mask ? ctx.ReadBytes(*mask) : 0;
  const ValueId out = node.outputs[0];
  const double out_bytes = ctx.Bytes(out, ctx.MatmulDtype(out));
  double written = 0;
  for (ValueId o : node.outputs) written += o == out ? out_bytes : ctx.Bytes(o);
  // The composite returns only the output; its kernel also writes a float32 logsumexp per query row.
  if (node.outputs.size() == 1) written += heads * lq * kStatBytes;
  cost.fwd_bytes = qkv_bytes + mask_bytes + written;
  if (!AnyOutputRequiresGrad(ctx, node)) return cost;
  cost.bwd_flops = cost.fwd_flops * (schema->recomputes ? kFusedAttentionBackwardFactor : kMathAttentionBackwardFactor);
  // Reads q, k, v, the output, its gradient, the logsumexp and the mask; writes the gradients of q, k, v.
  cost.bwd_bytes = qkv_bytes + 2 * out_bytes + heads * lq * kStatBytes + mask_bytes;
  for (ValueId t : {*q, *k, *v}) {
    if (ctx.RequiresGrad(t)) cost.bwd_bytes += ctx.Bytes(t, ctx.MatmulDtype(t));
  }
  return cost;
}

// --- Losses, softmax, normalization, embedding ------------------------------------------------------------------

std::optional<OpCost> CostSoftmaxOrLoss(const CostContext& ctx, const OpNode& node, CostFamily family) {
  auto x = TensorArg(node, 0);
  if (!x || node.outputs.empty()) return std::nullopt;
  const double n = ctx.Elements(*x);
  const bool x_grad = AnyOutputRequiresGrad(ctx, node) && ctx.RequiresGrad(*x);
  OpCost cost;
  if (family == CostFamily::kSoftmax) {
    cost.fwd_flops = kSoftmaxFlopsPerElement * n;
    cost.fwd_bytes = ctx.ReadBytes(*x) + OutputBytes(ctx, node);
    if (x_grad) {  // reads the gradient and the saved result, writes the input gradient
      cost.bwd_flops = kSoftmaxBackwardFlopsPerElement * n;
      cost.bwd_bytes = 2 * OutputBytes(ctx, node) + ctx.Bytes(*x);
    }
    return cost;
  }
  auto target = TensorArg(node, 1);
  const double target_bytes = target ? ctx.ReadBytes(*target) : 0;
  const double rows = n / static_cast<double>(ctx.Shape(*x).size() >= 2 ? ctx.Dim(*x, 1) : ctx.Dim(*x, 0));
  if (family == CostFamily::kCrossEntropy) {
    // log_softmax (writes x-sized log-probabilities, kept for backward), then nll_loss gathers one per row.
    cost.fwd_flops = kSoftmaxFlopsPerElement * n + rows;
    cost.fwd_bytes = ctx.ReadBytes(*x) + ctx.Bytes(*x) + target_bytes + OutputBytes(ctx, node);
    if (x_grad) {
      // nll_loss_backward zero-fills an x-sized gradient and scatters into it; log_softmax_backward reads it and
      // the log-probabilities and writes the x gradient.
      cost.bwd_flops = kSoftmaxBackwardFlopsPerElement * n;
      cost.bwd_bytes = 4 * ctx.Bytes(*x) + target_bytes;
    }
    return cost;
  }
  if (family == CostFamily::kNllLoss) {
    cost.fwd_flops = rows;
    cost.fwd_bytes = rows * static_cast<double>(ElementSize(ctx.Dtype(*x))) + target_bytes + OutputBytes(ctx, node);
    if (x_grad) {
      cost.bwd_flops = rows;
      cost.bwd_bytes = ctx.Bytes(*x) + target_bytes;  // zero-filled gradient, one write per row
    }
    return cost;
  }
  return std::nullopt;
}

std::optional<OpCost> CostNorm(const CostContext& ctx, const OpNode& node, CostFamily family) {
  const bool layer_norm = family == CostFamily::kLayerNorm;
  auto x = TensorArg(node, 0);
  if (!x || node.outputs.empty()) return std::nullopt;
  const OpArg* normalized = ArgAt(node, 1);
  double row_len = 1;
  if (normalized != nullptr && normalized->kind == OpArg::Kind::kIntList && !normalized->ints.empty()) {
    for (int64_t d : normalized->ints) row_len *= static_cast<double>(d);
  } else {
    row_len = static_cast<double>(ctx.Dim(*x, -1));
  }
  const double n = ctx.Elements(*x);
  const double rows = row_len > 0 ? n / row_len : 0;
  const double stats_bytes = rows * kStatBytes * (layer_norm ? 2 : 1);  // mean and rstd, or rstd alone
  std::vector<ValueId> affine;
  for (int i : {2, 3}) {
    if (i == 3 && !layer_norm) break;  // rms_norm's arg 3 is eps
    if (auto t = TensorArg(node, i)) affine.push_back(*t);
  }
  OpCost cost;
  cost.fwd_flops = (layer_norm ? kLayerNormFlopsPerElement : kRmsNormFlopsPerElement) * n +
                   static_cast<double>(affine.size()) * n;
  // Reads x and the weights; writes y and the statistics it keeps for backward.
  cost.fwd_bytes = ctx.ReadBytes(*x) + ctx.Bytes(node.outputs[0]) + stats_bytes;
  for (ValueId a : affine) cost.fwd_bytes += ctx.ReadBytes(a);
  if (!AnyOutputRequiresGrad(ctx, node)) return cost;
  cost.bwd_flops = kNormBackwardFactor * cost.fwd_flops;
  // Reads the gradient, x, the statistics and the weight; writes the x, weight and bias gradients.
  cost.bwd_bytes = ctx.Bytes(node.outputs[0]) + ctx.ReadBytes(*x) + stats_bytes;
  if (ctx.RequiresGrad(*x)) cost.bwd_bytes += ctx.Bytes(*x);
  for (ValueId a : affine) cost.bwd_bytes += ctx.ReadBytes(a) + (ctx.RequiresGrad(a) ? ctx.Bytes(a) : 0);
  return cost;
}

std::optional<OpCost> CostEmbedding(const CostContext& ctx, const OpNode& node) {
  auto weight = TensorArg(node, 0), indices = TensorArg(node, 1);
  if (!weight || !indices || node.outputs.empty()) return std::nullopt;
  const ValueId out = node.outputs[0];
  OpCost cost;
  // A gather: no arithmetic; reads the indices and the selected rows, writes them.
  cost.fwd_bytes = ctx.ReadBytes(*indices) + ctx.Bytes(out, ctx.Dtype(*weight)) + ctx.Bytes(out);
  if (AnyOutputRequiresGrad(ctx, node) && ctx.RequiresGrad(*weight)) {
    // embedding_dense_backward: zero-fill the weight-sized gradient, then add each gradient row into its row.
    cost.bwd_flops = ctx.Elements(out);
    cost.bwd_bytes = ctx.Bytes(*weight) + ctx.ReadBytes(*indices) + 3 * ctx.Bytes(out);
  }
  return cost;
}

// --- Reductions, data movement, elementwise ---------------------------------------------------------------------

OpCost CostReduction(const CostContext& ctx, const OpNode& node) {
  OpCost cost;
  auto x = TensorArg(node, 0);
  if (!x) return cost;
  cost.fwd_flops = ctx.Elements(*x);
  cost.fwd_bytes = ctx.ReadBytes(*x) + OutputBytes(ctx, node);
  if (!AnyOutputRequiresGrad(ctx, node) || !ctx.RequiresGrad(*x)) return cost;
  if (GradOf(node) == GradFormula::kSum) return cost;  // the gradient is an expanded view of the output gradient
  cost.bwd_flops = ctx.Elements(*x);
  cost.bwd_bytes = OutputBytes(ctx, node) + ctx.Bytes(*x);  // mean: grad.expand / numel, written input-sized
  if (GradOf(node) != GradFormula::kMean) cost.bwd_bytes += ctx.ReadBytes(*x);  // the rest also read the saved input
  return cost;
}

// A gradient that is a view of the output gradient needs no backward kernel (op_memory_rules: kView).
bool GradientIsAView(const OpNode& node) {
  const GradFormula g = GradOf(node);
  return g == GradFormula::kViewOfGrad || g == GradFormula::kSlicesOfGrad;
}

// Ops that only move or create data: no arithmetic.
OpCost CostDataMovement(const CostContext& ctx, const OpNode& node) {
  OpCost cost;
  if (node.kind == "aten::empty" || node.kind == "aten::empty_like" || node.kind == "aten::new_empty") return cost;
  const bool fills = node.kind == "aten::fill_" || node.kind == "aten::zero_" || node.kind.ends_with("_like") ||
                     node.kind.starts_with("aten::new_");  // shape/dtype donors, not read
  const double out_elems = OutputElements(ctx, node);
  const std::vector<ValueId> inputs = DistinctTensorInputs(node);
  for (size_t i = 0; i < inputs.size() && !fills; ++i) {
    if (i == 0 && node.kind == "aten::copy_") continue;  // copy_ overwrites self without reading it
    // A gather or slice reads no more than it writes.
    cost.fwd_bytes += std::min(ctx.ReadBytes(inputs[i]),
                               out_elems * static_cast<double>(ElementSize(ctx.Dtype(inputs[i]))));
  }
  cost.fwd_bytes += OutputBytes(ctx, node);
  if (!AnyOutputRequiresGrad(ctx, node) || GradientIsAView(node)) return cost;
  for (ValueId v : inputs) {
    if (!ctx.RequiresGrad(v)) continue;
    const bool same_dtype = std::all_of(node.outputs.begin(), node.outputs.end(),
                                        [&](ValueId o) { return ctx.Dtype(o) == ctx.Dtype(v); });
    const bool is_cast = OpHas(node.kind, kCastOp);
    if (is_cast && same_dtype) continue;  // the gradient passes through
    // A cast back, or a zero-filled input-sized gradient the output gradient is scattered into.
    cost.bwd_bytes += OutputBytes(ctx, node) + ctx.Bytes(v);
  }
  return cost;
}

OpCost CostElementwise(const CostContext& ctx, const OpNode& node) {
  OpCost cost;
  const std::vector<ValueId> inputs = DistinctTensorInputs(node);
  const double out_elems = OutputElements(ctx, node);
  const double out_bytes = OutputBytes(ctx, node);
  const GradFormula grad = GradOf(node);
  if (grad == GradFormula::kDropout) {
    // At p = 0 or in eval mode ATen returns the input: no kernel. Otherwise a 1-byte mask is drawn and applied.
    if (NumberArg(node, 1, 0.0) == 0.0 || !BoolArg(node, 2, true) || inputs.empty()) return cost;
    cost.fwd_flops = out_elems;
    cost.fwd_bytes = ctx.ReadBytes(inputs[0]) + out_bytes + out_elems;
    if (AnyOutputRequiresGrad(ctx, node)) {
      cost.bwd_flops = out_elems;
      cost.bwd_bytes = out_bytes + out_elems + ctx.Bytes(inputs[0]);
    }
    return cost;
  }
  cost.fwd_flops = out_elems;  // Note [Counting FLOPs]: 1 per output element
  for (ValueId v : inputs) cost.fwd_bytes += ctx.ReadBytes(v);
  cost.fwd_bytes += out_bytes;
  if (!AnyOutputRequiresGrad(ctx, node)) return cost;
  const bool additive = grad == GradFormula::kAdd || grad == GradFormula::kSub;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ValueId v = inputs[i];
    if (!ctx.RequiresGrad(v)) continue;
    if (additive) {
      const bool broadcast = ctx.Elements(v) < out_elems;
      const bool negated = i == 1 && grad == GradFormula::kSub;
      if (!broadcast && !negated) continue;  // the output gradient passes through unchanged
      cost.bwd_flops += out_elems;           // sum_to the input's shape, or negate
      cost.bwd_bytes += out_bytes + ctx.Bytes(v);
      continue;
    }
    // One kernel per input gradient (~1x forward): reads the output gradient and the saved operands (the other
    // inputs; a unary op its own input), writes this input's gradient.
    cost.bwd_flops += out_elems;
    cost.bwd_bytes += out_bytes + ctx.Bytes(v);
    for (ValueId w : inputs) {
      if (w != v || inputs.size() == 1) cost.bwd_bytes += ctx.ReadBytes(w);
    }
  }
  return cost;
}

// --- Dispatch ---------------------------------------------------------------------------------------------------

// Ops that launch no device kernel: shape queries, scalar conversions, the interpreter's own ops.
bool RunsNoKernel(const OpNode& node, CostFamily family) {
  return node.outputs.empty() || node.kind.starts_with("prim::") || family == CostFamily::kNoKernel;
}

// A view: every output shares an input's storage and the op does not write in place.
bool IsView(const CostContext& ctx, const OpNode& node) {
  if (IsInPlace(node.kind)) return false;
  return std::all_of(node.outputs.begin(), node.outputs.end(),
                     [&](ValueId v) { return ctx.graph().value(v).alias_of.valid(); });
}

OpCost Cost(const CostContext& ctx, const OpNode& node, bool* generic) {
  *generic = false;
  const OpInfo* op = FindOp(node.kind);
  const CostFamily family = op == nullptr ? CostFamily::kGeneric : op->cost;
  if (RunsNoKernel(node, family) || IsView(ctx, node)) return {};
  std::optional<OpCost> cost;
  switch (family) {
    case CostFamily::kContraction:
      cost = CostMatmulLike(ctx, node);
      break;
    case CostFamily::kAttention:
      cost = CostAttention(ctx, node);
      break;
    case CostFamily::kSoftmax:
    case CostFamily::kCrossEntropy:
    case CostFamily::kNllLoss:
      cost = CostSoftmaxOrLoss(ctx, node, family);
      break;
    case CostFamily::kLayerNorm:
    case CostFamily::kRmsNorm:
      cost = CostNorm(ctx, node, family);
      break;
    case CostFamily::kEmbedding:
      cost = CostEmbedding(ctx, node);
      break;
    case CostFamily::kReduction:
      return CostReduction(ctx, node);
    case CostFamily::kDataMovement:
      return CostDataMovement(ctx, node);
    case CostFamily::kElementwise:
    case CostFamily::kNoKernel:
    case CostFamily::kGeneric:
      break;
  }
  if (cost) return *cost;
  *generic = family != CostFamily::kElementwise;  // no rule of its own, or one its arguments did not fit
  return CostElementwise(ctx, node);
}

}  // namespace

CostTotals& CostTotals::operator+=(const OpCost& c) {
  fwd_flops += c.fwd_flops;
  bwd_flops += c.bwd_flops;
  fwd_bytes += c.fwd_bytes;
  bwd_bytes += c.bwd_bytes;
  return *this;
}

CostTotals& CostTotals::operator+=(const CostTotals& c) {
  fwd_flops += c.fwd_flops;
  bwd_flops += c.bwd_flops;
  fwd_bytes += c.fwd_bytes;
  bwd_bytes += c.bwd_bytes;
  return *this;
}

CostTotals GraphCost::total() const {
  CostTotals t = matmul;
  t += other;
  return t;
}

OpCost CostOf(const Graph& graph, const OpNode& node, const CostOptions& options) {
  bool generic = false;
  return Cost(CostContext(graph, options), node, &generic);
}

GraphCost SumCosts(const Graph& graph, const CostOptions& options) {
  const CostContext ctx(graph, options);
  GraphCost result;
  std::set<std::string> generic_kinds;
  result.ops.reserve(graph.nodes().size());
  for (const OpNode& node : graph.nodes()) {
    bool generic = false;
    const OpCost c = Cost(ctx, node, &generic);
    if (generic) generic_kinds.insert(node.kind);
    (c.matmul_like ? result.matmul : result.other) += c;
    result.ops.push_back(c);
  }
  result.generic_kinds.assign(generic_kinds.begin(), generic_kinds.end());
  return result;
}

std::map<ValueId, std::vector<int64_t>> ScaledShapes(const Graph& graph, const std::vector<ValueId>& values, int dim,
                                                     int64_t divisor) {
  if (divisor <= 0) throw ConfigError("ScaledShapes: divisor must be positive, got " + std::to_string(divisor));
  std::map<ValueId, std::vector<int64_t>> out;
  for (ValueId v : values) {
    const TensorValue& t = graph.value(v);
    std::vector<int64_t> shape = t.shape;
    const int rank = static_cast<int>(shape.size());
    const int d = dim < 0 ? dim + rank : dim;
    if (d < 0 || d >= rank) {
      throw ConfigError("ScaledShapes: " + t.name + " has " + std::to_string(rank) + " dims, no dim " +
                        std::to_string(dim));
    }
    auto& size = shape[static_cast<size_t>(d)];
    size = (size + divisor - 1) / divisor;
    out[v] = std::move(shape);
  }
  return out;
}

}  // namespace llmem
