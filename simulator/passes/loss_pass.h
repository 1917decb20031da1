// The loss pass: which loss the loop computes from the last hidden state, and over which sequence chunks.
#pragma once

#include "graph/graph.h"
#include "simulator/step_plan.h"
#include "simulator/training_config.h"

namespace llmem::sim {

// Throws ConfigError for a chunk count outside 1..seq, a model without an LM head linear (a module named
// lm_head) that ends the graph, or a loop the chunked loss does not combine with (kept outputs).
StepPlan LossPass(const Graph& graph, StepPlan plan, const TrainingConfig& config);

}  // namespace llmem::sim
