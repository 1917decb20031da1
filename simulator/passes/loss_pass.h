// The loss pass: which loss the loop computes from the last hidden state (the graph's, torchtune's chunked one or
// Liger-Kernel's fused linear one), and its chunks.
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

// Liger-Kernel's token rows per chunk of the fused linear cross-entropy for `tokens` (batch x seq) rows, a
// vocabulary of `vocab` and a hidden size `hidden`.
int64_t FusedLinearChunkRows(int64_t tokens, int64_t vocab, int64_t hidden);

// Throws ConfigError for a chunk count outside 1..seq, a model without an LM head linear (a module named
// lm_head) that ends the graph, an LM head with a bias, or the fused linear loss on the cpu target.
StepPlan LossPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
