#include "graph/eager_attention.h"

#include <functional>
#include <set>

#include "graph/error.h"

namespace llmem {
namespace {

int64_t Normalized(int64_t dim, size_t rank) { return dim < 0 ? dim + static_cast<int64_t>(rank) : dim; }

int64_t NumElementsOf(const TensorValue& v) { return NumElements(v.shape); }

const OpNode* Producer(const Graph& g, ValueId v) {
  const TensorValue& tv = g.value(v);
  return tv.producer.valid() ? &g.node(tv.producer) : nullptr;
}

ValueId FirstTensor(const OpNode& n) {
  return !n.args.empty() && n.args[0].kind == OpArg::Kind::kTensor && !n.args[0].tensors.empty()
             ? n.args[0].tensors[0]
             : ValueId{};
}

bool IsProduct(const std::string& kind) {
  return kind == "aten::matmul" || kind == "aten::bmm" || kind == "aten::baddbmm";
}

// Ops between the score product and the softmax: scaling, masking, casts, views.
bool IsScoreStep(const std::string& kind) {
  static const std::set<std::string> kSteps = {
      "aten::add",  "aten::add_",        "aten::where", "aten::div",  "aten::div_", "aten::mul",  "aten::mul_",
      "aten::sub",  "aten::masked_fill", "aten::view",  "aten::reshape", "aten::to", "aten::tanh", "aten::contiguous",
      "aten::_unsafe_view", "aten::masked_fill_"};
  return kSteps.count(kind) > 0;
}

// Ops between the softmax and the context product: casts, dropout, views, a head mask.
bool IsProbsStep(const std::string& kind) {
  static const std::set<std::string> kSteps = {"aten::to",   "aten::dropout", "aten::view",      "aten::reshape",
                                               "aten::mul",  "aten::type_as", "aten::contiguous", "aten::_unsafe_view"};
  return kSteps.count(kind) > 0;
}

// The score product a softmax's input comes from: the first one found back through score steps along operands
// of the same size.
const OpNode* ScoreProduct(const Graph& g, ValueId v, int depth = 0) {
  const OpNode* p = Producer(g, v);
  if (!p || depth > 12) return nullptr;
  if (IsProduct(p->kind)) return p;
  if (!IsScoreStep(p->kind)) return nullptr;
  const int64_t n = NumElementsOf(g.value(v));
  for (const auto& arg : p->args) {
    if (arg.kind != OpArg::Kind::kTensor || arg.tensors.empty()) continue;
    if (NumElementsOf(g.value(arg.tensors[0])) != n) continue;
    if (const OpNode* found = ScoreProduct(g, arg.tensors[0], depth + 1)) return found;
  }
  return nullptr;
}

// Walks back from `operand`, whose dim `token_dim` holds the key tokens, through ops that only re-index or cast it;
// the cached tensor is the earliest [B, heads, S, D] value on the way in the weights' dtype.
ValueId CachedTensor(const Graph& g, ValueId operand, int64_t token_dim, DType weights_dtype) {
  ValueId v = operand, found;
  int64_t d = Normalized(token_dim, g.value(operand).shape.size());
  while (v.valid()) {
    const TensorValue& tv = g.value(v);
    const bool follows_weights = !g.runs_with_bf16_weights() || tv.dtype_bf16_weights == weights_dtype;
    if (tv.shape.size() == 4 && d == 2 && tv.shape[0] == g.batch() && tv.shape[2] == g.seq() && follows_weights) {
      found = v;
    }
    const OpNode* p = Producer(g, v);
    if (!p) break;
    const ValueId x = FirstTensor(*p);
    if (!x.valid()) break;
    const std::vector<int64_t>& in = g.value(x).shape;
    const std::string& k = p->kind;
    if (k == "aten::transpose" && p->args.size() >= 3) {
      const int64_t a = Normalized(p->args[1].int_value, in.size()), b = Normalized(p->args[2].int_value, in.size());
      d = d == a ? b : d == b ? a : d;
    } else if (k == "aten::permute" && p->args.size() >= 2 && static_cast<size_t>(d) < p->args[1].ints.size()) {
      d = Normalized(p->args[1].ints[static_cast<size_t>(d)], in.size());
    } else if (k == "aten::to" || k == "aten::contiguous" || k == "aten::clone" || k == "aten::dropout" ||
               k == "aten::detach" || k == "aten::type_as") {
      // same dims
    } else if (k == "aten::unsqueeze" && p->args.size() >= 2) {
      const int64_t at = Normalized(p->args[1].int_value, tv.shape.size());
      if (d == at) break;
      if (d > at) --d;
    } else if (k == "aten::view" || k == "aten::reshape" || k == "aten::_unsafe_view" || k == "aten::expand") {
      // The input dim with the same size and the same number of elements after it.
      int64_t tail = 1;
      for (size_t i = static_cast<size_t>(d) + 1; i < tv.shape.size(); ++i) tail *= tv.shape[i];
      int64_t match = -1, in_tail = 1;
      for (size_t i = in.size(); i-- > 0;) {
        if (in_tail == tail && in[i] == tv.shape[static_cast<size_t>(d)]) {
          match = static_cast<int64_t>(i);
          break;
        }
        in_tail *= in[i];
      }
      if (match < 0) break;
      d = match;
    } else {
      break;
    }
    v = x;
  }
  return found;
}

}  // namespace

EagerAttentionSites FindEagerAttention(const Graph& g) {
  EagerAttentionSites sites;
  DType weights = DType::kBF16;
  for (const Parameter& p : g.params()) {
    if (IsFloating(p.dtype)) {
      weights = g.value(p.value).dtype_bf16_weights;
      break;
    }
  }
  // Per value, the ops that read it.
  std::vector<std::vector<NodeId>> users(g.values().size());
  for (const OpNode& n : g.nodes()) {
    for (ValueId in : g.tensor_inputs(n.id)) users[static_cast<size_t>(in.index)].push_back(n.id);
  }
  for (const OpNode& n : g.nodes()) {
    if (n.kind == "aten::scaled_dot_product_attention") return {};
    if (n.region.kind != RegionKind::kDecoderLayer || (n.kind != "aten::softmax" && n.kind != "aten::_softmax")) {
      continue;
    }
    const OpNode* scores = ScoreProduct(g, FirstTensor(n));
    // The context product reads the probabilities (through casts, dropout, views) as its first operand.
    const OpNode* context = nullptr;
    std::function<void(ValueId, int)> follow = [&](ValueId v, int depth) {
      for (NodeId u : users[static_cast<size_t>(v.index)]) {
        const OpNode& user = g.node(u);
        if (context || depth > 8) return;
        if ((user.kind == "aten::matmul" || user.kind == "aten::bmm") && FirstTensor(user) == v) {
          context = &user;
        } else if (IsProbsStep(user.kind) && FirstTensor(user) == v && !user.outputs.empty()) {
          follow(user.outputs[0], depth + 1);
        }
      }
    };
    if (!n.outputs.empty()) follow(n.outputs[0], 0);
    if (!scores || !context) {
      throw ConfigError("generation: the softmax in " + n.scope + " is not an attention this model's cache can be "
                        "traced through (scores = q @ k^T, softmax, probs @ v)");
    }
    const size_t key_arg = scores->kind == "aten::baddbmm" ? 2 : 1;
    const auto operand = [&](const OpNode& op, size_t arg) {
      return op.args.size() > arg && op.args[arg].kind == OpArg::Kind::kTensor && !op.args[arg].tensors.empty()
                 ? op.args[arg].tensors[0]
                 : ValueId{};
    };
    const ValueId key_operand = operand(*scores, key_arg), value_operand = operand(*context, 1);
    EagerAttention a;
    a.scope = n.scope;
    if (key_operand.valid()) a.keys = CachedTensor(g, key_operand, -1, weights);
    if (value_operand.valid()) a.values = CachedTensor(g, value_operand, -2, weights);
    if (!a.keys.valid() || !a.values.valid()) {
      throw ConfigError("generation: the keys or values of the attention in " + n.scope +
                        " cannot be traced back to [batch, heads, tokens, dim] tensors; its cache is not modelled");
    }
    sites.layers.push_back(std::move(a));
  }
  if (sites.layers.empty()) return sites;
  // The model-level tensors made for the training forward's key length.
  for (const OpNode& n : g.nodes()) {
    if (n.region.kind == RegionKind::kDecoderLayer) continue;
    for (ValueId out : n.outputs) {
      const TensorValue& v = g.value(out);
      if (n.kind == "aten::ones" && v.shape == std::vector<int64_t>{g.batch(), g.seq()} &&
          !sites.attention_mask.valid()) {
        sites.attention_mask = out;
      }
      const bool mask_shape = v.shape.size() == 4 && v.shape[1] == 1 && v.shape[2] == g.seq() && v.shape[3] >= g.seq();
      if (!mask_shape || sites.model_mask.valid()) continue;
      for (NodeId u : users[static_cast<size_t>(out.index)]) {
        if (g.node(u).region.kind == RegionKind::kDecoderLayer) {
          sites.model_mask = out;
          break;
        }
      }
    }
  }
  return sites;
}

}  // namespace llmem
