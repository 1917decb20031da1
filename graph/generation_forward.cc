#include "graph/generation_forward.h"

#include <algorithm>
#include <array>
#include <map>
#include <set>
#include <string>

#include "graph/dtype.h"
#include "graph/error.h"
#include "graph/graph_rewriter.h"

namespace llmem {
namespace {

// repeat_kv and the slicing around it (`[:, :, None, :, :].expand(...).reshape(...)`): ops that only re-index one
// tensor, walked back to the keys or values the cache stores.
bool IsRepeatKvStep(const std::string& kind) {
  return kind == "aten::reshape" || kind == "aten::expand" || kind == "aten::slice" || kind == "aten::unsqueeze" ||
         kind == "aten::view" || kind == "aten::contiguous";
}

ValueId CachedTensor(const Graph& g, ValueId v) {
  while (true) {
    const TensorValue& tv = g.value(v);
    if (!tv.producer.valid()) return v;
    const OpNode& p = g.node(tv.producer);
    if (!IsRepeatKvStep(p.kind) || p.args.empty() || p.args[0].kind != OpArg::Kind::kTensor) return v;
    v = p.args[0].tensors[0];
  }
}

std::vector<int64_t> WithTokens(std::vector<int64_t> shape, int64_t tokens) {
  shape[2] = tokens;
  return shape;
}

// Drops the ops none of `keep` depends on (the mask, repeat_kv, the loss), renumbering the rest; values no op
// produces any more are left without a producer (nothing reads them).
void DropDeadOps(GraphRewriter& rw, const std::vector<ValueId>& keep) {
  auto& nodes = rw.nodes();
  auto& values = rw.values();
  std::vector<bool> live_value(values.size(), false), live_node(nodes.size(), false);
  for (ValueId v : keep) live_value[static_cast<size_t>(v.index)] = true;
  for (size_t i = nodes.size(); i-- > 0;) {
    bool live = false;
    for (ValueId out : nodes[i].outputs) live |= live_value[static_cast<size_t>(out.index)];
    if (!live) continue;
    live_node[i] = true;
    for (const auto& arg : nodes[i].args) {
      for (ValueId in : arg.tensors) {
        // A view keeps the tensor it views alive.
        for (ValueId a = in; a.valid(); a = values[static_cast<size_t>(a.index)].alias_of) {
          live_value[static_cast<size_t>(a.index)] = true;
        }
      }
    }
  }
  for (auto& v : values) v.producer = NodeId{};
  std::vector<OpNode> kept;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (live_node[i]) kept.push_back(std::move(nodes[i]));
  }
  nodes.clear();
  for (auto& n : kept) rw.Emit(std::move(n));
  // A dead view no longer needs the tensor it viewed (which may now be defined after it).
  for (auto& v : values) {
    if (v.role == ValueRole::kActivation && !v.producer.valid()) v.alias_of = ValueId{};
  }
}

// The position ids the training forward derives from cache_position (`cache_position.unsqueeze(0)`: int64 [1, S]),
// which generate() replaces by position ids per sequence; none when the forward builds them per sequence itself
// (OPT's from the attention mask) or the batch is 1.
ValueId BroadcastPositionIds(const Graph& g) {
  if (g.batch() <= 1) return {};
  for (const auto& v : g.values()) {
    if (v.dtype != DType::kI64 || v.shape != std::vector<int64_t>{1, g.seq()} || !v.producer.valid()) continue;
    const OpNode& p = g.node(v.producer);
    if (p.kind != "aten::unsqueeze" || p.args.empty() || p.args[0].kind != OpArg::Kind::kTensor) continue;
    const TensorValue& in = g.value(p.args[0].tensors[0]);
    if (in.dtype == DType::kI64 && in.shape == std::vector<int64_t>{g.seq()}) return v.id;
  }
  return {};
}

// The model's own module path from an op inside its decoder layers ("model.model.layers.3.self_attn" ->
// "model.model", "model.transformer.h.0.ln_1" -> "model.transformer"): the path up to the layer container, whose
// entries are indices; "" when no component is one.
std::string ModelScope(const std::string& scope) {
  size_t start = 0, container = std::string::npos;
  while (start <= scope.size()) {
    const size_t dot = std::min(scope.find('.', start), scope.size());
    const std::string part = scope.substr(start, dot - start);
    if (!part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return container == std::string::npos ? "" : scope.substr(0, container);
    }
    container = start == 0 ? std::string::npos : start - 1;  // the dot before this component
    start = dot + 1;
  }
  return "";
}

// generate()'s [B, S] position ids in place of the forward's [1, S] ones: what the forward computes from them
// (RoPE's frequencies, cos and sin; GPT-2's position embeddings) has a batch dim of B where it had 1.
class BatchedPositions {
 public:
  BatchedPositions(const Graph& g, GraphRewriter& rw) : from_(BroadcastPositionIds(g)), batch_(g.batch()) {
    if (!from_.valid()) return;
    root_ = g.StorageRoot(from_);
    to_ = rw.NewValue("position_ids", {batch_, g.seq()}, DType::kI64, DType::kI64);
    batched_.insert(to_.index);
  }
  // The generation forward's new input, when there is one.
  ValueId input() const { return to_; }

  void Apply(OpNode& node, GraphRewriter& rw) {
    if (!to_.valid()) return;
    bool batched = false;
    for (auto& arg : node.args) {
      for (auto& t : arg.tensors) {
        if (t == from_) t = to_;
        batched |= batched_.count(t.index) > 0;
      }
    }
    if (!batched) return;
    for (ValueId out : node.outputs) {
      TensorValue& v = rw.value(out);
      if (v.alias_of.valid() && (v.alias_of == from_ || v.alias_of == root_)) {
        v.alias_of = to_;  // a view of the position ids views generate()'s
      }
      if (v.shape.empty() || v.shape[0] != 1) continue;
      const std::vector<int64_t> old_shape = v.shape;
      v.shape[0] = batch_;
      if (!v.strides.empty()) {  // the batch dim steps over everything the others span (a permuted view too)
        int64_t span = 1;
        for (size_t d = 1; d < v.shape.size(); ++d) span = std::max(span, v.strides[d] * v.shape[d]);
        v.strides[0] = span;
      }
      v.storage_numel *= batch_;
      batched_.insert(out.index);
      for (auto& arg : node.args) {  // a view's or expand's target shape
        if (arg.kind == OpArg::Kind::kIntList && arg.ints == old_shape) arg.ints[0] = batch_;
      }
    }
  }

 private:
  ValueId from_, root_, to_;  // root_: the storage from_ views (cache_position's arange)
  int64_t batch_;
  std::set<int32_t> batched_;
};

// repeat_kv of `source` ([B, kv, L, D], storage `root`) to `heads` query heads, as HF's SDPA path runs it with a mask:
// `[:, :, None].expand(B, kv, n_rep, L, D).reshape(B, H, L, D)`, a copy of the whole entry at every query head,
// except where the reshape can view the expansion (one key/value head, MQA); `source` itself when kv = heads.
ValueId RepeatKv(GraphRewriter& rw, const OpNode& at, ValueId source, ValueId root, int64_t heads) {
  const TensorValue sv = rw.value(source);
  const std::vector<int64_t>& whole = sv.shape;
  const int64_t kv_heads = whole.at(1);
  if (heads == kv_heads || kv_heads <= 0) return source;
  std::vector<int64_t> repeated = whole;
  repeated[1] = heads;
  const std::vector<int64_t> expanded = {whole[0], kv_heads, heads / kv_heads, whole[2], whole[3]};
  const std::vector<int64_t> expanded_strides = {kv_heads * whole[2] * whole[3], whole[2] * whole[3], 0, whole[3], 1};
  // The three ops HF runs, so that a split of the heads (tensor parallelism) can decide view or copy again.
  const ValueId unsqueezed = rw.NewValue(sv.name + " [:, :, None]", {whole[0], kv_heads, 1, whole[2], whole[3]},
                                         sv.dtype, sv.dtype_bf16_weights, root);
  rw.value(unsqueezed).strides = {kv_heads * whole[2] * whole[3], whole[2] * whole[3], whole[2] * whole[3], whole[3], 1};
  rw.Emit(GraphRewriter::NewNode(at, "aten::unsqueeze", at.scope, {TensorArg(source), IntArg(2)}, unsqueezed));
  const ValueId expansion = rw.NewValue(sv.name + " expanded", expanded, sv.dtype, sv.dtype_bf16_weights, root);
  rw.value(expansion).strides = expanded_strides;
  rw.Emit(GraphRewriter::NewNode(at, "aten::expand", at.scope,
                                 {TensorArg(unsqueezed), IntArg(0, OpArg::Kind::kIntList),
                                  IntArg(0, OpArg::Kind::kBool)},
                                 expansion));
  rw.nodes().back().args[1].ints = expanded;
  const auto view = ViewStrides(expanded, expanded_strides, repeated);
  const ValueId read = rw.NewValue(sv.name + " repeated", repeated, sv.dtype, sv.dtype_bf16_weights,
                                   view ? root : ValueId{});
  if (view) rw.value(read).strides = *view;
  rw.Emit(GraphRewriter::NewNode(at, "aten::reshape", at.scope,
                                 {TensorArg(expansion), IntArg(0, OpArg::Kind::kIntList)}, read));
  rw.nodes().back().args[1].ints = repeated;
  return read;
}

// The attention op `old` reading a StaticCache of `length` tokens (Note [Generation forward]): the entries made in the
// prefill or read as inputs, the in-place copies of the new tokens, the repeat_kv copies the mask `mask` forces.
// Appends to `past` and `present` (keys, values).
void EmitStaticCacheAttention(const Graph& g, GraphRewriter& rw, const OpNode& old, int64_t past_tokens,
                              int64_t length, ValueId& mask, std::array<std::vector<ValueId>*, 2> past,
                              std::array<std::vector<ValueId>*, 2> present) {
  const TensorValue qv = g.value(old.args[0].tensors.at(0));
  const int64_t new_tokens = qv.shape.at(2);
  if (length < past_tokens + new_tokens) throw ConfigError("generation: the static cache is shorter than the tokens");
  // A StaticCache is compileable, so create_causal_mask never skips the mask (allow_is_causal_skip is off).
  if (!mask.valid()) throw ConfigError("generation: the static cache's mask was not made before " + old.scope);
  std::array<ValueId, 2> fresh, entry;
  for (int which = 0; which < 2; ++which) {
    fresh[which] = CachedTensor(g, old.args[static_cast<size_t>(which + 1)].tensors.at(0));
    const TensorValue& fv = g.value(fresh[which]);
    if (fv.shape.size() != 4) {
      throw ConfigError("generation: the attention of " + old.scope + " does not read [batch, heads, tokens, "
                        "dim] keys and values; this architecture's cache is not modelled");
    }
  }
  // lazy_initialization makes both entries before the first copy.
  for (int which = 0; which < 2; ++which) {
    const TensorValue& fv = g.value(fresh[which]);
    const std::string what = std::string(which == 0 ? "keys" : "values") + " of " + old.scope;
    if (past_tokens > 0) {
      entry[which] = rw.NewValue("cached " + what, WithTokens(fv.shape, length), fv.dtype, fv.dtype_bf16_weights);
      past[which]->push_back(entry[which]);
    } else {
      entry[which] = rw.NewValue("cache " + what, WithTokens(fv.shape, length), fv.dtype, fv.dtype_bf16_weights);
      rw.Emit(GraphRewriter::NewNode(old, "aten::zeros", old.scope, {IntArg(0, OpArg::Kind::kIntList)}, entry[which]));
      rw.nodes().back().args[0].ints = WithTokens(fv.shape, length);
    }
  }
  OpNode sdpa = old;
  for (int which = 0; which < 2; ++which) {
    const TensorValue& fv = g.value(fresh[which]);
    const ValueId root = rw.value(entry[which]).alias_of.valid() ? rw.value(entry[which]).alias_of : entry[which];
    const ValueId updated = rw.NewValue(rw.value(entry[which]).name + " updated", WithTokens(fv.shape, length),
                                        fv.dtype, fv.dtype_bf16_weights, root);
    rw.Emit(GraphRewriter::NewNode(old, "aten::index_copy_", old.scope,
                                   {TensorArg(entry[which]), IntArg(2), TensorArg(fresh[which])}, updated));
    present[which]->push_back(past_tokens > 0 ? updated : entry[which]);
    const ValueId read = RepeatKv(rw, old, updated, root, qv.shape.at(1));
    sdpa.args[static_cast<size_t>(which + 1)] = TensorArg(read);
  }
  if (sdpa.args.size() > 3) sdpa.args[3] = TensorArg(mask);
  if (sdpa.args.size() > 5) sdpa.args[5] = IntArg(0, OpArg::Kind::kBool);  // is_causal: the mask says it
  if (sdpa.args.size() > 7) sdpa.args[7] = IntArg(0, OpArg::Kind::kBool);  // no enable_gqa with a mask
  rw.Emit(std::move(sdpa));
}

}  // namespace

GenerationForward MakeGenerationForward(const Graph& g, int64_t past_tokens, const GenerationLoop& loop) {
  if (past_tokens < 0) throw ConfigError("the cached tokens cannot be negative");
  GraphRewriter rw(g);
  for (auto& v : rw.values()) v.requires_grad = false;
  for (auto& p : rw.params()) {
    p.frozen = p.frozen || p.trainable;  // a Parameter still, which a parallel split divides like any other
    p.trainable = false;
  }
  GenerationForward out;
  ValueId head_output;
  int attention = 0;
  std::vector<ValueId> past_keys, past_values, present_keys, present_values;
  // A forward the importer ran with its cache (eager attention): its entries are there already.
  const std::optional<KvCacheNames>& run_with_cache = g.kv_cache();
  if (run_with_cache && (loop.cache == CacheKind::kStatic || loop.sliding_window > 0)) {
    throw ConfigError("generation: a static or sliding-window cache is modelled for scaled_dot_product_attention "
                      "models; this model computes its attention itself (use --cache dynamic)");
  }
  std::map<std::string, ValueId> base_names;
  if (run_with_cache) {
    for (const auto& v : g.values()) base_names.emplace(v.name, v.id);
    const auto found = [&](const std::string& name) {
      const auto it = base_names.find(name);
      if (it == base_names.end()) throw ConfigError("generation: the forward has no value " + name);
      return it->second;
    };
    const size_t layers = run_with_cache->present.size() / 2;
    for (size_t i = 0; i < run_with_cache->present.size(); ++i) {
      (i < layers ? present_keys : present_values).push_back(found(run_with_cache->present[i]));
    }
    for (size_t i = 0; i < run_with_cache->past.size(); ++i) {
      (i < layers ? past_keys : past_values).push_back(found(run_with_cache->past[i]));
    }
    attention = static_cast<int>(layers);
  }
  BatchedPositions positions(g, rw);
  // The causal mask generate()'s forward makes (static cache, or a sliding window HF cannot skip), once for every
  // layer: [B, 1, S, mask_tokens]; none when mask_tokens is 0.
  const int64_t fed = g.value(g.inputs().at(0)).shape.at(1);
  int64_t mask_tokens = 0;
  if (loop.cache == CacheKind::kStatic) {
    mask_tokens = loop.static_cache_tokens;
  } else if (loop.sliding_window > 0) {
    const int64_t kv = std::min(loop.sliding_window - 1, past_tokens) + fed;
    // masking_utils skips the mask only when the keys fit the window and the shape makes it causal by itself.
    if (!(kv < loop.sliding_window && (fed == 1 || kv == fed))) mask_tokens = kv;
  }
  ValueId causal_mask;
  for (const OpNode& original : g.nodes()) {
    if (mask_tokens > 0 && !causal_mask.valid() && original.region.kind == RegionKind::kDecoderLayer) {
      // create_causal_mask runs in the model's forward before its first layer, and lives until the model returns.
      const std::vector<int64_t>& ids = g.value(g.inputs().at(0)).shape;
      const std::vector<int64_t> shape = {ids.at(0), 1, ids.at(1), mask_tokens};
      OpNode at = original;
      at.region = Region{RegionKind::kEmbedding, -1};
      causal_mask = rw.NewValue("causal mask", shape, DType::kBool, DType::kBool);
      rw.Emit(GraphRewriter::NewNode(at, "aten::ones", ModelScope(original.scope), {IntArg(0, OpArg::Kind::kIntList)},
                                     causal_mask));
      rw.nodes().back().args[0].ints = shape;
    }
    OpNode batched = original;
    positions.Apply(batched, rw);
    const OpNode& old = batched;
    if (old.kind == "aten::scaled_dot_product_attention" && old.args.size() >= 3 &&
        loop.cache == CacheKind::kStatic) {
      ++attention;
      EmitStaticCacheAttention(g, rw, old, past_tokens, loop.static_cache_tokens, causal_mask,
                               {&past_keys, &past_values}, {&present_keys, &present_values});
      continue;
    }
    if (old.kind == "aten::scaled_dot_product_attention" && old.args.size() >= 3) {
      ++attention;
      OpNode sdpa = old;
      for (int which = 1; which <= 2; ++which) {
        const ValueId fresh = CachedTensor(g, old.args[static_cast<size_t>(which)].tensors.at(0));
        const TensorValue fv = g.value(fresh);
        if (fv.shape.size() != 4) {
          throw ConfigError("generation: the attention of " + old.scope + " does not read [batch, heads, tokens, "
                            "dim] keys and values; this architecture's cache is not modelled");
        }
        const std::string what = std::string(which == 1 ? "keys" : "values") + " of " + old.scope;
        OpArg parts;
        parts.kind = OpArg::Kind::kTensorList;
        // A sliding-window layer keeps a view of the last W - 1 tokens of the previous forward's full tensor, whose
        // storage (those kept before it plus what it fed) stays alive with the view.
        const int64_t window = loop.sliding_window;
        const int64_t kept = window > 0 ? std::min(window - 1, past_tokens) : past_tokens;
        if (past_tokens > 0) {
          const ValueId past = rw.NewValue("cached " + what, WithTokens(fv.shape, kept), fv.dtype,
                                           fv.dtype_bf16_weights);
          if (window > 0) {
            const int64_t before = std::min(window - 1, past_tokens - loop.previous_tokens);
            rw.value(past).storage_numel = NumElements(WithTokens(fv.shape, before + loop.previous_tokens));
          }
          (which == 1 ? past_keys : past_values).push_back(past);
          parts.tensors.push_back(past);
        }
        parts.tensors.push_back(fresh);
        const ValueId present = rw.NewValue("cache " + what, WithTokens(fv.shape, kept + fv.shape[2]),
                                            fv.dtype, fv.dtype_bf16_weights);
        rw.Emit(GraphRewriter::NewNode(old, "aten::cat", old.scope, {parts, IntArg(-2)}, present));
        (which == 1 ? present_keys : present_values).push_back(present);
        const int64_t heads = g.value(old.args[0].tensors.at(0)).shape.at(1);
        sdpa.args[static_cast<size_t>(which)] =
            TensorArg(mask_tokens > 0 ? RepeatKv(rw, old, present, present, heads) : present);
      }
      const int64_t new_tokens = g.value(old.args[0].tensors.at(0)).shape.at(2);
      const bool masked = mask_tokens > 0;
      if (sdpa.args.size() > 3) sdpa.args[3] = masked ? TensorArg(causal_mask) : OpArg{};
      if (sdpa.args.size() > 5) sdpa.args[5] = IntArg(!masked && new_tokens > 1 ? 1 : 0, OpArg::Kind::kBool);
      if (sdpa.args.size() > 7) sdpa.args[7] = IntArg(masked ? 0 : 1, OpArg::Kind::kBool);  // enable_gqa
      rw.Emit(std::move(sdpa));
      continue;
    }
    const bool head_linear = old.region.kind == RegionKind::kHead && old.kind == "aten::linear" &&
                             !head_output.valid() && old.args.size() >= 2 &&
                             old.args[1].kind == OpArg::Kind::kTensor &&
                             g.value(old.args[1].tensors[0]).role == ValueRole::kParameter;
    // `self.lm_head(h).to(torch.float32)`: a copy under 16-bit weights, the same tensor under fp32 ones.
    const auto cast_logits = [&] {
      if (!loop.float32_logits) return;
      const TensorValue lv = rw.value(head_output);
      const ValueId cast = rw.NewValue("float32 logits", lv.shape, DType::kF32, DType::kF32, head_output);
      rw.Emit(GraphRewriter::NewNode(old, "aten::to", old.scope,
                                     {TensorArg(head_output), IntArg(ScalarTypeOf(DType::kF32)), IntArg(0, OpArg::Kind::kBool),
                                      IntArg(0, OpArg::Kind::kBool)},
                                     cast));
      head_output = cast;
    };
    if (head_linear && !loop.last_position_logits) {
      head_output = old.outputs.at(0);
      rw.Emit(old);
      cast_logits();
      continue;
    }
    if (head_linear) {
      // lm_head(hidden_states[:, -1:, :]): a view of the last position, then [B, 1, V] logits.
      const ValueId hidden = old.args[0].tensors.at(0);
      const TensorValue hv = g.value(hidden);
      if (hv.shape.size() != 3) throw ConfigError("generation: the LM head's input is not [batch, tokens, hidden]");
      std::vector<int64_t> last = hv.shape;
      last[1] = 1;
      const ValueId root = g.StorageRoot(hidden);
      const ValueId sliced = rw.NewValue(old.scope + " last position", last, hv.dtype, hv.dtype_bf16_weights, root);
      rw.value(sliced).strides = StridesOf(hv);
      rw.Emit(GraphRewriter::NewNode(old, "aten::slice", old.scope,
                                     {TensorArg(hidden), IntArg(1), IntArg(hv.shape[1] - 1), IntArg(hv.shape[1]),
                                      IntArg(1)},
                                     sliced));
      const TensorValue ov = g.value(old.outputs.at(0));
      std::vector<int64_t> logits_shape = ov.shape;
      logits_shape[1] = 1;
      head_output = rw.NewValue("logits", logits_shape, ov.dtype, ov.dtype_bf16_weights);
      OpNode lin = old;
      lin.args[0] = TensorArg(sliced);
      lin.outputs = {head_output};
      rw.Emit(std::move(lin));
      cast_logits();
      continue;
    }
    rw.Emit(std::move(batched));
  }
  if (attention == 0) {
    throw ConfigError("generation: no attention in this export that the rewrite recognizes "
                      "(scaled_dot_product_attention, or eager q @ k^T, softmax, probs @ v)");
  }
  if (!head_output.valid()) throw ConfigError("generation: the export has no LM head linear");
  // The loop's work after the forward (hf::generate_next_token), with the tensors it carries between forwards.
  std::vector<ValueId> loop_inputs;
  const TensorValue lv = rw.value(head_output);
  const int64_t batch = lv.shape[0], vocab = lv.shape.back();
  const int64_t new_tokens = g.value(g.inputs().at(0)).shape.at(1), total = past_tokens + new_tokens;
  std::vector<OpArg> args = {TensorArg(head_output)};
  if (past_tokens > 0) {
    // Without processors the scores are the logits tensor itself.
    std::vector<const char*> carried = {"next_token_logits of the previous step"};
    if (loop.min_length_processors) carried.push_back("next_token_scores of the previous step");
    for (const char* name : carried) {
      loop_inputs.push_back(rw.NewValue(name, {batch, vocab}, DType::kF32, DType::kF32));
      args.push_back(TensorArg(loop_inputs.back()));
    }
  }
  // The forward run with its cache took generate()'s attention mask already.
  ValueId attention_mask;
  for (ValueId in : g.inputs()) {
    if (g.value(in).name == "attention_mask") attention_mask = in;
  }
  if (!attention_mask.valid()) {
    attention_mask = rw.NewValue("attention_mask", {batch, total}, DType::kI64, DType::kI64);
    loop_inputs.push_back(attention_mask);
  }
  args.push_back(TensorArg(attention_mask));
  ValueId ids = g.inputs().at(0);  // the prefill's input_ids are generate's
  if (past_tokens > 0) {
    ids = rw.NewValue("generated ids", {batch, total}, DType::kI64, DType::kI64);
    loop_inputs.push_back(ids);
  }
  args.push_back(TensorArg(ids));
  const int64_t processors = loop.min_length_processors ? 2 : 0;
  for (int64_t a : {int64_t{past_tokens > 0}, batch, vocab, total, processors}) args.push_back(IntArg(a));
  const ValueId next_tokens = rw.NewValue("next tokens", {batch}, DType::kI64, DType::kI64);
  rw.Emit(GraphRewriter::NewNode(g.nodes().back(), "hf::generate_next_token", "generate", std::move(args),
                                 next_tokens));

  // Per layer keys, then values.
  std::vector<ValueId> past = past_keys, present = present_keys;
  past.insert(past.end(), past_values.begin(), past_values.end());
  present.insert(present.end(), present_values.begin(), present_values.end());
  std::vector<ValueId> inputs;
  for (ValueId in : g.inputs()) {
    if (g.value(in).name != "labels") inputs.push_back(in);
  }
  if (positions.input().valid()) inputs.push_back(positions.input());
  if (!run_with_cache) inputs.insert(inputs.end(), past.begin(), past.end());
  inputs.insert(inputs.end(), loop_inputs.begin(), loop_inputs.end());
  // The rewriter renumbers values as it builds: the new values are found again by their (unique) names.
  auto names = [&](const std::vector<ValueId>& ids) {
    std::vector<std::string> n;
    for (ValueId v : ids) n.push_back(rw.value(v).name);
    return n;
  };
  const std::vector<std::string> past_names = names(past), present_names = names(present);
  std::vector<ValueId> keep = {head_output, next_tokens};
  keep.insert(keep.end(), present.begin(), present.end());
  DropDeadOps(rw, keep);
  out.graph = rw.Build(inputs, head_output);
  std::map<std::string, ValueId> by_name;
  for (const auto& v : out.graph.values()) by_name.emplace(v.name, v.id);
  for (const auto& n : past_names) out.past.push_back(by_name.at(n));
  for (const auto& n : present_names) out.present.push_back(by_name.at(n));
  out.logits = out.graph.loss();
  return out;
}

}  // namespace llmem
