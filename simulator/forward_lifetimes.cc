#include "simulator/forward_lifetimes.h"

#include <algorithm>
#include <cstdint>
#include <string_view>

#include "graph/op_registry.h"

namespace llmem::sim {

namespace {

// "model.layers.3.mlp" -> {"model", "layers", "3", "mlp"}; "" -> {} (the outermost module).
std::vector<std::string_view> PathComponents(std::string_view scope) {
  std::vector<std::string_view> parts;
  while (!scope.empty()) {
    const size_t dot = scope.find('.');
    parts.push_back(scope.substr(0, dot));
    if (dot == std::string_view::npos) break;
    scope.remove_prefix(dot + 1);
  }
  return parts;
}

size_t CommonDepth(const std::vector<std::string_view>& a, const std::vector<std::string_view>& b) {
  size_t d = 0;
  while (d < a.size() && d < b.size() && a[d] == b[d]) ++d;
  return d;
}

// `x = x.to(dtype)` in the holder's own forward: the frame rebinds its local to the cast, which drops the value
// (gpt_neo's `lm_logits = lm_logits.to(torch.float32)`). A cast in a helper of another file rebinds the helper's
// local only (HF's loss function: `logits = logits.float()`), so the caller still holds the value.
bool RebindsToACast(const OpNode& last_use, size_t holder_depth) {
  const bool direct = PathComponents(last_use.scope).size() == holder_depth;
  return direct && last_use.in_module_code && OpHas(last_use.kind, kCastOp);
}

}  // namespace

std::vector<int32_t> ForwardReleasePoints(const Graph& graph, Lifetimes lifetimes) {
  const auto& nodes = graph.nodes();
  const int32_t n = static_cast<int32_t>(nodes.size());
  std::vector<int32_t> release(graph.values().size(), -1);
  // Step 1: the last use of every value (the TorchScript interpreter's lifetimes).
  for (const auto& node : nodes) {
    for (ValueId in : graph.tensor_inputs(node.id)) release[static_cast<size_t>(in.index)] = node.id.index;
    for (ValueId out : node.outputs) {
      release[static_cast<size_t>(out.index)] = std::max(release[static_cast<size_t>(out.index)], node.id.index);
    }
  }
  if (lifetimes == Lifetimes::kEager && n > 0) {
    // Step 2: module calls. call_end[i][d]: the last op of the call, containing op i, of the module named by the
    // first d components of op i's path (d = 0: the outermost module, the whole forward).
    std::vector<std::vector<std::string_view>> paths(nodes.size());
    for (size_t i = 0; i < nodes.size(); ++i) paths[i] = PathComponents(nodes[i].scope);
    std::vector<std::vector<int32_t>> call_end(nodes.size());
    for (int32_t i = n - 1; i >= 0; --i) {
      const size_t ui = static_cast<size_t>(i);
      call_end[ui].assign(paths[ui].size() + 1, i);
      if (i + 1 == n) continue;
      const size_t shared = CommonDepth(paths[ui], paths[ui + 1]);
      for (size_t d = 0; d <= shared; ++d) call_end[ui][d] = call_end[ui + 1][d];
    }
    // Step 3: values handed between module calls live in the frames that hold them (Note [Eager lifetimes]).
    std::vector<size_t> holder(graph.values().size(), SIZE_MAX);  // depth of the innermost enclosing module
    for (const auto& node : nodes) {
      const auto& at = paths[static_cast<size_t>(node.id.index)];
      for (ValueId in : graph.tensor_inputs(node.id)) {
        const auto& v = graph.value(in);
        if (!v.producer.valid()) continue;
        size_t& depth = holder[static_cast<size_t>(in.index)];
        depth = std::min(depth, CommonDepth(paths[static_cast<size_t>(v.producer.index)], at));
      }
    }
    for (const auto& v : graph.values()) {
      const size_t i = static_cast<size_t>(v.id.index);
      if (!v.producer.valid() || holder[i] == SIZE_MAX) continue;
      const size_t depth = holder[i];
      const size_t last = static_cast<size_t>(release[i]);
      if (depth < paths[static_cast<size_t>(v.producer.index)].size() && !RebindsToACast(nodes[last], depth)) {
        release[i] = std::max(release[i], call_end[last][depth]);  // returned: bound until the holder returns
      }
      if (depth < paths[last].size()) {
        release[i] = std::max(release[i], call_end[last][depth + 1]);  // an argument of the last call using it
      }
    }
  }
  release[static_cast<size_t>(graph.loss().index)] = n;
  return release;
}

}  // namespace llmem::sim
