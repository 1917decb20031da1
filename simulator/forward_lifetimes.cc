#include "simulator/forward_lifetimes.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <string_view>
#include <unordered_map>

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

// The module paths of a graph's ops, each distinct path split once: a 70B graph has tens of thousands of ops
// but only a few hundred module paths.
class ModulePaths {
 public:
  explicit ModulePaths(const std::vector<OpNode>& nodes) : path_of_(nodes.size()) {
    std::unordered_map<std::string_view, int32_t> ids;
    for (size_t i = 0; i < nodes.size(); ++i) {
      const auto [it, added] = ids.try_emplace(nodes[i].scope, static_cast<int32_t>(paths_.size()));
      if (added) paths_.push_back(PathComponents(nodes[i].scope));
      path_of_[i] = it->second;
    }
  }
  // Components of op i's path.
  size_t Depth(size_t op) const { return paths_[static_cast<size_t>(path_of_[op])].size(); }
  // Whether component d of op i's path is an index into a container (ModuleList "layers.3").
  bool IndexedAt(size_t op, size_t d) const {
    const auto& parts = paths_[static_cast<size_t>(path_of_[op])];
    if (d >= parts.size() || parts[d].empty()) return false;
    return std::all_of(parts[d].begin(), parts[d].end(), [](char c) { return c >= '0' && c <= '9'; });
  }
  // Component d of op i's path (d < Depth(i)): the child that the module at depth d calls.
  std::string_view Component(size_t op, size_t d) const { return paths_[static_cast<size_t>(path_of_[op])][d]; }
  // Components that the paths of ops i and j share from the outermost module in.
  size_t CommonDepth(size_t i, size_t j) const {
    if (path_of_[i] == path_of_[j]) return Depth(i);
    const auto& a = paths_[static_cast<size_t>(path_of_[i])];
    const auto& b = paths_[static_cast<size_t>(path_of_[j])];
    size_t d = 0;
    while (d < a.size() && d < b.size() && a[d] == b[d]) ++d;
    return d;
  }

 private:
  std::vector<int32_t> path_of_;                       // per op: index into paths_
  std::vector<std::vector<std::string_view>> paths_;  // per distinct path: its components
};

// `x = x.to(dtype)` in the holder's own forward: the frame rebinds its local to the cast, which drops the value
// (gpt_neo's `lm_logits = lm_logits.to(torch.float32)`). A cast in a helper of another file rebinds the helper's
// local only (HF's loss function: `logits = logits.float()`), so the caller still holds the value.
bool RebindsToACast(const OpNode& last_use, size_t last_use_depth, size_t holder_depth) {
  return last_use_depth == holder_depth && last_use.in_module_code && OpHas(last_use.kind, kCastOp);
}

// Whether `op` hands `value` on as itself: an output sharing its storage with its shape (a contiguous tensor's
// `.contiguous()`, a same-dtype `.to()`), which Python returns as the same object. A real view (split, transpose)
// is a new tensor: it keeps the storage alive by itself while the temporary dies.
bool ReturnedUnchangedBy(const Graph& graph, const OpNode& op, ValueId value) {
  const auto& v = graph.value(value);
  return std::any_of(op.outputs.begin(), op.outputs.end(), [&](ValueId out) {
    const auto& o = graph.value(out);
    return o.alias_of == value && o.shape == v.shape;
  });
}

bool Names(const std::vector<std::string>& names, std::string_view child) {
  return std::find(names.begin(), names.end(), child) != names.end();
}

}  // namespace

// Note [Own-code rebindings]
// A name bound to a child call's result and rebound by the frame's own statements (Granite's
// `logits = logits / self.config.logits_scaling`, Gemma-2's soft-capping `logits = logits / c;
// logits = torch.tanh(logits); logits = logits * c`) drops the old tensor once the first of them has read it: each
// value of the chain dies at its last use, the next statement's op, and the last one is what the name holds until
// the frame returns. When the old value's last use is not the frame's own code, the rebinding did not run (it lay in
// a block the trace skipped) and the result stays bound.
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
    // Step 2: module calls. CallEnd(i, d): the last op of the call, containing op i, of the module named by the
    // first d components of op i's path (d = 0: the outermost module, the whole forward). Stored flat: op i's
    // entries start at first_end[i].
    const ModulePaths paths(nodes);
    std::vector<size_t> first_end(nodes.size() + 1, 0);
    for (size_t i = 0; i < nodes.size(); ++i) first_end[i + 1] = first_end[i] + paths.Depth(i) + 1;
    std::vector<int32_t> call_end(first_end.back());
    auto end_of_call = [&](size_t op, size_t depth) -> int32_t& { return call_end[first_end[op] + depth]; };
    for (int32_t i = n - 1; i >= 0; --i) {
      const size_t ui = static_cast<size_t>(i);
      std::fill(call_end.begin() + static_cast<std::ptrdiff_t>(first_end[ui]),
                call_end.begin() + static_cast<std::ptrdiff_t>(first_end[ui + 1]), i);
      if (i + 1 == n) continue;
      const size_t shared = paths.CommonDepth(ui, ui + 1);
      for (size_t d = 0; d <= shared; ++d) end_of_call(ui, d) = end_of_call(ui + 1, d);
    }
    // Step 3: values handed between module calls live in the frames that hold them (Note [Eager lifetimes]).
    std::vector<size_t> holder(graph.values().size(), SIZE_MAX);  // depth of the innermost enclosing module
    for (const auto& node : nodes) {
      const size_t at = static_cast<size_t>(node.id.index);
      for (ValueId in : graph.tensor_inputs(node.id)) {
        const auto& v = graph.value(in);
        if (!v.producer.valid()) continue;
        size_t& depth = holder[static_cast<size_t>(in.index)];
        depth = std::min(depth, paths.CommonDepth(static_cast<size_t>(v.producer.index), at));
      }
    }
    // The frame's rebinding of a name bound to a child call's result (OpNode::rebindings): the op after which it
    // drops the result that op p's call at depth d + 1 returned into the frame at depth d.
    auto rebinding = [&](size_t p, size_t d, const NameRebinding& rule) -> int32_t {
      const int32_t frame_end = end_of_call(p, d);
      for (int32_t k = end_of_call(p, d + 1) + 1; k <= frame_end;) {
        const size_t uk = static_cast<size_t>(k);
        if (paths.Depth(uk) <= d) {  // the frame's own code
          ++k;
          continue;
        }
        const std::string_view child = paths.Component(uk, d);
        const int32_t call_end = end_of_call(uk, d + 1);
        if (Names(rule.between, child)) {
          k = call_end + 1;
        } else if (Names(rule.rebinders, child)) {
          return call_end;  // the statement assigns the name once this call returns
        } else {
          return k - 1;  // the rebinding statement ran before this call
        }
      }
      // No child call follows: a rebinding statement that calls no child is the frame's own code.
      return rule.rebinders.empty() ? -1 : frame_end;
    };
    // Tensors each child call returns into its frame, for rules that bind one element of the result.
    std::map<std::pair<int32_t, size_t>, int> returned;  // (end of the call, depth of the frame) -> tensors
    for (const auto& v : graph.values()) {
      const size_t i = static_cast<size_t>(v.id.index);
      if (!v.producer.valid() || holder[i] == SIZE_MAX) continue;
      const auto p = static_cast<size_t>(v.producer.index);
      const auto& rules = nodes[p].rebindings;
      for (size_t d = holder[i]; d < paths.Depth(p) && d < rules.size(); ++d) {
        if (rules[d] && rules[d]->one_of_several) ++returned[{end_of_call(p, d + 1), d}];
      }
    }
    for (const auto& v : graph.values()) {
      const size_t i = static_cast<size_t>(v.id.index);
      if (!v.producer.valid() || holder[i] == SIZE_MAX) continue;
      const size_t depth = holder[i];
      const size_t last = static_cast<size_t>(release[i]);
      // A container (ModuleList) has no frame: its parent runs `for layer in self.layers: h = layer(h, ...)`, so
      // a layer's result lives in the loop variable, rebound once the next layer returns.
      const bool loop_variable = paths.IndexedAt(static_cast<size_t>(v.producer.index), depth);
      // A call nested in an expression of the holder (`self.act_fn(self.gate_proj(x))`) returns a temporary, never
      // bound to a name: it dies at its last use.
      // Unless that use returns it unchanged (`self.lm_head(h).contiguous()`): then it is the expression's result,
      // which the holder binds.
      const auto& temporary = nodes[static_cast<size_t>(v.producer.index)].temporary_calls;
      const bool expression_temporary =
          depth < temporary.size() && temporary[depth] != 0 && !ReturnedUnchangedBy(graph, nodes[last], v.id);
      if (depth < paths.Depth(static_cast<size_t>(v.producer.index)) && !loop_variable && !expression_temporary &&
          !RebindsToACast(nodes[last], paths.Depth(last), depth)) {
        // Returned: bound until the holder returns, or rebinds the name it bound the result to.
        int32_t bound_until = end_of_call(last, depth);
        const size_t p = static_cast<size_t>(v.producer.index);
        const auto& rules = nodes[p].rebindings;
        if (depth < rules.size() && rules[depth] &&
            (!rules[depth]->one_of_several || returned[{end_of_call(p, depth + 1), depth}] == 1)) {
          const NameRebinding& rule = *rules[depth];
          int32_t rebound = rebinding(p, depth, rule);
          // Rebound by the frame's own code (Note [Own-code rebindings]).
          const auto own_code = [&](size_t op) {
            return paths.Depth(op) == depth && nodes[op].in_module_code && !nodes[op].outputs.empty();
          };
          if (rule.rebinders.empty() && rule.own_rebindings > 0 && own_code(last)) {
            ValueId held = nodes[last].outputs.front();
            for (int step = 1; step < rule.own_rebindings; ++step) {
              const size_t next = static_cast<size_t>(release[static_cast<size_t>(held.index)]);
              if (next >= nodes.size() || !own_code(next)) break;
              held = nodes[next].outputs.front();
            }
            int32_t& until = release[static_cast<size_t>(held.index)];
            until = std::max(until, end_of_call(last, depth));
          } else if (rebound < 0) {
            rebound = end_of_call(p, depth);  // the rebinding did not run (a block the trace skipped): bound
          }
          bound_until = std::min(bound_until, rebound);
        }
        release[i] = std::max(release[i], bound_until);
      }
      if (depth < paths.Depth(last)) {
        release[i] = std::max(release[i], end_of_call(last, depth + 1));  // an argument of the last call using it
      }
    }
  }
  release[static_cast<size_t>(graph.loss().index)] = n;
  return release;
}

}  // namespace llmem::sim
