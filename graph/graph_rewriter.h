// The shared machinery of passes that rewrite a finished IR (graph/lora_rewrite.h, graph/quantize_rewrite.h):
// the base graph's values and parameters are copied, nodes are re-emitted in order with new ones in between, and
// Build() renumbers the values into the order the IR requires (every value after the one it aliases) before making
// the new Graph.
//
// Usage:
//   GraphRewriter rw(base);
//   for (const OpNode& old : base.nodes()) { OpNode n = old; ...; rw.Emit(std::move(n)); }
//   ValueId w = rw.NewParam("m.lora_A.default.weight", {r, in}, DType::kF32, DType::kF32, region, true);
//   Graph g = rw.Build(base.inputs(), new_loss);
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/graph.h"

namespace llmem {

OpArg TensorArg(ValueId v);
OpArg IntArg(int64_t v, OpArg::Kind kind = OpArg::Kind::kInt);
OpArg DoubleArg(double v);

class GraphRewriter {
 public:
  explicit GraphRewriter(const Graph& base);

  // Appends `node` (its id assigned here) and makes it the producer of its outputs.
  NodeId Emit(OpNode node);
  // A new activation value; it owns new storage unless it aliases `alias_of`.
  ValueId NewValue(const std::string& name, std::vector<int64_t> shape, DType dtype, DType dtype_bf16_weights,
                   ValueId alias_of = {});
  // A new parameter (or buffer, trainable false) and its value.
  ValueId NewParam(const std::string& name, std::vector<int64_t> shape, DType dtype, DType dtype_bf16_weights,
                   Region region, bool trainable);
  // A node in `at`'s region, run by module code, with one output; within `at`'s module it keeps how the enclosing
  // frames drop their calls' results (OpNode::temporary_calls, rebindings).
  static OpNode NewNode(const OpNode& at, std::string kind, std::string scope, std::vector<OpArg> args,
                        ValueId out);

  TensorValue& value(ValueId v) { return values_[static_cast<size_t>(v.index)]; }
  std::vector<TensorValue>& values() { return values_; }
  std::vector<Parameter>& params() { return params_; }
  std::vector<OpNode>& nodes() { return nodes_; }
  const std::vector<OpNode>& nodes() const { return nodes_; }

  ValueId& input_grad_leaf() { return input_grad_leaf_; }

  // The rewritten graph, with the base's batch, sequence and flags; `inputs` and `loss` in the rewriter's numbering.
  Graph Build(std::vector<ValueId> inputs, ValueId loss);

 private:
  void Renumber(std::vector<ValueId>& inputs, ValueId& loss);

  const Graph& base_;
  std::vector<TensorValue> values_;
  std::vector<OpNode> nodes_;
  std::vector<Parameter> params_;
  ValueId input_grad_leaf_;
};

}  // namespace llmem
