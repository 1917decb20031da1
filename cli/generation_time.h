// The time of Hugging Face generate() on a GPU as the step-time roofline of the two forwards llmem simulates.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distributed/collective.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// The time of generate() on a GPU, a roofline (distributed/step_time_model.h) of the two forwards simulated: a decode
// step reads every weight and, through the DynamicCache's torch.cat and the attention, the whole cache, so it is
// memory-bound; the prefill is mostly compute-bound.
struct GenerationTime {
  double prefill_s = 0;
  double decode_step_s = 0;  // the last step, whose cache is longest: the slowest
  double generate_s = 0;     // prefill + (N - 1) x the last step: the roofline's upper bound for the whole call
  std::vector<std::string> assumptions;
};

// `collectives`: each forward's tensor-parallel all-reduces (prefill, then the decode step; empty on one GPU), which
// the next op waits for: they add to the forward in full.
GenerationTime TimeGeneration(const sim::GenerationEstimate& est, const sim::TrainingConfig& config,
                              int64_t new_tokens, const std::vector<dist::CollectiveList>& collectives);

}  // namespace llmem::cli
