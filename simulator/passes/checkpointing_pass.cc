#include "simulator/passes/checkpointing_pass.h"

#include <algorithm>
#include <string>

#include "graph/error.h"

namespace llmem::sim {
namespace {

// torch.get_rng_state() on CPU: the mt19937 generator's state as a uint8 tensor (5,056 bytes, measured with
// torch 2.11: torch.get_rng_state().numel()).
constexpr int64_t kCpuRngStateBytes = 5056;

}  // namespace

StepPlan CheckpointingPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  plan.checkpointing = {};
  const Checkpointing& c = config.checkpointing;
  if (c.mode == CheckpointingMode::kNone) return plan;
  int32_t layers = 0;
  for (const auto& node : graph.nodes()) {
    if (node.region.kind == RegionKind::kDecoderLayer) layers = std::max(layers, node.region.layer + 1);
  }
  const std::string name = CheckpointingName(c);
  if (layers == 0) throw ConfigError("--checkpointing " + name + ": the model has no decoder layers to checkpoint");
  CheckpointPlan& cp = plan.checkpointing;
  if (c.mode == CheckpointingMode::kEveryK) {
    if (c.every_k < 1 || c.every_k > layers) {
      throw ConfigError("--checkpointing " + name + ": K must be between 1 and the model's " +
                        std::to_string(layers) + " decoder layers");
    }
    // torchtitan's layer-selective AC counts blocks from 1 and wraps a block when count % K == 0.
    for (int32_t i = 0; i < layers; ++i) {
      if ((i + 1) % c.every_k == 0) cp.layers.push_back(i);
    }
  } else {
    // HF gradient_checkpointing_enable() wraps every GradientCheckpointingLayer: every decoder layer.
    for (int32_t i = 0; i < layers; ++i) cp.layers.push_back(i);
  }
  cp.reentrant = c.impl == CheckpointingImpl::kReentrant;
  cp.rng_state_bytes = config.target.is_cpu ? kCpuRngStateBytes : 0;
  for (const auto& node : graph.nodes()) {
    if (node.region.kind == RegionKind::kDecoderLayer &&
        std::binary_search(cp.layers.begin(), cp.layers.end(), node.region.layer)) {
      plan.ops[static_cast<size_t>(node.id.index)].save = SavePolicy::kRecompute;
    }
  }
  return plan;
}

}  // namespace llmem::sim
