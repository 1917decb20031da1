// What both importers record while they execute a forward op by op on the meta device: every tensor an op sees or
// makes becomes a TensorValue (shape, strides, dtype, storage sharing, requires_grad), every ATen op that makes a
// tensor an OpNode, and module state a Parameter on first use. The importers differ in how they walk their
// file's graph (TorchScript nodes, an ExportedProgram's serialized nodes); what is observed, and how, is here.
//
// Usage: give each executed op's input IValues to ToArg, its outputs to AddOutputs, its module path to
// node_layers via AddNode; then Finish(...) assigns regions and records the module state the forward never read.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "graph/graph.h"
#include "graph/index_ranges.h"

namespace llmem {

DType FromScalarType(at::ScalarType t);

// Decoder layer index from a module path: the first "<name>.<integer>" step (a child of a container such as
// ModuleList; decoder architectures keep their layers in one); -1 outside the layers.
int32_t LayerIndex(const std::string& path);

// A parameter or buffer of the module, by the meta tensor that stands for it.
struct MetaSlot {
  std::string name;           // dotted, from the root
  bool is_parameter = false;  // false for a buffer
};
using MetaSlots = std::unordered_map<const c10::TensorImpl*, MetaSlot>;

// An embedding lookup whose indices the meta run bounds: they are built from sizes (positions, token types), not
// read from the input ids.
struct BoundedLookup {
  std::string table;    // the weight's dotted name
  int64_t rows = 0;     // weight.size(0)
  IndexRange indices;   // bounds of the indices at this run's sequence length
  std::string scope;    // module path of the lookup
};

class MetaRun {
 public:
  explicit MetaRun(MetaSlots slots) : slots_(std::move(slots)) {}
  // The module state of this run, by meta tensor.
  const MetaSlots& slots() const { return slots_; }

  // A new IR value for `t`; it aliases the value that owns t's storage when one exists.
  ValueId NewValue(ValueRole role, const at::Tensor& t, NodeId producer, const std::string& name);
  // The IR value of a tensor an op reads: the newest value of that tensor object, else a parameter (module state,
  // registered on first sight in `region`) or a tensor constant baked into the file.
  ValueId ValueOf(const at::Tensor& t, Region region);
  OpArg ToArg(const c10::IValue& iv);
  // Appends `op` (its id, outputs and region are filled here) with one value per tensor of `outputs`; returns the
  // values of the outputs in order (tensor lists flattened; invalid for a non-tensor output).
  std::vector<ValueId> AddNode(OpNode op, const std::vector<c10::IValue>& inputs,
                               const std::vector<c10::IValue>& outputs);
  // Whether the op is a view eager never makes: a slice of a whole dim (Python indexing returns the tensor itself
  // for `x[:, :n]` when n is the length: TensorIndexing.h applySlice) or contiguous() of a contiguous tensor (returns
  // self), or an alias (what torch.export records for a cast to the tensor's own dtype, which eager returns as is).
  // Such an op then records nothing and its result is the input's IR value. A trace records them all.
  bool IsNoOpView(const std::string& kind, const std::vector<c10::IValue>& inputs,
                  const std::vector<c10::IValue>& outputs);
  // Records what a lookup into a table of module state bounds (for the position limit), from the op's kind.
  void ObserveLookup(const std::string& kind, const std::vector<c10::IValue>& inputs, const std::string& scope);
  // Regions of ops and parameters; `all_slots` (module state in module order) adds what the forward never read;
  // names `loss` as the loss. Throws ModelLoadError when the output is not a tensor.
  void Finish(const std::vector<at::Tensor>& all_slots, const c10::IValue& loss);

  IndexRanges ranges;  // token ids and labels have none: their values are data
  std::vector<TensorValue> values;
  std::vector<OpNode> nodes;
  std::vector<Parameter> params;
  std::vector<BoundedLookup> bounded_lookups;  // in execution order
  std::unordered_map<const c10::TensorImpl*, ValueId> by_impl;      // tensor object -> newest IR value
  std::unordered_map<const c10::StorageImpl*, ValueId> by_storage;  // storage -> owning IR value

 private:
  MetaSlots slots_;
  std::vector<at::Tensor> keep_alive_;  // keeps storages alive so storage addresses are never reused
  std::vector<int32_t> node_layers_;    // per node: its decoder layer from the module path, or -1
};

// Decoder LMs attend causally: HF passes scaled_dot_product_attention is_causal=True or a causal mask. Attention
// (`args` of scaled_dot_product_attention) with is_causal=False and no mask, or a mask the meta run knows to hide
// nothing (an additive mask of zeros, a bool mask of ones: BERT's mask made from an all-ones attention_mask), is
// bidirectional, as in encoders and masked LMs, whose step llmem does not model.
bool IsBidirectionalAttention(const std::vector<c10::IValue>& args, const IndexRanges& ranges);
// The refusal of such an attention in module `scope` of class `module_class` (either may be empty).
std::string BidirectionalAttentionMessage(const std::string& scope, const std::string& module_class);

// The longest sequence the model allows, from the lookups of a run at `seq`, the override and the config's
// max_position_embeddings (`config_model_type` names it).
std::optional<PositionLimit> FindPositionLimit(const std::vector<BoundedLookup>& lookups, int64_t seq,
                                               std::optional<int64_t> override_max,
                                               std::optional<int64_t> config_max,
                                               const std::string& config_model_type);
// That limit, after refusing (ConfigError) a sequence past it or a lookup past its table.
std::optional<PositionLimit> CheckPositions(const std::vector<BoundedLookup>& lookups, int64_t seq,
                                            std::optional<int64_t> override_max, std::optional<int64_t> config_max,
                                            const std::string& config_model_type);

// The IR of two runs of the same forward, one with the file's weights and one with bf16 weights (none when that run
// failed: the file bakes fp32 in): each value's dtype_bf16_weights from the second, unless the second took another
// path (then the graph cannot run with bf16 weights). Throws ModelLoadError when the loss is not a scalar,
// ConfigError when a byte count overflows.
Graph AssembleGraph(MetaRun run, const MetaRun* half, std::vector<ValueId> inputs, int64_t batch, int64_t seq);

}  // namespace llmem
