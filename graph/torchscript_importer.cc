#include "graph/torchscript_importer.h"

#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "graph/eager_attention.h"
#include "graph/error.h"
#include "graph/json_record.h"
#include "graph/hf_generation_mask.h"
#include "graph/index_ranges.h"
#include "graph/meta_kernels.h"
#include "graph/meta_run.h"
#include "graph/model_file_check.h"

namespace llmem {
namespace {

std::string ErrorText(const c10::Error& e) { return BriefLoaderReason(e.what_without_backtrace()); }

// Replaces every tensor slot of the module tree with an empty meta tensor of the same shape, strides and dtype
// (or `float_dtype` for floating tensors, like Module::to(dtype)), keeping parameters trainable. Records names.
struct SlotMoves {
  MetaSlots names;                                                       // meta tensor -> slot
  std::unordered_map<const c10::StorageImpl*, std::pair<at::Tensor, at::Tensor>> by_storage;  // original -> meta
  std::vector<at::Tensor> all;                                           // every distinct meta tensor, in order
  std::map<std::string, at::ScalarType>* original_dtypes = nullptr;       // slot name -> dtype in the file
};

void MoveSlotsToMeta(const c10::intrusive_ptr<c10::ivalue::Object>& obj, const std::string& prefix,
                     std::optional<at::ScalarType> float_dtype, SlotMoves& slots) {
  const auto& type = obj->type();
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    const std::string attr = type->getAttributeName(i);
    const std::string name = prefix.empty() ? attr : prefix + "." + attr;
    c10::IValue slot = obj->getSlot(i);
    if (slot.isTensor()) {
      at::Tensor t = slot.toTensor();
      if (!t.defined()) continue;
      const c10::StorageImpl* storage = t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
      auto seen = storage ? slots.by_storage.find(storage) : slots.by_storage.end();
      if (seen != slots.by_storage.end()) {
        // A tied weight: the same storage under a second name (serialization may give it its own tensor object).
        const auto& [original, meta] = seen->second;
        if (original.sizes() == t.sizes() && original.strides() == t.strides() &&
            original.storage_offset() == t.storage_offset()) {
          obj->setSlot(i, meta);
        } else {
          obj->setSlot(i, meta.detach().as_strided(t.sizes(), t.strides(), t.storage_offset()));
        }
        continue;
      }
      // The dtype the file stored; earlier runs may have converted the slot already.
      auto original = slots.original_dtypes->emplace(name, t.scalar_type()).first->second;
      auto dtype = original;
      if (float_dtype && at::isFloatingType(dtype)) dtype = *float_dtype;
      at::Tensor meta = at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta).dtype(dtype));
      const bool is_param = type->is_parameter(i);
      if (is_param && at::isFloatingType(dtype)) meta.set_requires_grad(true);
      obj->setSlot(i, meta);
      slots.names[meta.unsafeGetTensorImpl()] = MetaSlot{name, is_param};
      if (storage) slots.by_storage[storage] = {t, meta};
      slots.all.push_back(meta);
    } else if (slot.isObject()) {
      auto child = slot.toObject();
      if (child->type()->is_module()) MoveSlotsToMeta(child, name, float_dtype, slots);
    }
  }
}

// Appends `obj` (a module at `name`) and its descendants to `tree` in nn.Module's order; `seen` maps a storage
// to the first parameter or buffer name that holds it (a tied weight's second name points there).
void AddModules(const c10::intrusive_ptr<c10::ivalue::Object>& obj, const std::string& name, ModuleTree& tree,
                std::unordered_map<const c10::StorageImpl*, std::string>& seen) {
  const auto& type = obj->type();
  const int index = static_cast<int>(tree.modules.size());
  tree.modules.push_back({});
  tree.modules.back().name = name;
  tree.modules.back().class_name = type->name() ? type->name()->name() : "";
  std::vector<ModuleTensor> params, buffers;
  std::vector<std::pair<std::string, c10::intrusive_ptr<c10::ivalue::Object>>> children;
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    const std::string attr = type->getAttributeName(i);
    const std::string full = name.empty() ? attr : name + "." + attr;
    const c10::IValue slot = obj->getSlot(i);
    if (slot.isTensor() && (type->is_parameter(i) || type->is_buffer(i))) {
      const at::Tensor t = slot.toTensor();
      if (!t.defined()) continue;
      ModuleTensor mt{full, t.numel(), FromScalarType(t.scalar_type()), type->is_parameter(i), ""};
      if (t.has_storage()) {
        const auto [it, added] = seen.emplace(t.storage().unsafeGetStorageImpl(), full);
        if (!added) mt.tied_to = it->second;
      }
      (mt.is_parameter ? params : buffers).push_back(std::move(mt));
    } else if (slot.isObject() && slot.toObject()->type()->is_module()) {
      children.emplace_back(full, slot.toObject());
    }
  }
  tree.modules[static_cast<size_t>(index)].tensors = std::move(params);
  auto& own = tree.modules[static_cast<size_t>(index)].tensors;
  own.insert(own.end(), buffers.begin(), buffers.end());
  for (const auto& [child_name, child] : children) {
    tree.modules[static_cast<size_t>(index)].children.push_back(static_cast<int>(tree.modules.size()));
    AddModules(child, child_name, tree, seen);
  }
}

std::string ClassName(const c10::intrusive_ptr<c10::ivalue::Object>& obj) {
  const auto name = obj->type()->name();
  return name ? name->name() : "";
}

// Module path of an inlined node, from its call stack. TorchScript flattens containers (ModuleList children show
// up as "3", not "layers.3"), so each step is resolved against the real module tree, going one level down through
// a container when the instance is not a direct child.
// With `calls` and `op`: per component depth of the path where a child's call starts, op->temporary_calls says
// whether that call is nested in an expression of its parent's forward, op->rebindings how the parent drops it.
std::string ModulePath(const torch::jit::Node* node, const torch::jit::Module& root,
                       const ExportRecords* calls = nullptr, OpNode* op = nullptr) {
  auto cs = node->callstack();
  if (!cs) return "";
  std::string path;
  size_t depth = 0;  // components of `path`
  c10::intrusive_ptr<c10::ivalue::Object> cur = root._ivalue();
  for (const auto& entry : (*cs)->vec()) {
    const auto& info = std::get<2>(entry);
    if (!info) continue;
    const std::string& inst = info->instance_name();
    auto type = cur->type();
    auto child_slot = type->findAttributeSlot(inst);
    std::string step;
    c10::intrusive_ptr<c10::ivalue::Object> next;
    if (child_slot && cur->getSlot(*child_slot).isObject()) {
      next = cur->getSlot(*child_slot).toObject();
      step = inst;
    } else {
      for (size_t i = 0; i < type->numAttributes() && !next; ++i) {
        c10::IValue s = cur->getSlot(i);
        if (!s.isObject()) continue;
        auto container = s.toObject();
        auto slot = container->type()->findAttributeSlot(inst);
        if (slot && container->getSlot(*slot).isObject()) {
          next = container->getSlot(*slot).toObject();
          step = type->getAttributeName(i) + "." + inst;
        }
      }
    }
    if (!next) break;  // the call stack left the module tree (e.g. a free function); keep what we have
    if (calls && op) calls->NoteChildCall(ClassName(cur), inst, depth, *op);
    path += (path.empty() ? "" : ".") + step;
    depth += static_cast<size_t>(std::count(step.begin(), step.end(), '.')) + 1;
    cur = next;
  }
  return path;
}

// Whether the innermost module's own code ran the node: the traced source line is in the Python file of the
// module's class (`__torch__.transformers.models.opt.modeling_opt.OPTForCausalLM` -> .../models/opt/modeling_opt.py),
// not in a helper of another file (a loss function in loss_utils.py, torch.nn.functional).
bool InModuleCode(const torch::jit::Node* node) {
  const auto cs = node->callstack();
  // A loaded export's ranges point into its serialized code; the range that generated it is the traced line.
  const auto traced = node->sourceRange().findSourceRangeThatGenerated();
  const auto file_line = traced ? traced->file_line_col() : std::nullopt;
  if (!cs || !file_line) return false;
  const auto& entries = (*cs)->vec();
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {
    const auto& info = std::get<2>(*it);
    if (!info || !info->class_type() || !info->class_type()->name()) continue;
    const std::vector<std::string> atoms = info->class_type()->name()->atoms();
    std::string file;  // the atoms without "__torch__", mangling and the class name, as a path
    for (size_t i = 0; i + 1 < atoms.size(); ++i) {
      if (atoms[i] == "__torch__" || atoms[i].rfind("___torch_mangle", 0) == 0) continue;
      file += "/" + atoms[i];
    }
    file += ".py";
    const std::string& source = std::get<0>(*file_line);
    return file.size() > 4 && source.size() >= file.size() &&
           source.compare(source.size() - file.size(), file.size(), file) == 0;
  }
  return false;
}

// The module path and class of an attention op the meta run finds bidirectional (meta_run.h), in the refusal.
[[noreturn]] void RefuseBidirectionalAttention(const torch::jit::Node* node, const torch::jit::Module& root) {
  // The class of the module that calls the attention, from the inlined call stack (e.g. BertSdpaSelfAttention).
  std::string module_class;
  if (auto cs = node->callstack()) {
    for (const auto& entry : (*cs)->vec()) {
      const auto& info = std::get<2>(entry);
      if (info && info->class_type() && info->class_type()->name()) module_class = info->class_type()->name()->name();
    }
  }
  throw ModelLoadError(BidirectionalAttentionMessage(ModulePath(node, root), module_class));
}

// Per-run state of the op-by-op interpreter: what MetaRun records, and the interpreter's own.
struct Run : MetaRun {
  explicit Run(MetaSlots slots) : MetaRun(std::move(slots)) {}
  std::unordered_map<const torch::jit::Value*, c10::IValue> env;
  // Per IR value an op made: the TorchScript node and the index of its output (null for inputs and parameters).
  std::vector<std::pair<const torch::jit::Node*, size_t>> origin;
  // A generation run's extra inputs (the attention mask, then the cache entries read) and the cache's names.
  std::vector<ValueId> generation_inputs;
  std::array<std::vector<std::string>, 2> past_names, present_names;  // keys, values
};

// What a generation forward replaces in the training forward's run (Note [Eager attention sites]), keyed by the
// TorchScript node whose output it replaces.
struct GenerationSubstitution {
  enum class Kind : uint8_t { kKeys, kValues, kModelMask, kAttentionMask };
  Kind kind;
  size_t output = 0;
};
struct GenerationSubstitutions {
  int64_t past_tokens = 0;
  std::unordered_map<const torch::jit::Node*, std::vector<GenerationSubstitution>> at;
};

}  // namespace

struct TorchScriptModel::Impl {
  std::string path;
  torch::jit::Module module;
  std::shared_ptr<torch::jit::Graph> graph;  // inlined copy of forward
  mutable std::map<std::string, at::ScalarType> original_dtypes;  // filled by the first run
  ModuleTree module_tree;                                           // as loaded
  ExportRecords records;  // what the export's extra files say
  // aten::to nodes of `graph` whose target under autocast is autocast's 16-bit dtype (from the export).
  std::unordered_set<const torch::jit::Node*> autocast_dtype_casts;

  // Reads which casts of `graph` follow autocast's dtype (the export's autocast trace); nothing when it has none.
  void ReadAutocastCasts(const std::string& text);
  // The position limit of a run at `seq`, after refusing a sequence past it (meta_run.h CheckPositions).
  std::optional<PositionLimit> CheckPositions(const Run& run, int64_t seq) const {
    return llmem::CheckPositions(run.bounded_lookups, seq, records.max_positions_override, records.max_positions,
                                 records.model_type);
  }

  // Executes the graph on meta and records the IR. `float_dtype` converts floating weights first; `generation`
  // replaces what a forward with a key/value cache computes differently.
  Run Execute(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype,
              const GenerationSubstitutions* generation = nullptr) const;
  // Both runs (fp32 and 16-bit weights) as one graph; `origins`, when given, receives the first run's value origins.
  Graph BuildUnguarded(int64_t batch, int64_t seq, const GenerationSubstitutions* generation,
                       std::vector<std::pair<const torch::jit::Node*, size_t>>* origins) const;
  Graph Build(int64_t batch, int64_t seq, const GenerationSubstitutions* generation,
              std::vector<std::pair<const torch::jit::Node*, size_t>>* origins) const;
};

TorchScriptModel::TorchScriptModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TorchScriptModel::TorchScriptModel(TorchScriptModel&&) noexcept = default;
TorchScriptModel& TorchScriptModel::operator=(TorchScriptModel&&) noexcept = default;
TorchScriptModel::~TorchScriptModel() = default;
const std::string& TorchScriptModel::path() const { return impl_->path; }
const ModuleTree& TorchScriptModel::module_tree() const { return impl_->module_tree; }
const ExportRecords& TorchScriptModel::records() const { return impl_->records; }
ExportRecords& TorchScriptModel::mutable_records() { return impl_->records; }

namespace {

// The nodes of a block and of its sub-blocks, in graph order (each node before the nodes of its blocks).
void CollectNodes(const torch::jit::Block* block, const torch::jit::Symbol kind,
                  std::vector<const torch::jit::Node*>& out) {
  for (const torch::jit::Node* node : block->nodes()) {
    if (node->kind() == kind) out.push_back(node);
    for (const torch::jit::Block* sub : node->blocks()) CollectNodes(sub, kind, out);
  }
}

}  // namespace

void TorchScriptModel::Impl::ReadAutocastCasts(const std::string& text) {
  if (text.empty()) return;
  const std::string where = std::string(kAutocastCastsFile) + " of " + path;
  const nlohmann::json record = ParseJsonRecord(text, where);
  const auto targets = record.is_object() ? record.find("to_autocast_dtype") : record.end();
  if (targets == record.end() || !targets->is_array()) {
    throw ModelLoadError(where + " has no to_autocast_dtype list");
  }
  std::vector<const torch::jit::Node*> casts;
  CollectNodes(graph->block(), c10::aten::to, casts);
  if (targets->size() != casts.size()) {
    throw ModelLoadError(where + " describes " + std::to_string(targets->size()) + " casts, the graph has " +
                         std::to_string(casts.size()) + " (re-export the model)");
  }
  for (size_t i = 0; i < casts.size(); ++i) {
    if ((*targets)[i].is_boolean() && (*targets)[i].get<bool>()) autocast_dtype_casts.insert(casts[i]);
  }
}

TorchScriptModel TorchScriptModel::Load(const std::string& path) {
  // LibTorch reads parts of a loaded module lazily (its debug records, its attributes' types): a damaged part
  // surfaces as a c10::Error after torch::jit::load returned.
  try {
    return LoadUnguarded(path);
  } catch (const c10::Error& e) {
    throw ModelLoadError("not a readable TorchScript file: " + path + " is damaged (" +
                         BriefLoaderReason(e.what_without_backtrace()) + ")");
  }
}

TorchScriptModel TorchScriptModel::LoadUnguarded(const std::string& path) {
  EnsureMetaKernelsRegistered();
  CheckModelFileReadable(path);
  CheckModelArchive(path);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  // models/export_hf.py stores the Hugging Face config beside the code (the only source of a RoPE model's limit).
  torch::jit::ExtraFilesMap extra_files{{kConfigFile, ""}, {kAutocastCastsFile, ""}, {kExpressionCallsFile, ""},
                                        {kRebindingsFile, ""}};
  try {
    // No map_location: weight-free exports hold meta tensors already; small CPU exports are moved to meta below.
    impl->module = torch::jit::load(path, std::nullopt, extra_files);
  } catch (const c10::Error& e) {
    throw ModelLoadError(DescribeUnloadableModelFile(path, e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw ModelLoadError(DescribeUnloadableModelFile(path, e.what()));
  }
  impl->records.ReadConfig(extra_files[kConfigFile], path);
  {
    std::unordered_map<const c10::StorageImpl*, std::string> seen;
    AddModules(impl->module._ivalue(), "", impl->module_tree, seen);
  }
  auto method = impl->module.find_method("forward");
  if (!method) throw ModelLoadError("not a decoder LM: " + path + " has no forward method");
  impl->graph = method->graph()->copy();
  torch::jit::Inline(*impl->graph);
  // inputs: self, input_ids, labels
  if (impl->graph->inputs().size() != 3) {
    throw ModelLoadError("not a decoder LM: forward must take (input_ids, labels), found " +
                         std::to_string(impl->graph->inputs().size() - 1) + " inputs in " + path);
  }
  if (impl->graph->outputs().size() != 1) {
    throw ModelLoadError("not a decoder LM: forward must return the loss tensor in " + path);
  }
  impl->ReadAutocastCasts(extra_files[kAutocastCastsFile]);
  impl->records.ReadExpressionCalls(extra_files[kExpressionCallsFile], path);
  impl->records.ReadRebindings(extra_files[kRebindingsFile], path);
  return TorchScriptModel(std::move(impl));
}

Run TorchScriptModel::Impl::Execute(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype,
                                    const GenerationSubstitutions* generation) const {
  using torch::jit::Node;
  using torch::jit::Value;
  // Slots are replaced in place (a clone would untie tied weights); after the first run they are meta already, so
  // the loaded weights are released and later runs only change dtypes.
  const torch::jit::Module& mod = module;
  SlotMoves slots;
  slots.original_dtypes = &original_dtypes;
  MoveSlotsToMeta(mod._ivalue(), "", float_dtype, slots);
  Run run(std::move(slots.names));
  IndexRanges& ranges = run.ranges;
  auto M = at::TensorOptions().device(at::kMeta).dtype(at::kLong);
  CheckedMul(CheckedMul(batch, seq, "the token ids"), 8, "the token ids");
  at::Tensor ids = at::empty({batch, seq}, M);
  at::Tensor labels = at::empty({batch, seq}, M);
  run.env[graph->inputs()[0]] = mod._ivalue();
  run.env[graph->inputs()[1]] = ids;
  run.env[graph->inputs()[2]] = labels;
  // The graph inputs are values 0 and 1 (BuildGraph relies on that).
  run.NewValue(ValueRole::kInput, ids, NodeId{}, "input_ids");
  run.NewValue(ValueRole::kInput, labels, NodeId{}, "labels");

  // Scripted modules keep Python's control flow. Conditions and trip counts that the meta run knows (None checks,
  // flags, sizes) are followed like the TorchScript interpreter does; one that needs tensor data fails in the op
  // that reads the data (e.g. aten::Bool on a meta tensor).
  // An op the generation forward runs that the training forward does not: made in `at`'s module, by its code.
  auto emit = [&](const OpNode& site, const char* kind, const std::vector<c10::IValue>& args, const at::Tensor& out,
                  const std::string& name) {
    OpNode op;
    op.kind = kind;
    op.scope = site.scope;
    op.in_module_code = true;
    op.temporary_calls = site.temporary_calls;
    op.rebindings = site.rebindings;
    const ValueId made = run.AddNode(std::move(op), args, {c10::IValue(out)})[0];
    if (!name.empty()) run.values[static_cast<size_t>(made.index)].name = name;
  };
  // generate()'s attention mask, [B, past + S] int64 ones: an input of the generation forward, made once.
  at::Tensor attention_mask;
  auto generation_attention_mask = [&]() {
    if (!attention_mask.defined()) {
      attention_mask = at::empty({batch, generation->past_tokens + seq}, at::TensorOptions().device(at::kMeta).dtype(at::kLong));
      run.generation_inputs.push_back(run.NewValue(ValueRole::kInput, attention_mask, NodeId{}, "attention_mask"));
    }
    return attention_mask;
  };
  // Replaces the output `sub.output` of `node` (just run and recorded) by what the generation forward has there.
  auto substitute = [&](const GenerationSubstitution& sub, const Node* node) {
    const OpNode site = run.nodes.back();
    c10::IValue& slot = run.env[node->outputs()[sub.output]];
    using Kind = GenerationSubstitution::Kind;
    if (sub.kind == Kind::kAttentionMask) {
      slot = generation_attention_mask();
      return;
    }
    if (sub.kind == Kind::kModelMask) {
      const at::ScalarType dtype = slot.toTensor().scalar_type();
      slot = MakeHfGenerationMask(
          [&](const char* kind, const std::vector<c10::IValue>& args, const at::Tensor& out) {
            emit(site, kind, args, out, "");
          },
          batch, seq, generation->past_tokens, dtype, generation_attention_mask());
      return;
    }
    // DynamicLayer.update: torch.cat([cached, new], dim=-2), the cached entry a forward input (none in a prefill).
    const int which = sub.kind == Kind::kKeys ? 0 : 1;
    const std::string what = std::string(which == 0 ? "keys" : "values") + " of " + site.scope;
    const at::Tensor fresh = slot.toTensor();
    std::vector<at::Tensor> parts;
    if (generation->past_tokens > 0) {
      std::vector<int64_t> sizes = fresh.sizes().vec();
      sizes[2] = generation->past_tokens;
      parts.push_back(at::empty(sizes, fresh.options()));
      // An activation, not an input: DynamicLayer.update rebinds self.keys to the cat, which frees the entry.
      run.generation_inputs.push_back(run.NewValue(ValueRole::kActivation, parts.back(), NodeId{}, "cached " + what));
      run.past_names[static_cast<size_t>(which)].push_back("cached " + what);
    }
    parts.push_back(fresh);
    const at::Tensor cat = at::cat(parts, 2);
    emit(site, "aten::cat", {c10::IValue(parts), c10::IValue(int64_t{-2})}, cat, "cache " + what);
    run.present_names[static_cast<size_t>(which)].push_back("cache " + what);
    slot = cat;
  };

  std::function<void(const torch::jit::Block*)> run_block;
  auto bool_condition = [&](const Value* v, const char* what) {
    const c10::IValue& cond = run.env.at(v);
    if (!cond.isBool()) {
      throw ModelLoadError(std::string("unsupported ") + what + " condition of type " + cond.tagKind() +
                           " in the forward graph");
    }
    return cond.toBool();
  };
  auto run_if = [&](const Node* node) {
    const torch::jit::Block* taken = node->blocks()[bool_condition(node->input(0), "prim::If") ? 0 : 1];
    run_block(taken);
    for (size_t i = 0; i < node->outputs().size(); ++i) run.env[node->outputs()[i]] = run.env.at(taken->outputs()[i]);
  };
  // prim::Loop(max_trip_count, initial_condition, carried...): the body takes (trip, carried...) and returns
  // (condition, carried...); the node's outputs are the carried values after the last trip.
  auto run_loop = [&](const Node* node) {
    const torch::jit::Block* body = node->blocks()[0];
    const int64_t max_trips = run.env.at(node->input(0)).toInt();
    bool go_on = bool_condition(node->input(1), "prim::Loop");
    std::vector<c10::IValue> carried;
    for (size_t i = 2; i < node->inputs().size(); ++i) carried.push_back(run.env.at(node->input(i)));
    for (int64_t trip = 0; trip < max_trips && go_on; ++trip) {
      run.env[body->inputs()[0]] = c10::IValue(trip);
      for (size_t i = 0; i < carried.size(); ++i) run.env[body->inputs()[i + 1]] = carried[i];
      run_block(body);
      go_on = bool_condition(body->outputs()[0], "prim::Loop");
      for (size_t i = 0; i < carried.size(); ++i) carried[i] = run.env.at(body->outputs()[i + 1]);
    }
    for (size_t i = 0; i < carried.size(); ++i) run.env[node->outputs()[i]] = carried[i];
  };
  run_block = [&](const torch::jit::Block* block) {
    for (const Node* node : block->nodes()) {
      const auto kind = node->kind();
      if (kind == c10::prim::Constant) {
        auto iv = torch::jit::toIValue(node->output());
        if (!iv) {
          // Scripted modules keep constants without an IValue, e.g. the Function a call was inlined from.
          if (node->output()->uses().empty()) continue;
          throw ModelLoadError("unsupported constant of type " + node->output()->type()->str() +
                               " in the forward graph");
        }
        if (iv->isDevice()) {
          iv = c10::IValue(c10::Device(at::kMeta));  // traced files bake the export device in
        } else if (iv->isTensor() && iv->toTensor().defined() && iv->toTensor().dim() > 0) {
          iv = c10::IValue(iv->toTensor().to(at::kMeta));
        }
        run.env[node->output()] = *iv;
        continue;
      }
      if (kind == c10::prim::GetAttr) {
        const auto& obj = run.env.at(node->input());
        run.env[node->output()] = obj.toObject()->getAttr(node->s(c10::attr::name));
        continue;
      }
      if (kind == c10::prim::If) {
        run_if(node);
        continue;
      }
      if (kind == c10::prim::Loop) {
        run_loop(node);
        continue;
      }
      if (kind == c10::prim::CallMethod || kind == c10::prim::CallFunction) {
        throw ModelLoadError(std::string("unsupported call ") + kind.toQualString() +
                             " left in the inlined forward graph: export the model with torch.jit.trace");
      }
      torch::jit::Stack stack;
      for (const Value* in : node->inputs()) stack.push_back(run.env.at(in));
      std::vector<c10::IValue> in_values(stack.begin(), stack.end());
      if (kind == c10::aten::scaled_dot_product_attention && IsBidirectionalAttention(in_values, ranges)) {
        RefuseBidirectionalAttention(node, mod);
      }
      try {
        // The interpreter emits these as instructions rather than registered operators.
        if (kind == c10::prim::ListConstruct) {
          c10::impl::GenericList list(node->output()->type()->expectRef<c10::ListType>().getElementType());
          for (auto& iv : stack) list.push_back(std::move(iv));
          stack.assign(1, c10::IValue(std::move(list)));
        } else if (kind == c10::prim::TupleConstruct) {
          auto tuple = c10::ivalue::Tuple::create(std::vector<c10::IValue>(stack.begin(), stack.end()));
          stack.assign(1, c10::IValue(std::move(tuple)));
        } else if (kind == c10::prim::ListUnpack) {
          std::vector<c10::IValue> items(stack.back().toListRef().begin(), stack.back().toListRef().end());
          stack = std::move(items);
        } else if (kind == c10::prim::TupleUnpack) {
          std::vector<c10::IValue> items(stack.back().toTupleRef().elements().begin(),
                                         stack.back().toTupleRef().elements().end());
          stack = std::move(items);
        } else {
          torch::jit::Operation op = node->getOperation();
          op(stack);
        }
      } catch (const torch::jit::ErrorReport& e) {
        throw ModelLoadError(std::string("op ") + kind.toQualString() +
                             " has no implementation: " + BriefLoaderReason(e.what()));
      } catch (const c10::Error& e) {
        const std::string msg = ErrorText(e);
        if (msg.find("overflow") != std::string::npos) {
          throw ConfigError("batch " + std::to_string(batch) + " x sequence " + std::to_string(seq) +
                            " is too large: " + msg);
        }
        // An op that fails on a sequence past the positions (a mask buffer sized like the table, as GPT-Neo's):
        // the position limit is the reason.
        CheckPositions(run, seq);
        throw ModelLoadError(std::string("op ") + kind.toQualString() + " failed while tracing shapes on meta: " + msg);
      } catch (const std::exception& e) {
        // e.g. prim::RaiseException of a scripted forward (torch::jit::JITException)
        throw ModelLoadError(std::string("op ") + kind.toQualString() + " failed while tracing shapes on meta: " +
                             BriefLoaderReason(e.what()));
      }
      LLMEM_CHECK(stack.size() == node->outputs().size()) << kind.toQualString();
      for (size_t i = 0; i < stack.size(); ++i) run.env[node->outputs()[i]] = stack[i];
      ranges.Observe(node, in_values, stack);
      if (kind == c10::aten::embedding || kind == c10::aten::index) {
        run.ObserveLookup(kind.toQualString(), in_values, ModulePath(node, mod));
      }

      const bool is_aten = kind.is_aten();
      bool has_tensor_out = false;
      for (const auto& iv : stack) has_tensor_out |= iv.isTensor() || iv.isTensorList();
      // Pure routing (prim list/tuple ops) and shape queries create no IR op; their tensors keep their identity.
      if (!is_aten || !has_tensor_out) continue;
      // Arithmetic on CPU scalars: a trace records Python's size arithmetic (`seq // heads`) as ops on 0-dim CPU
      // tensors, where eager computes Python numbers; nothing of it is device memory. A result a later op reads is
      // a constant there, as the trace's other scalars are.
      const auto cpu_scalar = [](const c10::IValue& v) {
        return !v.isTensor() || !v.toTensor().defined() || (v.toTensor().dim() == 0 && v.toTensor().is_cpu());
      };
      if (std::all_of(stack.begin(), stack.end(), cpu_scalar) &&
          std::all_of(in_values.begin(), in_values.end(), cpu_scalar)) {
        continue;
      }

      if (run.IsNoOpView(kind.toQualString(), in_values, stack)) continue;
      OpNode op;
      op.kind = kind.toQualString();
      op.scope = ModulePath(node, mod, &records, &op);
      op.in_module_code = InModuleCode(node);
      op.to_autocast_dtype = autocast_dtype_casts.count(node) > 0;
      const std::vector<ValueId> made = run.AddNode(std::move(op), in_values, stack);
      for (size_t i = 0; i < made.size(); ++i) {
        if (!made[i].valid()) continue;
        run.origin.resize(std::max(run.origin.size(), static_cast<size_t>(made[i].index) + 1));
        run.origin[static_cast<size_t>(made[i].index)] = {node, i};
      }
      if (generation) {
        if (const auto it = generation->at.find(node); it != generation->at.end()) {
          for (const GenerationSubstitution& sub : it->second) substitute(sub, node);
        }
      }
    }
  };
  run_block(graph->block());

  run.Finish(slots.all, run.env.at(graph->outputs()[0]));
  return run;
}

Graph TorchScriptModel::BuildGraph(int64_t batch, int64_t seq) const {
  return impl_->Build(batch, seq, nullptr, nullptr);
}


Graph TorchScriptModel::BuildGenerationGraph(int64_t batch, int64_t tokens, int64_t past_tokens) const {
  if (past_tokens < 0) throw ConfigError("the cached tokens cannot be negative");
  std::vector<std::pair<const torch::jit::Node*, size_t>> origins;
  Graph training = impl_->Build(batch, tokens, nullptr, &origins);
  const EagerAttentionSites sites = FindEagerAttention(training);
  if (sites.layers.empty()) return training;  // scaled_dot_product_attention: graph/generation_forward.h adds the cache
  GenerationSubstitutions subs;
  subs.past_tokens = past_tokens;
  const auto replace = [&](ValueId v, GenerationSubstitution::Kind kind) {
    const auto& [node, output] = origins.at(static_cast<size_t>(v.index));
    if (!node) throw ConfigError("generation: " + training.value(v).name + " is not made by an op");
    subs.at[node].push_back({kind, output});
  };
  for (const EagerAttention& a : sites.layers) {
    replace(a.keys, GenerationSubstitution::Kind::kKeys);
    replace(a.values, GenerationSubstitution::Kind::kValues);
  }
  // A forward that makes its own attention mask builds its mask (and BLOOM's alibi) from it: generate()'s mask of
  // the whole context replaces it. Otherwise the model's mask, made without one, is remade as with one.
  if (sites.attention_mask.valid()) {
    replace(sites.attention_mask, GenerationSubstitution::Kind::kAttentionMask);
  } else if (sites.model_mask.valid()) {
    replace(sites.model_mask, GenerationSubstitution::Kind::kModelMask);
  }
  return impl_->Build(batch, tokens, &subs, nullptr);
}

Graph TorchScriptModel::Impl::Build(int64_t batch, int64_t seq, const GenerationSubstitutions* generation,
                                    std::vector<std::pair<const torch::jit::Node*, size_t>>* origins) const {
  // The debug records (code/*.debug_pkl) are unpickled when a node's source is first asked for: damaged ones fail
  // here, not in torch::jit::load.
  try {
    return BuildUnguarded(batch, seq, generation, origins);
  } catch (const c10::Error& e) {
    throw ModelLoadError("not a readable TorchScript file: " + path + " is damaged (" +
                         BriefLoaderReason(e.what_without_backtrace()) + ")");
  }
}

Graph TorchScriptModel::Impl::BuildUnguarded(int64_t batch, int64_t seq, const GenerationSubstitutions* generation,
                                             std::vector<std::pair<const torch::jit::Node*, size_t>>* origins) const {
  if (batch <= 0) throw ConfigError("batch size must be positive, got " + std::to_string(batch));
  if (seq <= 0) throw ConfigError("sequence length must be positive, got " + std::to_string(seq));
  CheckedMul(batch, seq, "batch x sequence");
  c10::InferenceMode guard(false);
  torch::AutoGradMode grad_mode(true);

  Run run = Execute(batch, seq, std::nullopt, generation);
  std::optional<PositionLimit> position_limit = CheckPositions(run, seq);
  // Second run with 16-bit weights: values whose dtype changes follow the weights; the rest are fixed by an op.
  // Some traces bake fp32 dtypes in (e.g. BLOOM's alibi) and cannot run with 16-bit weights at all.
  std::optional<Run> half;
  try {
    half.emplace(Execute(batch, seq, at::kBFloat16, generation));
  } catch (const ModelLoadError&) {
  }

  std::vector<ValueId> inputs{ValueId{0}, ValueId{1}};
  inputs.insert(inputs.end(), run.generation_inputs.begin(), run.generation_inputs.end());
  if (origins) {
    *origins = run.origin;
    origins->resize(run.values.size());
  }
  std::optional<KvCacheNames> kv_cache;
  if (generation) {
    kv_cache.emplace();
    for (size_t which = 0; which < 2; ++which) {
      kv_cache->past.insert(kv_cache->past.end(), run.past_names[which].begin(), run.past_names[which].end());
      kv_cache->present.insert(kv_cache->present.end(), run.present_names[which].begin(),
                               run.present_names[which].end());
    }
  }
  Graph graph = AssembleGraph(std::move(run), half ? &*half : nullptr, std::move(inputs), batch, seq);
  graph.set_position_limit(std::move(position_limit));
  graph.set_kv_cache(std::move(kv_cache));
  return graph;
}

}  // namespace llmem
