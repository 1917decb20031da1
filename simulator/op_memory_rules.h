// What autograd keeps and allocates for each aten op of a decoder graph: which tensors the forward saves for
// backward, which extra buffers the op creates (kept for backward or freed at once), and what backward allocates
// for each input's gradient. One rule per gradient formula family of graph/op_registry.h, each following the entry in
// tools/autograd/derivatives.yaml and its ATen implementation (named per rule in the .cc).
//
// Forward output allocation is not a rule: the IR observed which outputs own new storage.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "simulator/backend_rules.h"

namespace llmem::sim {

// How backward produces the gradient of one tensor input.
enum class GradKind : uint8_t {
  kNone,         // no gradient flows to this input
  kNew,          // a new tensor of the input's size and dtype
  kPassThrough,  // the output's gradient itself (same storage) when shapes and dtypes match, else a new tensor
  kView,         // a view of the output's gradient: no allocation
};

// An extra buffer an op allocates beyond its IR outputs.
struct ExtraBuffer {
  int64_t bytes = 0;
  bool saved = false;  // true: kept until this op's backward; false: freed when the op returns
  // Made by the op's composite code before its kernel runs (a converted mask), not one of the kernel's outputs.
  bool before_kernel = false;
};

// One step of the temporaries an op's own code makes in order (a dequantization before its kernel): allocate
// `bytes`, or, with `free_of` >= 0, free the block that step `free_of` allocated. Blocks a sequence leaves
// allocated live until the op is done (forward: after its outputs; backward: after the input gradients).
struct TransientStep {
  int64_t bytes = 0;
  int free_of = -1;
  bool saved = false;  // left at the end of a forward sequence: autograd keeps it for the op's backward
  // >= 0: instead of allocating, the program drops its reference to this tensor input of the op (rebinds the name
  // that held it), which frees it when nothing else holds it.
  int drop_input = -1;
};

struct OpMemoryRule {
  std::vector<int> saved_inputs;         // indices into the op's tensor inputs (Graph::tensor_inputs)
  std::vector<int> saved_outputs;        // indices into the op's outputs
  std::vector<ExtraBuffer> forward_extra;
  std::vector<GradKind> input_grads;     // one per flattened tensor input
  int64_t backward_workspace_bytes = 0;  // allocated before the input gradients, freed after them
  std::vector<TransientStep> forward_prelude;   // run before the outputs are allocated
  std::vector<TransientStep> backward_prelude;  // run after the workspace, before the input gradients
  // Tensor inputs the op's autograd Function keeps as ctx attributes rather than saved tensors: they stay until the
  // autograd graph is freed (after the whole backward), and checkpointing's saved-tensor hooks do not see them.
  std::vector<int> graph_held_inputs;
};

// Context a rule may read: the dtype each value has under the simulated precision.
struct RuleContext {
  const Graph& graph;
  const BackendRules& backend;
  std::function<DType(ValueId)> dtype;
  std::function<int64_t(ValueId)> bytes;  // bytes of the value's own shape at its simulated dtype
};

// The rule for `node`, or nullopt when the op kind is unknown.
std::optional<OpMemoryRule> RuleFor(const OpNode& node, const RuleContext& ctx);

// True for op kinds that never carry gradients and allocate only their IR outputs (masks, index arithmetic).
bool IsKnownNonDifferentiable(const std::string& kind);

}  // namespace llmem::sim
