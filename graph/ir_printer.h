// Text form of the IR, one op per line, for tests, goldens and `llmem inspect --ir`:
//   %7:f32[4,128,256] = aten::linear(%5, model.layers.0.mlp.up_proj.weight, None)  # layer 0 model.layers.0.mlp.up_proj
// Views and in-place results print as `%8:f32[...]@%7` (shares %7's storage).
#pragma once

#include <string>

#include "graph/graph.h"

namespace llmem {

std::string PrintValue(const Graph& graph, ValueId id);  // "%7:f32[4,128,256]"
std::string PrintOp(const Graph& graph, const OpNode& node);
std::string PrintGraph(const Graph& graph);

}  // namespace llmem
