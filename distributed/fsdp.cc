#include "distributed/fsdp.h"

#include <string>

namespace llmem::dist {
namespace {

// Bytes per element of the gathered parameter: param_dtype's, else the parameter's own.
int64_t GatheredElementSize(const ManagedParam& p, const sim::FsdpPrecision& precision) {
  return precision.param_dtype ? ElementSize(*precision.param_dtype) : p.element_size;
}
// Bytes per element of the reduce-scatter: reduce_dtype's, else the gradient's (the gathered parameter's).
int64_t ReduceElementSize(const ManagedParam& p, const sim::FsdpPrecision& precision) {
  return precision.reduce_dtype ? ElementSize(*precision.reduce_dtype) : GatheredElementSize(p, precision);
}

}  // namespace

std::vector<FsdpGroup> FsdpGroups(const std::vector<ManagedParam>& params, int world, int32_t num_layers,
                                  const sim::FsdpPrecision& precision) {
  std::vector<FsdpGroup> groups(static_cast<size_t>(num_layers) + 1);
  for (const auto& p : params) {
    const bool in_layer =
        p.region.kind == RegionKind::kDecoderLayer && p.region.layer >= 0 && p.region.layer < num_layers;
    FsdpGroup& g = groups[in_layer ? static_cast<size_t>(p.region.layer) + 1 : 0];
    g.params.push_back(p);
    const int64_t shard_numel = PaddedShardNumel(p, world);
    g.shard_bytes += shard_numel * p.element_size;
    g.unsharded_bytes += shard_numel * world * GatheredElementSize(p, precision);
    if (p.trainable) g.reduce_bytes += shard_numel * world * ReduceElementSize(p, precision);
  }
  return groups;
}

CollectiveList FsdpCollectives(const std::vector<FsdpGroup>& groups, int world, bool reshard_after_forward,
                               bool crosses_nodes) {
  CollectiveList out;
  if (world <= 1) return out;
  int64_t layer_bytes = 0, root_bytes = groups.empty() ? 0 : groups[0].unsharded_bytes;
  int64_t reduce_bytes = 0;
  for (size_t i = 1; i < groups.size(); ++i) layer_bytes += groups[i].unsharded_bytes;
  for (const auto& g : groups) reduce_bytes += g.reduce_bytes;
  auto add = [&](CollectiveKind kind, int64_t bytes, StepPhase phase, const char* what) {
    if (bytes > 0) {
      out.push_back(Collective{.kind = kind,
                               .bytes = bytes,
                               .group_size = world,
                               .crosses_nodes = crosses_nodes,
                               .phase = phase,
                               .overlapped = true,
                               .count = 1,
                               .what = what});
    }
  };
  add(CollectiveKind::kAllGather, layer_bytes + root_bytes, StepPhase::kForward, "FSDP2 all-gather (forward)");
  if (reshard_after_forward) {
    add(CollectiveKind::kAllGather, layer_bytes, StepPhase::kBackward, "FSDP2 all-gather (backward)");
  }
  add(CollectiveKind::kReduceScatter, reduce_bytes, StepPhase::kBackward,
      "FSDP2 reduce-scatter of gradients");
  return out;
}

Fsdp2Hooks::Fsdp2Hooks(std::vector<FsdpGroup> groups, int world, bool reshard_after_forward, bool gloo_copies,
                       const sim::FsdpPrecision& precision, const FsdpLoop& loop)
    : groups_(std::move(groups)),
      world_(world),
      reshard_after_forward_(reshard_after_forward),
      gloo_copies_(gloo_copies),
      precision_(precision),
      loop_(loop),
      reducing_(!loop.accumulating || loop.reduce_every_micro_batch) {
  unsharded_.resize(groups_.size());
  flat_.assign(groups_.size(), -1);
  reduced_.assign(groups_.size(), false);
  for (const auto& g : groups_) {
    for (const auto& p : g.params) shard_bytes_of_value_[p.value] = PaddedShardNumel(p, world_) * p.element_size;
  }
}

int64_t Fsdp2Hooks::ResidentParamBytes(const Parameter& p, int64_t full_bytes) const {
  auto it = shard_bytes_of_value_.find(p.value.index);
  return it == shard_bytes_of_value_.end() ? full_bytes : it->second;  // buffers stay whole
}

int64_t Fsdp2Hooks::OptimizedBytes(const Parameter& p, int64_t full_bytes) const {
  auto it = shard_bytes_of_value_.find(p.value.index);
  return it == shard_bytes_of_value_.end() ? full_bytes : it->second;
}

int Fsdp2Hooks::GroupOf(const Region& region) const {
  if (region.kind == RegionKind::kDecoderLayer && region.layer >= 0 &&
      static_cast<size_t>(region.layer) + 1 < groups_.size()) {
    return region.layer + 1;
  }
  return 0;
}

void Fsdp2Hooks::AllGather(int group, sim::StepMemory& mem) {
  const FsdpGroup& g = groups_[static_cast<size_t>(group)];
  if (!unsharded_[static_cast<size_t>(group)].empty() || flat_[static_cast<size_t>(group)] >= 0 || g.params.empty()) {
    return;  // gathered already (ZeRO-2, the root) or in flight (prefetched)
  }
  const std::string name = group == 0 ? "root" : "layer " + std::to_string(group - 1);
  // With a param_dtype the all-gather inputs are new casts of the shards, dead once copied into the output.
  const int64_t cast_inputs =
      precision_.param_dtype
          ? mem.Alloc(g.unsharded_bytes / world_, sim::MemoryCategory::kCommBuffers, "FSDP2 all-gather input cast")
          : -1;
  flat_[static_cast<size_t>(group)] =
      mem.Alloc(g.unsharded_bytes, sim::MemoryCategory::kCommBuffers, "FSDP2 all-gather output (" + name + ")");
  if (cast_inputs >= 0) mem.Free(cast_inputs);
  if (gloo_copies_ && world_ > 1) {
    for (int i = 0; i < 2; ++i) {
      mem.Free(mem.Alloc(g.unsharded_bytes, sim::MemoryCategory::kCommBuffers, "gloo all-gather buffer"));
    }
  }
}

void Fsdp2Hooks::CopyOut(int group, bool keep_flat, sim::StepMemory& mem) {
  AllGather(group, mem);
  int64_t& flat = flat_[static_cast<size_t>(group)];
  if (flat < 0) return;  // nothing to copy out
  // wait_for_unshard in forward frees the previous group's flat buffer before this copy-out.
  if (keep_flat && deferred_flat_ >= 0) {
    mem.Free(deferred_flat_);
    deferred_flat_ = -1;
  }
  auto& live = unsharded_[static_cast<size_t>(group)];
  for (const auto& p : groups_[static_cast<size_t>(group)].params) {
    live.push_back(mem.Alloc(PaddedShardNumel(p, world_) * GatheredElementSize(p, precision_) * world_,
                             sim::MemoryCategory::kGatheredParams, "unsharded param #" + std::to_string(p.index)));
  }
  if (keep_flat) {
    deferred_flat_ = flat;
  } else {
    mem.Free(flat);
  }
  flat = -1;
}

void Fsdp2Hooks::Reshard(int group, sim::StepMemory& mem) {
  for (int64_t b : unsharded_[static_cast<size_t>(group)]) mem.Free(b);
  unsharded_[static_cast<size_t>(group)].clear();
}

void Fsdp2Hooks::PostBackward(int group, sim::StepMemory& mem) {
  if (reduced_[static_cast<size_t>(group)]) return;
  reduced_[static_cast<size_t>(group)] = true;
  if (!reducing_) {  // gradient sync off: reshard only, the unsharded gradients stay
    Reshard(group, mem);
    return;
  }
  const FsdpGroup& g = groups_[static_cast<size_t>(group)];
  std::vector<int64_t> grads;
  std::vector<int32_t> stepped;  // parameters with a gradient, for their post-accumulate-grad hooks
  int64_t input_bytes = 0, sharded_grad_bytes = 0;
  bool cast_output = false, cast_input = false;
  for (const auto& p : g.params) {
    const int64_t grad = mem.TakeParamGrad(p.index);
    if (grad < 0) continue;
    grads.push_back(grad);
    stepped.push_back(p.index);
    input_bytes += PaddedShardNumel(p, world_) * ReduceElementSize(p, precision_) * world_;
    sharded_grad_bytes += PaddedShardNumel(p, world_) * p.element_size;
    cast_output |= ReduceElementSize(p, precision_) != p.element_size;
    cast_input |= ReduceElementSize(p, precision_) != GatheredElementSize(p, precision_);
  }
  Reshard(group, mem);
  if (grads.empty()) return;
  if (pending_reduce_input_ >= 0) mem.Free(pending_reduce_input_);
  const std::string name = group == 0 ? "root" : "layer " + std::to_string(group - 1);
  pending_reduce_input_ =
      mem.Alloc(input_bytes, sim::MemoryCategory::kCommBuffers, "FSDP2 reduce-scatter input (" + name + ")");
  if (gloo_copies_ && cast_input) {
    // The CPU copy-in (torch._chunk_cat into an output of another dtype) makes a copy of each gradient in its
    // own dtype, one at a time (measured with a counting allocator, torch 2.11, bf16 gradients into fp32).
    for (const auto& p : g.params) {
      mem.Free(mem.Alloc(p.numel * GatheredElementSize(p, precision_), sim::MemoryCategory::kCommBuffers,
                         "reduce-scatter copy-in cast"));
    }
  }
  // unsharded_grads.clear() after the copy-in frees every gradient but the last: foreach_reduce's loop over the
  // gradients (the Shard(i > 0) reorder, run with more than one rank) leaves its loop variable bound to the last
  // one until the function returns, after the reduce-scatter and the output's cast (_fsdp_collectives.py,
  // torch 2.11).
  const int64_t held_grad = world_ > 1 ? grads.back() : -1;
  for (int64_t grad : grads) {
    if (grad != held_grad) mem.Free(grad);
  }
  // The reduce-scatter output is the sharded gradient, unless it must be cast to the parameter's dtype: then
  // each parameter's slice is cast into a new shard and the output dies with the last slice. A later micro-batch's
  // output (or its cast) is added into the sharded gradient and freed.
  const bool kept = !accumulating_ && !loop_.optimizer_in_backward;  // the block stays as the sharded .grad
  const auto category = [](bool gradients) {
    return gradients ? sim::MemoryCategory::kGradients : sim::MemoryCategory::kCommBuffers;
  };
  const int64_t output =
      mem.Alloc(input_bytes / world_, category(!cast_output && kept),
                cast_output || !kept ? "FSDP2 reduce-scatter output (" + name + ")"
                                     : "FSDP2 sharded gradients (" + name + ")");
  if (gloo_copies_ && world_ > 1) {
    mem.Free(mem.Alloc(input_bytes, sim::MemoryCategory::kCommBuffers, "gloo reduce-scatter input copy"));
  }
  int64_t sharded = output;
  if (cast_output) {
    sharded = mem.Alloc(sharded_grad_bytes, category(kept),
                        kept ? "FSDP2 sharded gradients (" + name + ")" : "FSDP2 reduce-scatter output cast");
    mem.Free(output);
  }
  if (held_grad >= 0) mem.Free(held_grad);
  if (loop_.optimizer_in_backward) {
    for (int32_t param : stepped) mem.StepParam(param);
  }
  if (!kept) mem.Free(sharded);
}

void Fsdp2Hooks::OnNextMicroBatch(sim::StepMemory&) {
  // The micro-batch runs the whole forward and backward again, from sharded parameters.
  reduced_.assign(groups_.size(), false);
  forward_started_ = backward_started_ = false;
  // The simulated later micro-batch stands for every later one and is the last: it reduces. Its output is added
  // into sharded gradients only when the earlier ones reduced too.
  accumulating_ = reducing_ && !loop_.optimizer_in_backward;
  reducing_ = true;
}

std::string Fsdp2Hooks::UnmodelledLoop(const sim::LoopPlan& loop) const {
  if (loop.simulated_micro_batches == 1 || loop_.reduce_every_micro_batch) return "";
  for (const auto& g : groups_) {
    for (const auto& p : g.params) {
      // to_accumulated_grad_if_needed keeps the deferred gradients in reduce_dtype, a copy this model lacks
      if (ReduceElementSize(p, precision_) != GatheredElementSize(p, precision_)) {
        return "--grad-accum > 1 with FSDP2 gradient sync off until the last micro-batch is not modelled with a "
               "--fsdp-reduce-dtype other than the gradients' dtype (add --fsdp-reduce-every-micro-batch)";
      }
    }
  }
  return "";
}

void Fsdp2Hooks::OnRegionStart(sim::Phase phase, const Region& region, sim::StepMemory& mem) {
  const int group = GroupOf(region);
  if (phase == sim::Phase::kForward) {
    if (!forward_started_) {
      forward_started_ = true;
      CopyOut(0, /*keep_flat=*/true, mem);  // the root's pre-forward runs before the embedding
    }
    if (group != 0) CopyOut(group, /*keep_flat=*/true, mem);
    return;
  }
  if (phase != sim::Phase::kBackward) return;
  if (!loss_outside_model_) RootPreBackward(mem);  // at the loss, which the model's forward computed
  if (group != 0) {
    CopyOut(group, false, mem);
    if (group > 1) AllGather(group - 1, mem);  // backward prefetch of the previous layer
  }
}

// The root's pre-backward prefetches the last layer. It is a hook on the model's outputs, so it runs when their
// gradient is ready: at the loss when the model computes it, else once the loss's backward has run.
void Fsdp2Hooks::RootPreBackward(sim::StepMemory& mem) {
  if (backward_started_) return;
  backward_started_ = true;
  CopyOut(0, false, mem);
  if (groups_.size() > 1) AllGather(static_cast<int>(groups_.size()) - 1, mem);
}

void Fsdp2Hooks::OnRegionEnd(sim::Phase phase, const Region& region, sim::StepMemory& mem) {
  const int group = GroupOf(region);
  if (phase == sim::Phase::kForward) {
    if (group != 0 && reshard_after_forward_) Reshard(group, mem);
    if (region.kind == RegionKind::kHead && deferred_flat_ >= 0) {
      mem.Free(deferred_flat_);  // the root's post-forward frees the last all-gather output
      deferred_flat_ = -1;
    }
    return;
  }
  if (phase == sim::Phase::kBackward && group != 0) PostBackward(group, mem);
}

// The root's post-forward when the loss runs after the model returns: the last all-gather output goes, and an
// explicit reshard_after_forward=True reshards the root as well (torch 2.11 _fsdp_state.py _lazy_init keeps the root
// unsharded only when reshard_after_forward was left to its default); its pre-backward all-gathers it again.
void Fsdp2Hooks::OnModelForwardEnd(sim::StepMemory& mem) {
  loss_outside_model_ = true;
  if (deferred_flat_ >= 0) {
    mem.Free(deferred_flat_);
    deferred_flat_ = -1;
  }
  if (reshard_after_forward_) Reshard(0, mem);
}

void Fsdp2Hooks::OnModelOutputsGrad(sim::StepMemory& mem) { RootPreBackward(mem); }

void Fsdp2Hooks::OnBackwardEnd(sim::StepMemory& mem) {
  for (size_t g = groups_.size(); g-- > 1;) PostBackward(static_cast<int>(g), mem);  // groups backward skipped
  PostBackward(0, mem);
  if (pending_reduce_input_ >= 0) {
    mem.Free(pending_reduce_input_);
    pending_reduce_input_ = -1;
  }
}

}  // namespace llmem::dist
