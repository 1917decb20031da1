#include "graph/torchscript_importer.h"

#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <array>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "graph/eager_attention.h"
#include "graph/error.h"
#include "graph/hf_generation_mask.h"
#include "graph/index_ranges.h"
#include "graph/meta_kernels.h"
#include "graph/model_file_check.h"

namespace llmem {
namespace {

std::string ErrorText(const c10::Error& e) { return BriefLoaderReason(e.what_without_backtrace()); }

DType FromScalarType(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    case at::kDouble: return DType::kF64;
    case at::kLong: return DType::kI64;
    case at::kInt: return DType::kI32;
    case at::kShort: return DType::kI16;
    case at::kChar: return DType::kI8;
    case at::kByte: return DType::kU8;
    case at::kBool: return DType::kBool;
    case at::kComplexFloat: return DType::kComplex64;
    default:
      throw ModelLoadError(std::string("unsupported tensor dtype ") + c10::toString(t));
  }
}

// What the module tree says about one parameter or buffer slot.
struct SlotInfo {
  std::string name;
  bool is_parameter = false;
};

// Replaces every tensor slot of the module tree with an empty meta tensor of the same shape, strides and dtype
// (or `float_dtype` for floating tensors, like Module::to(dtype)), keeping parameters trainable. Records names.
struct MetaSlots {
  std::unordered_map<const c10::TensorImpl*, SlotInfo> names;           // meta tensor -> slot
  std::unordered_map<const c10::StorageImpl*, std::pair<at::Tensor, at::Tensor>> by_storage;  // original -> meta
  std::vector<at::Tensor> all;                                           // every distinct meta tensor, in order
  std::map<std::string, at::ScalarType>* original_dtypes = nullptr;       // slot name -> dtype in the file
};

void MoveSlotsToMeta(const c10::intrusive_ptr<c10::ivalue::Object>& obj, const std::string& prefix,
                     std::optional<at::ScalarType> float_dtype, MetaSlots& slots) {
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
      slots.names[meta.unsafeGetTensorImpl()] = SlotInfo{name, is_param};
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

// Per module class (the last atom of its TorchScript name), the children whose calls in its forward are nested in an
// expression (models/export_hf.py writes them): their results are temporaries.
using ExpressionCalls = std::map<std::string, std::set<std::string>, std::less<>>;
// Per module class, per child: how the class's forward drops the child call's result it bound to a name (the
// export's record; OpNode::rebindings).
using RebindingCalls =
    std::map<std::string, std::map<std::string, std::shared_ptr<const NameRebinding>, std::less<>>, std::less<>>;

// What the export says about the child calls of each module class's forward.
struct CallRecords {
  ExpressionCalls expression;
  RebindingCalls rebinding;
};

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
                       const CallRecords* calls = nullptr, OpNode* op = nullptr) {
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
    if (calls && op) {
      const std::string cls_name = ClassName(cur);
      const auto cls = calls->expression.find(cls_name);
      const bool nested = cls != calls->expression.end() && cls->second.count(inst) > 0;
      if (op->temporary_calls.size() <= depth) op->temporary_calls.resize(depth + 1, 0);
      op->temporary_calls[depth] = nested ? 1 : 0;
      if (const auto rb = calls->rebinding.find(cls_name); rb != calls->rebinding.end()) {
        if (const auto child = rb->second.find(inst); child != rb->second.end()) {
          if (op->rebindings.size() <= depth) op->rebindings.resize(depth + 1);
          op->rebindings[depth] = child->second;
        }
      }
    }
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

// Decoder layer index from a module path: the first "<name>.<integer>" step (a child of a container such as
// ModuleList; decoder architectures keep their layers in one).
int32_t LayerIndex(const std::string& path) {
  static const std::regex kIndexed(R"((?:^|\.)[A-Za-z_]+\.(\d+)(?:\.|$))");
  std::smatch m;
  if (std::regex_search(path, m, kIndexed)) return std::stoi(m[1].str());
  return -1;
}

// Decoder LMs attend causally: HF passes scaled_dot_product_attention is_causal=True or a causal mask. Attention
// with is_causal=False and no mask, or a mask the meta run knows to hide nothing (an additive mask of zeros, a
// bool mask of ones: BERT's mask made from an all-ones attention_mask), is bidirectional, as in encoders and
// masked LMs, whose step llmem does not model.
void RefuseBidirectionalAttention(const torch::jit::Node* node, const std::vector<c10::IValue>& args,
                                  const torch::jit::Module& root, const IndexRanges& ranges) {
  // scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
  constexpr size_t kMask = 3, kIsCausal = 5;
  if (args.size() <= kIsCausal) return;
  const bool is_causal = args[kIsCausal].isBool() && args[kIsCausal].toBool();
  if (is_causal) return;
  if (args[kMask].isTensor() && args[kMask].toTensor().defined()) {
    const at::Tensor& mask = args[kMask].toTensor();
    const auto bounds = ranges.Of(mask);
    const int64_t attend = mask.scalar_type() == at::kBool ? 1 : 0;  // the value that hides nothing
    if (!bounds || bounds->lo != attend || bounds->hi != attend) return;
  }
  const std::string scope = ModulePath(node, root);
  // The class of the module that calls the attention, from the inlined call stack (e.g. BertSdpaSelfAttention).
  std::string module_class;
  if (auto cs = node->callstack()) {
    for (const auto& entry : (*cs)->vec()) {
      const auto& info = std::get<2>(entry);
      if (info && info->class_type() && info->class_type()->name()) module_class = info->class_type()->name()->name();
    }
  }
  throw ModelLoadError("not a decoder LM: attention" + (scope.empty() ? "" : " in " + scope) +
                       (module_class.empty() ? "" : " (" + module_class + ")") +
                       " has no causal mask (scaled_dot_product_attention with is_causal=False and no mask that "
                       "hides a position): "
                       "bidirectional, as in an encoder or masked LM; llmem estimates decoder (causal) LMs");
}

// An embedding lookup whose indices the meta run bounds: they are built from sizes (positions, token types), not
// read from the input ids.
struct BoundedLookup {
  std::string table;    // the weight's dotted name
  int64_t rows = 0;     // weight.size(0)
  IndexRange indices;   // bounds of the indices at this run's sequence length
  std::string scope;    // module path of the lookup
};

// Per-run state of the op-by-op interpreter.
struct Run {
  std::unordered_map<const torch::jit::Value*, c10::IValue> env;
  std::unordered_map<const c10::TensorImpl*, ValueId> by_impl;        // tensor object -> newest IR value
  std::unordered_map<const c10::StorageImpl*, ValueId> by_storage;    // storage -> owning IR value
  std::vector<TensorValue> values;
  std::vector<OpNode> nodes;
  std::vector<Parameter> params;
  std::vector<at::Tensor> keep_alive;  // keeps storages alive so storage addresses are never reused
  std::vector<BoundedLookup> bounded_lookups;  // in execution order
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
  std::optional<int64_t> config_max_positions;  // max_position_embeddings of the config the export carries
  std::string config_model_type;                // model_type of that config ("" without one)
  std::optional<int64_t> config_sliding_window;  // its sliding_window, when the model uses one
  bool config_hybrid_layers = false;             // layer_types mixes windowed and full-attention layers
  std::optional<int64_t> max_positions_override;
  // aten::to nodes of `graph` whose target under autocast is autocast's 16-bit dtype (from the export).
  std::unordered_set<const torch::jit::Node*> autocast_dtype_casts;
  CallRecords call_records;  // from the export; empty when it has none
  std::optional<bool> config_logits_to_keep;  // whether the model's forward takes logits_to_keep
  std::optional<bool> config_eos_token;       // whether its generation config names an eos_token_id
  std::optional<bool> config_float32_logits;  // whether its forward without labels casts the logits to float32
  std::optional<bool> config_tp_plan;         // whether its config has a base_model_tp_plan
  std::optional<std::vector<std::string>> config_no_split;  // _no_split_modules
  std::optional<bool> config_bool_mask;       // whether its causal mask is masking_utils' bool one
  std::optional<TorchScriptModel::MoeRouting> config_moe;  // the routing its MoE layers were traced with

  // Reads the config the export carries (max_position_embeddings, model_type); nothing when it has none.
  void ReadConfig(const std::string& text);
  // Reads which casts of `graph` follow autocast's dtype (the export's autocast trace); nothing when it has none.
  void ReadAutocastCasts(const std::string& text);
  // Reads which child calls hand their results to an expression (the export's record); nothing when it has none.
  void ReadExpressionCalls(const std::string& text);
  // Reads how each class's forward drops the results it binds to names (the export's record); nothing without one.
  void ReadRebindings(const std::string& text);
  // The longest sequence the model allows, from the lookups of a run at `seq` and the config.
  std::optional<PositionLimit> FindPositionLimit(const Run& run, int64_t seq) const;
  // That limit, after refusing (ConfigError) a sequence past it or a lookup past its table.
  std::optional<PositionLimit> CheckPositions(const Run& run, int64_t seq) const;

  // Executes the graph on meta and records the IR. `float_dtype` converts floating weights first; `generation`
  // replaces what a forward with a key/value cache computes differently.
  Run Execute(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype,
              const GenerationSubstitutions* generation = nullptr) const;
  // Both runs (fp32 and 16-bit weights) as one graph; `origins`, when given, receives the first run's value origins.
  Graph Build(int64_t batch, int64_t seq, const GenerationSubstitutions* generation,
              std::vector<std::pair<const torch::jit::Node*, size_t>>* origins) const;
};

TorchScriptModel::TorchScriptModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TorchScriptModel::TorchScriptModel(TorchScriptModel&&) noexcept = default;
TorchScriptModel& TorchScriptModel::operator=(TorchScriptModel&&) noexcept = default;
TorchScriptModel::~TorchScriptModel() = default;
const std::string& TorchScriptModel::path() const { return impl_->path; }
std::optional<int64_t> TorchScriptModel::sliding_window() const { return impl_->config_sliding_window; }
bool TorchScriptModel::hybrid_attention_layers() const { return impl_->config_hybrid_layers; }
std::optional<bool> TorchScriptModel::logits_to_keep() const { return impl_->config_logits_to_keep; }
std::optional<bool> TorchScriptModel::eos_token() const { return impl_->config_eos_token; }
std::optional<bool> TorchScriptModel::bool_causal_mask() const { return impl_->config_bool_mask; }
std::optional<bool> TorchScriptModel::float32_logits() const { return impl_->config_float32_logits; }
std::optional<bool> TorchScriptModel::tensor_parallel_plan() const { return impl_->config_tp_plan; }
const ModuleTree& TorchScriptModel::module_tree() const { return impl_->module_tree; }
std::optional<std::vector<std::string>> TorchScriptModel::no_split_modules() const { return impl_->config_no_split; }
std::optional<TorchScriptModel::MoeRouting> TorchScriptModel::moe_routing() const { return impl_->config_moe; }

namespace {

// The extra file of an export that holds its Hugging Face config as JSON (models/export_hf.py writes it).
constexpr const char* kConfigFile = "hf_config.json";
// The extra file that says, per aten::to of the graph in graph order, whether a trace under autocast casts to
// autocast's 16-bit dtype there (true / false / null: unknown); models/export_hf.py writes it for CPU exports.
constexpr const char* kAutocastCastsFile = "autocast_casts.json";
// The extra file that says, per module class, which child calls of its forward are nested in an expression.
constexpr const char* kExpressionCallsFile = "expression_calls.json";
// The extra file of which statement rebinds the name a child call's result is bound to (models/export_hf.py).
constexpr const char* kRebindingsFile = "rebound_names.json";

// The nodes of a block and of its sub-blocks, in graph order (each node before the nodes of its blocks).
void CollectNodes(const torch::jit::Block* block, const torch::jit::Symbol kind,
                  std::vector<const torch::jit::Node*>& out) {
  for (const torch::jit::Node* node : block->nodes()) {
    if (node->kind() == kind) out.push_back(node);
    for (const torch::jit::Block* sub : node->blocks()) CollectNodes(sub, kind, out);
  }
}

}  // namespace

void TorchScriptModel::Impl::ReadConfig(const std::string& text) {
  if (text.empty()) return;
  const nlohmann::json config = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) throw ModelLoadError(std::string(kConfigFile) + " of " + path + " is not a JSON object");
  if (auto it = config.find("model_type"); it != config.end() && it->is_string()) {
    config_model_type = it->get<std::string>();
  }
  if (auto it = config.find("max_position_embeddings"); it != config.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 1) {
      throw ModelLoadError(std::string(kConfigFile) + " of " + path + ": max_position_embeddings is not a positive "
                           "integer");
    }
    config_max_positions = it->get<int64_t>();
  }
  if (auto it = config.find("logits_to_keep"); it != config.end() && it->is_boolean()) {
    config_logits_to_keep = it->get<bool>();
  }
  if (auto it = config.find("eos_token_id"); it != config.end()) config_eos_token = !it->is_null();
  if (auto it = config.find("tp_plan"); it != config.end() && it->is_boolean()) config_tp_plan = it->get<bool>();
  if (auto it = config.find("no_split_modules"); it != config.end() && it->is_array()) {
    config_no_split.emplace();
    for (const auto& c : *it) {
      if (c.is_string()) config_no_split->push_back(c.get<std::string>());
    }
  }
  if (auto it = config.find("moe_routing"); it != config.end() && it->is_object()) {
    const auto experts = it->find("experts"), top_k = it->find("top_k");
    if (experts != it->end() && top_k != it->end() && experts->is_number_integer() && top_k->is_number_integer() &&
        experts->get<int64_t>() > 0 && top_k->get<int64_t>() > 0) {
      config_moe = TorchScriptModel::MoeRouting{experts->get<int64_t>(), top_k->get<int64_t>()};
    }
  }
  if (auto it = config.find("logits_dtype"); it != config.end() && it->is_string()) {
    config_float32_logits = it->get<std::string>() == "float32";
  }
  if (auto it = config.find("causal_mask"); it != config.end() && it->is_string()) {
    config_bool_mask = it->get<std::string>() == "create_causal_mask";
  }
  // Qwen2-style configs carry a window but switch it off with use_sliding_window.
  const auto use = config.find("use_sliding_window");
  const bool off = use != config.end() && use->is_boolean() && !use->get<bool>();
  if (auto it = config.find("sliding_window"); !off && it != config.end() && it->is_number_integer()) {
    config_sliding_window = it->get<int64_t>();
  }
  // layer_types decides each layer's cache (transformers' DynamicCache(config)): a window only where a layer says so.
  if (auto it = config.find("layer_types"); it != config.end() && it->is_array() && !it->empty()) {
    size_t windowed = 0;
    for (const auto& t : *it) {
      const std::string kind = t.is_string() ? t.get<std::string>() : "";
      if (kind == "sliding_attention" || kind == "chunked_attention") ++windowed;
    }
    if (windowed == 0) config_sliding_window.reset();
    config_hybrid_layers = windowed > 0 && windowed < it->size();
  }
}

void TorchScriptModel::Impl::ReadExpressionCalls(const std::string& text) {
  if (text.empty()) return;
  const nlohmann::json record = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!record.is_object()) throw ModelLoadError(std::string(kExpressionCallsFile) + " of " + path + " is not an object");
  for (const auto& [cls, children] : record.items()) {
    if (!children.is_array()) continue;
    for (const auto& c : children) {
      if (c.is_string()) call_records.expression[cls].insert(c.get<std::string>());
    }
  }
}

void TorchScriptModel::Impl::ReadRebindings(const std::string& text) {
  if (text.empty()) return;
  const std::string where = std::string(kRebindingsFile) + " of " + path;
  const nlohmann::json record = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!record.is_object()) throw ModelLoadError(where + " is not an object");
  auto names = [&](const nlohmann::json& rule, const char* key) {
    std::vector<std::string> out;
    const auto it = rule.find(key);
    if (it == rule.end() || !it->is_array()) throw ModelLoadError(where + ": a rule has no \"" + key + "\" list");
    for (const auto& n : *it) {
      if (!n.is_string()) throw ModelLoadError(where + ": \"" + key + "\" holds a non-string");
      out.push_back(n.get<std::string>());
    }
    return out;
  };
  for (const auto& [cls, children] : record.items()) {
    if (!children.is_object()) throw ModelLoadError(where + ": the entry of " + cls + " is not an object");
    for (const auto& [child, rule] : children.items()) {
      if (!rule.is_object()) throw ModelLoadError(where + ": the rule of " + cls + "." + child + " is not an object");
      NameRebinding r;
      r.between = names(rule, "between");
      r.rebinders = names(rule, "rebinder");
      const auto several = rule.find("one_of_several");
      r.one_of_several = several != rule.end() && several->is_boolean() && several->get<bool>();
      const auto own = rule.find("own_rebindings");
      if (own != rule.end() && own->is_number_integer()) r.own_rebindings = std::max(0, own->get<int>());
      call_records.rebinding[cls][child] = std::make_shared<const NameRebinding>(std::move(r));
    }
  }
}

void TorchScriptModel::Impl::ReadAutocastCasts(const std::string& text) {
  if (text.empty()) return;
  const std::string where = std::string(kAutocastCastsFile) + " of " + path;
  const nlohmann::json record = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
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
  EnsureMetaKernelsRegistered();
  CheckModelFileReadable(path);
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
  impl->ReadConfig(extra_files[kConfigFile]);
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
  impl->ReadExpressionCalls(extra_files[kExpressionCallsFile]);
  impl->ReadRebindings(extra_files[kRebindingsFile]);
  return TorchScriptModel(std::move(impl));
}

Run TorchScriptModel::Impl::Execute(int64_t batch, int64_t seq, std::optional<at::ScalarType> float_dtype,
                                    const GenerationSubstitutions* generation) const {
  using torch::jit::Node;
  using torch::jit::Value;
  Run run;
  // Slots are replaced in place (a clone would untie tied weights); after the first run they are meta already, so
  // the loaded weights are released and later runs only change dtypes.
  const torch::jit::Module& mod = module;
  MetaSlots slots;
  slots.original_dtypes = &original_dtypes;
  MoveSlotsToMeta(mod._ivalue(), "", float_dtype, slots);
  const auto& slot_names = slots.names;

  auto new_value = [&](ValueRole role, const at::Tensor& t, NodeId producer, const std::string& name) {
    TensorValue v;
    v.id = ValueId{static_cast<int32_t>(run.values.size())};
    v.role = role;
    v.name = name.empty() ? "%" + std::to_string(v.id.index) : name;
    v.shape = t.sizes().vec();
    v.strides = t.strides().vec();
    v.dtype = FromScalarType(t.scalar_type());
    v.dtype_bf16_weights = v.dtype;
    v.requires_grad = t.requires_grad();
    v.producer = producer;
    const c10::StorageImpl* storage = t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
    auto it = storage ? run.by_storage.find(storage) : run.by_storage.end();
    if (it != run.by_storage.end()) {
      v.alias_of = it->second;
    } else {
      const int64_t bytes = t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0;
      v.storage_numel = bytes / static_cast<int64_t>(t.element_size());
      if (storage) run.by_storage[storage] = v.id;
    }
    run.by_impl[t.unsafeGetTensorImpl()] = v.id;
    run.keep_alive.push_back(t);
    run.values.push_back(std::move(v));
    return run.values.back().id;
  };

  IndexRanges ranges;  // token ids and labels have none: their values are data
  auto M = at::TensorOptions().device(at::kMeta).dtype(at::kLong);
  CheckedMul(CheckedMul(batch, seq, "the token ids"), 8, "the token ids");
  at::Tensor ids = at::empty({batch, seq}, M);
  at::Tensor labels = at::empty({batch, seq}, M);
  run.env[graph->inputs()[0]] = mod._ivalue();
  run.env[graph->inputs()[1]] = ids;
  run.env[graph->inputs()[2]] = labels;
  // The graph inputs are values 0 and 1 (BuildGraph relies on that).
  new_value(ValueRole::kInput, ids, NodeId{}, "input_ids");
  new_value(ValueRole::kInput, labels, NodeId{}, "labels");

  // Resolves a tensor seen as an op input to its IR value (parameters are registered on first sight).
  auto tensor_value = [&](const at::Tensor& t, Region region) -> ValueId {
    auto it = run.by_impl.find(t.unsafeGetTensorImpl());
    if (it != run.by_impl.end()) return it->second;
    auto slot = slot_names.find(t.unsafeGetTensorImpl());
    ValueRole role = slot != slot_names.end() ? ValueRole::kParameter : ValueRole::kInput;
    std::string name = slot != slot_names.end() ? slot->second.name : "";
    ValueId id = new_value(role, t, NodeId{}, name);
    if (role == ValueRole::kParameter) {
      auto& v = run.values[static_cast<size_t>(id.index)];
      Parameter p;
      p.name = name;
      p.shape = v.shape;
      p.dtype = v.dtype;
      p.bytes = ShapeBytes(v.shape, v.dtype);
      p.trainable = slot->second.is_parameter && t.requires_grad();
      p.value = id;
      p.region = region;
      v.param = static_cast<int32_t>(run.params.size());
      run.params.push_back(std::move(p));
    } else {
      // A tensor constant baked into the trace.
      run.values[static_cast<size_t>(id.index)].name = "const%" + std::to_string(id.index);
    }
    return id;
  };

  auto to_arg = [&](const c10::IValue& iv, Region region) {
    OpArg a;
    if (iv.isTensor()) {
      a.kind = OpArg::Kind::kTensor;
      if (iv.toTensor().defined()) a.tensors.push_back(tensor_value(iv.toTensor(), region));
      else a.kind = OpArg::Kind::kNone;
    } else if (iv.isTensorList()) {
      a.kind = OpArg::Kind::kTensorList;
      for (const at::Tensor& t : iv.toTensorVector()) a.tensors.push_back(tensor_value(t, region));
    } else if (iv.isBool()) {
      a.kind = OpArg::Kind::kBool;
      a.int_value = iv.toBool() ? 1 : 0;
    } else if (iv.isInt()) {
      a.kind = OpArg::Kind::kInt;
      a.int_value = iv.toInt();
    } else if (iv.isDouble()) {
      a.kind = OpArg::Kind::kDouble;
      a.double_value = iv.toDouble();
    } else if (iv.isIntList()) {
      a.kind = OpArg::Kind::kIntList;
      a.ints = iv.toIntVector();
    } else if (iv.isString()) {
      a.kind = OpArg::Kind::kString;
      a.text = iv.toStringRef();
    } else if (iv.isNone()) {
      a.kind = OpArg::Kind::kNone;
    } else {
      a.kind = OpArg::Kind::kOther;
      a.text = iv.tagKind();  // printing would read tensor data, which meta tensors do not have
      if (iv.isList()) {  // e.g. Tensor?[] indices of aten::index
        for (const c10::IValue& e : iv.toListRef()) {
          if (e.isTensor() && e.toTensor().defined()) a.tensors.push_back(tensor_value(e.toTensor(), region));
        }
      }
    }
    return a;
  };

  // Regions are assigned after the run: ops inside a decoder layer get it from their module path; the rest are
  // embedding (before the first layer op) or head (after the last).
  std::vector<int32_t> node_layers;
  std::unordered_map<const Value*, bool> is_param_attr;

  // Scripted modules keep Python's control flow. Conditions and trip counts that the meta run knows (None checks,
  // flags, sizes) are followed like the TorchScript interpreter does; one that needs tensor data fails in the op
  // that reads the data (e.g. aten::Bool on a meta tensor).
  // An op the generation forward runs that the training forward does not: made in `at`'s module, by its code.
  auto emit = [&](const OpNode& site, const char* kind, const std::vector<c10::IValue>& args, const at::Tensor& out,
                  const std::string& name) {
    OpNode op;
    op.id = NodeId{static_cast<int32_t>(run.nodes.size())};
    op.kind = kind;
    op.scope = site.scope;
    op.in_module_code = true;
    op.temporary_calls = site.temporary_calls;
    op.rebindings = site.rebindings;
    const Region provisional{RegionKind::kEmbedding, -1};
    for (const auto& iv : args) op.args.push_back(to_arg(iv, provisional));
    op.outputs.push_back(new_value(ValueRole::kActivation, out, op.id, name));
    node_layers.push_back(LayerIndex(op.scope));
    run.nodes.push_back(std::move(op));
  };
  // generate()'s attention mask, [B, past + S] int64 ones: an input of the generation forward, made once.
  at::Tensor attention_mask;
  auto generation_attention_mask = [&]() {
    if (!attention_mask.defined()) {
      attention_mask = at::empty({batch, generation->past_tokens + seq}, at::TensorOptions().device(at::kMeta).dtype(at::kLong));
      run.generation_inputs.push_back(new_value(ValueRole::kInput, attention_mask, NodeId{}, "attention_mask"));
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
      run.generation_inputs.push_back(new_value(ValueRole::kActivation, parts.back(), NodeId{}, "cached " + what));
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
      if (kind == c10::aten::scaled_dot_product_attention) RefuseBidirectionalAttention(node, in_values, mod, ranges);
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
      // Table lookups: embedding(weight, indices), and module state indexed along dim 0 (CodeGen's sin/cos
      // table: embed_positions[position_ids]).
      std::optional<std::pair<at::Tensor, at::Tensor>> lookup;  // table, indices
      if (kind == c10::aten::embedding && in_values[0].isTensor() && in_values[1].isTensor()) {
        lookup.emplace(in_values[0].toTensor(), in_values[1].toTensor());
      } else if (kind == c10::aten::index && in_values[0].isTensor() && in_values[1].isList() &&
                 in_values[1].toListRef().size() == 1 && in_values[1].toListRef()[0].isTensor() &&
                 slot_names.count(in_values[0].toTensor().unsafeGetTensorImpl())) {
        lookup.emplace(in_values[0].toTensor(), in_values[1].toListRef()[0].toTensor());
      }
      if (lookup && lookup->first.dim() >= 1) {
        if (auto bounds = ranges.Of(lookup->second)) {
          auto slot = slot_names.find(lookup->first.unsafeGetTensorImpl());
          run.bounded_lookups.push_back(BoundedLookup{slot != slot_names.end() ? slot->second.name : "a table",
                                                      lookup->first.size(0), *bounds, ModulePath(node, mod)});
        }
      }

      const bool is_aten = kind.is_aten();
      bool has_tensor_out = false;
      for (const auto& iv : stack) has_tensor_out |= iv.isTensor() || iv.isTensorList();
      // Pure routing (prim list/tuple ops) and shape queries create no IR op; their tensors keep their identity.
      if (!is_aten || !has_tensor_out) continue;

      OpNode op;
      op.id = NodeId{static_cast<int32_t>(run.nodes.size())};
      op.kind = kind.toQualString();
      op.scope = ModulePath(node, mod, &call_records, &op);
      op.in_module_code = InModuleCode(node);
      op.to_autocast_dtype = autocast_dtype_casts.count(node) > 0;
      Region provisional{RegionKind::kEmbedding, -1};
      for (const auto& iv : in_values) op.args.push_back(to_arg(iv, provisional));
      for (size_t i = 0; i < stack.size(); ++i) {
        const c10::IValue& iv = stack[i];
        if (iv.isTensor() && iv.toTensor().defined()) {
          op.outputs.push_back(new_value(ValueRole::kActivation, iv.toTensor(), op.id, ""));
          run.origin.resize(run.values.size());
          run.origin.back() = {node, i};
        } else if (iv.isTensorList()) {
          for (const at::Tensor& t : iv.toTensorVector()) {
            op.outputs.push_back(new_value(ValueRole::kActivation, t, op.id, ""));
          }
        }
      }
      node_layers.push_back(LayerIndex(op.scope));
      run.nodes.push_back(std::move(op));
      if (generation) {
        if (const auto it = generation->at.find(node); it != generation->at.end()) {
          for (const GenerationSubstitution& sub : it->second) substitute(sub, node);
        }
      }
    }
  };
  run_block(graph->block());

  // Regions.
  int first_layer_node = -1, last_layer_node = -1;
  for (size_t n = 0; n < run.nodes.size(); ++n) {
    if (node_layers[n] >= 0) {
      if (first_layer_node < 0) first_layer_node = static_cast<int>(n);
      last_layer_node = static_cast<int>(n);
    }
  }
  for (size_t n = 0; n < run.nodes.size(); ++n) {
    auto& node = run.nodes[n];
    if (node_layers[n] >= 0) {
      node.region = Region{RegionKind::kDecoderLayer, node_layers[n]};
    } else if (first_layer_node < 0 || static_cast<int>(n) < first_layer_node) {
      node.region = Region{RegionKind::kEmbedding, -1};
    } else if (static_cast<int>(n) > last_layer_node) {
      node.region = Region{RegionKind::kHead, -1};
    } else {
      // Between layers but outside any: attribute to the layer of the previous op.
      node.region = run.nodes[n - 1].region;
    }
  }
  // A parameter belongs to the region of its first use.
  std::vector<bool> placed(run.params.size(), false);
  for (const auto& node : run.nodes) {
    for (const auto& arg : node.args) {
      for (ValueId t : arg.tensors) {
        int32_t p = run.values[static_cast<size_t>(t.index)].param;
        if (p >= 0 && !placed[static_cast<size_t>(p)]) {
          run.params[static_cast<size_t>(p)].region = node.region;
          placed[static_cast<size_t>(p)] = true;
        }
      }
    }
  }
  // Parameters and buffers the forward never reads still occupy memory (e.g. GPT-2's causal-mask buffers).
  for (const at::Tensor& t : slots.all) {
    if (run.by_impl.count(t.unsafeGetTensorImpl())) continue;
    const ValueId id = tensor_value(t, Region{RegionKind::kEmbedding, -1});
    auto& p = run.params[static_cast<size_t>(run.values[static_cast<size_t>(id.index)].param)];
    const int32_t layer = LayerIndex(p.name);
    p.region = layer >= 0 ? Region{RegionKind::kDecoderLayer, layer} : Region{RegionKind::kEmbedding, -1};
    p.used_in_forward = false;
  }
  // Output.
  const c10::IValue& out = run.env.at(graph->outputs()[0]);
  if (!out.isTensor()) throw ModelLoadError("not a decoder LM: forward does not return a tensor");
  auto it = run.by_impl.find(out.toTensor().unsafeGetTensorImpl());
  LLMEM_CHECK(it != run.by_impl.end()) << "loss tensor unknown";
  run.values[static_cast<size_t>(it->second.index)].name = "loss";
  return run;
}

void TorchScriptModel::set_max_positions(int64_t n) {
  if (n < 1) throw ConfigError("--max-positions must be at least 1, got " + std::to_string(n));
  impl_->max_positions_override = n;
}

std::optional<PositionLimit> TorchScriptModel::Impl::FindPositionLimit(const Run& run, int64_t seq) const {
  // A position table (learned, or fixed like CodeGen's sin/cos) is indexed by one id per token, so its indices
  // span exactly `seq` values and grow by one per token: the longest sequence keeps the largest index inside the
  // table.
  std::optional<PositionLimit> learned;
  for (const BoundedLookup& lookup : run.bounded_lookups) {
    if (lookup.indices.hi - lookup.indices.lo + 1 != seq) continue;
    const int64_t max_seq = seq + (lookup.rows - 1 - lookup.indices.hi);
    if (!learned || max_seq < learned->max_seq) {
      learned = PositionLimit{max_seq, "position table " + lookup.table + ", " +
                                           std::to_string(lookup.rows) + " rows"};
    }
  }
  if (learned && (!max_positions_override || *max_positions_override >= learned->max_seq)) return learned;
  if (max_positions_override) return PositionLimit{*max_positions_override, "--max-positions"};
  if (config_max_positions) {
    return PositionLimit{*config_max_positions, "max_position_embeddings of the export's config" +
                                                    (config_model_type.empty() ? "" : " (" + config_model_type + ")")};
  }
  return std::nullopt;
}

std::optional<PositionLimit> TorchScriptModel::Impl::CheckPositions(const Run& run, int64_t seq) const {
  std::optional<PositionLimit> position_limit = FindPositionLimit(run, seq);
  if (position_limit && seq > position_limit->max_seq) {
    const bool learned = position_limit->source.rfind("position table", 0) == 0;
    throw ConfigError("sequence length " + std::to_string(seq) + " exceeds the model's " +
                      std::to_string(position_limit->max_seq) + " positions (" + position_limit->source + ")" +
                      (learned ? ": the real step fails indexing past the table"
                               : "; pass --max-positions N when the model's RoPE is scaled past it"));
  }
  // The meta run reads no indices, so a lookup past its table runs there; the real step fails ("index out of
  // range in self").
  for (const BoundedLookup& lookup : run.bounded_lookups) {
    if (lookup.indices.lo < 0 || lookup.indices.hi >= lookup.rows) {
      throw ConfigError("sequence length " + std::to_string(seq) + " makes " + lookup.scope + " index rows " +
                        std::to_string(lookup.indices.lo) + ".." + std::to_string(lookup.indices.hi) + " of " +
                        lookup.table + ", which has " + std::to_string(lookup.rows) + " rows");
    }
  }
  return position_limit;
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
  if (batch <= 0) throw ConfigError("batch size must be positive, got " + std::to_string(batch));
  if (seq <= 0) throw ConfigError("sequence length must be positive, got " + std::to_string(seq));
  CheckedMul(batch, seq, "batch x sequence");
  c10::InferenceMode guard(false);
  torch::AutoGradMode grad_mode(true);

  Run run = Execute(batch, seq, std::nullopt, generation);
  std::optional<PositionLimit> position_limit = CheckPositions(run, seq);
  // Second run with 16-bit weights: values whose dtype changes follow the weights; the rest are fixed by an op.
  // Some traces bake fp32 dtypes in (e.g. BLOOM's alibi) and cannot run with 16-bit weights at all.
  bool runs_with_bf16_weights = true;
  try {
    Run half = Execute(batch, seq, at::kBFloat16, generation);
    if (half.values.size() != run.values.size() || half.nodes.size() != run.nodes.size()) {
      throw ModelLoadError("the forward graph of " + path + " is not straight-line (differs between runs)");
    }
    for (size_t i = 0; i < run.values.size(); ++i) run.values[i].dtype_bf16_weights = half.values[i].dtype;
  } catch (const ModelLoadError&) {
    runs_with_bf16_weights = false;
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
  ValueId loss;
  for (const auto& v : run.values) {
    if (v.name == "loss") loss = v.id;
    ShapeBytes(v.shape, v.dtype);  // throws ConfigError when the byte count overflows
  }
  Graph graph(std::move(run.values), std::move(run.nodes), std::move(run.params), std::move(inputs), loss, batch, seq);
  if (!graph.value(graph.loss()).shape.empty()) {
    throw ModelLoadError("not a decoder LM: forward(input_ids, labels) must return a scalar floating loss");
  }
  graph.set_runs_with_bf16_weights(runs_with_bf16_weights);
  graph.set_position_limit(std::move(position_limit));
  graph.set_kv_cache(std::move(kv_cache));
  return graph;
}

}  // namespace llmem
