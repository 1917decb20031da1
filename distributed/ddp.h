// PyTorch DistributedDataParallel as one rank sees it: a full replica plus flat gradient buckets that live as
// long as the DDP object. With gradient_as_bucket_view=False (the default) each gradient is copied into its
// bucket view when ready and the all-reduce runs in place on the bucket, so the buckets add the size of all
// gradients and backward allocates nothing bucket-sized (torch/csrc/distributed/c10d/reducer.cpp).
//
// Bucket layout after the rebuild at the first iteration: parameters in gradient-ready order (reverse of first
// forward use), a 1 MiB first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES) and 25 MiB after it (bucket_cap_mb); a
// bucket closes once it reaches its cap, so the parameter that crosses the cap stays in it.
#pragma once

#include <cstdint>
#include <vector>

#include "distributed/collective.h"
#include "distributed/sharded_params.h"
#include "simulator/step_hooks.h"

namespace llmem::dist {

constexpr int64_t kDdpFirstBucketBytes = 1 << 20;
constexpr int64_t kDdpBucketCapBytes = 25 << 20;

// Bucket sizes in bytes, in the order backward fills them.
std::vector<int64_t> DdpBucketBytes(const std::vector<ManagedParam>& params, int64_t first_cap = kDdpFirstBucketBytes,
                                    int64_t cap = kDdpBucketCapBytes);

// One all-reduce per bucket over the data-parallel group, overlapped with backward.
CollectiveList DdpCollectives(const std::vector<int64_t>& buckets, int dp, bool crosses_nodes);

class DdpHooks : public sim::StepHooks {
 public:
  explicit DdpHooks(std::vector<int64_t> buckets) : buckets_(std::move(buckets)) {}
  void OnSetup(sim::StepMemory& mem) override;
  // Gradient accumulation is the loop of accelerate's accumulate() (HF Trainer): every micro-batch but the last
  // runs under DistributedDataParallel.no_sync(), so gradients accumulate in .grad as on one GPU, and the last
  // backward copies them into the buckets (allocated at construction) and all-reduces there: nothing of its own.
  // An optimizer in backward is refused (see ddp.cc).
  std::string UnmodelledLoop(const sim::LoopPlan& loop) const override;

 private:
  std::vector<int64_t> buckets_;
};

}  // namespace llmem::dist
