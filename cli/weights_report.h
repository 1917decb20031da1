// The weights of a step by role and storage format, for a frozen base with adapters (LoRA, QLoRA): what a
// practitioner checks first ("13.5 GB of bf16 base, or 3.9 GB in nf4?").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "graph/graph.h"
#include "simulator/recipe.h"

namespace llmem::cli {

struct WeightGroup {
  std::string label;  // "trainable f32", "frozen bf16", "frozen 4-bit codes", "frozen quantization state", ...
  int64_t tensors = 0;
  int64_t elements = 0;
  int64_t bytes = 0;  // exact tensor bytes at the dtype the step stores them in
};

// Groups in a fixed order (trainable first), empty groups left out.
std::vector<WeightGroup> GroupWeights(const Graph& graph, sim::Precision precision);
void PrintWeights(const std::vector<WeightGroup>& groups);
nlohmann::json WeightsJson(const std::vector<WeightGroup>& groups);

}  // namespace llmem::cli
