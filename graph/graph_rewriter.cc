#include "graph/graph_rewriter.h"

#include <algorithm>

namespace llmem {

OpArg TensorArg(ValueId v) {
  OpArg a;
  a.kind = OpArg::Kind::kTensor;
  a.tensors = {v};
  return a;
}

OpArg IntArg(int64_t v, OpArg::Kind kind) {
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

GraphRewriter::GraphRewriter(const Graph& base)
    : base_(base), values_(base.values()), params_(base.params()), input_grad_leaf_(base.input_grad_leaf()) {}

NodeId GraphRewriter::Emit(OpNode node) {
  node.id = NodeId{static_cast<int32_t>(nodes_.size())};
  for (ValueId out : node.outputs) values_[static_cast<size_t>(out.index)].producer = node.id;
  nodes_.push_back(std::move(node));
  return nodes_.back().id;
}

ValueId GraphRewriter::NewValue(const std::string& name, std::vector<int64_t> shape, DType dtype,
                                DType dtype_bf16_weights, ValueId alias_of) {
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

ValueId GraphRewriter::NewParam(const std::string& name, std::vector<int64_t> shape, DType dtype,
                                DType dtype_bf16_weights, Region region, bool trainable) {
  const ValueId id = NewValue(name, shape, dtype, dtype_bf16_weights);
  TensorValue& v = value(id);
  v.role = ValueRole::kParameter;
  v.requires_grad = trainable;
  v.param = static_cast<int32_t>(params_.size());
  Parameter p;
  p.name = name;
  p.shape = std::move(shape);
  p.dtype = dtype;
  p.bytes = ShapeBytes(p.shape, dtype);
  p.trainable = trainable;
  p.value = id;
  p.region = region;
  params_.push_back(std::move(p));
  return id;
}

OpNode GraphRewriter::NewNode(const OpNode& at, std::string kind, std::string scope, std::vector<OpArg> args,
                              ValueId out) {
  OpNode n;
  n.kind = std::move(kind);
  n.args = std::move(args);
  n.outputs = {out};
  n.region = at.region;
  n.scope = std::move(scope);
  n.in_module_code = true;
  // Within `at`'s module (its scope or below), the calls that enclose it are the same: how each parent frame drops
  // their results (forward_lifetimes.h) carries over.
  if (n.scope == at.scope || n.scope.starts_with(at.scope + ".")) {
    n.temporary_calls = at.temporary_calls;
    n.rebindings = at.rebindings;
  }
  return n;
}

// Values in the order the IR requires (a value after the one it aliases): inputs and parameters first, then every
// op's outputs in op order.
void GraphRewriter::Renumber(std::vector<ValueId>& inputs, ValueId& loss) {
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
  remap(input_grad_leaf_);
}

Graph GraphRewriter::Build(std::vector<ValueId> inputs, ValueId loss) {
  Renumber(inputs, loss);
  Graph g(std::move(values_), std::move(nodes_), std::move(params_), std::move(inputs), loss, base_.batch(),
          base_.seq());
  g.set_runs_with_bf16_weights(base_.runs_with_bf16_weights());
  g.set_position_limit(base_.position_limit());
  g.set_input_grad_leaf(input_grad_leaf_);
  g.set_kv_cache(base_.kv_cache());
  return g;
}

}  // namespace llmem
