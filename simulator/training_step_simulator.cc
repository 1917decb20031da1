#include "simulator/training_step_simulator.h"

#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <type_traits>

#include "graph/error.h"
#include "simulator/backend_rules.h"
#include "simulator/forward_lifetimes.h"
#include "simulator/op_memory_rules.h"

namespace llmem::sim {

std::string_view CategoryName(MemoryCategory c) {
  switch (c) {
    case MemoryCategory::kWeights: return "weights";
    case MemoryCategory::kGradients: return "gradients";
    case MemoryCategory::kOptimizerState: return "optimizer states";
    case MemoryCategory::kInputs: return "inputs";
    case MemoryCategory::kActivations: return "activations (body)";
    case MemoryCategory::kHeadActivations: return "LM head + loss";
    case MemoryCategory::kAutocastCopies: return "autocast copies";
    case MemoryCategory::kActivationGrads: return "activation grads";
    case MemoryCategory::kTransient: return "workspaces";
    case MemoryCategory::kLibraryWorkspace: return "cuBLAS workspaces";
    case MemoryCategory::kGatheredParams: return "gathered params";
    case MemoryCategory::kCommBuffers: return "comm buffers";
  }
  return "?";
}

std::string_view PhaseName(Phase p) {
  switch (p) {
    case Phase::kSetup: return "setup";
    case Phase::kForward: return "forward";
    case Phase::kBackward: return "backward";
    case Phase::kOptimizer: return "optimizer";
  }
  return "?";
}

namespace {

DType Promote(DType a, DType b) {
  if (a == b) return a;
  if (!IsFloating(a)) return b;
  if (!IsFloating(b)) return a;
  if (a == DType::kF64 || b == DType::kF64) return DType::kF64;
  return DType::kF32;
}

// The ScalarType argument of aten::to, in c10::ScalarType numbering.
std::optional<DType> CastTarget(const OpNode& node) {
  const OpArg* dtype_arg = nullptr;
  if (node.args.size() > 1 && node.args[1].kind == OpArg::Kind::kInt) {
    dtype_arg = &node.args[1];  // to.dtype / to.dtype_layout
  } else if (node.args.size() > 2 && node.args[1].kind == OpArg::Kind::kOther &&
             node.args[2].kind == OpArg::Kind::kInt) {
    dtype_arg = &node.args[2];  // to.device
  }
  if (!dtype_arg) return std::nullopt;
  switch (dtype_arg->int_value) {  // c10/core/ScalarType.h
    case 0: return DType::kU8;
    case 1: return DType::kI8;
    case 2: return DType::kI16;
    case 3: return DType::kI32;
    case 4: return DType::kI64;
    case 5: return DType::kF16;
    case 6: return DType::kF32;
    case 7: return DType::kF64;
    case 11: return DType::kBool;
    case 15: return DType::kBF16;
    default: return std::nullopt;
  }
}

// Step 1: the dtype of every value under the precision, in the program `lifetimes` names.
std::vector<DType> SimulatedDTypes(const Graph& graph, Precision precision, Lifetimes lifetimes,
                                   const BackendRules& backend) {
  std::vector<DType> dt(graph.values().size());
  for (const auto& v : graph.values()) dt[static_cast<size_t>(v.id.index)] = v.dtype;
  if (precision == Precision::kFp32) return dt;
  if (precision == Precision::kBf16) {
    if (!graph.runs_with_bf16_weights()) {
      throw ConfigError("this export cannot run with bf16 weights (it bakes fp32 dtypes in); use bf16-autocast, or "
                        "re-export with --dtype bfloat16");
    }
    for (const auto& v : graph.values()) dt[static_cast<size_t>(v.id.index)] = v.dtype_bf16_weights;
    return dt;
  }
  const DType low = precision == Precision::kBf16Autocast ? DType::kBF16 : DType::kF16;
  for (const auto& node : graph.nodes()) {
    const AutocastClass cls = backend.Autocast(node.kind);
    const auto& inputs = graph.tensor_inputs(node.id);
    // Type promotion (c10 result_type): tensors with dimensions decide; 0-dim tensors only when no dimensioned
    // floating tensor takes part (the traced scalar constants are 0-dim float64 tensors).
    std::optional<DType> promoted, promoted_half;  // promoted_half: what the bf16-weights run saw
    for (int pass = 0; pass < 2 && !promoted; ++pass) {
      for (ValueId in : inputs) {
        if ((graph.value(in).shape.empty() ? 1 : 0) != pass) continue;
        const DType d = dt[static_cast<size_t>(in.index)];
        if (IsFloating(d)) promoted = promoted ? Promote(*promoted, d) : d;
        const DType h = graph.value(in).dtype_bf16_weights;
        if (IsFloating(h)) promoted_half = promoted_half ? Promote(*promoted_half, h) : h;
      }
    }
    for (ValueId out : node.outputs) {
      const auto& v = graph.value(out);
      DType& d = dt[static_cast<size_t>(out.index)];
      if (!IsFloating(v.dtype)) continue;
      if (v.alias_of.valid() && node.kind != "aten::to") {
        // A view has the dtype of the tensor it views: the op's first input when they share storage (the root
        // could be a value that a simulated cast has since copied).
        const bool views_input = !inputs.empty() && graph.StorageRoot(inputs[0]) == graph.StorageRoot(out);
        d = dt[static_cast<size_t>((views_input ? inputs[0] : graph.StorageRoot(out)).index)];
        continue;
      }
      if (cls == AutocastClass::kLowerPrecision) {
        d = low;
      } else if (cls == AutocastClass::kFp32) {
        d = DType::kF32;
      } else if (node.kind == "aten::to") {
        // An explicit cast to the dtype in its schema (to.dtype: arg 1; to.device: arg 2); without one it keeps
        // its input's dtype.
        // The eager program's `x.to(y.dtype)` where autocast made y 16-bit casts to that dtype; the trace (and
        // the TorchScript step that runs it) baked the trace-time fp32.
        const std::optional<DType> target = CastTarget(node);
        if (node.to_autocast_dtype && lifetimes == Lifetimes::kEager) {
          d = low;
        } else {
          d = target ? *target : (promoted ? *promoted : v.dtype);
        }
      } else if (node.kind == "aten::type_as") {
        d = inputs.size() > 1 ? dt[static_cast<size_t>(inputs[1].index)] : v.dtype;
      } else if (promoted && (!graph.runs_with_bf16_weights() || !promoted_half ||
                              v.dtype_bf16_weights == *promoted_half)) {
        d = *promoted;  // follows its inputs
      } else {
        d = v.dtype;  // the op fixed its output dtype
      }
    }
  }
  return dt;
}

// Builds the events; one instance per simulation.
class StepBuilder : private StepMemory {
 public:
  StepBuilder(const Graph& graph, const TrainingConfig& config, StepHooks* hooks)
      : graph_(graph), config_(config), backend_(RulesFor(config.target)), hooks_(hooks ? hooks : &no_hooks_) {}

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
  };

  // `label` is a string or a function making one: labels are built only when the configuration keeps them.
  template <typename Label>
  int64_t NewStorage(int64_t bytes, MemoryCategory category, Label&& label, int32_t node) {
    const int64_t id = static_cast<int64_t>(storages_.size());
    storages_.push_back(Storage{id, bytes, 1});
    if constexpr (std::is_invocable_v<Label>) {
      out_.timeline.block_labels.push_back(config_.keep_labels ? std::string(label()) : std::string());
    } else {
      out_.timeline.block_labels.push_back(config_.keep_labels ? std::string(label) : std::string());
    }
    out_.timeline.events.push_back(MemoryEvent{true, id, bytes, category, phase_, node});
    return id;
  }
  void Ref(int64_t s) { storages_[static_cast<size_t>(s)].refs++; }
  void Unref(int64_t s, int32_t node) {
    auto& st = storages_[static_cast<size_t>(s)];
    LLMEM_CHECK(st.refs > 0) << "double free of " << out_.timeline.block_labels[static_cast<size_t>(s)];
    if (--st.refs == 0) {
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
    return node.region.kind == RegionKind::kHead ? MemoryCategory::kHeadActivations : MemoryCategory::kActivations;
  }
  bool Trainable(ValueId v) const {
    const auto& tv = graph_.value(v);
    return tv.param >= 0 && graph_.params()[static_cast<size_t>(tv.param)].trainable;
  }

  // The parameters the optimizer updates: trainable, reached by the loss, one per storage (tied weights once).
  std::vector<const Parameter*> OptimizedParams() const {
    std::vector<const Parameter*> params;
    std::set<int32_t> seen_roots;
    for (const auto& p : graph_.params()) {
      if (p.trainable && p.used_in_forward && seen_roots.insert(graph_.StorageRoot(p.value).index).second) {
        params.push_back(&p);
      }
    }
    return params;
  }

  void Setup();
  void Forward();
  void Backward();
  void OptimizerStep();
  void AdamTemporaries();

  const Graph& graph_;
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
};

void StepBuilder::Setup() {
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
  // Optimizer states exist in the steady state; they have the parameters' dtype.
  const int states = config_.optimizer == OptimizerKind::kAdamW ? 2 : 1;
  for (const Parameter* p : OptimizedParams()) {
    const int64_t bytes = hooks_->OptimizedBytes(*p, Bytes(p->value));
    if (bytes == 0) continue;
    for (int s = 0; s < states; ++s) {
      NewStorage(bytes, MemoryCategory::kOptimizerState, [&] { return p->name + (s ? " exp_avg_sq" : " state"); }, -1);
    }
  }
  if (backend_.library_workspaces) {
    NewStorage(config_.target.gpu.cublas_workspace_bytes, MemoryCategory::kLibraryWorkspace, "cuBLAS workspace", -1);
    NewStorage(config_.target.gpu.cublaslt_workspace_bytes, MemoryCategory::kLibraryWorkspace, "cuBLASLt workspace",
               -1);
  }
  for (ValueId in : graph_.inputs()) {
    storage_of_[static_cast<size_t>(in.index)] =
        NewStorage(StorageBytes(in), MemoryCategory::kInputs, graph_.value(in).name, -1);
  }
}

void StepBuilder::Forward() {
  phase_ = Phase::kForward;
  const auto& nodes = graph_.nodes();
  // Release points (Note [Eager lifetimes]); the loss lives until backward. Per op, the activations released after
  // it: its inputs and outputs that die there first (in that order), then the values a frame held until there.
  const std::vector<int32_t> release = ForwardReleasePoints(graph_, config_.lifetimes);
  std::vector<std::vector<ValueId>> released_after(nodes.size());
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
  // A handful of entries per op: a flat list, reused across ops.
  std::vector<std::pair<int32_t, DType>> op_input_dtype;
  auto dtype_in_op = [this, &op_input_dtype](ValueId v) {
    for (const auto& [index, dtype] : op_input_dtype) {
      if (index == v.index) return dtype;
    }
    return out_.value_dtypes[static_cast<size_t>(v.index)];
  };
  RuleContext ctx{graph_, backend_, dtype_in_op,
                  [this, &dtype_in_op](ValueId v) { return ShapeBytes(graph_.value(v).shape, dtype_in_op(v)); }};
  const bool autocast =
      config_.precision == Precision::kBf16Autocast || config_.precision == Precision::kFp16Autocast;
  const DType low = config_.precision == Precision::kFp16Autocast ? DType::kF16 : DType::kBF16;
  std::map<int32_t, int64_t> weight_cast_cache;  // value index -> autocast copy storage (held until forward ends)

  rules_.resize(nodes.size());
  saved_.resize(nodes.size());
  cast_of_input_.resize(nodes.size());
  for (const auto& node : nodes) {
    const size_t n = static_cast<size_t>(node.id.index);
    const auto& inputs = graph_.tensor_inputs(node.id);
    current_node_ = node.id.index;
    EnterRegionOf(node);
    op_input_dtype.clear();
    const AutocastClass autocast_class = autocast ? backend_.Autocast(node.kind) : AutocastClass::kNone;
    const bool casts_inputs =
        autocast_class == AutocastClass::kLowerPrecision || autocast_class == AutocastClass::kFp32;
    const DType cast_to = autocast_class == AutocastClass::kLowerPrecision ? low : DType::kF32;
    if (casts_inputs) {
      for (ValueId in : inputs) {
        if (IsFloating(out_.value_dtypes[static_cast<size_t>(in.index)]))
          op_input_dtype.emplace_back(in.index, cast_to);
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

    // Outputs that own new storage. aten::to allocates exactly when the simulated dtypes differ.
    for (ValueId out : node.outputs) {
      const auto& v = graph_.value(out);
      const ValueId root = graph_.StorageRoot(out);
      bool owns = !v.alias_of.valid();
      if (node.kind == "aten::to" && !inputs.empty()) {
        const DType in_d = out_.value_dtypes[static_cast<size_t>(inputs[0].index)];
        const DType out_d = out_.value_dtypes[static_cast<size_t>(out.index)];
        owns = in_d != out_d || !v.alias_of.valid();
        if (owns && v.alias_of.valid()) {
          storage_of_[static_cast<size_t>(out.index)] = NewStorage(
              Bytes(out), ActivationCategory(node), [&] { return v.name + " = " + node.kind; }, node.id.index);
          continue;
        }
      }
      if (owns) {
        storage_of_[static_cast<size_t>(out.index)] = NewStorage(
            StorageBytes(out), ActivationCategory(node), [&] { return v.name + " = " + node.kind; }, node.id.index);
      } else {
        // A view shares the storage of the tensor it views (the first input), which may be a simulated cast copy
        // rather than the IR's storage root.
        const bool views_input = !inputs.empty() && graph_.StorageRoot(inputs[0]) == root;
        const int64_t s = storage_of_[static_cast<size_t>((views_input ? inputs[0] : root).index)];
        storage_of_[static_cast<size_t>(out.index)] = s;
        if (s >= 0) Ref(s);
      }
    }
    // Extra buffers.
    for (const auto& extra : rule->forward_extra) {
      const int64_t s = NewStorage(
          extra.bytes, extra.saved ? ActivationCategory(node) : MemoryCategory::kTransient,
          [&] { return node.kind + (extra.saved ? " saved buffer" : " workspace"); }, node.id.index);
      if (extra.saved) {
        saved_[n].push_back(s);
      } else {
        op_temporaries.push_back(s);
      }
    }
    // Saved tensors (their autocast copies when the op saw copies). Only ops on the gradient path save anything.
    bool on_grad_path = false;
    for (ValueId out : node.outputs) on_grad_path |= graph_.value(out).requires_grad;
    if (on_grad_path) {
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
    } else {
      for (int64_t s : saved_[n]) Unref(s, node.id.index);  // extra buffers nobody will read
      saved_[n].clear();
    }
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
    for (ValueId v : released_after[n]) Unref(storage_of_[static_cast<size_t>(v.index)], node.id.index);
  }
  current_node_ = -1;
  LeaveRegion();
  // Leaving the autocast region clears the weight-cast cache.
  for (const auto& [value, s] : weight_cast_cache) Unref(s, -1);
}

void StepBuilder::Backward() {
  phase_ = Phase::kBackward;
  const auto& nodes = graph_.nodes();
  const ValueId loss = graph_.loss();
  // loss.backward() seeds with ones_like(loss); the interpreter then drops the loss value itself.
  grad_of_[static_cast<size_t>(loss.index)] = NewStorage(Bytes(loss), MemoryCategory::kActivationGrads, "d loss", -1);
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    const auto& node = *it;
    const size_t n = static_cast<size_t>(node.id.index);
    current_node_ = node.id.index;
    EnterRegionOf(node);
    int64_t grad_out = -1;
    for (ValueId out : node.outputs) {
      if (grad_of_[static_cast<size_t>(out.index)] >= 0) {
        grad_out = grad_of_[static_cast<size_t>(out.index)];
        break;
      }
    }
    if (grad_out < 0) continue;  // no gradient reaches this op
    const auto& rule = rules_[n];
    const auto& inputs = graph_.tensor_inputs(node.id);
    int64_t workspace = -1;
    if (rule.backward_workspace_bytes > 0) {
      workspace = NewStorage(
          rule.backward_workspace_bytes, MemoryCategory::kTransient, [&] { return node.kind + " backward"; },
          node.id.index);
    }
    int64_t parallel_workspace = -1;
    if (const int64_t extra = hooks_->ExtraTransientBytes(node, Phase::kBackward); extra > 0) {
      parallel_workspace = NewStorage(
          extra, MemoryCategory::kTransient, [&] { return node.kind + " parallel backward"; }, node.id.index);
    }
    // Hands `contribution` (one reference owned by the caller) to input `in` as (part of) its gradient.
    auto deliver = [&](ValueId in, int64_t contribution, bool transposed_weight_grad) {
      const auto& v = graph_.value(in);
      int64_t& slot = grad_of_[static_cast<size_t>(in.index)];
      if (slot < 0) {
        slot = contribution;
        if (!transposed_weight_grad && contribution != grad_out) inplace_ok_.insert(contribution);
        return;
      }
      // Note [Gradient accumulation]: the engine adds a second gradient in place only when the buffered one holds
      // the last reference to its storage (input_buffer.cpp can_accumulate_inplace). A matmul's weight gradient
      // is a transposed view of the product and fails that test, so the sum is a new tensor.
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
    if (parallel_workspace >= 0) Unref(parallel_workspace, node.id.index);
    // Output gradients and saved tensors are no longer needed.
    for (ValueId out : node.outputs) {
      int64_t& g = grad_of_[static_cast<size_t>(out.index)];
      if (g >= 0) {
        Unref(g, node.id.index);
        g = -1;
      }
    }
    for (int64_t s : saved_[n]) Unref(s, node.id.index);
    saved_[n].clear();
    // ToCopyBackward of each autocast copy: a fresh tensor in the input's dtype.
    for (const auto& pending : pending_casts) {
      const int64_t contribution = NewStorage(
          Bytes(pending.in), Trainable(pending.in) ? MemoryCategory::kGradients : MemoryCategory::kActivationGrads,
          [&] { return "d " + graph_.value(pending.in).name; }, node.id.index);
      Unref(pending.copy_grad, node.id.index);
      deliver(pending.in, CollectiveCopy(node, pending.input, contribution), false);
    }
  }
  current_node_ = -1;
  LeaveRegion();
  // Saved tensors of ops no gradient reached, and the loss value, go when the graph is freed.
  for (size_t n = 0; n < saved_.size(); ++n) {
    for (int64_t s : saved_[n]) Unref(s, -1);
    saved_[n].clear();
  }
  Unref(storage_of_[static_cast<size_t>(loss.index)], -1);
  hooks_->OnBackwardEnd(*this);
}

void StepBuilder::OptimizerStep() {
  phase_ = Phase::kOptimizer;
  AdamTemporaries();
  hooks_->OnOptimizerStepEnd(*this);
}

void StepBuilder::AdamTemporaries() {
  if (config_.optimizer != OptimizerKind::kAdamW) return;  // SGD momentum updates in place
  std::vector<std::pair<std::string, int64_t>> params;
  for (const Parameter* p : OptimizedParams()) {
    const int64_t bytes = hooks_->OptimizedBytes(*p, Bytes(p->value));
    if (bytes > 0) params.emplace_back(p->name, bytes);
  }
  if (backend_.optimizer == OptimizerImpl::kForeach) {
    // _multi_tensor_adamw: exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs) for the whole group, freed after addcdiv_.
    std::vector<int64_t> sqrt_copies;
    for (const auto& [name, bytes] : params) {
      sqrt_copies.push_back(NewStorage(
          bytes, MemoryCategory::kTransient, [&] { return name + " sqrt(exp_avg_sq)"; }, -1));
    }
    for (int64_t s : sqrt_copies) Unref(s, -1);
  } else {
    // torch::optim::AdamW: denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps): the sqrt temporary and
    // the quotient are alive together; the quotient (denom) lives until addcdiv_.
    for (const auto& [name, bytes] : params) {
      const int64_t sqrt_tmp = NewStorage(
          bytes, MemoryCategory::kTransient, [&] { return name + " sqrt(exp_avg_sq)"; }, -1);
      const int64_t denom = NewStorage(bytes, MemoryCategory::kTransient, [&] { return name + " denom"; }, -1);
      Unref(sqrt_tmp, -1);
      Unref(denom, -1);
    }
  }
}

StepSimulation StepBuilder::Run() {
  out_.value_dtypes = SimulatedDTypes(graph_, config_.precision, config_.lifetimes, backend_);
  Setup();
  Forward();
  Backward();
  OptimizerStep();
  return std::move(out_);
}

}  // namespace

StepSimulation SimulateTrainingStep(const Graph& graph, const TrainingConfig& config, StepHooks* hooks) {
  StepBuilder builder(graph, config, hooks);
  return builder.Run();
}

}  // namespace llmem::sim
