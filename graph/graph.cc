#include "graph/graph.h"

#include <algorithm>

#include "graph/error.h"

namespace llmem {

std::string RegionName(const Region& region) {
  switch (region.kind) {
    case RegionKind::kEmbedding:
      return "embedding";
    case RegionKind::kDecoderLayer:
      return "layer " + std::to_string(region.layer);
    case RegionKind::kHead:
      return "head";
  }
  return "?";
}

Graph::Graph(std::vector<TensorValue> values, std::vector<OpNode> nodes, std::vector<Parameter> params,
             std::vector<ValueId> inputs, ValueId loss, int64_t batch, int64_t seq)
    : values_(std::move(values)),
      nodes_(std::move(nodes)),
      params_(std::move(params)),
      inputs_(std::move(inputs)),
      loss_(loss),
      batch_(batch),
      seq_(seq) {
  tensor_inputs_.reserve(nodes_.size());
  for (const auto& node : nodes_) {
    auto& in = tensor_inputs_.emplace_back();
    for (const auto& arg : node.args) in.insert(in.end(), arg.tensors.begin(), arg.tensors.end());
  }
  VerifyGraph(*this);
}

int32_t Graph::num_layers() const {
  int32_t n = 0;
  for (const auto& node : nodes_) {
    if (node.region.kind == RegionKind::kDecoderLayer) n = std::max(n, node.region.layer + 1);
  }
  return n;
}

ValueId Graph::StorageRoot(ValueId id) const {
  ValueId cur = id;
  while (value(cur).alias_of.valid()) cur = value(cur).alias_of;
  return cur;
}

std::vector<int64_t> StridesOf(const TensorValue& v) {
  if (v.strides.size() == v.shape.size()) return v.strides;
  std::vector<int64_t> strides(v.shape.size(), 1);
  for (size_t i = v.shape.size(); i-- > 1;) strides[i - 1] = strides[i] * std::max<int64_t>(v.shape[i], 1);
  return strides;
}

bool CanMergeDims(const TensorValue& v, size_t first, size_t last) {
  const std::vector<int64_t> strides = StridesOf(v);
  // Walk the dims that matter (size > 1) from inner to outer.
  int64_t expected = -1;
  for (size_t i = std::min(last, v.shape.size()); i-- > first;) {
    if (v.shape[i] == 1) continue;
    if (expected >= 0 && strides[i] != expected) return false;
    expected = strides[i] * v.shape[i];
  }
  return true;
}

std::optional<std::vector<int64_t>> ViewStrides(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                                                const std::vector<int64_t>& new_shape) {
  std::vector<int64_t> out(new_shape.size(), 1);
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  if (numel == 0 || shape.empty()) {
    // Empty or 0-dim tensors: any shape of the same numel is a contiguous view.
    for (size_t i = new_shape.size(); i-- > 1;) out[i - 1] = out[i] * std::max<int64_t>(new_shape[i], 1);
    return out;
  }
  // Walk the old dims from inner to outer, one run of mutually contiguous dims ("chunk") at a time; the new dims
  // covering the same elements must fit inside the chunk.
  int64_t view_d = static_cast<int64_t>(new_shape.size()) - 1;
  int64_t chunk_base_stride = strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    tensor_numel *= shape[static_cast<size_t>(d)];
    const bool chunk_ends =
        d == 0 || (shape[static_cast<size_t>(d - 1)] != 1 &&
                   strides[static_cast<size_t>(d - 1)] != tensor_numel * chunk_base_stride);
    if (!chunk_ends) continue;
    while (view_d >= 0 && (view_numel < tensor_numel || new_shape[static_cast<size_t>(view_d)] == 1)) {
      out[static_cast<size_t>(view_d)] = view_numel * chunk_base_stride;
      view_numel *= new_shape[static_cast<size_t>(view_d)];
      --view_d;
    }
    if (view_numel != tensor_numel) return std::nullopt;
    if (d > 0) {
      chunk_base_stride = strides[static_cast<size_t>(d - 1)];
      tensor_numel = 1;
      view_numel = 1;
    }
  }
  if (view_d != -1) return std::nullopt;
  return out;
}

void VerifyGraph(const Graph& graph) {
  const auto& values = graph.values();
  for (size_t i = 0; i < values.size(); ++i) {
    const auto& v = values[i];
    if (v.id.index != static_cast<int32_t>(i)) throw ModelLoadError("IR value " + std::to_string(i) + " has a wrong id");
    if (v.alias_of.valid() && v.alias_of.index >= static_cast<int32_t>(i)) {
      throw ModelLoadError("IR value " + v.name + " aliases a value defined after it");
    }
    if (!v.alias_of.valid() && v.storage_numel < 0) throw ModelLoadError("IR value " + v.name + " has negative size");
  }
  std::vector<bool> defined(values.size(), false);
  for (const auto& v : values) {
    if (!v.producer.valid()) defined[static_cast<size_t>(v.id.index)] = true;
  }
  for (size_t n = 0; n < graph.nodes().size(); ++n) {
    const auto& node = graph.nodes()[n];
    if (node.id.index != static_cast<int32_t>(n)) throw ModelLoadError("IR node " + std::to_string(n) + " has a wrong id");
    for (const auto& arg : node.args) {
      for (ValueId t : arg.tensors) {
        if (!t.valid() || t.index >= static_cast<int32_t>(values.size()) || !defined[static_cast<size_t>(t.index)]) {
          throw ModelLoadError("IR node " + node.kind + " uses a value before it is defined");
        }
      }
    }
    for (ValueId out : node.outputs) {
      if (graph.value(out).producer != node.id) throw ModelLoadError("IR node " + node.kind + " output has another producer");
      defined[static_cast<size_t>(out.index)] = true;
    }
  }
  if (!graph.loss().valid()) throw ModelLoadError("the model's forward returns no tensor");
  if (!IsFloating(graph.value(graph.loss()).dtype)) throw ModelLoadError("the model's forward returns no floating tensor");
}

}  // namespace llmem
