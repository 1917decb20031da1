// `llmem infer --gpus N`: the tensor-parallel layouts of N GPUs for one generate() request, compared.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "cli/infer_command.h"
#include "graph/graph.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// "TP4 x 2 copies", "TP8", "1 GPU x 8 engines": T ranks per copy of the model, `copies` of them (`unit` names one).
std::string TensorParallelLayoutName(int tp, int copies, const std::string& unit);

// Every degree T that divides N and the model's heads: N / T copies of the model, each generating the batch on T
// ranks; printed (or JSON) fitting layouts first by decode tokens/s over all copies. `request_at(b)`: the request at
// batch b (for --max-batch per layout); `no_tp_plan`, when not empty, why no degree above 1 is tried. 0 when one
// fits, 3 when none does.
int RunGenerationLayouts(const InferOptions& o, const sim::GenerationGraphAt& graph_at,
                         const std::function<sim::GenerationRequest(int64_t)>& request_at,
                         const sim::TrainingConfig& config, const Graph& probe_graph,
                         const std::string& no_tp_plan);

}  // namespace llmem::cli
