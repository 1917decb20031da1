// The largest batch, or the longest prompt, whose generation fits the GPU: exact estimates of the whole loop
// (simulator/generation_simulator.h) bracketing the answer as LargestBatchSearch does (distributed/
// largest_batch_search.h): memory grows with either, nearly linearly, so a line through the known points proposes
// and bisection bounds the rounds.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "graph/graph.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::dist {

struct GenerationSearch {
  sim::GenerationGraphAt graph_at;                                // the export's generation forwards
  std::function<sim::GenerationRequest(int64_t)> request_at;      // the request at the searched value
  sim::GenerationForwardSimulator simulate;                       // one GPU's, or a tensor-parallel rank's
  // A model placed over GPUs (a device map): each GPU's share, used instead of `simulate`; a value fits when it
  // fits every GPU.
  std::vector<sim::GenerationForwardSimulator> shares;
  int64_t limit = 1;                                              // no value above it is tried (e.g. positions)
  const sim::GenerationEstimate* known = nullptr;                 // an estimate already made, at `known_value`
  int64_t known_value = 0;
};

// 0 when not even 1 fits; otherwise a value whose estimate fits next to one that does not (or the limit).
int64_t LargestFittingGeneration(const GenerationSearch& search, const sim::TrainingConfig& config);

}  // namespace llmem::dist
