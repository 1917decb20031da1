// `llmem infer --cache paged`: vLLM's V1 engine on each GPU (simulator/paged_kv_pool.h): the KV blocks its
// start-up profile leaves room for, whether it starts at all, and how many sequences of the request run at once.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include "cli/infer_command.h"
#include "graph/graph.h"
#include "graph/decoder_model.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// 0 when the engine starts with room for the whole request at once, 3 otherwise; bad input throws ConfigError.
// `graph_at`: the export's generation graphs; `probe_graph`: the export at 1 x 2 tokens (its position
// limit and dimensions).
int RunPagedInfer(const InferOptions& o, const DecoderModel& model,
                  const sim::GenerationGraphAt& graph_at, const Graph& probe_graph,
                  const sim::TrainingConfig& config);

}  // namespace llmem::cli
