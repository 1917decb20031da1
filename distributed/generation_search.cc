#include "distributed/generation_search.h"

#include <algorithm>

#include "distributed/largest_batch_search.h"

namespace llmem::dist {

int64_t LargestFittingGeneration(const GenerationSearch& s, const sim::TrainingConfig& config) {
  if (s.limit < 1) return 0;
  LargestBatchSearch search(config.target.gpu.capacity_bytes, s.limit);
  if (s.known && s.known_value >= 1 && s.known_value <= s.limit) {
    search.Record(s.known_value, s.known->nvidia_smi_bytes(), s.known->fits());
  }
  while (!search.Done()) {
    for (int64_t v : search.NextProbes()) {
      if (s.shares.empty()) {
        const sim::GenerationEstimate e = sim::EstimateGeneration(s.graph_at, s.request_at(v), config, s.simulate);
        search.Record(v, e.nvidia_smi_bytes(), e.fits());
        continue;
      }
      int64_t highest = 0;
      bool fits = true;
      for (const auto& share : s.shares) {
        const sim::GenerationEstimate e = sim::EstimateGeneration(s.graph_at, s.request_at(v), config, share);
        highest = std::max(highest, e.nvidia_smi_bytes());
        fits = fits && e.fits();
      }
      search.Record(v, highest, fits);
    }
  }
  return search.Largest();
}

}  // namespace llmem::dist
