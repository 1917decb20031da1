// Test-only builder for hand-written IR graphs: graph inputs, parameters, ops with their arguments, outputs,
// storage sharing and requires_grad, and the loss. Produces the same llmem::Graph an importer would, so the
// simulator tests can state exact byte counts on graphs small enough to work out by hand.
//
// Usage:
//   TestGraphBuilder b;
//   ValueId x = b.Input("x", {4, 8}, DType::kF32);
//   ValueId labels = b.Input("labels", {4});                       // i64 by default
//   ValueId w = b.Param("w", {16, 8});                             // f32, trainable, requires grad
//   ValueId logits = b.Op("aten::linear", {T(x), T(w), None()}, {4, 16});
//   ValueId loss = b.Op("aten::cross_entropy_loss", {T(logits), T(labels), None(), I(1), I(-100), D(0.0)}, {});
//   Graph g = b.Build(loss);
//
// Output requires_grad defaults to "some tensor input requires grad and the output is floating"; an output that
// shares storage is declared with Out::alias_of. The builder does not check that shapes agree with the op: a test
// states exactly the shapes it wants the rules to see.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "graph/dtype.h"
#include "graph/graph.h"

namespace llmem::testing {

inline OpArg T(ValueId v) {
  OpArg a;
  a.kind = OpArg::Kind::kTensor;
  a.tensors = {v};
  return a;
}
inline OpArg TList(std::vector<ValueId> vs) {
  OpArg a;
  a.kind = OpArg::Kind::kTensorList;
  a.tensors = std::move(vs);
  return a;
}
inline OpArg I(int64_t v) {
  OpArg a;
  a.kind = OpArg::Kind::kInt;
  a.int_value = v;
  return a;
}
inline OpArg B(bool v) {
  OpArg a;
  a.kind = OpArg::Kind::kBool;
  a.int_value = v ? 1 : 0;
  return a;
}
inline OpArg D(double v) {
  OpArg a;
  a.kind = OpArg::Kind::kDouble;
  a.double_value = v;
  return a;
}
inline OpArg Ints(std::vector<int64_t> v) {
  OpArg a;
  a.kind = OpArg::Kind::kIntList;
  a.ints = std::move(v);
  return a;
}
inline OpArg None() { return OpArg{}; }

// One output of an op.
struct Out {
  Out(std::vector<int64_t> s, DType d = DType::kF32) : shape(std::move(s)), dtype(d) {}
  Out& AliasOf(ValueId v) {
    alias_of = v;
    return *this;
  }
  Out& WithBf16Weights(DType d) {
    dtype_bf16_weights = d;
    return *this;
  }
  Out& RequiresGrad(bool g) {
    requires_grad = g;
    return *this;
  }

  std::vector<int64_t> shape;
  DType dtype = DType::kF32;
  std::optional<bool> requires_grad;         // default: derived from the inputs (see the header comment)
  ValueId alias_of;                          // set: a view / in-place result sharing that value's storage
  std::optional<DType> dtype_bf16_weights;   // default: dtype
};

class TestGraphBuilder {
 public:
  // Subsequent ops are placed in `region` (embedding until changed).
  void SetRegion(Region region) { region_ = region; }
  void SetLayer(int32_t layer) { region_ = Region{RegionKind::kDecoderLayer, layer}; }
  void SetHead() { region_ = Region{RegionKind::kHead, -1}; }
  // Subsequent ops are run by their module's own forward (OpNode::in_module_code) or by a helper (default).
  void SetInModuleCode(bool in_module_code) { in_module_code_ = in_module_code; }

  ValueId Input(const std::string& name, std::vector<int64_t> shape, DType dtype = DType::kI64) {
    TensorValue v = NewValue(name, std::move(shape), dtype, ValueRole::kInput);
    inputs_.push_back(v.id);
    return Push(std::move(v));
  }

  // A parameter (trainable: requires grad) or a buffer (trainable=false).
  ValueId Param(const std::string& name, std::vector<int64_t> shape, DType dtype = DType::kF32, bool trainable = true,
                bool used_in_forward = true) {
    TensorValue v = NewValue(name, shape, dtype, ValueRole::kParameter);
    v.requires_grad = trainable && IsFloating(dtype);
    v.dtype_bf16_weights = IsFloating(dtype) ? DType::kBF16 : dtype;
    v.param = static_cast<int32_t>(params_.size());
    Parameter p;
    p.name = name;
    p.shape = shape;
    p.dtype = dtype;
    p.bytes = ShapeBytes(shape, dtype);
    p.trainable = trainable;
    p.used_in_forward = used_in_forward;
    p.value = v.id;
    p.region = region_;
    params_.push_back(std::move(p));
    return Push(std::move(v));
  }

  // A second parameter name for the storage of `of` (a tied weight whose views differ), sharing its storage.
  ValueId TiedParam(const std::string& name, ValueId of) {
    const TensorValue& base = values_.at(static_cast<size_t>(of.index));
    TensorValue v = NewValue(name, base.shape, base.dtype, ValueRole::kParameter);
    v.requires_grad = base.requires_grad;
    v.dtype_bf16_weights = base.dtype_bf16_weights;
    v.alias_of = of;
    v.storage_numel = 0;
    v.param = static_cast<int32_t>(params_.size());
    Parameter p = params_.at(static_cast<size_t>(base.param));
    p.name = name;
    p.value = v.id;
    params_.push_back(std::move(p));
    return Push(std::move(v));
  }

  // An op with several outputs.
  std::vector<ValueId> OpN(const std::string& kind, std::vector<OpArg> args, std::vector<Out> outs,
                           const std::string& scope = "") {
    OpNode node;
    node.id = NodeId{static_cast<int32_t>(nodes_.size())};
    node.kind = kind;
    node.args = std::move(args);
    node.region = region_;
    node.scope = scope;
    node.in_module_code = in_module_code_;
    bool any_input_grad = false;
    for (const auto& a : node.args) {
      for (ValueId t : a.tensors) any_input_grad |= values_.at(static_cast<size_t>(t.index)).requires_grad;
    }
    for (auto& o : outs) {
      TensorValue v = NewValue("", o.shape, o.dtype, ValueRole::kActivation);
      v.name = "%" + std::to_string(v.id.index);
      v.producer = node.id;
      v.requires_grad = o.requires_grad.value_or(any_input_grad && IsFloating(o.dtype));
      v.dtype_bf16_weights = o.dtype_bf16_weights.value_or(o.dtype);
      if (o.alias_of.valid()) {
        v.alias_of = o.alias_of;
        v.storage_numel = 0;
      }
      node.outputs.push_back(Push(std::move(v)));
    }
    std::vector<ValueId> result = node.outputs;
    nodes_.push_back(std::move(node));
    return result;
  }

  // An op with one output.
  ValueId OpOut(const std::string& kind, std::vector<OpArg> args, Out out, const std::string& scope = "") {
    return OpN(kind, std::move(args), {std::move(out)}, scope).at(0);
  }
  ValueId Op(const std::string& kind, std::vector<OpArg> args, std::vector<int64_t> shape,
             DType dtype = DType::kF32) {
    return OpOut(kind, std::move(args), Out(std::move(shape), dtype));
  }

  // Mutable access for tests that tweak a recorded value (e.g. dtype_bf16_weights) before Build.
  TensorValue& value(ValueId id) { return values_.at(static_cast<size_t>(id.index)); }

  Graph Build(ValueId loss, int64_t batch = 1, int64_t seq = 1, bool runs_with_bf16_weights = true) const {
    Graph g(values_, nodes_, params_, inputs_, loss, batch, seq);
    g.set_runs_with_bf16_weights(runs_with_bf16_weights);
    return g;
  }

 private:
  TensorValue NewValue(const std::string& name, std::vector<int64_t> shape, DType dtype, ValueRole role) {
    TensorValue v;
    v.id = ValueId{static_cast<int32_t>(values_.size())};
    v.role = role;
    v.name = name;
    v.storage_numel = NumElements(shape);
    v.shape = std::move(shape);
    v.dtype = dtype;
    v.dtype_bf16_weights = dtype;
    return v;
  }
  ValueId Push(TensorValue v) {
    values_.push_back(std::move(v));
    return values_.back().id;
  }

  Region region_{RegionKind::kEmbedding, -1};
  bool in_module_code_ = false;
  std::vector<TensorValue> values_;
  std::vector<OpNode> nodes_;
  std::vector<Parameter> params_;
  std::vector<ValueId> inputs_;
};

}  // namespace llmem::testing
