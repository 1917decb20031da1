#include "simulator/step_executor.h"

#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <type_traits>

#include "graph/error.h"
#include "graph/op_registry.h"
#include "simulator/backend_rules.h"
#include "simulator/forward_lifetimes.h"
#include "simulator/op_memory_rules.h"

namespace llmem::sim {
namespace {

// Builds the events of one plan; one instance per simulation.
class StepExecutor : private StepMemory {
 public:
  StepExecutor(const Graph& graph, const StepPlan& plan, const TrainingConfig& config, StepHooks* hooks)
      : graph_(graph),
        plan_(plan),
        config_(config),
        backend_(RulesFor(config.target)),
        hooks_(hooks ? hooks : &no_hooks_) {}

  StepSimulation Run();

 private:
  // StepMemory: what the parallel engine's hooks may do.
  int64_t Alloc(int64_t bytes, MemoryCategory category, const std::string& label) override {
    return NewStorage(bytes, category, label, current_node_);
  }
  void Free(int64_t block) override { Unref(block, current_node_); }
  int64_t TakeParamGrad(int32_t param) override {
    int64_t& slot = grad_of_[static_cast<size_t>(graph_.params().at(static_cast<size_t>(param)).value.index)];
    const int64_t g = slot;
    slot = -1;
    return g;
  }
  void StepParam(int32_t param) override {
    if (!plan_.params.at(static_cast<size_t>(param)).optimized) return;
    for (int64_t s : StepTemporaries(graph_.params().at(static_cast<size_t>(param)))) Unref(s, current_node_);
  }
  // Calls the hooks when the op at `node` belongs to another region than the previous one.
  void EnterRegionOf(const OpNode& node) {
    if (in_region_ && current_region_ == node.region) return;
    if (in_region_) hooks_->OnRegionEnd(phase_, current_region_, *this);
    current_region_ = node.region;
    in_region_ = true;
    hooks_->OnRegionStart(phase_, current_region_, *this);
  }
  void LeaveRegion() {
    if (in_region_) hooks_->OnRegionEnd(phase_, current_region_, *this);
    in_region_ = false;
  }

  struct Storage {
    int64_t block = -1;
    int64_t bytes = 0;
    int refs = 0;
    size_t alloc_event = 0;  // index of its allocation in the timeline
    bool elsewhere = false;  // allocated by an op of another device: no events on this device's timeline
  };

  // `label` is a string or a function making one: labels are built only when the configuration keeps them.
  template <typename Label>
  int64_t NewStorage(int64_t bytes, MemoryCategory category, Label&& label, int32_t node) {
    const int64_t id = static_cast<int64_t>(storages_.size());
    if (node >= 0 && !hooks_->RunsOnThisDevice(graph_.nodes()[static_cast<size_t>(node)])) return ElsewhereStorage();
    storages_.push_back(Storage{id, bytes, 1, out_.timeline.events.size()});
    // What a checkpointed layer's recompute makes is named so, for the breakdown of the backward peak.
    const std::string_view prefix = recomputing_ ? "recomputed: " : "";
    if constexpr (std::is_invocable_v<Label>) {
      out_.timeline.block_labels.push_back(config_.keep_labels ? std::string(prefix) + std::string(label())
                                                               : std::string());
    } else {
      out_.timeline.block_labels.push_back(config_.keep_labels ? std::string(prefix) + std::string(label)
                                                               : std::string());
    }
    out_.timeline.events.push_back(MemoryEvent{true, id, bytes, category, phase_, node});
    return id;
  }
  // Re-files an activation gradient that becomes a parameter's .grad under the gradients.
  void MarkAsParameterGradient(int64_t s) {
    const Storage& st = storages_[static_cast<size_t>(s)];
    if (st.elsewhere) return;
    MemoryCategory& c = out_.timeline.events[st.alloc_event].category;
    if (c == MemoryCategory::kActivationGrads) c = MemoryCategory::kGradients;
  }
  // A storage of another device: refcounted like the others, never on this device's timeline.
  int64_t ElsewhereStorage() {
    const int64_t id = static_cast<int64_t>(storages_.size());
    storages_.push_back(Storage{id, 0, 1, out_.timeline.events.size(), true});
    out_.timeline.block_labels.emplace_back();
    return id;
  }
  void Ref(int64_t s) { storages_[static_cast<size_t>(s)].refs++; }
  void Unref(int64_t s, int32_t node) {
    auto& st = storages_[static_cast<size_t>(s)];
    LLMEM_CHECK(st.refs > 0) << "double free of " << out_.timeline.block_labels[static_cast<size_t>(s)];
    if (--st.refs == 0 && !st.elsewhere) {
      out_.timeline.events.push_back(MemoryEvent{false, s, st.bytes, MemoryCategory::kTransient, phase_, node});
    }
  }
  int64_t Bytes(ValueId v) const {
    return ShapeBytes(graph_.value(v).shape, out_.value_dtypes[static_cast<size_t>(v.index)]);
  }
  int64_t StorageBytes(ValueId root) const {
    return CheckedMul(graph_.value(root).storage_numel, ElementSize(out_.value_dtypes[static_cast<size_t>(root.index)]),
                      "a tensor storage");
  }
  MemoryCategory ActivationCategory(const OpNode& node) const {
    if (recomputing_) return MemoryCategory::kRecomputed;
    return node.region.kind == RegionKind::kHead ? MemoryCategory::kHeadActivations : MemoryCategory::kActivations;
  }
  MemoryCategory OutputCategory(const OpNode& node, ValueId out) const {
    const auto& cache = plan_.loop.cache_outputs;
    if (std::find(cache.begin(), cache.end(), out) != cache.end()) return MemoryCategory::kKvCache;
    return ActivationCategory(node);
  }
  bool ProducedInLayer(ValueId v, int32_t layer) const {
    const NodeId producer = graph_.value(v).producer;
    if (!producer.valid()) return false;
    const Region& r = graph_.nodes()[static_cast<size_t>(producer.index)].region;
    return r.kind == RegionKind::kDecoderLayer && r.layer == layer;
  }
  // The rules' view of the current op: an input autocast copied has the copy's dtype.
  RuleContext OpRuleContext() const {
    auto dtype_in_op = [this](ValueId v) {
      for (const auto& [index, dtype] : op_input_dtype_) {
        if (index == v.index) return dtype;
      }
      return out_.value_dtypes[static_cast<size_t>(v.index)];
    };
    return RuleContext{graph_, backend_, dtype_in_op,
                       [this, dtype_in_op](ValueId v) { return ShapeBytes(graph_.value(v).shape, dtype_in_op(v)); }};
  }
  bool Trainable(ValueId v) const {
    const auto& tv = graph_.value(v);
    return tv.param >= 0 && graph_.params()[static_cast<size_t>(tv.param)].trainable;
  }

  // The parameters the optimizer updates, with their plans.
  std::vector<std::pair<const Parameter*, const ParamPlan*>> OptimizedParams() const {
    std::vector<std::pair<const Parameter*, const ParamPlan*>> params;
    for (const ParamPlan& pp : plan_.params) {
      if (pp.optimized) params.emplace_back(&graph_.params()[static_cast<size_t>(pp.param)], &pp);
    }
    return params;
  }
  // Bytes of a per-parameter block for the part of `p` this rank's optimizer updates (0: none of it).
  int64_t RankBlockBytes(const Parameter& p, const PerParamBlock& block) const {
    const DType param_dtype = out_.value_dtypes[static_cast<size_t>(p.value.index)];
    const int64_t rank_bytes = hooks_->OptimizedBytes(p, Bytes(p.value));
    if (block.layout == BlockLayout::kElementwise && (!block.dtype || *block.dtype == param_dtype)) return rank_bytes;
    const int64_t elements = BlockElements(graph_.value(p.value).shape, rank_bytes / ElementSize(param_dtype), block);
    return CheckedMul(elements, ElementSize(block.dtype.value_or(param_dtype)), "an optimizer tensor");
  }
  // Elements of `block` for a parameter of `shape` of which this rank updates `rank_elements` (engines shard
  // dim 0, so the local shape is the full one with dim 0 scaled down).
  static int64_t BlockElements(const std::vector<int64_t>& shape, int64_t rank_elements, const PerParamBlock& block) {
    if (rank_elements == 0) return 0;
    int64_t inner = 1;  // elements per dim-0 slice
    for (size_t d = 1; d < shape.size(); ++d) inner *= shape[d];
    const int64_t dim0 = shape.empty() || inner == 0 ? 1 : rank_elements / inner;
    switch (block.layout) {
      case BlockLayout::kElementwise: return rank_elements;
      case BlockLayout::kPerBlock: return (rank_elements + block.count - 1) / block.count;
      case BlockLayout::kRows: return shape.empty() ? 1 : rank_elements / shape.back();
      case BlockLayout::kColumns: {
        if (shape.size() < 2) return rank_elements;
        int64_t outer = shape.size() == 2 ? 1 : dim0;  // shape[:-2], with the local dim 0
        for (size_t d = 1; d + 2 < shape.size(); ++d) outer *= shape[d];
        return outer * shape.back();
      }
      case BlockLayout::kFixed: return block.count;
    }
    return rank_elements;
  }

  void Setup();
  void Forward();
  // One op's forward: its outputs, autocast copies, extra buffers and (unless checkpointed, outside a recompute)
  // what it saves. `weight_casts`: the autocast weight-copy cache of the enclosing autocast region.
  void ForwardOp(const OpNode& node, const RuleContext& ctx, std::map<int32_t, int64_t>& weight_casts);
  bool InCheckpointedLayer(const OpNode& node) const {
    return plan_.ops[static_cast<size_t>(node.id.index)].save != SavePolicy::kSave;
  }
  void CountCheckpointedInputs();
  void CheckpointForwardOp(const OpNode& node);
  // Selective checkpointing (Note [Cached outputs]).
  void CacheOutputs(const OpNode& node, const OpMemoryRule& rule);
  bool TakeCachedOutputs(const OpNode& node);
  void RecomputeLayer(int32_t layer, const RuleContext& ctx, int32_t first_reversed);
  void ReleaseCheckpointedLayer(int32_t layer);
  void HoldCtxAttributes(const OpNode& node, const OpMemoryRule& rule);
  bool SavesForBackward(size_t n) const;
  void Backward();
  void OptimizerStep();
  void OptimizerTemporaries();
  // The training loop (LoopPlan).
  void FindLastGradientNodes();
  void StartNextMicroBatch();
  void AfterNodeBackward(int32_t node);
  void StepInBackward(const Parameter& p, const ParamPlan& pp);
  std::vector<int64_t> StepTemporaries(const Parameter& p);
  void KeepPreviousOutputs();
  void HoldIfReturned(const OpNode& node);
  // Runs a rule's sequence of temporaries; returns the blocks it leaves allocated (those of steps marked saved go to
  // `saved` instead).
  std::vector<int64_t> RunTransientSteps(const std::vector<TransientStep>& steps, const OpNode& node, const char* what,
                                         std::vector<int64_t>* saved = nullptr);
  void KeepOutputs();
  void ReleaseKeptOutputs();
  ValueId ReturnedLogits() const;
  void ClipGradNormTemporaries();
  // The chunked loss (LossPlan, Note [Chunked loss]).
  bool ReplacedByLoss(const OpNode& node) const {
    return !plan_.loss.chunk_lengths.empty() && node.id.index >= plan_.loss.lm_head_node;
  }
  // The LM head the replaced loss projects with, and the dtypes it sees.
  struct LossHead {
    int32_t linear = -1, loss_node = -1;  // the LM head's linear; the op producing the loss
    ValueId hidden, weight, logits;       // the last hidden state [B, S, H], the weight [V, H], the graph's logits
    int64_t batch = 0, seq = 0, width = 0, vocab = 0;
    DType low = DType::kBF16;              // autocast's 16-bit dtype
    bool cast_hidden = false, cast_weight = false;  // autocast copies them for matmuls
  };
  LossHead LossHeadOf(ValueId hidden) const;
  ValueId ChunkedLossHidden() const;
  void ReleaseHeldUntilLoss(int32_t head);
  void SetLossGradient(ValueId v, int64_t grad, bool addable);
  void ChunkedLossForward(std::map<int32_t, int64_t>& weight_casts);
  void ChunkedLossBackward();
  // Kept outputs of a replaced loss: the chunked loop keeps the logit chunks it returns, not the loss.
  bool ChunkedLossReturned() const { return !plan_.loss.chunk_lengths.empty() && !plan_.loss.fused_linear; }
  void KeepPreviousLossOutputs();
  void FusedLinearLossForward(std::map<int32_t, int64_t>& weight_casts);
  void FusedLinearLossBackward();

  const Graph& graph_;
  const StepPlan& plan_;
  const TrainingConfig& config_;
  BackendRules backend_;
  StepHooks no_hooks_;
  StepHooks* hooks_;
  int32_t current_node_ = -1;
  Region current_region_;
  bool in_region_ = false;
  StepSimulation out_;
  Phase phase_ = Phase::kSetup;
  std::vector<Storage> storages_;
  std::vector<int64_t> storage_of_;     // per value: storage id of its root, -1 if none
  std::vector<OpMemoryRule> rules_;      // per node
  std::vector<std::vector<int64_t>> saved_;  // per node: storages this node's backward still needs
  std::vector<std::vector<std::optional<int64_t>>> cast_of_input_;  // per node, per tensor input: autocast copy
  std::vector<int64_t> grad_of_;         // per value: storage of its gradient, -1 if none yet
  std::set<int64_t> inplace_ok_;        // gradient storages a second gradient may be added to in place
  // The training loop.
  std::vector<std::vector<int32_t>> params_done_after_;  // per node: parameters whose last gradient it delivers
  std::vector<int64_t> earlier_grad_;   // per value: its .grad from an earlier micro-batch, -1 if none
  std::vector<int64_t> kept_outputs_;   // storages the loop keeps bound (the last forward's outputs)
  std::vector<int64_t> held_by_graph_;  // storages the autograd graph holds until it is freed (a leaf and its .grad)
  std::vector<int64_t> recompute_graph_held_;  // what a non-reentrant recompute's own graph holds while it runs
  std::vector<int64_t> returned_;       // this forward's outputs, held from their op on
  ValueId logits_;
  // Per op, the activations released after it in the forward (Note [Eager lifetimes]).
  std::vector<std::vector<ValueId>> released_after_;
  std::vector<std::pair<int32_t, DType>> op_input_dtype_;  // inside the current op: inputs autocast copied
  // Activation checkpointing (Note [Checkpointed layers]).
  bool recomputing_ = false;
  struct CheckpointedLayer {
    std::vector<int32_t> nodes;             // the layer's ops in forward order
    std::vector<int64_t> kept;              // storages the checkpoint keeps: the layer's inputs, the RNG state
    int64_t rng_state = -1;                 // the stashed RNG state among them (-1: none)
    std::set<int32_t> inputs;               // values from outside the layer its ops read
    std::vector<int64_t> recompute_held;    // recomputed values the reentrant inner backward holds to its end
    bool recomputed = false;
    // Per op a selective policy saves: the storages of its outputs and its kernel's saved extra buffers.
    struct Cached {
      std::vector<std::pair<ValueId, int64_t>> outputs;
      std::vector<int64_t> extras;
    };
    std::map<int32_t, Cached> cached;
  };
  std::map<int32_t, CheckpointedLayer> checkpointed_;  // by decoder layer
  // The chunked loss: per chunk, what its projection and cross-entropy keep for backward.
  struct LossChunk {
    int64_t rows = 0;             // batch x the chunk's positions
    int64_t input = -1;           // the hidden chunk mm saves (its copy, or the hidden state it views)
    int64_t weight_copy = -1;     // the autocast copy of the weight mm saves
    int64_t labels = -1;          // the chunk's labels nll_loss saves
    int64_t log_probs = -1;       // log_softmax's output, saved by it and by nll_loss
    int64_t total_weight = -1;    // nll_loss's total_weight
  };
  std::vector<LossChunk> loss_chunks_;
  int64_t loss_label_count_ = -1;  // the count of labels the loss divides by (saved by the division)
  // The fused linear cross-entropy's gradients, computed in forward and saved for backward.
  int64_t fused_grad_input_ = -1, fused_grad_weight_ = -1;
};

void StepExecutor::Setup() {
  phase_ = Phase::kSetup;
  storage_of_.assign(graph_.values().size(), -1);
  grad_of_.assign(graph_.values().size(), -1);
  // Weights (deduplicated by storage: tied weights share one).
  for (const auto& p : graph_.params()) {
    const ValueId root = graph_.StorageRoot(p.value);
    if (storage_of_[static_cast<size_t>(root.index)] < 0) {
      storage_of_[static_cast<size_t>(root.index)] =
          NewStorage(hooks_->ResidentParamBytes(p, StorageBytes(root)), MemoryCategory::kWeights, p.name, -1);
    }
    storage_of_[static_cast<size_t>(p.value.index)] = storage_of_[static_cast<size_t>(root.index)];
  }
  hooks_->OnSetup(*this);
  // Optimizer states exist in the steady state.
  for (const auto& [p, pp] : OptimizedParams()) {
    for (const PerParamBlock& state : pp->states) {
      const int64_t bytes = RankBlockBytes(*p, state);
      if (bytes == 0) continue;
      if (state.managed) {  // outside the allocator: not on the timeline
        out_.managed_bytes = CheckedAdd(out_.managed_bytes, bytes, "the managed optimizer states");
        continue;
      }
      NewStorage(bytes, MemoryCategory::kOptimizerState, [&, param = p] { return param->name + " " + state.name; }, -1);
    }
  }
  if (backend_.library_workspaces) {
    NewStorage(config_.target.gpu.cublas_workspace_bytes, MemoryCategory::kLibraryWorkspace, "cuBLAS workspace", -1);
    NewStorage(config_.target.gpu.cublaslt_workspace_bytes, MemoryCategory::kLibraryWorkspace, "cuBLASLt workspace",
               -1);
  }
  for (ValueId in : graph_.inputs()) {
    const bool cache = std::find(plan_.loop.cache_inputs.begin(), plan_.loop.cache_inputs.end(), in) !=
                       plan_.loop.cache_inputs.end();
    storage_of_[static_cast<size_t>(in.index)] =
        !hooks_->InputOnThisDevice(graph_.value(in))
            ? ElsewhereStorage()
            : NewStorage(StorageBytes(in), cache ? MemoryCategory::kKvCache : MemoryCategory::kInputs,
                         graph_.value(in).name, -1);
  }
}

void StepExecutor::Forward() {
  phase_ = Phase::kForward;
  const auto& nodes = graph_.nodes();
  // Release points (Note [Eager lifetimes]); the loss lives until backward. Per op, the activations released after
  // it: its inputs and outputs that die there first (in that order), then the values a frame held until there.
  std::vector<int32_t> release = ForwardReleasePoints(graph_, config_.lifetimes);
  for (ValueId v : plan_.loop.cache_outputs) release[static_cast<size_t>(v.index)] = static_cast<int32_t>(nodes.size());
  released_after_.assign(nodes.size(), {});
  auto& released_after = released_after_;
  {
    std::vector<bool> listed(graph_.values().size(), false);
    auto list = [&](ValueId v, int32_t at) {
      const size_t i = static_cast<size_t>(v.index);
      if (listed[i] || release[i] != at || graph_.value(v).role != ValueRole::kActivation) return;
      listed[i] = true;
      released_after[static_cast<size_t>(at)].push_back(v);
    };
    for (const auto& node : nodes) {
      for (ValueId in : graph_.tensor_inputs(node.id)) list(in, node.id.index);
      for (ValueId out : node.outputs) list(out, node.id.index);
    }
    for (const auto& v : graph_.values()) {
      const int32_t at = release[static_cast<size_t>(v.id.index)];
      if (at >= 0 && at < static_cast<int32_t>(nodes.size())) list(v.id, at);
    }
  }

  // Inside an op, an input that autocast copied has the copy's dtype (e.g. cross_entropy's fp32 copy of 16-bit
  // logits), so the rule sizes what the op really sees.
  const RuleContext ctx = OpRuleContext();
  std::map<int32_t, int64_t> weight_cast_cache;  // value index -> autocast copy storage (held until forward ends)

  rules_.resize(nodes.size());
  saved_.resize(nodes.size());
  cast_of_input_.resize(nodes.size());
  for (const auto& node : nodes) {
    current_node_ = node.id.index;
    EnterRegionOf(node);
    if (ReplacedByLoss(node)) {
      if (node.id.index == plan_.loss.lm_head_node && plan_.loss.fused_linear) {
        FusedLinearLossForward(weight_cast_cache);
      } else if (node.id.index == plan_.loss.lm_head_node) {
        ChunkedLossForward(weight_cast_cache);
      }
      continue;
    }
    if (InCheckpointedLayer(node)) CheckpointForwardOp(node);
    ForwardOp(node, ctx, weight_cast_cache);
  }
  current_node_ = -1;
  CountCheckpointedInputs();
  LeaveRegion();
  // Leaving the autocast region clears the weight-cast cache.
  for (const auto& [value, s] : weight_cast_cache) Unref(s, -1);
}

void StepExecutor::ForwardOp(const OpNode& node, const RuleContext& ctx,
                             std::map<int32_t, int64_t>& weight_cast_cache) {
  const size_t n = static_cast<size_t>(node.id.index);
  const auto& inputs = graph_.tensor_inputs(node.id);
  const bool autocast =
      config_.precision == Precision::kBf16Autocast || config_.precision == Precision::kFp16Autocast;
  const DType low = config_.precision == Precision::kFp16Autocast ? DType::kF16 : DType::kBF16;
  {
    op_input_dtype_.clear();
    const OpInfo* info = FindOp(node.kind);
    const AutocastClass autocast_class = autocast ? backend_.Autocast(node.kind) : AutocastClass::kNone;
    const bool casts_inputs =
        (autocast_class == AutocastClass::kLowerPrecision || autocast_class == AutocastClass::kFp32) &&
        !(info && info->Has(kAutocastInside));
    const bool is_cast = info && info->Has(kCastOp);
    const DType cast_to = autocast_class == AutocastClass::kLowerPrecision ? low : DType::kF32;
    if (casts_inputs) {
      for (ValueId in : inputs) {
        if (IsFloating(out_.value_dtypes[static_cast<size_t>(in.index)]))
          op_input_dtype_.emplace_back(in.index, cast_to);
      }
    }
    auto rule = RuleFor(node, ctx);
    if (!rule) {
      bool differentiable = false;
      for (ValueId out : node.outputs) differentiable |= graph_.value(out).requires_grad;
      if (!config_.allow_unknown_ops) {
        throw UnsupportedOpError("op " + node.kind + " (" + RegionName(node.region) +
                                 (node.scope.empty() ? "" : ", " + node.scope) +
                                 ") has no memory rule; rerun with --allow-unknown-ops for a conservative estimate");
      }
      // Conservative: save every input and output, new gradients for every input.
      OpMemoryRule r;
      for (size_t i = 0; i < inputs.size(); ++i) r.saved_inputs.push_back(static_cast<int>(i));
      for (size_t i = 0; i < node.outputs.size(); ++i) r.saved_outputs.push_back(static_cast<int>(i));
      r.input_grads.assign(inputs.size(), differentiable ? GradKind::kNew : GradKind::kNone);
      rule = r;
      if (std::find(out_.unknown_ops.begin(), out_.unknown_ops.end(), node.kind) == out_.unknown_ops.end()) {
        out_.unknown_ops.push_back(node.kind);
      }
    }
    rules_[n] = *rule;
    cast_of_input_[n].assign(inputs.size(), std::nullopt);

    // Autocast: inputs of lower-precision ops become 16-bit copies; weights' copies are cached for the forward.
    std::vector<int64_t> op_temporaries;
    if (casts_inputs) {
      {
        const AutocastClass cls = autocast_class;
        const DType want = cast_to;
        for (size_t i = 0; i < inputs.size(); ++i) {
          const ValueId in = inputs[i];
          const DType have = out_.value_dtypes[static_cast<size_t>(in.index)];
          if (!IsFloating(have) || have == want) continue;
          const int64_t bytes = CheckedMul(NumElements(graph_.value(in).shape), ElementSize(want), "a cast");
          if (Trainable(in) && cls == AutocastClass::kLowerPrecision && hooks_->ComputesWithLowPrecisionWeights()) {
            continue;  // the engine's weights are already 16-bit
          }
          if (Trainable(in) && cls == AutocastClass::kLowerPrecision) {
            auto it = weight_cast_cache.find(in.index);
            if (it == weight_cast_cache.end()) {
              const int64_t s = NewStorage(bytes, MemoryCategory::kAutocastCopies,
                                           [&] { return graph_.value(in).name + " autocast copy"; }, node.id.index);
              it = weight_cast_cache.emplace(in.index, s).first;
            }
            cast_of_input_[n][i] = it->second;
          } else {
            const int64_t s = NewStorage(
                bytes, MemoryCategory::kAutocastCopies,
                [&] { return graph_.value(in).name + " autocast copy for " + node.kind; }, node.id.index);
            cast_of_input_[n][i] = s;
            op_temporaries.push_back(s);
          }
        }
      }
    }

    // Outputs that own new storage. A cast (aten::to, type_as) allocates exactly when the simulated dtypes differ.
    const bool from_cache = recomputing_ && TakeCachedOutputs(node);
    // The op's own temporaries before its kernel (a weight dequantized for it); what they leave lives until it returns.
    std::vector<int64_t> prelude_saved;
    if (!from_cache) {
      for (int64_t s : RunTransientSteps(rule->forward_prelude, node, " temporary", &prelude_saved)) {
        op_temporaries.push_back(s);
      }
    }
    for (ValueId out : node.outputs) {
      if (from_cache) break;
      const auto& v = graph_.value(out);
      const ValueId root = graph_.StorageRoot(out);
      bool owns = !v.alias_of.valid();
      if (is_cast && !inputs.empty()) {
        const DType in_d = out_.value_dtypes[static_cast<size_t>(inputs[0].index)];
        const DType out_d = out_.value_dtypes[static_cast<size_t>(out.index)];
        owns = in_d != out_d || !v.alias_of.valid();
        if (owns && v.alias_of.valid()) {
          storage_of_[static_cast<size_t>(out.index)] = NewStorage(
              Bytes(out), OutputCategory(node, out), [&] { return v.name + " = " + node.kind; }, node.id.index);
          continue;
        }
      }
      if (owns) {
        storage_of_[static_cast<size_t>(out.index)] = NewStorage(
            StorageBytes(out), OutputCategory(node, out), [&] { return v.name + " = " + node.kind; }, node.id.index);
      } else {
        // A view shares the storage of the tensor it views (the first input), which may be a simulated cast copy
        // rather than the IR's storage root.
        const bool views_input = !inputs.empty() && graph_.StorageRoot(inputs[0]) == root;
        const int64_t s = storage_of_[static_cast<size_t>((views_input ? inputs[0] : root).index)];
        storage_of_[static_cast<size_t>(out.index)] = s;
        if (s >= 0) Ref(s);
      }
    }
    if (plan_.loop.keep_outputs) HoldIfReturned(node);
    // enable_input_require_grads' leaf: its AccumulateGrad node holds it until the graph is freed.
    for (ValueId out : node.outputs) {
      if (out != graph_.input_grad_leaf() || recomputing_) continue;
      const int64_t s = storage_of_[static_cast<size_t>(out.index)];
      if (s < 0) continue;
      Ref(s);
      held_by_graph_.push_back(s);
    }
    // Extra buffers.
    for (const auto& extra : rule->forward_extra) {
      if (from_cache) break;  // the kernel does not run again
      const int64_t s = NewStorage(
          extra.bytes, extra.saved ? ActivationCategory(node) : MemoryCategory::kTransient,
          [&] { return node.kind + (extra.saved ? " saved buffer" : " workspace"); }, node.id.index);
      if (extra.saved) {
        saved_[n].push_back(s);
      } else {
        op_temporaries.push_back(s);
      }
    }
    if (!recomputing_ && plan_.ops[n].save == SavePolicy::kCacheOutput) CacheOutputs(node, *rule);
    // Saved tensors (their autocast copies when the op saw copies). Only ops on the gradient path save anything.
    bool on_grad_path = false;
    for (ValueId out : node.outputs) on_grad_path |= graph_.value(out).requires_grad;
    if (on_grad_path && (recomputing_ || !InCheckpointedLayer(node))) {
      for (int i : rule->saved_inputs) {
        if (i >= static_cast<int>(inputs.size())) continue;
        const auto cast = cast_of_input_[n][static_cast<size_t>(i)];
        const int64_t s = cast ? *cast : storage_of_[static_cast<size_t>(inputs[static_cast<size_t>(i)].index)];
        if (s >= 0) {
          Ref(s);
          saved_[n].push_back(s);
        }
      }
      for (int o : rule->saved_outputs) {
        const int64_t s = storage_of_[static_cast<size_t>(node.outputs.at(static_cast<size_t>(o)).index)];
        if (s >= 0) {
          Ref(s);
          saved_[n].push_back(s);
        }
      }
      saved_[n].insert(saved_[n].end(), prelude_saved.begin(), prelude_saved.end());
    } else {
      for (int64_t s : saved_[n]) Unref(s, node.id.index);  // extra buffers nobody will read
      saved_[n].clear();
      for (int64_t s : prelude_saved) Unref(s, node.id.index);
    }
    if (on_grad_path && !from_cache) HoldCtxAttributes(node, *rule);
    if (const int64_t extra = hooks_->ExtraTransientBytes(node, Phase::kForward); extra > 0) {
      op_temporaries.push_back(NewStorage(
          extra, MemoryCategory::kTransient, [&] { return node.kind + " parallel workspace"; }, node.id.index));
    }
    for (int64_t s : op_temporaries) Unref(s, node.id.index);
    // A collective (e.g. the all-reduce of a partial sum) hands on a fresh copy of the output.
    if (hooks_->OutputReplacedByCollective(node)) {
      for (ValueId out : node.outputs) {
        int64_t& s = storage_of_[static_cast<size_t>(out.index)];
        if (s < 0 || graph_.value(out).alias_of.valid()) continue;
        const int64_t copy = NewStorage(storages_[static_cast<size_t>(s)].bytes, ActivationCategory(node),
                                        [&] { return graph_.value(out).name + " after collective"; }, node.id.index);
        Unref(s, node.id.index);
        s = copy;
      }
    }
    for (ValueId v : released_after_[n]) {
      // A recompute re-makes only the layer's own values; its inputs are the checkpoint's.
      if (recomputing_ && !ProducedInLayer(v, node.region.layer)) continue;
      if (storage_of_[static_cast<size_t>(v.index)] < 0) continue;  // an op dropped it already
      Unref(storage_of_[static_cast<size_t>(v.index)], node.id.index);
    }
  }
}

// Inputs an autograd Function keeps as ctx attributes live as long as the graph its node belongs to: this forward's
// graph (to the end of backward; under non-reentrant checkpointing too, whose hooks see only saved tensors), a
// reentrant recompute's graph (to the end of the layer's inner backward), a non-reentrant recompute's graph (dropped
// when the recompute returns). A reentrant checkpoint's first forward runs without a graph.
void StepExecutor::HoldCtxAttributes(const OpNode& node, const OpMemoryRule& rule) {
  const auto& inputs = graph_.tensor_inputs(node.id);
  const bool reentrant = plan_.checkpointing.reentrant;
  for (int i : rule.graph_held_inputs) {
    if (i >= static_cast<int>(inputs.size())) continue;
    const int64_t s = storage_of_[static_cast<size_t>(inputs[static_cast<size_t>(i)].index)];
    if (s < 0) continue;
    if (recomputing_) {
      Ref(s);
      (reentrant ? checkpointed_.at(node.region.layer).recompute_held : recompute_graph_held_).push_back(s);
    } else if (!(reentrant && InCheckpointedLayer(node))) {
      Ref(s);
      held_by_graph_.push_back(s);
    }
  }
}

// Note [Checkpointed layers]
// torch.utils.checkpoint around a decoder layer (checkpoint.py): the forward runs the layer without saving
// anything for backward, keeping only the layer's inputs (reentrant: ctx.save_for_backward; non-reentrant: the
// recompute closure's args) and, with preserve_rng_state, torch.get_rng_state(). In backward the layer's forward
// runs again under fork_rng (one more RNG state) with grad enabled and the forward's autocast state (a fresh
// autocast weight-copy cache, cleared when that autocast region exits), saving what each op saves:
// - reentrant (CheckpointFunction.backward): the whole layer is recomputed when the gradient reaches it; its
//   outputs and the incoming output gradients are held until the inner torch.autograd.backward has finished;
// - non-reentrant (_checkpoint_without_reentrant_generator): the first unpack of a saved tensor recomputes, and
//   with early stop (the default) the recompute ends once the last saved tensor is re-made; everything else it
//   made is dropped then.
// The storages the checkpoints of this forward keep are counted apart from the activations the forward frees:
// exactly the blocks CheckpointForwardOp kept (a layer input that an op such as .to() copied is the copy, not the
// tensor it was made from), from their allocation on. Under HF's GradientCheckpointingLayer the checkpoint's
// only argument is the hidden state; the causal mask and the rotary cos / sin are keyword arguments bound into
// the checkpointed callable (functools.partial, transformers/modeling_layers.py), so every layer's checkpoint
// keeps them too until its backward has run.
void StepExecutor::CountCheckpointedInputs() {
  for (const auto& [layer, cl] : checkpointed_) {
    for (int64_t s : cl.kept) {
      out_.timeline.events[storages_[static_cast<size_t>(s)].alloc_event].category = MemoryCategory::kCheckpointInputs;
    }
  }
}

void StepExecutor::CheckpointForwardOp(const OpNode& node) {
  CheckpointedLayer& cl = checkpointed_[node.region.layer];
  if (cl.nodes.empty() && plan_.checkpointing.rng_state_bytes > 0) {
    cl.rng_state = NewStorage(plan_.checkpointing.rng_state_bytes, MemoryCategory::kCheckpointInputs,
                              [&] { return "checkpoint RNG state (" + RegionName(node.region) + ")"; },
                              node.id.index);
    cl.kept.push_back(cl.rng_state);
  }
  cl.nodes.push_back(node.id.index);
  for (ValueId in : graph_.tensor_inputs(node.id)) {
    if (graph_.value(in).role != ValueRole::kActivation || ProducedInLayer(in, node.region.layer)) continue;
    const int64_t s = storage_of_[static_cast<size_t>(in.index)];
    if (s < 0 || !cl.inputs.insert(in.index).second) continue;
    Ref(s);
    cl.kept.push_back(s);
  }
}

// Note [Cached outputs]
// A selective policy (torch.utils.checkpoint.create_selective_checkpoint_contexts) runs the checkpointed forward
// under _CachingTorchDispatchMode: for a MUST_SAVE kernel it keeps (a detached alias of) every output in the
// checkpoint's storage; the recompute's _CachedTorchDispatchMode hands them back instead of running the kernel,
// and the autograd node around it saves what it always saves. What the op's composite code does around its
// kernel (autocast casts, a converted mask) is recomputed. Entries an early-stopped recompute never reaches stay
// in the storage until the layer's backward is over.
void StepExecutor::CacheOutputs(const OpNode& node, const OpMemoryRule& rule) {
  auto& [outputs, extras] = checkpointed_.at(node.region.layer).cached[node.id.index];
  for (ValueId out : node.outputs) {
    const int64_t s = storage_of_[static_cast<size_t>(out.index)];
    if (s < 0) continue;
    Ref(s);
    outputs.emplace_back(out, s);
  }
  // saved_ holds the op's saved extra buffers in rule order.
  const auto& saved = saved_[static_cast<size_t>(node.id.index)];
  size_t i = 0;
  for (const auto& extra : rule.forward_extra) {
    if (!extra.saved) continue;
    if (i < saved.size() && !extra.before_kernel) {
      Ref(saved[i]);
      extras.push_back(saved[i]);
    }
    ++i;
  }
}

bool StepExecutor::TakeCachedOutputs(const OpNode& node) {
  auto& cached = checkpointed_.at(node.region.layer).cached;
  const auto it = cached.find(node.id.index);
  if (it == cached.end()) return false;
  for (const auto& [out, s] : it->second.outputs) storage_of_[static_cast<size_t>(out.index)] = s;
  const auto& extras = it->second.extras;
  auto& saved = saved_[static_cast<size_t>(node.id.index)];
  saved.insert(saved.end(), extras.begin(), extras.end());
  cached.erase(it);
  return true;
}

bool StepExecutor::SavesForBackward(size_t n) const {
  bool on_grad_path = false;
  for (ValueId out : graph_.nodes()[n].outputs) on_grad_path |= graph_.value(out).requires_grad;
  if (!on_grad_path) return false;
  const OpMemoryRule& rule = rules_[n];
  bool saves = !rule.saved_inputs.empty() || !rule.saved_outputs.empty();
  for (const auto& extra : rule.forward_extra) saves |= extra.saved;
  return saves;
}

void StepExecutor::RecomputeLayer(int32_t layer, const RuleContext& ctx, int32_t trigger) {
  CheckpointedLayer& cl = checkpointed_.at(layer);
  cl.recomputed = true;
  const bool reentrant = plan_.checkpointing.reentrant;
  const int64_t fork_state =
      plan_.checkpointing.rng_state_bytes > 0
          ? NewStorage(plan_.checkpointing.rng_state_bytes, MemoryCategory::kTransient, "fork_rng state", trigger)
          : -1;
  // Reentrant: CheckpointFunction.backward holds its incoming gradients (args) through the inner backward.
  if (reentrant) {
    for (int32_t n : cl.nodes) {
      for (ValueId out : graph_.nodes()[static_cast<size_t>(n)].outputs) {
        const int64_t g = grad_of_[static_cast<size_t>(out.index)];
        if (g < 0) continue;
        Ref(g);
        cl.recompute_held.push_back(g);
      }
    }
  }
  size_t stop = cl.nodes.size();
  if (!reentrant) {
    while (stop > 0 && !SavesForBackward(static_cast<size_t>(cl.nodes[stop - 1]))) --stop;
  }
  std::map<int32_t, int64_t> weight_casts;
  std::set<int32_t> released;
  recomputing_ = true;
  for (size_t i = 0; i < stop; ++i) {
    const OpNode& op = graph_.nodes()[static_cast<size_t>(cl.nodes[i])];
    current_node_ = op.id.index;
    ForwardOp(op, ctx, weight_casts);
    for (ValueId v : released_after_[static_cast<size_t>(op.id.index)]) released.insert(v.index);
  }
  recomputing_ = false;
  current_node_ = trigger;
  for (const auto& [value, s] : weight_casts) Unref(s, trigger);
  for (int64_t s : recompute_graph_held_) Unref(s, trigger);
  recompute_graph_held_.clear();
  // What the recompute made and did not release: the layer's outputs (reentrant: held until the inner backward
  // ends), and with an early stop the values the rest of the layer would have read.
  for (size_t i = 0; i < stop; ++i) {
    for (ValueId out : graph_.nodes()[static_cast<size_t>(cl.nodes[i])].outputs) {
      const int64_t s = storage_of_[static_cast<size_t>(out.index)];
      if (s < 0 || released.count(out.index) || graph_.value(out).role != ValueRole::kActivation) continue;
      if (reentrant) {
        cl.recompute_held.push_back(s);
      } else {
        Unref(s, trigger);
      }
    }
  }
  if (fork_state >= 0) Unref(fork_state, trigger);
}

void StepExecutor::ReleaseCheckpointedLayer(int32_t layer) {
  CheckpointedLayer& cl = checkpointed_.at(layer);
  for (int64_t s : cl.recompute_held) Unref(s, current_node_);
  for (int64_t s : cl.kept) {
    // Reentrant: CheckpointFunction keeps the stashed RNG state as a ctx attribute, not a saved tensor, so it goes
    // only when the autograd graph is freed (after the whole backward), not after the layer's backward.
    if (s == cl.rng_state && plan_.checkpointing.reentrant) {
      held_by_graph_.push_back(s);
    } else {
      Unref(s, current_node_);
    }
  }
  cl.rng_state = -1;
  for (const auto& [node, entry] : cl.cached) {
    for (const auto& [out, s] : entry.outputs) Unref(s, current_node_);
    for (int64_t s : entry.extras) Unref(s, current_node_);
  }
  cl.recompute_held.clear();
  cl.kept.clear();
  cl.cached.clear();
}

void StepExecutor::Backward() {
  phase_ = Phase::kBackward;
  const auto& nodes = graph_.nodes();
  const ValueId loss = graph_.loss();
  // loss.backward() seeds with ones_like(loss); the interpreter then drops the loss value itself.
  grad_of_[static_cast<size_t>(loss.index)] = NewStorage(Bytes(loss), MemoryCategory::kActivationGrads, "d loss", -1);
  const RuleContext ctx = OpRuleContext();
  int32_t checkpointed_layer = -1;  // the checkpointed layer whose backward is running
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    const auto& node = *it;
    const size_t n = static_cast<size_t>(node.id.index);
    current_node_ = node.id.index;
    if (checkpointed_layer >= 0 && !(InCheckpointedLayer(node) && node.region.layer == checkpointed_layer)) {
      ReleaseCheckpointedLayer(checkpointed_layer);
      checkpointed_layer = -1;
    }
    EnterRegionOf(node);
    if (ReplacedByLoss(node)) {
      if (node.id == graph_.value(graph_.loss()).producer && plan_.loss.fused_linear) {
        FusedLinearLossBackward();
      } else if (node.id == graph_.value(graph_.loss()).producer) {
        ChunkedLossBackward();
      }
      continue;
    }
    int64_t grad_out = -1;
    for (ValueId out : node.outputs) {
      if (grad_of_[static_cast<size_t>(out.index)] >= 0) {
        grad_out = grad_of_[static_cast<size_t>(out.index)];
        break;
      }
    }
    if (grad_out < 0) continue;  // no gradient reaches this op
    if (InCheckpointedLayer(node)) {
      checkpointed_layer = node.region.layer;
      CheckpointedLayer& cl = checkpointed_.at(checkpointed_layer);
      // Reentrant: CheckpointFunction.backward runs when the gradient reaches the layer; non-reentrant: the first
      // unpack of a saved tensor triggers the recompute.
      if (!cl.recomputed && (plan_.checkpointing.reentrant || SavesForBackward(n))) {
        RecomputeLayer(checkpointed_layer, ctx, node.id.index);
      }
    }
    const auto& rule = rules_[n];
    const auto& inputs = graph_.tensor_inputs(node.id);
    int64_t workspace = -1;
    if (rule.backward_workspace_bytes > 0) {
      workspace = NewStorage(
          rule.backward_workspace_bytes, MemoryCategory::kTransient, [&] { return node.kind + " backward"; },
          node.id.index);
    }
    const std::vector<int64_t> prelude_left = RunTransientSteps(rule.backward_prelude, node, " backward temporary");
    int64_t parallel_workspace = -1;
    if (const int64_t extra = hooks_->ExtraTransientBytes(node, Phase::kBackward); extra > 0) {
      parallel_workspace = NewStorage(
          extra, MemoryCategory::kTransient, [&] { return node.kind + " parallel backward"; }, node.id.index);
    }
    // Sums into a buffered gradient wait until the op has released its inputs (Note [Gradient accumulation]).
    std::vector<std::pair<ValueId, int64_t>> pending_sums;
    bool released = false;
    // Hands `contribution` (one reference owned by the caller) to input `in` as (part of) its gradient.
    auto deliver = [&](ValueId in, int64_t contribution, bool transposed_weight_grad) {
      const auto& v = graph_.value(in);
      int64_t& slot = grad_of_[static_cast<size_t>(in.index)];
      if (slot < 0) {
        // A gradient passed through to a parameter unchanged (Gemma's norm: `1.0 + self.weight.float()` passes
        // the sum's gradient on) is the tensor AccumulateGrad takes as .grad: a parameter gradient from now on.
        if (Trainable(in)) MarkAsParameterGradient(contribution);
        slot = contribution;
        if (!transposed_weight_grad && contribution != grad_out) inplace_ok_.insert(contribution);
        return;
      }
      // Note [Gradient accumulation]: the engine adds a second gradient in place only when the buffered one holds
      // the last reference to its storage (input_buffer.cpp can_accumulate_inplace). A matmul's weight gradient
      // is a transposed view of the product and fails that test, so the sum is a new tensor. The engine adds an
      // op's gradients into the buffers of the next ops after the op has returned, its output gradients gone,
      // and has released its saved tensors (engine.cpp evaluate_function: call_function, release_variables,
      // then InputBuffer::add per output).
      if (!inplace_ok_.count(slot) && !released) {
        pending_sums.emplace_back(in, contribution);
        return;
      }
      if (!inplace_ok_.count(slot)) {
        const int64_t sum = NewStorage(
            Bytes(in), Trainable(in) ? MemoryCategory::kGradients : MemoryCategory::kActivationGrads,
            [&] { return "d " + v.name + " (sum)"; }, node.id.index);
        Unref(slot, node.id.index);
        slot = sum;
        inplace_ok_.insert(sum);
      }
      Unref(contribution, node.id.index);
    };
    // A collective on an input gradient (e.g. the all-reduce of a column-parallel linear's partial input
    // gradient) hands on a fresh copy and releases the op's own.
    auto CollectiveCopy = [&](const OpNode& op, size_t input, int64_t contribution) {
      if (!hooks_->InputGradReplacedByCollective(op, input)) return contribution;
      const int64_t copy = NewStorage(
          storages_[static_cast<size_t>(contribution)].bytes, MemoryCategory::kActivationGrads,
          [&] { return "d " + graph_.value(inputs[input]).name + " after collective"; }, op.id.index);
      Unref(contribution, op.id.index);
      return copy;
    };
    struct PendingCast {
      size_t input;
      ValueId in;
      int64_t copy_grad;
    };
    std::vector<PendingCast> pending_casts;
    std::set<int32_t> done;
    for (size_t i = 0; i < inputs.size() && i < rule.input_grads.size(); ++i) {
      const ValueId in = inputs[i];
      const auto& v = graph_.value(in);
      if (!v.requires_grad || rule.input_grads[i] == GradKind::kNone || !done.insert(in.index).second) continue;
      const int64_t in_bytes = Bytes(in);
      const DType in_dtype = out_.value_dtypes[static_cast<size_t>(in.index)];
      const auto cast = cast_of_input_[n][i];
      const GradKind kind = rule.input_grads[i];
      if (cast) {
        // The op differentiates its autocast copy; the copy's ToCopyBackward converts to the input's dtype as a
        // separate autograd node, after this one has released its saved tensors (below).
        pending_casts.push_back({i, in, NewStorage(storages_[static_cast<size_t>(*cast)].bytes,
                                                MemoryCategory::kActivationGrads,
                                                [&] { return "d " + v.name + " (autocast dtype)"; }, node.id.index)});
      } else if (kind == GradKind::kView ||
                 (kind == GradKind::kPassThrough && node.outputs.size() >= 1 && Bytes(node.outputs[0]) == in_bytes &&
                  out_.value_dtypes[static_cast<size_t>(node.outputs[0].index)] == in_dtype)) {
        Ref(grad_out);
        deliver(in, grad_out, false);
      } else {
        const int64_t contribution = NewStorage(
            hooks_->InputGradBytes(node, i, in_bytes),
            Trainable(in) ? MemoryCategory::kGradients : MemoryCategory::kActivationGrads,
            [&] { return "d " + v.name; }, node.id.index);
        const bool transposed_weight_grad =
            i == 1 && (node.kind == "aten::linear" || node.kind == "aten::matmul" || node.kind == "aten::mm");
        deliver(in, CollectiveCopy(node, i, contribution), transposed_weight_grad);
      }
    }
    if (workspace >= 0) Unref(workspace, node.id.index);
    for (int64_t s : prelude_left) Unref(s, node.id.index);
    if (parallel_workspace >= 0) Unref(parallel_workspace, node.id.index);
    // Output gradients and saved tensors are no longer needed.
    for (ValueId out : node.outputs) {
      int64_t& g = grad_of_[static_cast<size_t>(out.index)];
      if (g >= 0 && out == graph_.input_grad_leaf()) {
        held_by_graph_.push_back(g);  // the leaf's .grad, gone with the leaf
      } else if (g >= 0) {
        Unref(g, node.id.index);
      }
      g = -1;
    }
    for (int64_t s : saved_[n]) Unref(s, node.id.index);
    saved_[n].clear();
    released = true;
    for (const auto& [in, contribution] : pending_sums) deliver(in, contribution, false);
    // ToCopyBackward of each autocast copy: a fresh tensor in the input's dtype.
    for (const auto& pending : pending_casts) {
      const int64_t contribution = NewStorage(
          Bytes(pending.in), Trainable(pending.in) ? MemoryCategory::kGradients : MemoryCategory::kActivationGrads,
          [&] { return "d " + graph_.value(pending.in).name; }, node.id.index);
      Unref(pending.copy_grad, node.id.index);
      deliver(pending.in, CollectiveCopy(node, pending.input, contribution), false);
    }
    AfterNodeBackward(node.id.index);
  }
  current_node_ = -1;
  for (auto& [layer, cl] : checkpointed_) ReleaseCheckpointedLayer(layer);
  // Each forward call of a checkpointed layer is a new checkpoint: the next micro-batch stashes its inputs and RNG
  // state again and recomputes again.
  checkpointed_.clear();
  LeaveRegion();
  // Saved tensors of ops no gradient reached, and the loss value, go when the graph is freed.
  for (size_t n = 0; n < saved_.size(); ++n) {
    for (int64_t s : saved_[n]) Unref(s, -1);
    saved_[n].clear();
  }
  Unref(storage_of_[static_cast<size_t>(loss.index)], -1);
  for (int64_t s : held_by_graph_) Unref(s, -1);
  held_by_graph_.clear();
  hooks_->OnBackwardEnd(*this);
}

void StepExecutor::OptimizerStep() {
  phase_ = Phase::kOptimizer;
  if (plan_.loop.optimizer_in_backward) return;  // every parameter was stepped during backward
  if (plan_.loop.clip_grad_norm) ClipGradNormTemporaries();
  OptimizerTemporaries();
  hooks_->OnOptimizerStepEnd(*this);
}

void StepExecutor::OptimizerTemporaries() {
  const OptimizerStepPlan& step = plan_.optimizer_step;
  // Per parameter, its temporaries are alive together; a whole-group step makes them for every parameter first.
  std::vector<int64_t> live;
  int64_t held = -1;  // the previous parameter's temporary that a Python local still holds
  for (const auto& [p, pp] : OptimizedParams()) {
    if (hooks_->OptimizedBytes(*p, Bytes(p->value)) == 0) continue;
    for (const PerParamBlock& temp : pp->step_temporaries.value_or(step.temporaries)) {
      live.push_back(NewStorage(
          RankBlockBytes(*p, temp), MemoryCategory::kTransient, [&, param = p] { return param->name + " " + temp.name; }, -1));
    }
    if (!step.whole_group) {
      const int keep = pp->step_temporaries ? -1 : step.held_by_local;
      for (size_t k = 0; k < live.size(); ++k) {
        if (static_cast<int>(k) != keep) Unref(live[k], -1);
      }
      if (keep >= 0 && static_cast<size_t>(keep) < live.size()) {
        if (held >= 0) Unref(held, -1);  // rebound to this parameter's value
        held = live[static_cast<size_t>(keep)];
      }
      live.clear();
    }
  }
  for (int64_t s : live) Unref(s, -1);
  if (held >= 0) Unref(held, -1);
}

// Note [Training loop]
// AccumulateGrad runs as soon as the last gradient of its parameter has arrived: the CPU and CUDA ready queues
// order nodes by sequence number and AccumulateGrad's is the highest (torch/csrc/autograd/engine.cpp,
// CompareNodeTaskTime). So right after the backward of a parameter's first use in the forward:
// - a later micro-batch adds its gradient into the existing .grad in place (`variable_grad += new_grad` in
//   accumulate_grad.h, grad mode being off in backward) and the new gradient is freed;
// - an optimizer in backward (torchtune: register_post_accumulate_grad_hook) steps the parameter, with its step
//   temporaries, and zero_grad(set_to_none) frees the gradient.
void StepExecutor::FindLastGradientNodes() {
  const auto& nodes = graph_.nodes();
  params_done_after_.assign(nodes.size(), {});
  earlier_grad_.assign(graph_.values().size(), -1);
  std::vector<int32_t> first_use(graph_.params().size(), -1);
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    for (ValueId in : graph_.tensor_inputs(it->id)) {
      const int32_t param = graph_.value(in).param;
      if (param >= 0 && graph_.params()[static_cast<size_t>(param)].value == in) {
        first_use[static_cast<size_t>(param)] = it->id.index;
      }
    }
  }
  for (size_t p = 0; p < first_use.size(); ++p) {
    if (first_use[p] >= 0) params_done_after_[static_cast<size_t>(first_use[p])].push_back(static_cast<int32_t>(p));
  }
}

// The gradients of the micro-batch before stay as the parameters' .grad; the next forward starts.
void StepExecutor::StartNextMicroBatch() {
  for (const auto& p : graph_.params()) {
    const size_t v = static_cast<size_t>(p.value.index);
    if (grad_of_[v] < 0) continue;
    LLMEM_CHECK(earlier_grad_[v] < 0) << "a third micro-batch is never simulated";
    earlier_grad_[v] = grad_of_[v];
    grad_of_[v] = -1;
  }
  hooks_->OnNextMicroBatch(*this);
}

void StepExecutor::AfterNodeBackward(int32_t node) {
  for (int32_t param : params_done_after_[static_cast<size_t>(node)]) {
    const Parameter& p = graph_.params()[static_cast<size_t>(param)];
    const size_t v = static_cast<size_t>(p.value.index);
    if (grad_of_[v] < 0) continue;
    if (earlier_grad_[v] >= 0) {
      Unref(grad_of_[v], node);  // added into the existing .grad
      grad_of_[v] = earlier_grad_[v];
      earlier_grad_[v] = -1;
    }
    if (plan_.loop.optimizer_in_backward && !hooks_->RunsPostAccumulateGradHooks()) {
      const ParamPlan& pp = plan_.params[static_cast<size_t>(param)];
      if (pp.optimized) StepInBackward(p, pp);
    }
  }
}

// One parameter's optimizer step inside backward, then its gradient freed.
void StepExecutor::StepInBackward(const Parameter& p, const ParamPlan&) {
  for (int64_t s : StepTemporaries(p)) Unref(s, current_node_);
  int64_t& grad = grad_of_[static_cast<size_t>(p.value.index)];
  Unref(grad, current_node_);
  grad = -1;
}

// The temporaries of one parameter's step, alive together (the caller frees them).
std::vector<int64_t> StepExecutor::StepTemporaries(const Parameter& p) {
  std::vector<int64_t> live;
  for (const PerParamBlock& temp : plan_.optimizer_step.temporaries) {
    live.push_back(NewStorage(RankBlockBytes(p, temp), MemoryCategory::kTransient,
                              [&] { return p.name + " " + temp.name; }, current_node_));
  }
  return live;
}

// What the model returns besides the loss: the LM head's output (HF CausalLM's `logits`; an HF export's wrapper
// returns only the loss, the model the loop calls returns both). A model without an `lm_head` module returns what
// its graph returns, the loss alone: no value (the loop then keeps only the loss).
ValueId StepExecutor::ReturnedLogits() const {
  for (auto it = graph_.nodes().rbegin(); it != graph_.nodes().rend(); ++it) {
    // The module's path ends in lm_head (under a wrapper: "model.lm_head").
    if ((it->scope == "lm_head" || it->scope.ends_with(".lm_head")) && !it->outputs.empty()) return it->outputs[0];
  }
  return ValueId{};
}

// Note [Kept outputs]
// `outputs = model(**batch)` stays bound until the next forward returns: the previous step's logits and loss are
// live through the whole forward, this step's through backward and the optimizer step.
void StepExecutor::KeepPreviousOutputs() {
  if (!plan_.loss.chunk_lengths.empty()) {
    KeepPreviousLossOutputs();
    return;
  }
  logits_ = ReturnedLogits();
  if (logits_.valid()) {
    kept_outputs_.push_back(NewStorage(StorageBytes(graph_.StorageRoot(logits_)), MemoryCategory::kHeadActivations,
                                       "previous step's logits", -1));
  }
  kept_outputs_.push_back(NewStorage(Bytes(graph_.loss()), MemoryCategory::kHeadActivations, "previous step's loss", -1));
}

std::vector<int64_t> StepExecutor::RunTransientSteps(const std::vector<TransientStep>& steps, const OpNode& node,
                                                     const char* what, std::vector<int64_t>* saved) {
  std::vector<int64_t> blocks(steps.size(), -1);
  for (size_t i = 0; i < steps.size(); ++i) {
    const TransientStep& step = steps[i];
    if (step.drop_input >= 0) {
      const auto& inputs = graph_.tensor_inputs(node.id);
      const ValueId in = inputs.at(static_cast<size_t>(step.drop_input));
      int64_t& s = storage_of_[static_cast<size_t>(in.index)];
      LLMEM_CHECK(s >= 0) << node.kind << ": drops an input twice";
      Unref(s, node.id.index);
      s = -1;
    } else if (step.free_of >= 0) {
      int64_t& freed = blocks.at(static_cast<size_t>(step.free_of));
      LLMEM_CHECK(freed >= 0) << node.kind << ": a temporary freed twice";
      Unref(freed, node.id.index);
      freed = -1;
    } else if (step.bytes > 0) {
      const bool keep = step.saved && saved != nullptr;
      blocks[i] = NewStorage(step.bytes, keep ? ActivationCategory(node) : MemoryCategory::kTransient,
                             [&] { return node.kind + (keep ? " saved temporary" : what); }, node.id.index);
    }
  }
  std::vector<int64_t> left;
  for (size_t i = 0; i < steps.size(); ++i) {
    if (blocks[i] < 0) continue;
    (steps[i].saved && saved != nullptr ? *saved : left).push_back(blocks[i]);
  }
  return left;
}

void StepExecutor::HoldIfReturned(const OpNode& node) {
  for (ValueId out : node.outputs) {
    if (out != logits_) continue;
    const int64_t s = storage_of_[static_cast<size_t>(out.index)];
    Ref(s);
    returned_.push_back(s);
  }
}

// The forward has returned: the previous outputs go, this forward's are bound in their place.
void StepExecutor::KeepOutputs() {
  ReleaseKeptOutputs();
  if (!ChunkedLossReturned()) {
    const int64_t loss = storage_of_[static_cast<size_t>(graph_.loss().index)];
    Ref(loss);
    returned_.push_back(loss);
  }
  kept_outputs_.swap(returned_);
}

void StepExecutor::ReleaseKeptOutputs() {
  for (int64_t s : kept_outputs_) Unref(s, -1);
  kept_outputs_.clear();
}

// torch.nn.utils.clip_grad_norm_ (torch/nn/utils/clip_grad.py): _foreach_norm gives one 0-d norm per gradient,
// torch.stack of them and vector_norm the total; then clip_coef = max_norm / (total_norm + 1e-6), clamped to 1,
// multiplies the gradients in place (_foreach_mul_).
void StepExecutor::ClipGradNormTemporaries() {
  std::vector<int64_t> norms;
  for (const auto& p : graph_.params()) {
    const size_t v = static_cast<size_t>(p.value.index);
    if (grad_of_[v] < 0) continue;
    norms.push_back(NewStorage(ElementSize(out_.value_dtypes[v]), MemoryCategory::kTransient,
                               [&] { return p.name + " grad norm"; }, -1));
  }
  if (norms.empty()) return;
  const int64_t norm_bytes = storages_[static_cast<size_t>(norms.front())].bytes;
  const int64_t stacked = NewStorage(norm_bytes * static_cast<int64_t>(norms.size()), MemoryCategory::kTransient,
                                     "stacked grad norms", -1);
  const int64_t total = NewStorage(norm_bytes, MemoryCategory::kTransient, "total grad norm", -1);
  Unref(stacked, -1);
  for (int64_t s : norms) Unref(s, -1);
  const int64_t shifted = NewStorage(norm_bytes, MemoryCategory::kTransient, "total norm + eps", -1);
  const int64_t coef = NewStorage(norm_bytes, MemoryCategory::kTransient, "clip coefficient", -1);
  Unref(shifted, -1);
  const int64_t clamped = NewStorage(norm_bytes, MemoryCategory::kTransient, "clamped clip coefficient", -1);
  Unref(coef, -1);
  Unref(clamped, -1);
  Unref(total, -1);
}

// Note [Chunked loss]
// torchtune's chunked output and CEWithChunkedOutputLoss (torchtune/modules/transformer.py chunked_output,
// torchtune/modules/loss/ce_chunked_output_loss.py; torchtune 0.7) on the model's last hidden state, in place of
// the graph's LM head and loss:
//   logits = [lm_head(c) for c in hidden.tensor_split(N, dim=1)]
//   labels = torch.hstack((labels[..., 1:], ignore_column))           # a new int64 tensor
//   total = (labels != -100).sum(); labels = [c.reshape(-1) for c in labels.tensor_split(N, dim=1)]
//   loss = sum(F.cross_entropy(c.reshape(-1, V).float(), l, reduction="sum") for c, l in ...) / total
// What that allocates (aten/src/ATen/native/Linear.cpp, LinearAlgebra.cpp _matmul_impl; derivatives.yaml):
// - linear on a [B, s, H] chunk runs matmul, which folds it to [B*s, H] with reshape: a view when B == 1 (mm then
//   saves the hidden state itself), a contiguous copy otherwise (a chunk of dim 1 is not contiguous), and mm saves
//   the copy. Under autocast the chunk's 16-bit copy is contiguous instead and is what mm saves; the weight's copy
//   is cast once (autocast's cache) and saved by every chunk's mm.
// - all N logit chunks live until the loss returns; .float() makes one fp32 copy at a time (none for fp32
//   logits), log_softmax's fp32 output is saved per chunk; the label chunks are copies when B > 1.
// Backward follows the engine's order (highest sequence number first): every chunk's cross-entropy backward
// (nll_loss_backward's zero-filled gradient, then log_softmax_backward's, cast back to the logits' dtype) runs
// before any projection backward, since all the projections were created before the loss; then each chunk's mm
// backward, last chunk first (a weight gradient accumulated like any other: the first is a transposed view, so
// the second makes a new sum, later ones add in place), each followed under autocast by the copy's cast back;
// then the weight copy's cast to fp32; last each chunk's SliceBackward, a zero-filled hidden-sized gradient that
// the hidden state's gradient buffer adds in place.
// HF's full-range logits_to_keep slices before lm_head are not in torchtune's loop: the hidden state is the
// value they view.
ValueId StepExecutor::ChunkedLossHidden() const {
  ValueId hidden = graph_.tensor_inputs(NodeId{plan_.loss.lm_head_node}).at(0);
  while (true) {
    const NodeId producer = graph_.value(hidden).producer;
    if (!producer.valid()) return hidden;
    const OpNode& op = graph_.nodes()[static_cast<size_t>(producer.index)];
    const auto& inputs = graph_.tensor_inputs(op.id);
    if (op.kind != "aten::slice" || inputs.empty() || graph_.value(inputs[0]).shape != graph_.value(hidden).shape) {
      return hidden;
    }
    hidden = inputs[0];
  }
}

StepExecutor::LossHead StepExecutor::LossHeadOf(ValueId hidden) const {
  LossHead h;
  const OpNode& linear = graph_.nodes()[static_cast<size_t>(plan_.loss.lm_head_node)];
  h.linear = linear.id.index;
  h.loss_node = graph_.value(graph_.loss()).producer.index;
  h.hidden = hidden;
  h.weight = graph_.tensor_inputs(linear.id).at(1);
  h.logits = linear.outputs.at(0);
  const auto& shape = graph_.value(hidden).shape;  // [B, S, H]
  h.batch = shape[0];
  h.seq = shape[1];
  h.width = shape[2];
  h.vocab = graph_.value(h.logits).shape.back();
  const bool autocast =
      config_.precision == Precision::kBf16Autocast || config_.precision == Precision::kFp16Autocast;
  h.low = config_.precision == Precision::kFp16Autocast ? DType::kF16 : DType::kBF16;
  const DType hidden_dtype = out_.value_dtypes[static_cast<size_t>(hidden.index)];
  h.cast_hidden = autocast && IsFloating(hidden_dtype) && hidden_dtype != h.low;
  h.cast_weight = autocast && out_.value_dtypes[static_cast<size_t>(h.weight.index)] != h.low;
  return h;
}

// Values the model's frame held until its loss (the last hidden state among them) go when the replaced loss
// no longer needs them.
void StepExecutor::ReleaseHeldUntilLoss(int32_t head) {
  for (size_t n = static_cast<size_t>(head); n < graph_.nodes().size(); ++n) {
    for (ValueId v : released_after_[n]) {
      const int64_t s = storage_of_[static_cast<size_t>(v.index)];
      if (s >= 0 && graph_.value(v).producer.index < head) Unref(s, head);
    }
  }
}

// The replaced loss's backward hands `grad` on as the gradient of `v`, which has none yet: the LM head's weight
// and hidden state are used by nothing later in the forward. `addable`: a later gradient may be added in place.
void StepExecutor::SetLossGradient(ValueId v, int64_t grad, bool addable) {
  int64_t& slot = grad_of_[static_cast<size_t>(v.index)];
  LLMEM_CHECK(slot < 0) << graph_.value(v).name << " has a gradient before the LM head's backward";
  slot = grad;
  if (addable) inplace_ok_.insert(grad);
}

void StepExecutor::ChunkedLossForward(std::map<int32_t, int64_t>& weight_casts) {
  const LossHead h = LossHeadOf(ChunkedLossHidden());
  const int32_t head = h.linear, loss_node = h.loss_node;
  const ValueId hidden = h.hidden, weight = h.weight, logits = h.logits;
  const int64_t batch = h.batch, seq = h.seq, width = h.width, vocab = h.vocab;
  const DType low = h.low;
  const bool cast_hidden = h.cast_hidden, cast_weight = h.cast_weight;
  auto dtype = [this](ValueId v) { return out_.value_dtypes[static_cast<size_t>(v.index)]; };
  auto bytes = [](int64_t elements, DType d) { return CheckedMul(elements, ElementSize(d), "a loss chunk"); };
  auto named = [](const std::string& what, size_t c) { return what + " " + std::to_string(c); };
  loss_chunks_.assign(plan_.loss.chunk_lengths.size(), {});
  std::vector<int64_t> logit_chunks;
  for (size_t c = 0; c < loss_chunks_.size(); ++c) {
    LossChunk& chunk = loss_chunks_[c];
    const int64_t positions = plan_.loss.chunk_lengths[c];
    chunk.rows = batch * positions;
    // Autocast casts the weight first (its cached copy), then the chunk.
    int64_t weight_copy = -1;
    if (cast_weight) {
      auto it = weight_casts.find(weight.index);
      if (it == weight_casts.end() || !Trainable(weight)) {
        const int64_t s = NewStorage(bytes(vocab * width, low), MemoryCategory::kAutocastCopies,
                                     [&] { return graph_.value(weight).name + " autocast copy"; }, head);
        if (!Trainable(weight)) {
          weight_copy = s;
        } else {
          it = weight_casts.emplace(weight.index, s).first;
        }
      }
      if (weight_copy < 0) {
        weight_copy = it->second;
        Ref(weight_copy);
      }
    }
    int64_t input;
    if (cast_hidden) {
      input = NewStorage(bytes(chunk.rows * width, low), MemoryCategory::kAutocastCopies,
                         [&] { return named("hidden chunk autocast copy", c); }, head);
    } else if (batch > 1 && positions != seq) {
      input = NewStorage(bytes(chunk.rows * width, dtype(hidden)), MemoryCategory::kHeadActivations,
                         [&] { return named("hidden chunk reshape copy", c); }, head);
    } else {
      input = storage_of_[static_cast<size_t>(hidden.index)];  // the reshape is a view of the hidden state
      Ref(input);
    }
    logit_chunks.push_back(NewStorage(bytes(chunk.rows * vocab, dtype(logits)), MemoryCategory::kHeadActivations,
                                      [&] { return named("logits chunk", c); }, head));
    if (plan_.loop.keep_outputs) {  // the loop keeps the returned list
      Ref(logit_chunks.back());
      returned_.push_back(logit_chunks.back());
    }
    // mm saves the chunk for the weight's gradient and the weight for the chunk's.
    if (graph_.value(weight).requires_grad) {
      chunk.input = input;
    } else {
      Unref(input, head);
    }
    if (weight_copy >= 0 && graph_.value(hidden).requires_grad) {
      chunk.weight_copy = weight_copy;
    } else if (weight_copy >= 0) {
      Unref(weight_copy, head);
    }
  }
  // The hidden state goes when chunked_output returns; the model's forward returns with it, before the loss.
  ReleaseHeldUntilLoss(head);
  hooks_->OnModelForwardEnd(*this);
  current_node_ = loss_node;
  // Class-index targets are int64.
  const int64_t label_bytes = ElementSize(DType::kI64);
  const int64_t shifted = NewStorage(CheckedMul(batch * seq, label_bytes, "the labels"),
                                     MemoryCategory::kHeadActivations, "shifted labels", loss_node);
  // (labels != ignore_index).sum(): a bool mask, summed through an int64 copy of it (make_reduction_from_out_ty in
  // ReduceOps.cpp casts the input to the output dtype).
  const int64_t mask = NewStorage(batch * seq, MemoryCategory::kTransient, "label mask", loss_node);
  loss_label_count_ = NewStorage(label_bytes, MemoryCategory::kHeadActivations, "label count", loss_node);
  const int64_t widened = NewStorage(CheckedMul(batch * seq, label_bytes, "the labels"), MemoryCategory::kTransient,
                                     "label mask as int64", loss_node);
  Unref(widened, loss_node);
  Unref(mask, loss_node);
  for (size_t c = 0; c < loss_chunks_.size(); ++c) {
    if (batch > 1 && plan_.loss.chunk_lengths[c] != seq) {
      loss_chunks_[c].labels = NewStorage(loss_chunks_[c].rows * label_bytes, MemoryCategory::kHeadActivations,
                                          [&] { return named("labels chunk", c); }, loss_node);
    } else {
      loss_chunks_[c].labels = shifted;
      Ref(shifted);
    }
  }
  const int64_t fp32 = ElementSize(DType::kF32);
  int64_t total = -1;
  for (size_t c = 0; c < loss_chunks_.size(); ++c) {
    LossChunk& chunk = loss_chunks_[c];
    const int64_t upcast =
        dtype(logits) == DType::kF32
            ? -1
            : NewStorage(bytes(chunk.rows * vocab, DType::kF32), MemoryCategory::kTransient,
                         [&] { return named("logits chunk in fp32", c); }, loss_node);
    chunk.log_probs = NewStorage(bytes(chunk.rows * vocab, DType::kF32), MemoryCategory::kHeadActivations,
                                 [&] { return named("log_softmax of chunk", c); }, loss_node);
    const int64_t value = NewStorage(fp32, MemoryCategory::kHeadActivations, "chunk loss", loss_node);
    chunk.total_weight = NewStorage(fp32, MemoryCategory::kHeadActivations, "nll_loss total weight", loss_node);
    if (upcast >= 0) Unref(upcast, loss_node);
    // total_loss = 0.0 + the first chunk's loss makes a tensor; `+=` then adds the others in place.
    if (total < 0) total = NewStorage(fp32, MemoryCategory::kHeadActivations, "loss sum", loss_node);
    Unref(value, loss_node);
  }
  const int64_t loss = NewStorage(fp32, MemoryCategory::kHeadActivations, "loss", loss_node);
  Unref(total, loss_node);
  storage_of_[static_cast<size_t>(graph_.loss().index)] = loss;
  // The loop drops the logit chunks and the shifted labels when the loss is computed.
  Unref(shifted, loss_node);
  for (int64_t s : logit_chunks) Unref(s, loss_node);
}

void StepExecutor::ChunkedLossBackward() {
  const LossHead h = LossHeadOf(ChunkedLossHidden());
  const int32_t head = h.linear, loss_node = h.loss_node;
  const ValueId hidden = h.hidden, weight = h.weight, logits = h.logits;
  const int64_t width = h.width, vocab = h.vocab;
  const bool cast_hidden = h.cast_hidden, cast_weight = h.cast_weight;
  const DType low = h.low;
  auto dtype = [this](ValueId v) { return out_.value_dtypes[static_cast<size_t>(v.index)]; };
  auto bytes = [](int64_t elements, DType d) { return CheckedMul(elements, ElementSize(d), "a loss gradient"); };
  auto named = [](const std::string& what, size_t c) { return what + " " + std::to_string(c); };
  const size_t chunks = loss_chunks_.size();
  current_node_ = loss_node;
  // DivBackward: grad / total, handed by every AddBackward to every chunk's loss.
  int64_t& seed = grad_of_[static_cast<size_t>(graph_.loss().index)];
  const int64_t d_sum = NewStorage(ElementSize(DType::kF32), MemoryCategory::kActivationGrads, "d loss sum", loss_node);
  Unref(seed, loss_node);
  seed = -1;
  Unref(loss_label_count_, loss_node);
  std::vector<int64_t> d_logits(chunks, -1);
  for (size_t c = chunks; c-- > 0;) {
    LossChunk& chunk = loss_chunks_[c];
    const int64_t d_nll = NewStorage(bytes(chunk.rows * vocab, DType::kF32), MemoryCategory::kActivationGrads,
                                     [&] { return named("d log_softmax chunk", c); }, loss_node);
    Unref(chunk.labels, loss_node);
    Unref(chunk.total_weight, loss_node);
    int64_t d = NewStorage(bytes(chunk.rows * vocab, DType::kF32), MemoryCategory::kActivationGrads,
                           [&] { return named("d logits chunk in fp32", c); }, loss_node);
    Unref(d_nll, loss_node);
    Unref(chunk.log_probs, loss_node);
    if (dtype(logits) != DType::kF32) {  // ToCopyBackward of .float()
      const int64_t back = NewStorage(bytes(chunk.rows * vocab, dtype(logits)), MemoryCategory::kActivationGrads,
                                      [&] { return named("d logits chunk", c); }, loss_node);
      Unref(d, loss_node);
      d = back;
    }
    d_logits[c] = d;
  }
  Unref(d_sum, loss_node);
  current_node_ = head;
  hooks_->OnModelOutputsGrad(*this);  // the logit chunks' gradients are ready before their projections' backward
  const DType compute = cast_hidden ? low : dtype(hidden);
  const MemoryCategory weight_grad_category =
      !cast_weight && Trainable(weight) ? MemoryCategory::kGradients : MemoryCategory::kActivationGrads;
  int64_t d_weight = -1;
  bool d_weight_addable = false;  // the buffered weight gradient can take the next one in place
  std::vector<int64_t> d_inputs(chunks, -1);
  for (size_t c = chunks; c-- > 0;) {
    LossChunk& chunk = loss_chunks_[c];
    const int64_t dw = graph_.value(weight).requires_grad
                           ? NewStorage(bytes(vocab * width, compute), weight_grad_category,
                                        [&] { return named("d " + graph_.value(weight).name + " chunk", c); }, head)
                           : -1;
    int64_t dx = graph_.value(hidden).requires_grad
                     ? NewStorage(bytes(chunk.rows * width, compute), MemoryCategory::kActivationGrads,
                                  [&] { return named("d hidden chunk", c); }, head)
                     : -1;
    Unref(d_logits[c], head);
    if (chunk.weight_copy >= 0) Unref(chunk.weight_copy, head);
    if (chunk.input >= 0) Unref(chunk.input, head);
    if (dw >= 0 && d_weight < 0) {
      d_weight = dw;
    } else if (dw >= 0 && !d_weight_addable) {
      const int64_t sum = NewStorage(bytes(vocab * width, compute), weight_grad_category,
                                     [&] { return "d " + graph_.value(weight).name + " (sum)"; }, head);
      Unref(d_weight, head);
      Unref(dw, head);
      d_weight = sum;
      d_weight_addable = true;
    } else if (dw >= 0) {
      Unref(dw, head);
    }
    if (dx >= 0 && cast_hidden) {  // ToCopyBackward of the chunk's autocast copy
      const int64_t back = NewStorage(bytes(chunk.rows * width, dtype(hidden)), MemoryCategory::kActivationGrads,
                                      [&] { return named("d hidden chunk in its dtype", c); }, head);
      Unref(dx, head);
      dx = back;
    }
    d_inputs[c] = dx;
  }
  if (d_weight >= 0 && cast_weight) {  // ToCopyBackward of the weight's autocast copy
    const int64_t back = NewStorage(bytes(vocab * width, dtype(weight)),
                                    Trainable(weight) ? MemoryCategory::kGradients : MemoryCategory::kActivationGrads,
                                    [&] { return "d " + graph_.value(weight).name; }, head);
    Unref(d_weight, head);
    d_weight = back;
    d_weight_addable = true;
  }
  if (d_weight >= 0) {
    SetLossGradient(weight, d_weight, d_weight_addable);
    AfterNodeBackward(head);
  }
  // SliceBackward of each chunk, last first: zeros of the hidden state's size with the chunk's gradient copied in.
  int64_t d_hidden = -1;
  for (size_t c = chunks; c-- > 0;) {
    if (d_inputs[c] < 0) continue;
    const int64_t full = NewStorage(Bytes(hidden), MemoryCategory::kActivationGrads,
                                    [&] { return named("d hidden from chunk", c); }, head);
    Unref(d_inputs[c], head);
    if (d_hidden < 0) {
      d_hidden = full;
    } else {
      Unref(full, head);
    }
  }
  if (d_hidden >= 0) SetLossGradient(hidden, d_hidden, true);
  loss_chunks_.clear();
}

// The previous step's outputs the loop still holds (Note [Kept outputs]): torchtune's chunked loop returns the list
// of logit chunks (its loss is dropped after backward); Liger's patched forward returns no logits (skip_logits),
// only the loss.
void StepExecutor::KeepPreviousLossOutputs() {
  if (ChunkedLossReturned()) {
    const LossHead h = LossHeadOf(ChunkedLossHidden());
    const DType dtype = out_.value_dtypes[static_cast<size_t>(h.logits.index)];
    for (size_t c = 0; c < plan_.loss.chunk_lengths.size(); ++c) {
      const int64_t elements = CheckedMul(h.batch * plan_.loss.chunk_lengths[c], h.vocab, "a loss chunk");
      kept_outputs_.push_back(NewStorage(CheckedMul(elements, ElementSize(dtype), "a loss chunk"),
                                         MemoryCategory::kHeadActivations,
                                         [&] { return "previous step's logits chunk " + std::to_string(c); }, -1));
    }
    return;
  }
  kept_outputs_.push_back(
      NewStorage(Bytes(graph_.loss()), MemoryCategory::kHeadActivations, "previous step's loss", -1));
}

// Note [Fused linear cross-entropy]
// Liger-Kernel's LigerFusedLinearCrossEntropyFunction (src/liger_kernel/ops/fused_linear_cross_entropy.py, Liger
// 0.8.2; reduction "mean", no accum_dtype) as its patched HF forward calls it (LigerForCausalLMLoss in
// transformers/model/loss_utils.py): the labels padded and shifted (`pad(labels, (0, 1))`, then
// `[..., 1:].contiguous()`, both alive until the loss returns), the hidden state viewed to [BT, H], then in the
// forward, with the gradients computed there:
//   grad_input = zeros_like(input); grad_weight = zeros_like(weight); loss_1d = zeros(BT, fp32)
//   target_mask = target != ignore_index (kept to the end); its .sum().item()
//   per chunk of FusedLinearChunkRows rows: logits_chunk = input_chunk @ weight.t() (the previous chunk's logits go
//   only once `grad_logits_chunk` is rebound, after this one exists); the Triton kernel writes the loss and, in
//   place, the logits' gradient; grad_input[rows] = grad_logits_chunk @ weight (a product copied in);
//   grad_weight += mm(grad_logits_chunk.t(), input_chunk).float(), or, for an fp32 grad_weight and 16-bit logits on
//   CUDA capability >= 8, addmm(..., out_dtype=float32, out=grad_weight) with the chunk cast to the logits' dtype
//   (bound to a local until the next chunk)
//   loss = sum(loss_1d); save_for_backward(grad_input, grad_weight)
// Under autocast (the ambient state in the Function) the matmuls cast as any: each input chunk per product, the
// weight once (autocast's cache) for grad_input, and `weight.t()`, a view autocast does not cache, per chunk.
// The backward only scales the saved gradients in place (not even that for a gradient of 1.0: it compares with a
// new scalar tensor) and returns them; AccumulateGrad takes grad_weight as .grad without a copy, since nothing
// else references it once the node has released its saved tensors. Liger runs on GPUs only: modelled from the
// source, not measured.
void StepExecutor::FusedLinearLossForward(std::map<int32_t, int64_t>& weight_casts) {
  const LossHead h = LossHeadOf(graph_.tensor_inputs(NodeId{plan_.loss.lm_head_node}).at(0));
  auto dtype = [this](ValueId v) { return out_.value_dtypes[static_cast<size_t>(v.index)]; };
  auto bytes = [](int64_t elements, DType d) { return CheckedMul(elements, ElementSize(d), "a fused loss buffer"); };
  auto named = [](const std::string& what, size_t c) { return what + " " + std::to_string(c); };
  const int32_t node = h.loss_node;
  current_node_ = node;
  const int64_t tokens = h.batch * h.seq;
  const int64_t label_bytes = ElementSize(DType::kI64);
  const int64_t padded = NewStorage(CheckedMul(h.batch * (h.seq + 1), label_bytes, "the labels"),
                                    MemoryCategory::kHeadActivations, "padded labels", node);
  const int64_t shifted = NewStorage(CheckedMul(tokens, label_bytes, "the labels"), MemoryCategory::kHeadActivations,
                                     "shifted labels", node);
  const DType input_dtype = dtype(h.hidden), weight_dtype = dtype(h.weight);
  const bool weight_grad = graph_.value(h.weight).requires_grad;
  fused_grad_input_ = NewStorage(bytes(tokens * h.width, input_dtype), MemoryCategory::kActivationGrads,
                                 "grad_input (fused linear cross-entropy)", node);
  fused_grad_weight_ = weight_grad ? NewStorage(bytes(h.vocab * h.width, weight_dtype),
                                                Trainable(h.weight) ? MemoryCategory::kGradients
                                                                    : MemoryCategory::kActivationGrads,
                                                "grad_weight (fused linear cross-entropy)", node)
                                   : -1;
  const int64_t loss_1d = NewStorage(bytes(tokens, DType::kF32), MemoryCategory::kTransient, "loss_1d", node);
  const int64_t target_mask = NewStorage(tokens, MemoryCategory::kTransient, "target_mask", node);
  // .sum() reduces an int64 copy of the mask (make_reduction_from_out_ty casts the input to the output dtype).
  const int64_t count = NewStorage(label_bytes, MemoryCategory::kTransient, "target_mask.sum()", node);
  Unref(NewStorage(CheckedMul(tokens, label_bytes, "the labels"), MemoryCategory::kTransient, "target_mask as int64",
                   node),
        node);
  Unref(count, node);
  const DType logits_dtype = h.cast_weight || h.cast_hidden ? h.low : input_dtype;
  int64_t previous_logits = -1, addmm_chunk = -1;
  for (size_t c = 0; c < plan_.loss.chunk_lengths.size(); ++c) {
    const int64_t rows = plan_.loss.chunk_lengths[c];
    auto chunk_cast = [&](const char* what) {
      return h.cast_hidden ? NewStorage(bytes(rows * h.width, h.low), MemoryCategory::kAutocastCopies,
                                        [&] { return named(what, c); }, node)
                           : -1;
    };
    // input_chunk @ weight.t(): weight.t() is a view, which autocast does not cache, so it is cast per chunk
    // (the weight operand first, as the CPU trace shows for linear).
    const int64_t weight_t_cast =
        h.cast_weight ? NewStorage(bytes(h.vocab * h.width, h.low), MemoryCategory::kAutocastCopies,
                                   [&] { return named("weight.t() autocast copy", c); }, node)
                      : -1;
    const int64_t cast = chunk_cast("input chunk autocast copy");
    const int64_t logits = NewStorage(bytes(rows * h.vocab, logits_dtype), MemoryCategory::kHeadActivations,
                                      [&] { return named("logits chunk", c); }, node);
    if (cast >= 0) Unref(cast, node);
    if (weight_t_cast >= 0) Unref(weight_t_cast, node);
    if (previous_logits >= 0) Unref(previous_logits, node);
    previous_logits = logits;
    // grad_logits_chunk @ weight: the weight itself, a leaf, is cast once and cached for the forward.
    if (h.cast_weight && !weight_casts.count(h.weight.index)) {
      weight_casts.emplace(h.weight.index, NewStorage(bytes(h.vocab * h.width, h.low), MemoryCategory::kAutocastCopies,
                                                      [&] { return graph_.value(h.weight).name + " autocast copy"; },
                                                      node));
    }
    // grad_input[rows] = grad_logits_chunk @ weight
    Unref(NewStorage(bytes(rows * h.width, logits_dtype), MemoryCategory::kTransient,
                     [&] { return named("grad_logits_chunk @ weight", c); }, node),
          node);
    if (weight_grad && plan_.loss.weight_grad_addmm && input_dtype != logits_dtype) {
      // input_chunk = input_chunk.to(grad_logits_t.dtype): the local holds it until the next chunk rebinds it.
      if (addmm_chunk >= 0) Unref(addmm_chunk, node);
      addmm_chunk = NewStorage(bytes(rows * h.width, logits_dtype), MemoryCategory::kTransient,
                               [&] { return named("input chunk in the logits' dtype", c); }, node);
    } else if (weight_grad && !plan_.loss.weight_grad_addmm) {
      const int64_t mm_cast = chunk_cast("input chunk autocast copy for the weight gradient");
      const int64_t product = NewStorage(bytes(h.vocab * h.width, logits_dtype), MemoryCategory::kTransient,
                                         [&] { return named("grad_logits_chunk.t() @ input_chunk", c); }, node);
      if (mm_cast >= 0) Unref(mm_cast, node);
      if (logits_dtype != DType::kF32) {  // .float()
        const int64_t widened = NewStorage(bytes(h.vocab * h.width, DType::kF32), MemoryCategory::kTransient,
                                           [&] { return named("weight gradient chunk in fp32", c); }, node);
        Unref(product, node);
        Unref(widened, node);
      } else {
        Unref(product, node);
      }
    }
  }
  const int64_t loss = NewStorage(ElementSize(DType::kF32), MemoryCategory::kHeadActivations, "loss", node);
  storage_of_[static_cast<size_t>(graph_.loss().index)] = loss;
  Unref(loss_1d, node);
  Unref(target_mask, node);
  if (previous_logits >= 0) Unref(previous_logits, node);
  if (addmm_chunk >= 0) Unref(addmm_chunk, node);
  Unref(shifted, node);
  Unref(padded, node);
  // The model's forward returns: the hidden state goes (nothing saved it).
  ReleaseHeldUntilLoss(h.linear);
}

void StepExecutor::FusedLinearLossBackward() {
  const LossHead h = LossHeadOf(graph_.tensor_inputs(NodeId{plan_.loss.lm_head_node}).at(0));
  current_node_ = h.loss_node;
  // torch.equal(grad_output, torch.tensor(1.0)): a scalar on the device.
  Unref(NewStorage(ElementSize(DType::kF32), MemoryCategory::kTransient, "torch.tensor(1.0)", h.loss_node),
        h.loss_node);
  int64_t& seed = grad_of_[static_cast<size_t>(graph_.loss().index)];
  Unref(seed, h.loss_node);
  seed = -1;
  current_node_ = h.linear;
  if (fused_grad_weight_ >= 0) {
    SetLossGradient(h.weight, fused_grad_weight_, true);
    AfterNodeBackward(h.linear);
  }
  // The view to [BT, H] hands grad_input on as the LM head input's gradient.
  if (graph_.value(h.hidden).requires_grad) {
    SetLossGradient(h.hidden, fused_grad_input_, true);
  } else {
    Unref(fused_grad_input_, h.linear);
  }
  fused_grad_input_ = fused_grad_weight_ = -1;
}

StepSimulation StepExecutor::Run() {
  out_.value_dtypes = plan_.value_dtypes;
  Setup();
  if (plan_.loop.forward_only) {
    Forward();
    // What the forward returns (the logits, the new cache entries) is the caller's: the step ends with it.
    Unref(storage_of_[static_cast<size_t>(graph_.loss().index)], -1);
    for (ValueId v : plan_.loop.cache_outputs) Unref(storage_of_[static_cast<size_t>(v.index)], -1);
    return std::move(out_);
  }
  FindLastGradientNodes();
  if (plan_.loop.keep_outputs) KeepPreviousOutputs();
  for (int micro_batch = 0; micro_batch < plan_.loop.simulated_micro_batches; ++micro_batch) {
    if (micro_batch > 0) StartNextMicroBatch();
    Forward();
    if (plan_.loop.keep_outputs) KeepOutputs();
    Backward();
  }
  OptimizerStep();
  ReleaseKeptOutputs();
  return std::move(out_);
}

}  // namespace

StepSimulation ExecuteStepPlan(const Graph& graph, const StepPlan& plan, const TrainingConfig& config,
                               StepHooks* hooks) {
  if (hooks) {
    if (const std::string why = hooks->UnmodelledLoop(plan.loop); !why.empty()) throw ConfigError(why);
    if (const std::string why = hooks->UnmodelledLoss(plan.loss); !why.empty()) throw ConfigError(why);
  }
  StepExecutor executor(graph, plan, config, hooks);
  return executor.Run();
}

}  // namespace llmem::sim
