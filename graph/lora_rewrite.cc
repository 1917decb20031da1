#include "graph/lora_rewrite.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string_view>

#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem {
namespace {

constexpr int64_t kFloatScalarType = 6;  // c10::ScalarType::Float, the dtype argument of aten::to

// PEFT's list matching: the whole name, or a suffix of whole dotted components.
bool Matches(std::string_view scope, std::string_view target) {
  if (scope == target) return true;
  return scope.size() > target.size() && scope.ends_with(target) && scope[scope.size() - target.size() - 1] == '.';
}

bool MatchesAny(std::string_view scope, const std::vector<std::string>& targets) {
  return std::any_of(targets.begin(), targets.end(), [&](const std::string& t) { return Matches(scope, t); });
}

OpArg TensorArg(ValueId v) {
  OpArg a;
  a.kind = OpArg::Kind::kTensor;
  a.tensors = {v};
  return a;
}
OpArg IntArg(int64_t v, OpArg::Kind kind = OpArg::Kind::kInt) {
  OpArg a;
  a.kind = kind;
  a.int_value = v;
  return a;
}
OpArg DoubleArg(double v) {
  OpArg a;
  a.kind = OpArg::Kind::kDouble;
  a.double_value = v;
  return a;
}

// Builds the rewritten graph: values and parameters are appended, nodes re-emitted in order.
class LoraRewriter {
 public:
  LoraRewriter(const Graph& base, const LoraSettings& s) : base_(base), s_(s) {
    values_ = base.values();
    params_ = base.params();
  }

  Graph Run() {
    CheckTargetsExist();
    for (auto& p : params_) {  // the base is frozen
      if (!p.trainable) continue;
      p.trainable = false;
      values_[static_cast<size_t>(p.value.index)].requires_grad = false;
    }
    for (const OpNode& old : base_.nodes()) {
      OpNode node = old;
      for (auto& arg : node.args) {
        for (auto& t : arg.tensors) t = Replaced(t);
      }
      const bool linear = IsLinear(node);
      if (linear && MatchesAny(node.scope, s_.modules_to_save)) SaveModuleCopy(node);
      const NodeId id = Emit(std::move(node));
      if (linear && IsTarget(nodes_.back())) AddAdapter(id);
    }
    // Views made after an adapter of a value it replaced view the adapter's result.
    for (auto& v : values_) {
      if (v.alias_of.valid() && v.producer.valid() && replaced_.contains(v.alias_of.index) &&
          v.producer.index > replaced_at_[v.alias_of.index]) {
        v.alias_of = Replaced(v.alias_of);
      }
    }
    DeriveRequiresGrad();
    MarkUnusedParams();
    std::vector<ValueId> inputs = base_.inputs();
    ValueId loss = Replaced(base_.loss());
    Renumber(inputs, loss);
    Graph g(std::move(values_), std::move(nodes_), std::move(params_), std::move(inputs), loss, base_.batch(),
            base_.seq());
    g.set_runs_with_bf16_weights(base_.runs_with_bf16_weights());
    g.set_position_limit(base_.position_limit());
    return g;
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
    auto check = [&](const std::vector<std::string>& names, const char* what) {
      for (const auto& t : names) {
        if (std::string_view(what) == "targets" && t == "all-linear" && names.size() == 1) continue;
        const bool found = std::any_of(base_.nodes().begin(), base_.nodes().end(),
                                       [&](const OpNode& n) { return IsLinear(n) && Matches(n.scope, t); });
        if (!found) {
          throw ConfigError(std::string("--lora ") + what + " '" + t + "' matches no linear module; the linear modules are " +
                            have);
        }
      }
    };
    check(s_.targets, "targets");
    check(s_.modules_to_save, "modules-to-save");
  }

  ValueId Replaced(ValueId v) const {
    auto it = replaced_.find(v.index);
    return it == replaced_.end() ? v : ValueId{it->second};
  }

  NodeId Emit(OpNode node) {
    node.id = NodeId{static_cast<int32_t>(nodes_.size())};
    for (ValueId out : node.outputs) values_[static_cast<size_t>(out.index)].producer = node.id;
    nodes_.push_back(std::move(node));
    return nodes_.back().id;
  }

  ValueId NewValue(const std::string& name, std::vector<int64_t> shape, DType dtype, DType dtype_bf16_weights,
                   ValueId alias_of = {}) {
    TensorValue v;
    v.id = ValueId{static_cast<int32_t>(values_.size())};
    v.name = name;
    v.storage_numel = alias_of.valid() ? 0 : NumElements(shape);
    v.shape = std::move(shape);
    v.dtype = dtype;
    v.dtype_bf16_weights = dtype_bf16_weights;
    v.alias_of = alias_of;
    values_.push_back(std::move(v));
    return values_.back().id;
  }

  ValueId NewParam(const std::string& name, std::vector<int64_t> shape, DType dtype, DType dtype_bf16_weights,
                   Region region) {
    const ValueId id = NewValue(name, shape, dtype, dtype_bf16_weights);
    TensorValue& v = values_[static_cast<size_t>(id.index)];
    v.role = ValueRole::kParameter;
    v.requires_grad = true;
    v.param = static_cast<int32_t>(params_.size());
    Parameter p;
    p.name = name;
    p.shape = std::move(shape);
    p.dtype = dtype;
    p.bytes = ShapeBytes(p.shape, dtype);
    p.value = id;
    p.region = region;
    params_.push_back(std::move(p));
    return id;
  }

  OpNode NewNode(const OpNode& at, std::string kind, std::string scope, std::vector<OpArg> args, ValueId out) {
    OpNode n;
    n.kind = std::move(kind);
    n.args = std::move(args);
    n.outputs = {out};
    n.region = at.region;
    n.scope = std::move(scope);
    n.in_module_code = true;
    return n;
  }

  // A trainable copy of the module's weight and bias, which its forward reads from then on.
  void SaveModuleCopy(OpNode& node) {
    for (size_t i = 1; i < node.args.size() && i <= 2; ++i) {
      if (node.args[i].kind != OpArg::Kind::kTensor) continue;
      const TensorValue& orig = values_[static_cast<size_t>(node.args[i].tensors[0].index)];
      if (orig.role != ValueRole::kParameter) continue;
      const std::string name = node.scope + ".modules_to_save.default." + (i == 1 ? "weight" : "bias");
      node.args[i].tensors[0] = NewParam(name, orig.shape, orig.dtype, orig.dtype_bf16_weights, node.region);
      copied_.insert(orig.id.index);
    }
  }

  void AddAdapter(NodeId base_id) {
    const OpNode base = nodes_[static_cast<size_t>(base_id.index)];
    const TensorValue x = values_[static_cast<size_t>(base.args[0].tensors[0].index)];
    const TensorValue w = values_[static_cast<size_t>(base.args[1].tensors[0].index)];
    const TensorValue y = values_[static_cast<size_t>(base.outputs.at(0).index)];
    if (w.shape.size() != 2 || x.shape.empty()) {
      throw ConfigError("--lora: the linear op of " + base.scope + " has a weight of rank " +
                        std::to_string(w.shape.size()) + "; adapters need a 2-D weight");
    }
    const int64_t out_features = w.shape[0], in_features = w.shape[1];
    const std::string& m = base.scope;
    nodes_[static_cast<size_t>(base_id.index)].scope = m + ".base_layer";
    const ValueId a_w = NewParam(m + ".lora_A.default.weight", {s_.rank, in_features}, DType::kF32, DType::kF32,
                                 base.region);
    const ValueId b_w = NewParam(m + ".lora_B.default.weight", {out_features, s_.rank}, DType::kF32, DType::kF32,
                                 base.region);
    auto leading = [&](int64_t last) {
      std::vector<int64_t> shape = x.shape;
      shape.back() = last;
      return shape;
    };
    // x.to(A.dtype): the same tensor when x is already fp32, a copy when it is 16-bit.
    const ValueId xc = NewValue(m + " lora input", x.shape, DType::kF32, DType::kF32, x.id);
    Emit(NewNode(base, "aten::to", m, {TensorArg(x.id), IntArg(kFloatScalarType), IntArg(0, OpArg::Kind::kBool),
                                       IntArg(0, OpArg::Kind::kBool)}, xc));
    ValueId in = xc;
    if (s_.dropout > 0) {
      const ValueId d = NewValue(m + " lora dropout", x.shape, DType::kF32, DType::kF32);
      Emit(NewNode(base, "aten::dropout", m + ".lora_dropout.default",
                   {TensorArg(in), DoubleArg(s_.dropout), IntArg(1, OpArg::Kind::kBool)}, d));
      in = d;
    }
    const ValueId a = NewValue(m + " lora_A", leading(s_.rank), DType::kF32, DType::kF32);
    Emit(NewNode(base, "aten::linear", m + ".lora_A.default", {TensorArg(in), TensorArg(a_w), OpArg{}}, a));
    const ValueId b = NewValue(m + " lora_B", leading(out_features), DType::kF32, DType::kF32);
    Emit(NewNode(base, "aten::linear", m + ".lora_B.default", {TensorArg(a), TensorArg(b_w), OpArg{}}, b));
    const ValueId scaled = NewValue(m + " lora scaled", leading(out_features), DType::kF32, DType::kF32);
    Emit(NewNode(base, "aten::mul", m, {TensorArg(b), DoubleArg(s_.alpha / static_cast<double>(s_.rank))}, scaled));
    // A 16-bit base result plus the fp32 adapter output promotes to fp32.
    const DType sum_bf16 = Promote(y.dtype_bf16_weights, DType::kF32);
    const ValueId sum = NewValue(m + " lora sum", y.shape, Promote(y.dtype, DType::kF32), sum_bf16);
    Emit(NewNode(base, "aten::add", m, {TensorArg(y.id), TensorArg(scaled), IntArg(1)}, sum));
    // result.to(the base result's dtype): under autocast the base linear's bf16 (hence to_autocast_dtype).
    const ValueId result = NewValue(m + " lora result", y.shape, y.dtype, y.dtype_bf16_weights, sum);
    OpNode cast = NewNode(base, "aten::to", m, {TensorArg(sum), IntArg(kFloatScalarType),
                                                IntArg(0, OpArg::Kind::kBool), IntArg(0, OpArg::Kind::kBool)},
                          result);
    cast.to_autocast_dtype = true;
    const NodeId cast_id = Emit(std::move(cast));
    replaced_[y.id.index] = result.index;
    replaced_at_[y.id.index] = cast_id.index;
  }

  // requires_grad again, from what still requires grad: an op's output requires grad when the base graph's did
  // (the op is differentiable there) and some input still does; the adapter ops' outputs when an input does.
  void DeriveRequiresGrad() {
    const size_t base_values = base_.values().size();
    for (const OpNode& node : nodes_) {
      bool any = false;
      for (const auto& arg : node.args) {
        for (ValueId t : arg.tensors) any |= values_[static_cast<size_t>(t.index)].requires_grad;
      }
      for (ValueId out : node.outputs) {
        TensorValue& v = values_[static_cast<size_t>(out.index)];
        const bool differentiable = static_cast<size_t>(out.index) >= base_values
                                        ? IsFloating(v.dtype)
                                        : base_.value(out).requires_grad;
        v.requires_grad = differentiable && any;
      }
    }
  }

  // Values in the order the IR requires (a value after the one it aliases): inputs and parameters first, then
  // every op's outputs in op order.
  void Renumber(std::vector<ValueId>& inputs, ValueId& loss) {
    std::vector<int32_t> order(values_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
    auto key = [&](int32_t i) { return values_[static_cast<size_t>(i)].producer.index; };  // -1: not produced
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return key(a) < key(b); });
    std::vector<int32_t> new_index(values_.size());
    for (size_t i = 0; i < order.size(); ++i) new_index[static_cast<size_t>(order[i])] = static_cast<int32_t>(i);
    auto remap = [&](ValueId& v) {
      if (v.valid()) v.index = new_index[static_cast<size_t>(v.index)];
    };
    std::vector<TensorValue> sorted;
    sorted.reserve(values_.size());
    for (int32_t i : order) sorted.push_back(std::move(values_[static_cast<size_t>(i)]));
    for (auto& v : sorted) {
      remap(v.id);
      remap(v.alias_of);
    }
    values_ = std::move(sorted);
    for (auto& node : nodes_) {
      for (auto& arg : node.args) {
        for (auto& t : arg.tensors) remap(t);
      }
      for (auto& out : node.outputs) remap(out);
    }
    for (auto& p : params_) remap(p.value);
    for (auto& in : inputs) remap(in);
    remap(loss);
  }

  // An original whose module now computes with its trainable copy stays in memory, unread unless tied.
  void MarkUnusedParams() {
    std::set<int32_t> read;
    for (const OpNode& node : nodes_) {
      for (const auto& arg : node.args) {
        for (ValueId t : arg.tensors) read.insert(t.index);
      }
    }
    for (auto& p : params_) {
      if (copied_.contains(p.value.index) && !read.contains(p.value.index)) p.used_in_forward = false;
    }
  }

  const Graph& base_;
  const LoraSettings& s_;
  std::vector<TensorValue> values_;
  std::vector<OpNode> nodes_;
  std::vector<Parameter> params_;
  std::map<int32_t, int32_t> replaced_;     // base linear output -> the adapter's result
  std::map<int32_t, int32_t> replaced_at_;  // base linear output -> the node that makes its replacement
  std::set<int32_t> copied_;                // originals of modules_to_save parameters
};

}  // namespace

Graph ApplyLora(const Graph& base, const LoraSettings& settings) { return LoraRewriter(base, settings).Run(); }

}  // namespace llmem
