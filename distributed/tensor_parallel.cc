#include "distributed/tensor_parallel.h"

#include <algorithm>
#include <map>
#include <optional>
#include <string>

#include "distributed/model_dims.h"
#include "graph/dtype.h"
#include "graph/error.h"
#include "graph/op_registry.h"

namespace llmem::dist {
namespace {

int Normalize(int64_t dim, size_t rank) { return static_cast<int>(dim < 0 ? dim + static_cast<int64_t>(rank) : dim); }

int64_t IntArg(const OpNode& node, size_t i, int64_t fallback) {
  if (i < node.args.size() && (node.args[i].kind == OpArg::Kind::kInt)) return node.args[i].int_value;
  return fallback;
}

// Where a reshape puts split input dim `d`: the output dim whose element range covers the input dim's range
// (`merged` when it is wider: other dims were folded in), or, when the input dim is spread over several output
// dims, the outermost of them. -1 when neither applies.
struct ReshapedSplit {
  int dim = -1;
  bool merged = false;
  bool spread = false;
};
ReshapedSplit MapThroughReshape(const std::vector<int64_t>& in, int d, const std::vector<int64_t>& out) {
  int64_t prefix = 1;
  for (int i = 0; i < d; ++i) prefix *= in[static_cast<size_t>(i)];
  const int64_t end = prefix * in[static_cast<size_t>(d)];
  int64_t p = 1;
  for (size_t k = 0; k < out.size(); ++k) {
    const int64_t next = p * out[k];
    if (out[k] != 1 && p <= prefix && next >= end) {
      return {static_cast<int>(k), p < prefix || next > end, false};  // covers
    }
    if (out[k] != 1 && p == prefix) return {static_cast<int>(k), false, true};  // spread
    p = next;
    if (p > prefix) break;
  }
  return {};
}

// Elementwise and broadcasting ops: dims line up from the right.
int MapRightAligned(const std::vector<int64_t>& in, int d, const std::vector<int64_t>& out) {
  const int o = static_cast<int>(out.size()) - static_cast<int>(in.size()) + d;
  if (o < 0 || o >= static_cast<int>(out.size())) return -1;
  return out[static_cast<size_t>(o)] == in[static_cast<size_t>(d)] ? o : -1;
}

// Ops that change the shape only, keeping the elements in order (graph/op_registry.h).
bool IsViewLike(const std::string& k) { return OpHas(k, kReshape); }

class Sharder {
 public:
  Sharder(const Graph& graph, int tp, bool vocab_parallel)
      : g_(graph),
        tp_(tp),
        vocab_parallel_(vocab_parallel),
        split_(graph.values().size(), -1),
        merged_(graph.values().size(), 0),
        fused_from_(graph.values().size(), -1) {
    out_.tp = tp;
    out_.output_all_reduced.assign(graph.nodes().size(), 0);
    out_.replicated_weight_grad.assign(graph.nodes().size(), 0);
    out_.input_grad_all_reduced.resize(graph.nodes().size());
  }

  TensorParallelRank Run() {
    for (const auto& node : g_.nodes()) {
      out_.input_grad_all_reduced[static_cast<size_t>(node.id.index)].assign(g_.tensor_inputs(node.id).size(), 0);
      Visit(node);
    }
    CheckFusedPieces();
    out_.split_dim = split_;
    out_.graph = BuildRankGraph();
    return std::move(out_);
  }

 private:
  const std::vector<int64_t>& Shape(ValueId v) const { return g_.value(v).shape; }
  int Split(ValueId v) const { return split_[static_cast<size_t>(v.index)]; }
  ValueId Arg(const OpNode& node, size_t i) const {
    return i < node.args.size() && node.args[i].kind == OpArg::Kind::kTensor && !node.args[i].tensors.empty()
               ? node.args[i].tensors[0]
               : ValueId{};
  }
  bool Splittable(ValueId weight, RegionKind allowed_extra) const {
    if (!weight.valid()) return false;
    const auto& v = g_.value(weight);
    if (v.param < 0) return false;
    const auto& p = g_.params()[static_cast<size_t>(v.param)];
    if (!p.trainable && !p.frozen) return false;  // a buffer (rotary tables, masks) stays whole
    return p.region.kind == RegionKind::kDecoderLayer || (vocab_parallel_ && p.region.kind == allowed_extra);
  }
  void SplitParam(ValueId w, int dim, const OpNode& node) {
    int& s = split_[static_cast<size_t>(w.index)];
    if (s != -1 && s != dim) {
      throw UnsupportedOpError("tensor parallelism: parameter " + g_.value(w).name +
                               " would be split along two different dims (" + node.scope + ")");
    }
    s = dim;
  }
  void AddAllReduce(const OpNode& node, ValueId v, StepPhase phase, const std::string& what) {
    out_.all_reduces.push_back({.value = v, .phase = phase, .what = what + " (" + node.scope + ")"});
  }

  // A linear (weight [out, in], or [in, out] for addmm's Conv1D layout) in a decoder layer or the LM head.
  bool VisitLinear(const OpNode& node, ValueId x, ValueId w, ValueId bias, bool weight_in_out) {
    if (!Splittable(w, RegionKind::kHead)) return false;
    const size_t n = static_cast<size_t>(node.id.index);
    const ValueId y = node.outputs.at(0);
    const int x_split = x.valid() ? Split(x) : -1;
    if (x_split >= 0 && x_split == static_cast<int>(Shape(x).size()) - 1) {
      // Row-parallel: the input's last dim is split; partial sums are all-reduced into a replicated output.
      SplitParam(w, weight_in_out ? 0 : 1, node);
      out_.output_all_reduced[n] = 1;
      AddAllReduce(node, y, StepPhase::kForward, "row-parallel output all-reduce");
      return true;
    }
    if (x_split >= 0) {
      throw UnsupportedOpError("tensor parallelism: the input of " + node.scope + " is split along dim " +
                               std::to_string(x_split) + ", not its last dim");
    }
    // Column-parallel: output features split; the input gradient is partial and all-reduced in backward.
    SplitParam(w, weight_in_out ? 1 : 0, node);
    if (bias.valid() && g_.value(bias).param >= 0) SplitParam(bias, 0, node);
    split_[static_cast<size_t>(y.index)] = static_cast<int>(Shape(y).size()) - 1;
    fused_from_[static_cast<size_t>(y.index)] = node.id.index;
    const auto& inputs = g_.tensor_inputs(node.id);
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i] == x && g_.value(x).requires_grad) {
        out_.input_grad_all_reduced[n][i] = 1;
        AddAllReduce(node, x, StepPhase::kBackward, "column-parallel input-gradient all-reduce");
      }
    }
    return true;
  }

  void Visit(const OpNode& node) {
    const std::string& k = node.kind;
    if (k == "aten::linear" && VisitLinear(node, Arg(node, 0), Arg(node, 1), Arg(node, 2), false)) return;
    if (k == "aten::addmm" && VisitLinear(node, Arg(node, 1), Arg(node, 2), Arg(node, 0), true)) return;
    if (k == "aten::embedding") {
      const ValueId w = Arg(node, 0), ids = Arg(node, 1);
      const bool token_ids = ids.valid() && IsGraphInputOrView(g_, ids);
      if (token_ids && Splittable(w, RegionKind::kEmbedding)) {
        // Vocab-parallel embedding: each rank looks up its rows (zeros elsewhere); the partial sums are all-reduced.
        SplitParam(w, 0, node);
        out_.output_all_reduced[static_cast<size_t>(node.id.index)] = 1;
        out_.replicated_weight_grad[static_cast<size_t>(node.id.index)] = 1;
        AddAllReduce(node, node.outputs.at(0), StepPhase::kForward, "vocab-parallel embedding all-reduce");
        return;
      }
    }
    if (k == "aten::cross_entropy_loss") {
      const ValueId logits = Arg(node, 0);
      if (logits.valid() && Split(logits) == static_cast<int>(Shape(logits).size()) - 1) {
        loss_nodes_.push_back(node.id.index);  // vocab-parallel loss; the loss itself is replicated
        return;
      }
    }
    MapOutputs(node);
  }

  void MapOutputs(const OpNode& node) {
    const std::string& k = node.kind;
    // The first split tensor input drives the outputs' split.
    ValueId src;
    for (ValueId in : g_.tensor_inputs(node.id)) {
      if (Split(in) >= 0) {
        src = in;
        break;
      }
    }
    if (!src.valid()) return;
    const auto& in = Shape(src);
    const int d = Split(src);
    auto set = [&](ValueId out, int dim) {
      const auto& s = Shape(out);
      if (dim >= 0 && dim < static_cast<int>(s.size()) && s[static_cast<size_t>(dim)] % tp_ == 0) {
        split_[static_cast<size_t>(out.index)] = dim;
      }
    };
    for (ValueId out : node.outputs) {
      const auto& os = Shape(out);
      if (os.empty()) continue;  // scalars (e.g. the loss) are replicated
      int dim = -1;
      if (k == "aten::transpose" || k == "aten::swapaxes") {
        const int a = Normalize(IntArg(node, 1, 0), in.size()), b = Normalize(IntArg(node, 2, 1), in.size());
        dim = d == a ? b : d == b ? a : d;
      } else if (k == "aten::t") {
        dim = 1 - d;
      } else if (k == "aten::permute") {
        const auto& perm = node.args.size() > 1 ? node.args[1].ints : std::vector<int64_t>{};
        for (size_t j = 0; j < perm.size(); ++j) {
          if (Normalize(perm[j], in.size()) == d) dim = static_cast<int>(j);
        }
      } else if (k == "aten::select" || k == "aten::unbind") {
        const int sel = Normalize(IntArg(node, 1, 0), in.size());
        dim = sel == d ? -1 : (sel < d ? d - 1 : d);
      } else if (k == "aten::stack") {
        const int at = Normalize(IntArg(node, 1, 0), in.size() + 1);
        dim = at <= d ? d + 1 : d;
      } else if (k == "aten::matmul" || k == "aten::bmm" || k == "aten::baddbmm") {
        // Activation products (attention scores, probs @ V): a split batch dim (heads) stays split.
        const bool from_second = src == Arg(node, k == "aten::baddbmm" ? 2 : 1);
        const int r = static_cast<int>(in.size());
        if (d < r - 2 || (!from_second && d == r - 2) || (from_second && d == r - 1)) {
          dim = static_cast<int>(os.size()) - (r - d);
        }
      } else if (IsViewLike(k) && os != in) {
        // A dim that folded other dims in (e.g. [B * heads]) does not say which part carries the split: spreading
        // it again is ambiguous. Refuse rather than guess (a wrong guess could under-state memory).
        const ReshapedSplit r = MapThroughReshape(in, d, os);
        if (r.dim >= 0 && os[static_cast<size_t>(r.dim)] % tp_ != 0) {
          throw ConfigError("tensor-parallel degree " + std::to_string(tp_) + " does not divide dim " +
                            std::to_string(r.dim) + " (" + std::to_string(os[static_cast<size_t>(r.dim)]) + ") of " +
                            g_.value(out).name);
        }
        if (r.dim < 0 || (r.spread && merged_[static_cast<size_t>(src.index)])) {
          throw UnsupportedOpError("tensor parallelism: cannot follow the split through " + k + " (" + node.scope +
                                   ")");
        }
        dim = r.dim;
        merged_[static_cast<size_t>(out.index)] = r.merged || (merged_[static_cast<size_t>(src.index)] && !r.spread);
        if (!r.merged && !r.spread) fused_from_[static_cast<size_t>(out.index)] = fused_from_[static_cast<size_t>(src.index)];
      } else if (os.size() == in.size() && k != "aten::cat" && os == in) {
        dim = d;  // same shape: elementwise, copies, casts, in-place ops, slices along other dims
      } else {
        dim = MapRightAligned(in, d, os);
        if (dim < 0 && os.size() == in.size() && (OpHas(k, kSlicesAlongDim) || k == "aten::cat")) {
          dim = d;  // sliced or concatenated along the split dim: every piece is split the same way
          const int32_t linear = fused_from_[static_cast<size_t>(src.index)];
          if (linear >= 0 && k != "aten::cat") {
            auto& cuts = pieces_[linear];
            cuts.kind = k;
            cuts.widths.push_back(os[static_cast<size_t>(d)]);
          }
        }
      }
      set(out, dim);
      if (!IsViewLike(k)) merged_[static_cast<size_t>(out.index)] = merged_[static_cast<size_t>(src.index)];
      if (k == "aten::cat" || k == "aten::index_copy_") SplitCacheOperands(node, out);
    }
  }

  // A generation forward's key/value cache (graph/generation_forward.h): the previous entry a DynamicCache
  // concatenates with the new keys, or the StaticCache's zeros the new keys are copied into, holds the rank's heads
  // as the new keys do (each rank caches what its own attention computes). Such an operand is a graph input or a
  // factory's output, so splitting it here changes no other op's split.
  void SplitCacheOperands(const OpNode& node, ValueId out) {
    const int d = Split(out);
    if (d < 0) return;
    for (ValueId in : g_.tensor_inputs(node.id)) {
      if (Split(in) >= 0 || Shape(in).size() != Shape(out).size() ||
          Shape(in)[static_cast<size_t>(d)] != Shape(out)[static_cast<size_t>(d)]) {
        continue;
      }
      const NodeId from = g_.value(in).producer;
      const bool input = !from.valid() && g_.value(in).param < 0;
      if (input || (from.valid() && g_.tensor_inputs(from).empty())) split_[static_cast<size_t>(in.index)] = d;
    }
  }

  // Note [Fused projections]: a column-parallel linear whose output is cut along its features into pieces (GPT-2's
  // c_attn split into q, k, v; Phi-3's qkv_proj slices and gate_up_proj chunk) is modelled as Megatron's fused
  // layout (and vLLM's QKVParallelLinear / MergedColumnParallelLinear): the weight's rows are interleaved so that
  // each rank holds 1/tp of every piece. A plain column split of the fused weight would not give each rank its
  // share of every piece (which is why HF's own plans replicate such outputs, `colwise_rep`). With pieces of equal
  // widths the interleaving is the usual one and the shares follow; with unequal ones (fused GQA or MQA q/k/v)
  // each rank's share depends on how the checkpoint interleaves the groups, which the graph does not say: refused.
  void CheckFusedPieces() const {
    for (const auto& [linear, cuts] : pieces_) {
      const bool equal = std::all_of(cuts.widths.begin(), cuts.widths.end(),
                                     [first = cuts.widths.front()](int64_t w) { return w == first; });
      if (equal) continue;
      std::string widths;
      for (int64_t w : cuts.widths) widths += (widths.empty() ? "" : ", ") + std::to_string(w);
      const OpNode& node = g_.node(NodeId{linear});
      throw UnsupportedOpError("tensor parallelism: the fused projection " + node.scope + " (" + node.kind +
                               ") is cut by " + cuts.kind + " into pieces of unequal widths (" + widths +
                               "): each rank's share depends on how its weight is interleaved, which is not modelled");
    }
  }

  Graph BuildRankGraph() {
    std::vector<TensorValue> values = g_.values();
    for (auto& v : values) {
      const int d = split_[static_cast<size_t>(v.id.index)];
      if (d < 0) continue;
      auto& size = v.shape[static_cast<size_t>(d)];
      if (size % tp_ != 0) {
        throw ConfigError("tensor-parallel degree " + std::to_string(tp_) + " does not divide dim " +
                          std::to_string(d) + " (" + std::to_string(size) + ") of " + v.name);
      }
      // Element strides: dims laid out outside the split dim shrink with it (works for permuted and sliced views).
      if (!v.strides.empty()) {
        const int64_t split_stride = v.strides[static_cast<size_t>(d)];
        for (auto& s : v.strides) {
          if (s > split_stride) s /= tp_;
        }
      }
      size /= tp_;
      if (v.storage_numel > 0) v.storage_numel = (v.storage_numel + tp_ - 1) / tp_;
    }
    std::vector<Parameter> params = g_.params();
    for (auto& p : params) {
      const auto& v = values[static_cast<size_t>(p.value.index)];
      if (split_[static_cast<size_t>(p.value.index)] < 0) continue;
      p.shape = v.shape;
      p.bytes = ShapeBytes(p.shape, p.dtype);
    }
    RecomputeViews(values);
    out_.loss_workspace_bytes.assign(g_.nodes().size(), 0);
    for (int32_t n : loss_nodes_) {
      const ValueId logits = Arg(g_.node(NodeId{n}), 0);
      out_.loss_workspace_bytes[static_cast<size_t>(n)] =
          NumElements(values[static_cast<size_t>(logits.index)].shape) * 4;
    }
    Graph rank(std::move(values), g_.nodes(), std::move(params), g_.inputs(), g_.loss(), g_.batch(), g_.seq());
    rank.set_runs_with_bf16_weights(g_.runs_with_bf16_weights());
    return rank;
  }

  // Ops that return a view when they can and copy otherwise: decide again at the rank's shapes.
  void RecomputeViews(std::vector<TensorValue>& values) const {
    for (const auto& node : g_.nodes()) {
      const std::string& k = node.kind;
      const bool reshape = OpHas(k, kReshape);
      if (!OpHas(k, kViewOrCopy) || node.outputs.size() != 1) continue;
      const ValueId in = Arg(node, 0);
      const ValueId out = node.outputs[0];
      if (!in.valid() || (Split(in) < 0 && Split(out) < 0)) continue;
      const TensorValue& src = values[static_cast<size_t>(in.index)];
      TensorValue& dst = values[static_cast<size_t>(out.index)];
      std::optional<std::vector<int64_t>> view;
      const std::vector<int64_t> src_strides = StridesOf(src);
      if (reshape) {
        view = ViewStrides(src.shape, src_strides, dst.shape);
      } else if (CanMergeDims(src, 0, src.shape.size()) &&
                 (src.shape.empty() || src_strides.back() == 1 || src.shape.back() == 1)) {
        view = src_strides;  // already contiguous: contiguous() returns its input
      }
      if (view) {
        dst.alias_of = in;
        dst.storage_numel = 0;
        dst.strides = *view;
      } else {
        dst.alias_of = ValueId{};
        dst.storage_numel = NumElements(dst.shape);
        dst.strides.clear();
      }
    }
  }

  const Graph& g_;
  int tp_;
  bool vocab_parallel_;
  std::vector<int> split_;
  std::vector<uint8_t> merged_;  // per value: its split dim folded other dims in
  std::vector<int32_t> fused_from_;  // per value: the column-parallel linear (node) whose features it holds whole
  struct Cuts {
    std::string kind;              // the op that cuts (aten::slice, aten::split, ...)
    std::vector<int64_t> widths;   // features of each piece
  };
  std::map<int32_t, Cuts> pieces_;  // per column-parallel linear (node): the pieces its output is cut into
  std::vector<int32_t> loss_nodes_;
  TensorParallelRank out_;
};

}  // namespace

TensorParallelRank ShardForTensorParallel(const Graph& graph, int tp, bool vocab_parallel) {
  if (tp < 1) throw ConfigError("the tensor-parallel degree must be at least 1 (got " + std::to_string(tp) + ")");
  if (tp == 1) {
    TensorParallelRank rank;
    rank.graph = graph;
    rank.output_all_reduced.assign(graph.nodes().size(), 0);
    rank.replicated_weight_grad.assign(graph.nodes().size(), 0);
    rank.input_grad_all_reduced.resize(graph.nodes().size());
    rank.split_dim.assign(graph.values().size(), -1);
    return rank;
  }
  return Sharder(graph, tp, vocab_parallel).Run();
}

CollectiveList TensorParallelCollectives(const TensorParallelRank& rank, const std::vector<DType>& value_dtypes) {
  CollectiveList out;
  for (const TensorParallelAllReduce& a : rank.all_reduces) {
    Collective c;
    c.kind = CollectiveKind::kAllReduce;
    c.bytes = ShapeBytes(rank.graph.value(a.value).shape, value_dtypes.at(static_cast<size_t>(a.value.index)));
    c.group_size = rank.tp;
    c.phase = a.phase;
    c.what = a.what;
    out.push_back(std::move(c));
  }
  return out;
}

bool TensorParallelHooks::OutputReplacedByCollective(const OpNode& node) const {
  const size_t n = static_cast<size_t>(node.id.index);
  return rank_ && n < rank_->output_all_reduced.size() && rank_->output_all_reduced[n];
}

int64_t TensorParallelHooks::ExtraTransientBytes(const OpNode& node, sim::Phase phase) const {
  const size_t n = static_cast<size_t>(node.id.index);
  if (!rank_ || n >= rank_->loss_workspace_bytes.size()) return 0;
  return phase == sim::Phase::kForward || phase == sim::Phase::kBackward ? rank_->loss_workspace_bytes[n] : 0;
}

int64_t TensorParallelHooks::InputGradBytes(const OpNode& node, size_t input, int64_t bytes) const {
  const size_t n = static_cast<size_t>(node.id.index);
  const bool whole =
      rank_ && input == 0 && n < rank_->replicated_weight_grad.size() && rank_->replicated_weight_grad[n];
  return whole ? bytes * rank_->tp : bytes;
}

bool TensorParallelHooks::InputGradReplacedByCollective(const OpNode& node, size_t input) const {
  const size_t n = static_cast<size_t>(node.id.index);
  return rank_ && n < rank_->input_grad_all_reduced.size() && input < rank_->input_grad_all_reduced[n].size() &&
         rank_->input_grad_all_reduced[n][input];
}

std::string TensorParallelHooks::UnmodelledLoss(const sim::LossPlan& loss) const {
  if (!rank_ || loss.chunk_lengths.empty()) return StepHooks::UnmodelledLoss(loss);
  const OpNode& head = rank_->graph.nodes().at(static_cast<size_t>(loss.lm_head_node));
  const bool vocab_split = rank_->split_dim.at(static_cast<size_t>(head.outputs.at(0).index)) >= 0;
  return sim::LossFeature(loss) + " is not modelled with tensor parallelism: " +
         (vocab_split ? "the LM head is vocab-split, so every chunk's logits and cross-entropy would be the "
                        "vocab-parallel ones with their collectives"
                      : "the chunked loop has not been compared with a tensor-parallel run");
}

}  // namespace llmem::dist
