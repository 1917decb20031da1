#include "distributed/sharded_params.h"

#include <algorithm>
#include <climits>
#include <vector>

#include "graph/dtype.h"

namespace llmem::dist {

std::vector<ManagedParam> ManagedParams(const Graph& graph, sim::Precision precision, bool with_frozen) {
  // First forward use of each storage root (INT32_MAX: none), indexed by value.
  std::vector<int32_t> first_use(graph.values().size(), INT32_MAX);
  for (const auto& node : graph.nodes()) {
    for (ValueId in : graph.tensor_inputs(node.id)) {
      int32_t& first = first_use[static_cast<size_t>(graph.StorageRoot(in).index)];
      first = std::min(first, node.id.index);
    }
  }
  std::vector<std::pair<int32_t, ManagedParam>> ordered;
  std::vector<bool> seen(graph.values().size(), false);
  for (size_t i = 0; i < graph.params().size(); ++i) {
    const Parameter& p = graph.params()[i];
    const auto root = static_cast<size_t>(graph.StorageRoot(p.value).index);
    if (!(p.trainable || (with_frozen && p.frozen)) || !p.used_in_forward || seen[root]) continue;
    seen[root] = true;
    ManagedParam m;
    m.trainable = p.trainable;
    m.index = static_cast<int32_t>(i);
    m.value = p.value.index;
    m.numel = NumElements(p.shape);
    m.dim0 = p.shape.empty() ? 1 : p.shape[0];
    // Pure bf16 stores the weights in their bf16-run dtype (bf16; LoRA's adapters stay fp32); the other precisions
    // keep fp32 weights (autocast copies are transient, and FSDP2's MixedPrecisionPolicy keeps fp32 shards even
    // when the export was traced with 16-bit weights).
    const DType bf16_run = graph.value(p.value).dtype_bf16_weights;
    m.element_size = !IsFloating(p.dtype)                  ? ElementSize(p.dtype)
                     : precision == sim::Precision::kBf16 ? ElementSize(IsFloating(bf16_run) ? bf16_run : DType::kBF16)
                                                          : 4;
    m.region = p.region;
    ordered.emplace_back(first_use[root], m);
  }
  std::stable_sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<ManagedParam> out;
  for (auto& [use, m] : ordered) out.push_back(m);
  return out;
}

int64_t PaddedShardNumel(const ManagedParam& p, int world) {
  const int64_t rows = (p.dim0 + world - 1) / world;
  const int64_t row_numel = p.dim0 > 0 ? p.numel / p.dim0 : 0;
  return rows * row_numel;
}

}  // namespace llmem::dist
