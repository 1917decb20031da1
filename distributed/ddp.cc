#include "distributed/ddp.h"

#include <string>

namespace llmem::dist {

std::vector<int64_t> DdpBucketBytes(const std::vector<ManagedParam>& params, int64_t first_cap, int64_t cap) {
  std::vector<int64_t> buckets;
  int64_t current = 0;
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    current += it->bytes();
    if (current >= (buckets.empty() ? first_cap : cap)) {
      buckets.push_back(current);
      current = 0;
    }
  }
  if (current > 0) buckets.push_back(current);
  return buckets;
}

CollectiveList DdpCollectives(const std::vector<int64_t>& buckets, int dp, bool crosses_nodes) {
  CollectiveList out;
  if (dp <= 1) return out;
  for (int64_t b : buckets) {
    out.push_back(Collective{.kind = CollectiveKind::kAllReduce, .bytes = b, .group_size = dp,
                             .crosses_nodes = crosses_nodes, .phase = StepPhase::kBackward, .overlapped = true,
                             .count = 1, .what = "DDP gradient bucket all-reduce"});
  }
  return out;
}

std::string DdpHooks::UnmodelledLoop(const sim::LoopPlan& loop) const {
  // A tensor's post-accumulate-grad hooks run inside AccumulateGrad, before the node's post hooks where the
  // reducer copies the gradient into its bucket (torch/csrc/autograd/functions/accumulate_grad.cpp, reducer.cpp).
  if (loop.optimizer_in_backward && !buckets_.empty()) {
    return "--optimizer-in-backward does not run under DDP: the per-parameter step would run before DDP's "
           "all-reduce, on each rank's own gradient (torchtune steps in backward with FSDP2 only)";
  }
  return "";
}

void DdpHooks::OnSetup(sim::StepMemory& mem) {
  for (size_t i = 0; i < buckets_.size(); ++i) {
    mem.Alloc(buckets_[i], sim::MemoryCategory::kCommBuffers, "DDP gradient bucket " + std::to_string(i));
  }
}

}  // namespace llmem::dist
