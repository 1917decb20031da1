#include "simulator/passes/loss_pass.h"

#include <algorithm>
#include <string>

#include "graph/error.h"

namespace llmem::sim {
namespace {

bool InLmHead(const OpNode& node) { return node.scope == "lm_head" || node.scope.ends_with(".lm_head"); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// triton.next_power_of_2: the smallest power of two >= n.
int64_t NextPowerOfTwo(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

}  // namespace

// Liger-Kernel 0.8.2, src/liger_kernel/ops/fused_linear_cross_entropy.py (fused_linear_cross_entropy_forward): the
// chunk grows the [rows, V] logits to about the [BT, H] input's size: inc_factor = cdiv(V, H), chunk_size =
// next_power_of_2(cdiv(BT, inc_factor)).
int64_t FusedLinearChunkRows(int64_t tokens, int64_t vocab, int64_t hidden) {
  return NextPowerOfTwo(CeilDiv(tokens, CeilDiv(vocab, hidden)));
}

StepPlan LossPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  plan.loss = {};
  if (config.loss == LossVariant::kStandard) return plan;
  const std::string name = "--loss " + LossName(config.loss, config.loss_chunks);
  const bool fused = config.loss == LossVariant::kFusedLinear;
  if (fused && config.target.is_cpu) {
    throw ConfigError(name + " runs Liger-Kernel's Triton kernels, which need a GPU target (no CPU run to predict)");
  }
  const auto& nodes = graph.nodes();
  int32_t head = -1;
  for (const auto& node : nodes) {
    if (InLmHead(node) && node.kind == "aten::linear") head = node.id.index;
  }
  if (head < 0) throw ConfigError(name + ": the model has no LM head (a linear module named lm_head) to replace");
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
  plan.loss.lm_head_node = head;
  if (fused) {
    const int64_t tokens = hidden[0] * hidden[1];
    const int64_t rows = FusedLinearChunkRows(tokens, logits[2], hidden[2]);
    for (int64_t start = 0; start < tokens; start += rows) {
      plan.loss.chunk_lengths.push_back(std::min(rows, tokens - start));
    }
    plan.loss.fused_linear = true;
    // The addmm path needs an fp32 weight gradient and 16-bit logits: fp32 weights under autocast.
    const bool autocast =
        config.precision == Precision::kBf16Autocast || config.precision == Precision::kFp16Autocast;
    plan.loss.weight_grad_addmm = autocast && config.target.gpu.compute_capability >= 80 &&
                                  plan.value_dtypes.at(static_cast<size_t>(inputs[1].index)) == DType::kF32;
    return plan;
  }
  const int64_t seq = hidden[1];
  const int64_t chunks = config.loss_chunks;
  if (chunks < 1 || chunks > seq) {
    throw ConfigError(name + ": N must be between 1 and the sequence length " + std::to_string(seq));
  }
  // torch.tensor_split(sections=N): the first seq % N chunks are one position longer.
  for (int64_t c = 0; c < chunks; ++c) plan.loss.chunk_lengths.push_back(seq / chunks + (c < seq % chunks ? 1 : 0));
  return plan;
}

}  // namespace llmem::sim
