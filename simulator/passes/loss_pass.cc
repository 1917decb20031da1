#include "simulator/passes/loss_pass.h"

#include <string>

#include "graph/error.h"

namespace llmem::sim {
namespace {

bool InLmHead(const OpNode& node) { return node.scope == "lm_head" || node.scope.ends_with(".lm_head"); }

}  // namespace

StepPlan LossPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  plan.loss = {};
  if (config.loss != LossVariant::kChunked) return plan;
  const std::string name = "--loss " + LossName(config.loss, config.loss_chunks);
  if (config.keep_outputs) throw ConfigError(name + " with --keep-outputs is not modelled yet");
  const auto& nodes = graph.nodes();
  int32_t head = -1;
  for (const auto& node : nodes) {
    if (InLmHead(node) && node.kind == "aten::linear") head = node.id.index;
  }
  if (head < 0) throw ConfigError(name + ": the model has no LM head (a linear module named lm_head) to chunk");
  const OpNode& linear = nodes[static_cast<size_t>(head)];
  const auto& inputs = graph.tensor_inputs(linear.id);
  const auto& hidden = graph.value(inputs.at(0)).shape;
  const auto& logits = graph.value(linear.outputs.at(0)).shape;
  if (inputs.size() > 2) throw ConfigError(name + ": an LM head with a bias is not modelled yet");
  if (hidden.size() != 3 || logits.size() != 3 || hidden[1] != graph.seq()) {
    throw ConfigError(name + ": the LM head does not take the [batch, seq, hidden] last hidden state");
  }
  for (size_t n = static_cast<size_t>(head); n < nodes.size(); ++n) {
    if (nodes[n].region.kind != RegionKind::kHead) {
      throw ConfigError(name + ": ops after the LM head are not all part of the loss");
    }
  }
  const int64_t seq = hidden[1];
  const int64_t chunks = config.loss_chunks;
  if (chunks < 1 || chunks > seq) {
    throw ConfigError(name + ": N must be between 1 and the sequence length " + std::to_string(seq));
  }
  plan.loss.lm_head_node = head;
  // torch.tensor_split(sections=N): the first seq % N chunks are one position longer.
  for (int64_t c = 0; c < chunks; ++c) plan.loss.chunk_lengths.push_back(seq / chunks + (c < seq % chunks ? 1 : 0));
  return plan;
}

}  // namespace llmem::sim
