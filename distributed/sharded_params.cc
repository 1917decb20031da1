#include "distributed/sharded_params.h"

#include <algorithm>
#include <map>
#include <set>

#include "graph/dtype.h"

namespace llmem::dist {

std::vector<ManagedParam> ManagedParams(const Graph& graph, sim::Precision precision) {
  // First forward use of each storage root.
  std::map<int32_t, int32_t> first_use;
  for (const auto& node : graph.nodes()) {
    for (ValueId in : graph.tensor_inputs(node.id)) first_use.emplace(graph.StorageRoot(in).index, node.id.index);
  }
  std::vector<std::pair<int32_t, ManagedParam>> ordered;
  std::set<int32_t> seen;
  for (size_t i = 0; i < graph.params().size(); ++i) {
    const Parameter& p = graph.params()[i];
    const int32_t root = graph.StorageRoot(p.value).index;
    if (!p.trainable || !p.used_in_forward || !seen.insert(root).second) continue;
    ManagedParam m;
    m.index = static_cast<int32_t>(i);
    m.value = p.value.index;
    m.numel = NumElements(p.shape);
    m.dim0 = p.shape.empty() ? 1 : p.shape[0];
    // Pure bf16 stores the weights in bf16; the other precisions keep fp32 weights (autocast copies are transient,
    // and FSDP2's MixedPrecisionPolicy keeps fp32 shards even when the export was traced with 16-bit weights).
    m.element_size = IsFloating(p.dtype) ? (precision == sim::Precision::kBf16 ? 2 : 4) : ElementSize(p.dtype);
    m.region = p.region;
    auto it = first_use.find(root);
    ordered.emplace_back(it == first_use.end() ? INT32_MAX : it->second, m);
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
