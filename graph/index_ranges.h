// Bounds of the values of integer tensors that the meta run knows without data: position ids built from
// arange / ones / cumsum and arithmetic with scalars. The importer asks them at an embedding lookup to tell a
// table indexed by positions (bounded indices) from one indexed by token ids (unbounded), and whether the
// requested length stays inside the table.
//
// Deliberately small: ops outside the list give no range, which means "unknown", never a guess. Floating tensors
// and tensors with data-dependent values (token ids, labels) have no range.
//
// Usage, for every executed node:  ranges.Observe(node, inputs, outputs);  then  ranges.Of(tensor)
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/jit/ir/ir.h>

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace llmem {

// Inclusive bounds of every element of a tensor.
struct IndexRange {
  int64_t lo = 0;
  int64_t hi = 0;
};

class IndexRanges {
 public:
  // Derives the range of the node's first tensor output from its inputs, when the op is one whose result bounds
  // follow from its inputs' bounds; otherwise records nothing.
  void Observe(const torch::jit::Node* node, const std::vector<c10::IValue>& inputs,
               const std::vector<c10::IValue>& outputs);
  // The same for an op named by its kind ("aten::arange") and overload name ("start"; "" for the default one).
  void Observe(const std::string& kind, const std::string& overload, const std::vector<c10::IValue>& inputs,
               const std::vector<c10::IValue>& outputs);

  // The range of `t`, or nullopt when unknown. 0-dim CPU constants (traces bake scalars as such) are read.
  std::optional<IndexRange> Of(const at::Tensor& t) const;

 private:
  std::optional<IndexRange> OfValue(const c10::IValue& v) const;
  std::unordered_map<const c10::TensorImpl*, IndexRange> ranges_;
};

}  // namespace llmem
