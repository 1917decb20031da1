#include "graph/lora_rewrite.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string_view>

#include "graph/dtype.h"
#include "graph/error.h"
#include "graph/graph_rewriter.h"

namespace llmem {
namespace {

const int64_t kFloatScalarType = ScalarTypeOf(DType::kF32);  // the dtype argument of aten::to

// PEFT's list matching: the whole name, or a suffix of whole dotted components.
bool Matches(std::string_view scope, std::string_view target) {
  if (scope == target) return true;
  return scope.size() > target.size() && scope.ends_with(target) && scope[scope.size() - target.size() - 1] == '.';
}

bool MatchesAny(std::string_view scope, const std::vector<std::string>& targets) {
  return std::any_of(targets.begin(), targets.end(), [&](const std::string& t) { return Matches(scope, t); });
}

// Builds the rewritten graph: values and parameters are appended, nodes re-emitted in order.
class LoraRewriter {
 public:
  LoraRewriter(const Graph& base, const LoraSettings& s) : base_(base), s_(s), rw_(base) {}

  Graph Run() {
    CheckTargetsExist();
    for (auto& p : rw_.params()) {  // the base is frozen
      if (!p.trainable) continue;
      p.trainable = false;
      p.frozen = true;
      rw_.value(p.value).requires_grad = false;
    }
    for (const OpNode& old : base_.nodes()) {
      OpNode node = old;
      for (auto& arg : node.args) {
        for (auto& t : arg.tensors) t = Replaced(t);
      }
      const bool linear = IsLinear(node);
      if (linear && MatchesAny(node.scope, s_.modules_to_save)) SaveModuleCopy(node);
      const NodeId id = rw_.Emit(std::move(node));
      if (linear && IsTarget(rw_.nodes().back())) AddAdapter(id);
    }
    // Views made after an adapter of a value it replaced view the adapter's result.
    for (auto& v : rw_.values()) {
      const auto it = v.alias_of.valid() ? replaced_.find(v.alias_of.index) : replaced_.end();
      if (it != replaced_.end() && v.producer.valid() && v.producer.index > it->second.at_node) {
        v.alias_of = Replaced(v.alias_of);
      }
    }
    DeriveRequiresGrad();
    MarkUnusedParams();
    return rw_.Build(base_.inputs(), Replaced(base_.loss()));
  }

 private:
  static bool IsLinear(const OpNode& node) {
    return node.kind == "aten::linear" && node.args.size() >= 2 && node.args[1].kind == OpArg::Kind::kTensor;
  }
  bool IsTarget(const OpNode& node) const {
    if (s_.targets.size() == 1 && s_.targets[0] == "all-linear") return node.region.kind != RegionKind::kHead;
    return MatchesAny(node.scope, s_.targets);
  }

  void CheckTargetsExist() const {
    if (s_.rank <= 0) throw ConfigError("--lora r must be a positive integer, not " + std::to_string(s_.rank));
    if (!(s_.alpha > 0) || !std::isfinite(s_.alpha)) {
      throw ConfigError("--lora alpha must be positive, not " + std::to_string(s_.alpha));
    }
    if (!(s_.dropout >= 0 && s_.dropout < 1)) {
      throw ConfigError("--lora dropout must lie in [0, 1), not " + std::to_string(s_.dropout));
    }
    if (s_.targets.empty()) throw ConfigError("--lora needs targets=MODULE[+MODULE...] or targets=all-linear");
    std::set<std::string> suffixes;  // the last component of every linear module, for the error message
    for (const auto& node : base_.nodes()) {
      if (!IsLinear(node)) continue;
      const size_t dot = node.scope.rfind('.');
      suffixes.insert(dot == std::string::npos ? node.scope : node.scope.substr(dot + 1));
    }
    std::string have;
    for (const auto& name : suffixes) have += (have.empty() ? "" : ", ") + name;
    if (have.empty()) have = "none (this export has no aten::linear op)";
    auto check = [&](const std::vector<std::string>& names, const char* what, bool all_linear_allowed) {
      for (const auto& t : names) {
        if (all_linear_allowed && t == "all-linear" && names.size() == 1) continue;
        const bool found = std::any_of(base_.nodes().begin(), base_.nodes().end(),
                                       [&](const OpNode& n) { return IsLinear(n) && Matches(n.scope, t); });
        if (!found) {
          throw ConfigError(std::string("--lora ") + what + " '" + t + "' matches no linear module; the linear modules are " +
                            have);
        }
      }
    };
    check(s_.targets, "targets", true);
    check(s_.modules_to_save, "modules-to-save", false);
  }

  ValueId Replaced(ValueId v) const {
    auto it = replaced_.find(v.index);
    return it == replaced_.end() ? v : ValueId{it->second.by};
  }

  // A trainable copy of the module's weight and bias, which its forward reads from then on.
  void SaveModuleCopy(OpNode& node) {
    for (size_t i = 1; i < node.args.size() && i <= 2; ++i) {
      if (node.args[i].kind != OpArg::Kind::kTensor) continue;
      const TensorValue& orig = rw_.value(node.args[i].tensors[0]);
      if (orig.role != ValueRole::kParameter) continue;
      const std::string name = node.scope + ".modules_to_save.default." + (i == 1 ? "weight" : "bias");
      node.args[i].tensors[0] = rw_.NewParam(name, orig.shape, orig.dtype, orig.dtype_bf16_weights, node.region, true);
      copied_.insert(orig.id.index);
    }
  }

  void AddAdapter(NodeId base_id) {
    const OpNode base = rw_.nodes()[static_cast<size_t>(base_id.index)];
    const TensorValue x = rw_.value(base.args[0].tensors[0]);
    const TensorValue w = rw_.value(base.args[1].tensors[0]);
    const TensorValue y = rw_.value(base.outputs.at(0));
    if (w.shape.size() != 2 || x.shape.empty()) {
      throw ConfigError("--lora: the linear op of " + base.scope + " has a weight of rank " +
                        std::to_string(w.shape.size()) + "; adapters need a 2-D weight");
    }
    const int64_t out_features = w.shape[0], in_features = w.shape[1];
    const std::string& m = base.scope;
    if (!s_.torchtune) rw_.nodes()[static_cast<size_t>(base_id.index)].scope = m + ".base_layer";
    // PEFT's adapters are fp32 whatever the base (autocast_adapter_dtype); torchtune's are in the model's dtype.
    const DType ad = s_.torchtune ? w.dtype : DType::kF32, ad16 = s_.torchtune ? w.dtype_bf16_weights : DType::kF32;
    const std::string a_name = s_.torchtune ? ".lora_a.weight" : ".lora_A.default.weight";
    const std::string b_name = s_.torchtune ? ".lora_b.weight" : ".lora_B.default.weight";
    const ValueId a_w = rw_.NewParam(m + a_name, {s_.rank, in_features}, ad, ad16, base.region, true);
    const ValueId b_w = rw_.NewParam(m + b_name, {out_features, s_.rank}, ad, ad16, base.region, true);
    auto leading = [&](int64_t last) {
      std::vector<int64_t> shape = x.shape;
      shape.back() = last;
      return shape;
    };
    auto emit = [&](const std::string& kind, const std::string& scope, std::vector<OpArg> args, ValueId out) {
      return rw_.Emit(GraphRewriter::NewNode(base, kind, scope, std::move(args), out));
    };
    // A bitsandbytes base: lora.bnb.Linear4bit clones the base result before adding to it.
    ValueId base_result = y.id;
    if (s_.base_layer == LoraBaseLayer::kBnb4bit) {
      base_result = rw_.NewValue(m + " base result clone", y.shape, y.dtype, y.dtype_bf16_weights);
      emit("aten::clone", m, {TensorArg(y.id), OpArg{}}, base_result);
    }
    // PEFT: x.to(A.dtype), the same tensor when x is already fp32, a copy when it is 16-bit. torchtune: x itself.
    ValueId in = x.id;
    if (!s_.torchtune) {
      in = rw_.NewValue(m + " lora input", x.shape, DType::kF32, DType::kF32, x.id);
      emit("aten::to", m, {TensorArg(x.id), IntArg(kFloatScalarType), IntArg(0, OpArg::Kind::kBool),
                           IntArg(0, OpArg::Kind::kBool)}, in);
    }
    if (s_.dropout > 0) {
      const ValueId d = rw_.NewValue(m + " lora dropout", x.shape, s_.torchtune ? x.dtype : DType::kF32,
                                     s_.torchtune ? x.dtype_bf16_weights : DType::kF32);
      emit("aten::dropout", m + (s_.torchtune ? ".dropout" : ".lora_dropout.default"),
           {TensorArg(in), DoubleArg(s_.dropout), IntArg(1, OpArg::Kind::kBool)}, d);
      in = d;
    }
    const DType od = s_.torchtune ? y.dtype : DType::kF32, od16 = s_.torchtune ? y.dtype_bf16_weights : DType::kF32;
    const ValueId a = rw_.NewValue(m + " lora_A", leading(s_.rank), od, od16);
    emit("aten::linear", m + (s_.torchtune ? ".lora_a" : ".lora_A.default"), {TensorArg(in), TensorArg(a_w), OpArg{}},
         a);
    const ValueId b = rw_.NewValue(m + " lora_B", leading(out_features), od, od16);
    emit("aten::linear", m + (s_.torchtune ? ".lora_b" : ".lora_B.default"), {TensorArg(a), TensorArg(b_w), OpArg{}},
         b);
    const ValueId scaled = rw_.NewValue(m + " lora scaled", leading(out_features), od, od16);
    emit("aten::mul", m, {TensorArg(b), DoubleArg(s_.alpha / static_cast<double>(s_.rank))}, scaled);
    // A 16-bit base result plus PEFT's fp32 adapter output promotes to fp32.
    const DType sum_bf16 = Promote(y.dtype_bf16_weights, od16);
    const ValueId sum = rw_.NewValue(m + " lora sum", y.shape, Promote(y.dtype, od), sum_bf16);
    NodeId last = emit("aten::add", m, {TensorArg(base_result), TensorArg(scaled), IntArg(1)}, sum);
    ValueId result = sum;
    if (s_.base_layer == LoraBaseLayer::kLinear && !s_.torchtune) {
      // result.to(the base result's dtype): under autocast the base linear's bf16 (hence to_autocast_dtype). The
      // bitsandbytes layer casts the adapter output instead, and only outside autocast: a no-op on its fp32
      // activations (prepare_model_for_kbit_training keeps them fp32).
      result = rw_.NewValue(m + " lora result", y.shape, y.dtype, y.dtype_bf16_weights, sum);
      OpNode cast = GraphRewriter::NewNode(base, "aten::to", m,
                                           {TensorArg(sum), IntArg(kFloatScalarType), IntArg(0, OpArg::Kind::kBool),
                                            IntArg(0, OpArg::Kind::kBool)},
                                           result);
      cast.to_autocast_dtype = true;
      last = rw_.Emit(std::move(cast));
    }
    replaced_[y.id.index] = {result.index, last.index};
  }

  // requires_grad again, from what still requires grad: an op's output requires grad when the base graph's did
  // (the op is differentiable there) and some input still does; the adapter ops' outputs when an input does.
  void DeriveRequiresGrad() {
    const size_t base_values = base_.values().size();
    const ValueId leaf = s_.input_requires_grad ? TokenEmbeddingOutput() : ValueId{};
    rw_.input_grad_leaf() = leaf;
    for (const OpNode& node : rw_.nodes()) {
      bool any = false;
      for (const auto& arg : node.args) {
        for (ValueId t : arg.tensors) any |= rw_.value(t).requires_grad;
      }
      for (ValueId out : node.outputs) {
        TensorValue& v = rw_.value(out);
        const bool differentiable = static_cast<size_t>(out.index) >= base_values
                                        ? IsFloating(v.dtype)
                                        : base_.value(out).requires_grad;
        v.requires_grad = (differentiable && any) || out == leaf;
      }
    }
  }

  // The output of the embedding op that looks up the graph's first input (the token ids): get_input_embeddings().
  ValueId TokenEmbeddingOutput() const {
    const ValueId ids = base_.inputs().empty() ? ValueId{} : base_.inputs()[0];
    for (const OpNode& node : rw_.nodes()) {
      // The ids may reach it through a view (OPT: input_ids.view(-1, seq)).
      if (node.kind != "aten::embedding" || node.args.size() < 2 || node.args[1].kind != OpArg::Kind::kTensor ||
          static_cast<size_t>(node.args[1].tensors[0].index) >= base_.values().size() ||
          base_.StorageRoot(node.args[1].tensors[0]) != ids || node.outputs.empty()) {
        continue;
      }
      return node.outputs[0];
    }
    throw ConfigError("--lora with checkpointing: no embedding op looks up the token ids, so enable_input_require_grads "
                      "has no output to make a leaf");
  }

  // An original whose module now computes with its trainable copy stays in memory, unread unless tied.
  void MarkUnusedParams() {
    std::set<int32_t> read;
    for (const OpNode& node : rw_.nodes()) {
      for (const auto& arg : node.args) {
        for (ValueId t : arg.tensors) read.insert(t.index);
      }
    }
    for (auto& p : rw_.params()) {
      if (copied_.contains(p.value.index) && !read.contains(p.value.index)) p.used_in_forward = false;
    }
  }

  const Graph& base_;
  const LoraSettings& s_;
  GraphRewriter rw_;
  struct Replacement {
    int32_t by = -1;       // the adapter's result
    int32_t at_node = -1;  // the node that makes it
  };
  std::map<int32_t, Replacement> replaced_;  // base linear output -> its replacement
  std::set<int32_t> copied_;                // originals of modules_to_save parameters
};

}  // namespace

Graph ApplyLora(const Graph& base, const LoraSettings& settings) { return LoraRewriter(base, settings).Run(); }

}  // namespace llmem
