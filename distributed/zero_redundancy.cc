#include "distributed/zero_redundancy.h"

#include <algorithm>
#include <numeric>


namespace llmem::dist {

std::vector<int> ZeroRedundancyOwners(const std::vector<ManagedParam>& params, int world) {
  std::vector<size_t> order(params.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return params[a].numel > params[b].numel; });
  std::vector<int64_t> sizes(static_cast<size_t>(world), 0);
  std::vector<int> owner(params.size(), 0);
  for (size_t i : order) {
    const int rank = static_cast<int>(std::min_element(sizes.begin(), sizes.end()) - sizes.begin());
    owner[i] = rank;
    sizes[static_cast<size_t>(rank)] += params[i].numel;
  }
  return owner;
}

int LargestZeroRedundancyRank(const std::vector<ManagedParam>& params, const std::vector<int>& owners, int world) {
  std::vector<int64_t> bytes(static_cast<size_t>(world), 0);
  for (size_t i = 0; i < params.size(); ++i) bytes[static_cast<size_t>(owners[i])] += params[i].bytes();
  return static_cast<int>(std::max_element(bytes.begin(), bytes.end()) - bytes.begin());
}

ZeroRedundancyHooks::ZeroRedundancyHooks(std::vector<int64_t> buckets, const std::vector<ManagedParam>& params,
                                         int world)
    : DdpHooks(std::move(buckets)) {
  const auto owners = ZeroRedundancyOwners(params, world);
  const int rank = LargestZeroRedundancyRank(params, owners, world);
  for (size_t i = 0; i < params.size(); ++i) {
    if (owners[i] == rank) owned_.insert(params[i].value);
  }
}

std::string ZeroRedundancyHooks::UnmodelledLoop(const sim::LoopPlan& loop) const {
  if (loop.optimizer_in_backward) {
    return "--optimizer-in-backward does not run with ZeRO-1: ZeroRedundancyOptimizer steps its partition of "
           "the parameters after backward, then broadcasts them";
  }
  return DdpHooks::UnmodelledLoop(loop);
}

int64_t ZeroRedundancyHooks::OptimizedBytes(const Parameter& p, int64_t full_bytes) const {
  return owned_.count(p.value.index) ? full_bytes : 0;
}

}  // namespace llmem::dist
