#include "graph/meta_run.h"

#include <regex>

#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem {

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

int32_t LayerIndex(const std::string& path) {
  static const std::regex kIndexed(R"((?:^|\.)[A-Za-z_]+\.(\d+)(?:\.|$))");
  std::smatch m;
  if (std::regex_search(path, m, kIndexed)) return std::stoi(m[1].str());
  return -1;
}

ValueId MetaRun::NewValue(ValueRole role, const at::Tensor& t, NodeId producer, const std::string& name) {
  TensorValue v;
  v.id = ValueId{static_cast<int32_t>(values.size())};
  v.role = role;
  v.name = name.empty() ? "%" + std::to_string(v.id.index) : name;
  v.shape = t.sizes().vec();
  v.strides = t.strides().vec();
  v.dtype = FromScalarType(t.scalar_type());
  v.dtype_bf16_weights = v.dtype;
  v.requires_grad = t.requires_grad();
  v.producer = producer;
  const c10::StorageImpl* storage = t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
  auto it = storage ? by_storage.find(storage) : by_storage.end();
  if (it != by_storage.end()) {
    v.alias_of = it->second;
  } else {
    const int64_t bytes = t.has_storage() ? static_cast<int64_t>(t.storage().nbytes()) : 0;
    v.storage_numel = bytes / static_cast<int64_t>(t.element_size());
    if (storage) by_storage[storage] = v.id;
  }
  by_impl[t.unsafeGetTensorImpl()] = v.id;
  keep_alive_.push_back(t);
  values.push_back(std::move(v));
  return values.back().id;
}

ValueId MetaRun::ValueOf(const at::Tensor& t, Region region) {
  auto it = by_impl.find(t.unsafeGetTensorImpl());
  if (it != by_impl.end()) return it->second;
  auto slot = slots_.find(t.unsafeGetTensorImpl());
  const bool is_slot = slot != slots_.end();
  const ValueRole role = is_slot ? ValueRole::kParameter : ValueRole::kInput;
  const ValueId id = NewValue(role, t, NodeId{}, is_slot ? slot->second.name : "");
  auto& v = values[static_cast<size_t>(id.index)];
  if (is_slot) {
    Parameter p;
    p.name = slot->second.name;
    p.shape = v.shape;
    p.dtype = v.dtype;
    p.bytes = ShapeBytes(v.shape, v.dtype);
    p.trainable = slot->second.is_parameter && t.requires_grad();
    p.value = id;
    p.region = region;
    v.param = static_cast<int32_t>(params.size());
    params.push_back(std::move(p));
  } else {
    v.name = "const%" + std::to_string(id.index);  // a tensor constant baked into the file
  }
  return id;
}

OpArg MetaRun::ToArg(const c10::IValue& iv) {
  const Region provisional{RegionKind::kEmbedding, -1};  // a parameter's region is its first use's (Finish)
  OpArg a;
  if (iv.isTensor()) {
    a.kind = OpArg::Kind::kTensor;
    if (iv.toTensor().defined()) a.tensors.push_back(ValueOf(iv.toTensor(), provisional));
    else a.kind = OpArg::Kind::kNone;
  } else if (iv.isTensorList()) {
    a.kind = OpArg::Kind::kTensorList;
    for (const at::Tensor& t : iv.toTensorVector()) a.tensors.push_back(ValueOf(t, provisional));
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
        if (e.isTensor() && e.toTensor().defined()) a.tensors.push_back(ValueOf(e.toTensor(), provisional));
      }
    }
  }
  return a;
}

std::vector<ValueId> MetaRun::AddNode(OpNode op, const std::vector<c10::IValue>& inputs,
                                      const std::vector<c10::IValue>& outputs) {
  op.id = NodeId{static_cast<int32_t>(nodes.size())};
  for (const auto& iv : inputs) op.args.push_back(ToArg(iv));
  std::vector<ValueId> made(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const c10::IValue& iv = outputs[i];
    if (iv.isTensor() && iv.toTensor().defined()) {
      made[i] = NewValue(ValueRole::kActivation, iv.toTensor(), op.id, "");
      op.outputs.push_back(made[i]);
    } else if (iv.isTensorList()) {
      for (const at::Tensor& t : iv.toTensorVector()) {
        op.outputs.push_back(NewValue(ValueRole::kActivation, t, op.id, ""));
      }
    }
  }
  node_layers_.push_back(LayerIndex(op.scope));
  nodes.push_back(std::move(op));
  return made;
}

bool MetaRun::IsNoOpView(const std::string& kind, const std::vector<c10::IValue>& inputs,
                         const std::vector<c10::IValue>& outputs) {
  if (kind != "aten::slice" && kind != "aten::contiguous" && kind != "aten::alias") return false;
  if (inputs.empty() || outputs.size() != 1 || !inputs[0].isTensor() || !outputs[0].isTensor()) return false;
  const at::Tensor& in = inputs[0].toTensor();
  const at::Tensor& out = outputs[0].toTensor();
  if (!in.defined() || !out.defined() || !in.has_storage() || !out.has_storage()) return false;
  const bool same = in.unsafeGetTensorImpl() == out.unsafeGetTensorImpl() ||
                    (in.storage().unsafeGetStorageImpl() == out.storage().unsafeGetStorageImpl() &&
                     in.sizes() == out.sizes() && in.strides() == out.strides() &&
                     in.storage_offset() == out.storage_offset());
  if (!same) return false;
  by_impl[out.unsafeGetTensorImpl()] = ValueOf(in, Region{RegionKind::kEmbedding, -1});
  keep_alive_.push_back(out);
  return true;
}

void MetaRun::ObserveLookup(const std::string& kind, const std::vector<c10::IValue>& inputs,
                            const std::string& scope) {
  // Table lookups: embedding(weight, indices), and module state indexed along dim 0 (CodeGen's sin/cos table:
  // embed_positions[position_ids]).
  std::optional<std::pair<at::Tensor, at::Tensor>> lookup;  // table, indices
  if (inputs.size() < 2 || !inputs[0].isTensor()) return;
  if (kind == "aten::embedding" && inputs[1].isTensor()) {
    lookup.emplace(inputs[0].toTensor(), inputs[1].toTensor());
  } else if (kind == "aten::index" && inputs[1].isList() && inputs[1].toListRef().size() == 1 &&
             inputs[1].toListRef()[0].isTensor() && slots_.count(inputs[0].toTensor().unsafeGetTensorImpl())) {
    lookup.emplace(inputs[0].toTensor(), inputs[1].toListRef()[0].toTensor());
  }
  if (!lookup || lookup->first.dim() < 1) return;
  if (auto bounds = ranges.Of(lookup->second)) {
    auto slot = slots_.find(lookup->first.unsafeGetTensorImpl());
    bounded_lookups.push_back(BoundedLookup{slot != slots_.end() ? slot->second.name : "a table",
                                            lookup->first.size(0), *bounds, scope});
  }
}

void MetaRun::Finish(const std::vector<at::Tensor>& all_slots, const c10::IValue& loss) {
  // Ops inside a decoder layer get it from their module path; the rest are embedding (before the first layer op)
  // or head (after the last).
  int first_layer_node = -1, last_layer_node = -1;
  for (size_t n = 0; n < nodes.size(); ++n) {
    if (node_layers_[n] >= 0) {
      if (first_layer_node < 0) first_layer_node = static_cast<int>(n);
      last_layer_node = static_cast<int>(n);
    }
  }
  for (size_t n = 0; n < nodes.size(); ++n) {
    auto& node = nodes[n];
    if (node_layers_[n] >= 0) {
      node.region = Region{RegionKind::kDecoderLayer, node_layers_[n]};
    } else if (first_layer_node < 0 || static_cast<int>(n) < first_layer_node) {
      node.region = Region{RegionKind::kEmbedding, -1};
    } else if (static_cast<int>(n) > last_layer_node) {
      node.region = Region{RegionKind::kHead, -1};
    } else {
      // Between layers but outside any: attribute to the layer of the previous op.
      node.region = nodes[n - 1].region;
    }
  }
  // A parameter belongs to the region of its first use.
  std::vector<bool> placed(params.size(), false);
  for (const auto& node : nodes) {
    for (const auto& arg : node.args) {
      for (ValueId t : arg.tensors) {
        const int32_t p = values[static_cast<size_t>(t.index)].param;
        if (p >= 0 && !placed[static_cast<size_t>(p)]) {
          params[static_cast<size_t>(p)].region = node.region;
          placed[static_cast<size_t>(p)] = true;
        }
      }
    }
  }
  // Parameters and buffers the forward never reads still occupy memory (e.g. GPT-2's causal-mask buffers).
  for (const at::Tensor& t : all_slots) {
    if (by_impl.count(t.unsafeGetTensorImpl())) continue;
    const ValueId id = ValueOf(t, Region{RegionKind::kEmbedding, -1});
    auto& p = params[static_cast<size_t>(values[static_cast<size_t>(id.index)].param)];
    const int32_t layer = LayerIndex(p.name);
    p.region = layer >= 0 ? Region{RegionKind::kDecoderLayer, layer} : Region{RegionKind::kEmbedding, -1};
    p.used_in_forward = false;
  }
  if (!loss.isTensor()) throw ModelLoadError("not a decoder LM: forward does not return a tensor");
  auto it = by_impl.find(loss.toTensor().unsafeGetTensorImpl());
  LLMEM_CHECK(it != by_impl.end()) << "loss tensor unknown";
  values[static_cast<size_t>(it->second.index)].name = "loss";
}

bool IsBidirectionalAttention(const std::vector<c10::IValue>& args, const IndexRanges& ranges) {
  // scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
  constexpr size_t kMask = 3, kIsCausal = 5;
  if (args.size() <= kIsCausal) return false;
  const bool is_causal = args[kIsCausal].isBool() && args[kIsCausal].toBool();
  if (is_causal) return false;
  if (args[kMask].isTensor() && args[kMask].toTensor().defined()) {
    const at::Tensor& mask = args[kMask].toTensor();
    const auto bounds = ranges.Of(mask);
    const int64_t attend = mask.scalar_type() == at::kBool ? 1 : 0;  // the value that hides nothing
    if (!bounds || bounds->lo != attend || bounds->hi != attend) return false;
  }
  return true;
}

std::string BidirectionalAttentionMessage(const std::string& scope, const std::string& module_class) {
  return "not a decoder LM: attention" + (scope.empty() ? "" : " in " + scope) +
         (module_class.empty() ? "" : " (" + module_class + ")") +
         " has no causal mask (scaled_dot_product_attention with is_causal=False and no mask that hides a position): "
         "bidirectional, as in an encoder or masked LM; llmem estimates decoder (causal) LMs";
}

std::optional<PositionLimit> FindPositionLimit(const std::vector<BoundedLookup>& lookups, int64_t seq,
                                               std::optional<int64_t> override_max,
                                               std::optional<int64_t> config_max,
                                               const std::string& config_model_type) {
  // A position table (learned, or fixed like CodeGen's sin/cos) is indexed by one id per token, so its indices
  // span exactly `seq` values and grow by one per token: the longest sequence keeps the largest index inside the
  // table.
  std::optional<PositionLimit> learned;
  for (const BoundedLookup& lookup : lookups) {
    if (lookup.indices.hi - lookup.indices.lo + 1 != seq) continue;
    const int64_t max_seq = seq + (lookup.rows - 1 - lookup.indices.hi);
    if (!learned || max_seq < learned->max_seq) {
      learned = PositionLimit{max_seq, "position table " + lookup.table + ", " + std::to_string(lookup.rows) + " rows"};
    }
  }
  if (learned && (!override_max || *override_max >= learned->max_seq)) return learned;
  if (override_max) return PositionLimit{*override_max, "--max-positions"};
  if (config_max) {
    return PositionLimit{*config_max, "max_position_embeddings of the export's config" +
                                          (config_model_type.empty() ? "" : " (" + config_model_type + ")")};
  }
  return std::nullopt;
}

std::optional<PositionLimit> CheckPositions(const std::vector<BoundedLookup>& lookups, int64_t seq,
                                            std::optional<int64_t> override_max, std::optional<int64_t> config_max,
                                            const std::string& config_model_type) {
  std::optional<PositionLimit> position_limit =
      FindPositionLimit(lookups, seq, override_max, config_max, config_model_type);
  if (position_limit && seq > position_limit->max_seq) {
    const bool learned = position_limit->source.rfind("position table", 0) == 0;
    throw ConfigError("sequence length " + std::to_string(seq) + " exceeds the model's " +
                      std::to_string(position_limit->max_seq) + " positions (" + position_limit->source + ")" +
                      (learned ? ": the real step fails indexing past the table"
                               : "; pass --max-positions N when the model's RoPE is scaled past it"));
  }
  // The meta run reads no indices, so a lookup past its table runs there; the real step fails ("index out of
  // range in self").
  for (const BoundedLookup& lookup : lookups) {
    if (lookup.indices.lo < 0 || lookup.indices.hi >= lookup.rows) {
      throw ConfigError("sequence length " + std::to_string(seq) + " makes " + lookup.scope + " index rows " +
                        std::to_string(lookup.indices.lo) + ".." + std::to_string(lookup.indices.hi) + " of " +
                        lookup.table + ", which has " + std::to_string(lookup.rows) + " rows");
    }
  }
  return position_limit;
}

Graph AssembleGraph(MetaRun run, const MetaRun* half, std::vector<ValueId> inputs, int64_t batch, int64_t seq) {
  // A run with bf16 weights that took another path is no information about dtypes (as one that failed).
  const bool same = half && half->values.size() == run.values.size() && half->nodes.size() == run.nodes.size();
  if (same) {
    for (size_t i = 0; i < run.values.size(); ++i) run.values[i].dtype_bf16_weights = half->values[i].dtype;
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
  graph.set_runs_with_bf16_weights(same);
  return graph;
}

}  // namespace llmem
