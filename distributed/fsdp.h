// ZeRO-2/3 with PyTorch FSDP2 (fully_shard on every decoder layer, then on the root model), as one rank sees it.
// Read from torch/distributed/fsdp/_fully_shard (torch 2.11): _fsdp_param_group.py, _fsdp_collectives.py,
// _fsdp_param.py, _fsdp_state.py.
//
// Resident: each parameter's padded dim-0 shard (ceil(dim0 / N) rows), optimizer states of the shard.
// Forward, per group (root = embedding + final norm + LM head, then each layer):
//   pre-forward: all-gather into one flat buffer (N × shard), free the previous group's flat buffer (kept so its
//   copy-out could overlap this all-gather), copy out into one unsharded tensor per parameter; post-forward:
//   free the unsharded tensors (ZeRO-3; ZeRO-2 keeps them). The root never reshards after forward; the last flat
//   buffer is freed when the root's forward returns.
// Backward, in reverse: pre-backward prefetches the next group (reverse post-forward order) by starting its
// all-gather into a flat buffer; a group's own pre-backward copies out (one tensor per parameter) and frees its
// flat buffer at once (gathering first if nothing prefetched it); post-backward frees the unsharded
// parameters, frees the previous group's reduce-scatter input, copies the unsharded gradients into a new
// reduce-scatter input (N × shard, gradient dtype), frees them but the last (held until the reduce returns), and
// reduce-scatters into an output of one shard that the sharded .grad views until zero_grad. The root's post-backward runs in the final callback, then the
// last reduce-scatter input is freed.
// MixedPrecisionPolicy (simulator/passes/fsdp_mixed_precision_pass.h): the all-gather input is a new shard cast
// to param_dtype (freed once copied in), the all-gather output and the unsharded parameters are in param_dtype;
// the reduce-scatter input and output are in reduce_dtype, and an output in another dtype than the parameter's is
// cast per parameter into the sharded gradient (_fsdp_collectives.py foreach_reduce).
// Gradient accumulation, by default accelerate's no_sync() (what HF Trainer runs): set_requires_gradient_sync(False)
// until the last micro-batch, whose post-backward is the first to reduce-scatter; before it, post-backward only
// reshards (reduce_grads false) and the unsharded gradients stay as the unsharded parameters' .grad, where the
// next backward adds into them as on one GPU. FsdpLoop::reduce_every_micro_batch: torchtitan's loop, which keeps
// gradient sync on, so every micro-batch reduce-scatters; a later micro-batch's output is added into the sharded
// gradient (`sharded_param.grad._local_tensor += new_sharded_grad`) and freed, no unsharded gradient survives a
// micro-batch. Optimizer in backward (torchtune): foreach_reduce calls each sharded parameter's
// post-accumulate-grad hooks right after viewing its gradient out of the reduce-scatter output; the hook steps the
// shard and frees its .grad, and the output (shared by the group's gradients) goes once foreach_reduce returns.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "distributed/collective.h"
#include "distributed/sharded_params.h"
#include "simulator/passes/fsdp_mixed_precision_pass.h"
#include "simulator/step_hooks.h"

namespace llmem::dist {

struct FsdpGroup {
  std::vector<ManagedParam> params;
  int64_t shard_bytes = 0;     // Σ padded shard bytes (one rank's resident parameters of the group)
  int64_t unsharded_bytes = 0; // N × padded shard elements in param_dtype: the all-gather output, the parameters
  int64_t reduce_bytes = 0;    // N × padded shard elements in reduce_dtype of the trainable ones: the reduce-scatter input
};

// Group 0 is the root (everything outside the decoder layers); group i + 1 is decoder layer i.
std::vector<FsdpGroup> FsdpGroups(const std::vector<ManagedParam>& params, int world, int32_t num_layers,
                                  const sim::FsdpPrecision& precision = {});

// Per step: all-gather of every layer in forward (ZeRO-3) and backward, and one reduce-scatter per group.
CollectiveList FsdpCollectives(const std::vector<FsdpGroup>& groups, int world, bool reshard_after_forward,
                               bool crosses_nodes);

// The training loop around the engine.
struct FsdpLoop {
  bool accumulating = false;             // more than one micro-batch per step
  bool reduce_every_micro_batch = false;  // torchtitan's; otherwise accelerate's no_sync() until the last one
  bool optimizer_in_backward = false;    // each parameter stepped by its post-accumulate-grad hook after the reduce
};

class Fsdp2Hooks : public sim::StepHooks {
 public:
  // `gloo_copies`: the collectives run on gloo (CPU ranks), whose all_gather_into_tensor allocates two transient
  // output-sized buffers one after the other and whose reduce_scatter_tensor copies its whole input (measured
  // with a counting allocator, torch 2.11); NCCL works in place.
  Fsdp2Hooks(std::vector<FsdpGroup> groups, int world, bool reshard_after_forward, bool gloo_copies = false,
             const sim::FsdpPrecision& precision = {}, const FsdpLoop& loop = {});

  int64_t ResidentParamBytes(const Parameter& p, int64_t full_bytes) const override;
  int64_t OptimizedBytes(const Parameter& p, int64_t full_bytes) const override;
  void OnRegionStart(sim::Phase phase, const Region& region, sim::StepMemory& mem) override;
  void OnRegionEnd(sim::Phase phase, const Region& region, sim::StepMemory& mem) override;
  void OnModelForwardEnd(sim::StepMemory& mem) override;
  void OnModelOutputsGrad(sim::StepMemory& mem) override;
  void OnBackwardEnd(sim::StepMemory& mem) override;
  std::string UnmodelledLoop(const sim::LoopPlan& loop) const override;
  void OnNextMicroBatch(sim::StepMemory& mem) override;
  bool RunsPostAccumulateGradHooks() const override { return true; }

 private:
  int GroupOf(const Region& region) const;
  void AllGather(int group, sim::StepMemory& mem);                // the flat all-gather output
  void CopyOut(int group, bool keep_flat, sim::StepMemory& mem);  // per-parameter tensors; frees or defers the flat
  void RootPreBackward(sim::StepMemory& mem);
  void Reshard(int group, sim::StepMemory& mem);
  void PostBackward(int group, sim::StepMemory& mem);

  std::vector<FsdpGroup> groups_;
  int world_;
  bool reshard_after_forward_;
  bool gloo_copies_;
  sim::FsdpPrecision precision_;
  std::map<int32_t, int64_t> shard_bytes_of_value_;   // parameter IR value -> padded shard bytes
  std::vector<std::vector<int64_t>> unsharded_;       // per group: live unsharded parameter blocks
  std::vector<bool> reduced_;                         // per group: post-backward done
  std::vector<int64_t> flat_;                         // per group: all-gather output not yet copied out
  int64_t deferred_flat_ = -1;                        // forward all-gather output kept for the next copy-out
  int64_t pending_reduce_input_ = -1;                 // reduce-scatter input kept until the next one
  bool forward_started_ = false;
  bool backward_started_ = false;
  bool loss_outside_model_ = false;  // the loss runs after the model's forward returns (OnModelForwardEnd)
  FsdpLoop loop_;
  bool reducing_ = true;       // this backward reduce-scatters (gradient sync on)
  bool accumulating_ = false;  // the sharded gradients of an earlier micro-batch exist
};

}  // namespace llmem::dist
