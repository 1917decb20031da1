// The project's IR of one forward pass: tensor values, the aten ops that produce them, parameters, and the region
// (embeddings, decoder layer i, LM head + loss) of every op. Built once by an importer, immutable afterwards.
//
// What the IR records is structure and observation, never memory policy: shapes and dtypes at the requested
// batch/sequence, which value shares storage with which (views and in-place results), which values require grad,
// and which ops produce floating outputs whose dtype follows their inputs. Deciding what that costs in bytes, and
// when, is the simulator's job.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "graph/dtype.h"

namespace llmem {

// Dense index of a TensorValue in Graph::values(); doubles as a strong typedef.
struct ValueId {
  int32_t index = -1;
  bool valid() const { return index >= 0; }
  friend bool operator==(ValueId a, ValueId b) = default;
  friend auto operator<=>(ValueId a, ValueId b) = default;
};

// Dense index of an OpNode in Graph::nodes(); nodes are in execution (topological) order.
struct NodeId {
  int32_t index = -1;
  bool valid() const { return index >= 0; }
  friend bool operator==(NodeId a, NodeId b) = default;
  friend auto operator<=>(NodeId a, NodeId b) = default;
};

enum class RegionKind : uint8_t {
  kEmbedding,     // everything before the first decoder layer: embeddings, masks, rotary tables
  kDecoderLayer,  // ops inside decoder layer `layer`
  kHead,          // everything after the last decoder layer: final norm, LM head, loss
};

struct Region {
  RegionKind kind = RegionKind::kEmbedding;
  int32_t layer = -1;  // decoder layer index for kDecoderLayer, else -1
  friend bool operator==(const Region&, const Region&) = default;
};

std::string RegionName(const Region& region);  // "embedding", "layer 3", "head"

// One argument of an op, in schema order. Tensors refer to values; everything else is kept for the rules.
struct OpArg {
  enum class Kind : uint8_t { kTensor, kTensorList, kInt, kDouble, kBool, kIntList, kString, kNone, kOther };
  Kind kind = Kind::kNone;
  std::vector<ValueId> tensors;  // kTensor: one value; kTensorList: the list's values in order
  int64_t int_value = 0;         // kInt, kBool (0/1); also a ScalarType/Device enum as an int
  double double_value = 0.0;     // kDouble
  std::vector<int64_t> ints;     // kIntList
  std::string text;              // kString, kOther (printable form)
};

enum class ValueRole : uint8_t {
  kInput,       // a graph input (token ids, labels)
  kParameter,   // a module parameter or buffer
  kActivation,  // produced by an op
};

struct TensorValue {
  ValueId id;
  ValueRole role = ValueRole::kActivation;
  std::string name;             // "%12", or the parameter's dotted name
  std::vector<int64_t> shape;   // at the batch/sequence the graph was built for
  std::vector<int64_t> strides; // observed element strides; empty means contiguous
  DType dtype = DType::kF32;
  DType dtype_bf16_weights = DType::kF32;  // dtype observed when the same graph runs with bf16 weights: tells
                                           // which floating values follow the weights and which ops fix a dtype
  int64_t storage_numel = 0;    // elements of the storage this value created; 0 when it aliases another value
  ValueId alias_of;             // the value whose storage this one shares (a view or an in-place result)
  bool requires_grad = false;   // observed in an autograd-enabled run
  NodeId producer;              // invalid for inputs and parameters
  int32_t param = -1;           // index into Graph::params() for kParameter
};

// How a module's forward drops the result of a child call that it bound to a name (`x = self.norm(x)`), as the
// export read it from the source: after the call the frame calls only children named in `between` until a later
// statement rebinds the name. That statement's own call is one of `rebinders` (the result is dropped once that
// call returns); when it calls none, the result is dropped before the frame's next call of a child outside `between`.
struct NameRebinding {
  std::vector<std::string> between;
  std::vector<std::string> rebinders;
  bool one_of_several = false;  // the name binds one element of the call's result (`x, w = self.attn(...)`): the
                                // rule holds for the call's result when the call returns a single tensor
  int own_rebindings = 0;       // no rebinder: the frame's own statements that rebind the name in turn, each from
                                // the value before (`logits = logits / c; logits = torch.tanh(logits)`: 2)
};

struct OpNode {
  NodeId id;
  std::string kind;             // "aten::linear"
  std::vector<OpArg> args;      // schema order
  std::vector<ValueId> outputs; // tensor outputs, flattened (a Tensor[] result becomes several values)
  Region region;
  std::string scope;            // module path, e.g. "model.layers.3.mlp.up_proj"
  bool in_module_code = false;  // run by the module's own forward: the op's traced source line is in the file
                                // that defines the module's class, not in a helper function of another file
  bool to_autocast_dtype = false;  // aten::to whose target, under autocast, is autocast's 16-bit dtype (the
                                   // export's autocast trace says so; the graph bakes the trace-time fp32)
  // Per component depth of `scope` where a module call starts: 1 when its parent's forward nests that call in an
  // expression (its result a temporary, not a bound name; Note [Eager lifetimes]), 0 or absent otherwise.
  std::vector<uint8_t> temporary_calls;
  // Per component depth of `scope` where a module call starts: how its parent's forward drops the call's result
  // (null when the export says nothing, e.g. the result is returned or copied to another name).
  std::vector<std::shared_ptr<const NameRebinding>> rebindings;
};

struct Parameter {
  std::string name;             // "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
  DType dtype = DType::kF32;
  int64_t bytes = 0;
  bool trainable = true;        // false for buffers (masks, rotary tables)
  bool used_in_forward = true;  // false for tensors the module holds but the forward never reads
  bool frozen = false;          // an nn.Parameter with requires_grad off (a LoRA base), not a buffer: sharding
                                // engines (FSDP2) shard and gather it like a trainable one
  ValueId value;
  Region region;                // region of its first use
};

// The longest sequence the model's positions allow, and where that limit comes from.
struct PositionLimit {
  int64_t max_seq = 0;  // tokens
  std::string source;   // "position table model.decoder.embed_positions.weight, 2050 rows", "--max-positions", ...
};

struct KvCacheNames {
  std::vector<std::string> past;     // graph inputs: the entries before this forward
  std::vector<std::string> present;  // the entries after it
};

class Graph {
 public:
  Graph() = default;
  Graph(std::vector<TensorValue> values, std::vector<OpNode> nodes, std::vector<Parameter> params,
        std::vector<ValueId> inputs, ValueId loss, int64_t batch, int64_t seq);

  const std::vector<TensorValue>& values() const { return values_; }
  const std::vector<OpNode>& nodes() const { return nodes_; }
  const std::vector<Parameter>& params() const { return params_; }
  const std::vector<ValueId>& inputs() const { return inputs_; }
  const TensorValue& value(ValueId id) const { return values_.at(static_cast<size_t>(id.index)); }
  const OpNode& node(NodeId id) const { return nodes_.at(static_cast<size_t>(id.index)); }
  // The op's tensor inputs in schema order, tensor lists flattened (computed once: simulations read them often).
  const std::vector<ValueId>& tensor_inputs(NodeId id) const { return tensor_inputs_.at(static_cast<size_t>(id.index)); }
  ValueId loss() const { return loss_; }
  int64_t batch() const { return batch_; }
  int64_t seq() const { return seq_; }
  int32_t num_layers() const;
  // False when the export cannot run with 16-bit weights (it bakes fp32 dtypes in); then dtype_bf16_weights
  // carries no information and pure-bf16 estimates are refused.
  bool runs_with_bf16_weights() const { return runs_with_bf16_weights_; }
  void set_runs_with_bf16_weights(bool v) { runs_with_bf16_weights_ = v; }
  // The position limit the importer found (a learned position table, or the config the export carries); none
  // when the model has neither (e.g. RoPE in an export without its config).
  const std::optional<PositionLimit>& position_limit() const { return position_limit_; }
  void set_position_limit(std::optional<PositionLimit> limit) { position_limit_ = std::move(limit); }
  // The input embeddings' output made a leaf that requires grad (HF enable_input_require_grads, which PEFT turns on
  // under gradient checkpointing): autograd's AccumulateGrad node holds it, and its .grad, until the graph is freed.
  ValueId input_grad_leaf() const { return input_grad_leaf_; }
  void set_input_grad_leaf(ValueId v) { input_grad_leaf_ = v; }
  // A generation forward the importer ran with its key/value cache (graph/generation_forward.h): the names of the
  // cache entries it reads (inputs) and makes, per layer its keys, then its values. Names survive rewrites that
  // renumber values. None for a training graph.
  const std::optional<KvCacheNames>& kv_cache() const { return kv_cache_; }
  void set_kv_cache(std::optional<KvCacheNames> names) { kv_cache_ = std::move(names); }

  // Follows alias_of to the value that owns the storage.
  ValueId StorageRoot(ValueId id) const;

 private:
  std::vector<TensorValue> values_;
  std::vector<OpNode> nodes_;
  std::vector<Parameter> params_;
  std::vector<ValueId> inputs_;
  std::vector<std::vector<ValueId>> tensor_inputs_;  // per node
  ValueId loss_;
  int64_t batch_ = 0;
  int64_t seq_ = 0;
  bool runs_with_bf16_weights_ = true;
  std::optional<PositionLimit> position_limit_;
  ValueId input_grad_leaf_;
  std::optional<KvCacheNames> kv_cache_;
};

// Strides of `v`: the observed ones, or contiguous strides when none were recorded.
std::vector<int64_t> StridesOf(const TensorValue& v);

// True when dims [first, last) of `v` can be merged into one without a copy (what reshape/flatten needs to
// return a view): each dim's stride equals the next one's stride times its size, ignoring size-1 dims.
bool CanMergeDims(const TensorValue& v, size_t first, size_t last);

// The strides a view of `shape`/`strides` with `new_shape` has, or nullopt when no view can have that shape and
// reshape must copy (the rule of ATen's computeStride in aten/src/ATen/TensorUtils.cpp: runs of dims that are
// contiguous with each other may be split or merged; size-1 dims fit anywhere).
std::optional<std::vector<int64_t>> ViewStrides(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                                                const std::vector<int64_t>& new_shape);

// Checks the invariants every importer must establish (topological order, every use defined, alias chains end at
// an owning value, the loss is a scalar); throws ModelLoadError naming the first broken one.
void VerifyGraph(const Graph& graph);

}  // namespace llmem
