#include "distributed/model_dims.h"

#include <algorithm>
#include <set>

#include "graph/error.h"

namespace llmem::dist {
namespace {

const TensorValue* ArgTensor(const Graph& graph, const OpNode& node, size_t arg) {
  if (arg >= node.args.size() || node.args[arg].tensors.empty()) return nullptr;
  return &graph.value(node.args[arg].tensors[0]);
}

// The smallest head count along the producers of an attention input: before GQA's repeat_kv expands the
// key/value heads, the tensor is [B, kv_heads, S, head_dim] (or [B, S, kv_heads, head_dim] before the transpose).
int64_t HeadsBeforeExpansion(const Graph& graph, ValueId v, int64_t heads, int64_t head_dim) {
  int64_t best = heads;
  for (int step = 0; step < 12 && v.valid(); ++step) {
    const auto& tv = graph.value(v);
    if (tv.shape.size() == 4 && tv.shape[3] == head_dim) {
      const int64_t h = tv.shape[1] == graph.seq() ? tv.shape[2] : tv.shape[1];
      if (h > 0) best = std::min(best, h);
    }
    if (!tv.producer.valid()) break;
    const auto& node = graph.node(tv.producer);
    if (node.args.empty() || node.args[0].tensors.empty()) break;
    v = node.args[0].tensors[0];
  }
  return best;
}

}  // namespace

bool IsGraphInputOrView(const Graph& graph, ValueId v) {
  const ValueId root = graph.StorageRoot(v);
  return std::find(graph.inputs().begin(), graph.inputs().end(), root) != graph.inputs().end();
}

ModelDims ReadModelDims(const Graph& graph) {
  ModelDims dims;
  dims.layers = graph.num_layers();
  for (const auto& node : graph.nodes()) {
    if (node.kind != "aten::embedding") continue;
    const TensorValue* weight = ArgTensor(graph, node, 0);
    if (!weight || weight->shape.size() != 2 || node.args.size() < 2 || node.args[1].tensors.empty()) continue;
    if (!IsGraphInputOrView(graph, node.args[1].tensors[0])) continue;  // position embeddings index positions
    dims.vocab = weight->shape[0];
    dims.hidden = weight->shape[1];
    break;
  }
  if (dims.vocab == 0) throw ModelLoadError("the graph has no token embedding (aten::embedding of the input ids)");
  for (const auto& node : graph.nodes()) {
    if (node.region.kind != RegionKind::kDecoderLayer || node.region.layer != 0) continue;
    if (node.kind == "aten::linear" || node.kind == "aten::addmm") {
      const auto& out = graph.value(node.outputs.at(0));
      if (!out.shape.empty()) dims.intermediate = std::max(dims.intermediate, out.shape.back());
    }
    if (dims.heads == 0 && node.kind == "aten::scaled_dot_product_attention") {
      const TensorValue* q = ArgTensor(graph, node, 0);
      const TensorValue* k = ArgTensor(graph, node, 1);
      if (q && k && q->shape.size() == 4) {
        dims.heads = q->shape[1];
        dims.kv_heads = HeadsBeforeExpansion(graph, node.args[1].tensors[0], dims.heads, q->shape[3]);
      }
    }
    if (dims.heads == 0 && node.kind == "aten::softmax") {
      // Eager attention: softmax over [B, heads, S, S] scores.
      const TensorValue* scores = ArgTensor(graph, node, 0);
      if (scores && scores->shape.size() == 4 && scores->shape[2] == graph.seq()) {
        dims.heads = dims.kv_heads = scores->shape[1];
      }
    }
  }
  if (dims.heads == 0) throw ModelLoadError("the graph has no attention in decoder layer 0");
  return dims;
}

std::string CheckTensorParallelDegree(const ModelDims& dims, int tp, bool vocab_parallel) {
  if (tp < 1) return "the tensor-parallel degree must be at least 1 (got " + std::to_string(tp) + ")";
  auto fails = [tp](int64_t n) { return n % tp != 0; };
  const std::string degree = "tensor-parallel degree " + std::to_string(tp) + " does not divide the ";
  if (fails(dims.heads)) return degree + std::to_string(dims.heads) + " attention heads";
  if (fails(dims.kv_heads)) return degree + std::to_string(dims.kv_heads) + " key/value heads";
  if (fails(dims.hidden)) return degree + "hidden size " + std::to_string(dims.hidden);
  if (fails(dims.intermediate)) return degree + "MLP width " + std::to_string(dims.intermediate);
  if (vocab_parallel && fails(dims.vocab)) return degree + "vocabulary of " + std::to_string(dims.vocab);
  return "";
}

}  // namespace llmem::dist
