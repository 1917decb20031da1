// ZeRO-1 with PyTorch's engines: DDP for gradients plus torch.distributed.optim.ZeroRedundancyOptimizer, which
// gives each rank the optimizer states of a subset of whole parameters. Its partition (zero_redundancy_optimizer.py
// _partition_parameters): parameters sorted by size, largest first (stable), each to the rank with the fewest
// elements so far (lowest rank on ties). After the local step each owner broadcasts its parameters in place.
#pragma once

#include <cstdint>
#include <set>
#include <vector>

#include "distributed/ddp.h"

namespace llmem::dist {

// Owner rank of each managed parameter (same order as `params`).
std::vector<int> ZeroRedundancyOwners(const std::vector<ManagedParam>& params, int world);

// The rank holding the most optimizer-state bytes (the one that peaks).
int LargestZeroRedundancyRank(const std::vector<ManagedParam>& params, const std::vector<int>& owners, int world);

class ZeroRedundancyHooks : public DdpHooks {
 public:
  ZeroRedundancyHooks(std::vector<int64_t> buckets, const std::vector<ManagedParam>& params, int world);
  int64_t OptimizedBytes(const Parameter& p, int64_t full_bytes) const override;
  // Accumulation as DDP's; the ZeroRedundancyOptimizer steps its partition only after backward.
  std::string UnmodelledLoop(const sim::LoopPlan& loop) const override;

 private:
  std::set<int32_t> owned_;  // IR values of the parameters this rank steps
};

}  // namespace llmem::dist
