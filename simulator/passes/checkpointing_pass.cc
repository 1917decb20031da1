#include "simulator/passes/checkpointing_pass.h"

#include <algorithm>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "graph/error.h"
#include "simulator/backend_rules.h"
#include "simulator/dispatched_kernels.h"

namespace llmem::sim {
namespace {

// torch.get_rng_state() on CPU: the mt19937 generator's state as a uint8 tensor (5,056 bytes, measured with
// torch 2.11: torch.get_rng_state().numel()).
constexpr int64_t kCpuRngStateBytes = 5056;

// Note [Selective checkpointing policy]
// torchtitan v0.1.0's op-level selective AC (torchtitan/models/llama3/infra/parallelize.py, _save_list and
// _custom_policy; selective_ac_option "op"): every transformer block is checkpointed non-reentrantly with
// preserve_rng_state=False and create_selective_checkpoint_contexts(policy); the policy returns MUST_SAVE for
// the kernels below, except every second aten.mm of the block (a per-block counter, counted again from zero in
// the recompute, so the same mms are saved), and PREFER_RECOMPUTE for everything else. The list names the
// kernels a TorchDispatchMode sees (dispatched_kernels.h): on CUDA the attention kernel is on it, on CPU
// (_scaled_dot_product_flash_attention_for_cpu) it is not, and a linear with a bias runs addmm, which is not.
// Its _c10d_functional.reduce_scatter_tensor entry is a collective no single-GPU graph has.
constexpr std::string_view kSelectiveSaveList[] = {
    "aten::mm",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::max",
};

// The save policy of every op of the checkpointed layers under torchtitan's rule.
void ApplySelectivePolicy(const Graph& graph, const TrainingConfig& config, StepPlan& plan) {
  const BackendRules backend = RulesFor(config.target);
  const bool autocast =
      config.precision == Precision::kBf16Autocast || config.precision == Precision::kFp16Autocast;
  std::vector<int> mm_count;  // per decoder layer, in forward order
  for (const auto& node : graph.nodes()) {
    if (node.region.kind != RegionKind::kDecoderLayer) continue;
    const auto& inputs = graph.tensor_inputs(node.id);
    bool sixteen_bit = false;
    if (!inputs.empty()) {
      sixteen_bit = ElementSize(plan.value_dtypes[static_cast<size_t>(inputs[0].index)]) == 2 ||
                    (autocast && backend.Autocast(node.kind) == AutocastClass::kLowerPrecision);
    }
    const std::string_view kernel = DispatchedKernel(graph, node, backend, sixteen_bit);
    if (mm_count.size() <= static_cast<size_t>(node.region.layer)) mm_count.resize(node.region.layer + 1, 0);
    const bool mm = kernel == "aten::mm";
    if (mm) ++mm_count[static_cast<size_t>(node.region.layer)];
    const bool listed = std::find(std::begin(kSelectiveSaveList), std::end(kSelectiveSaveList), kernel) !=
                        std::end(kSelectiveSaveList);
    const bool every_second_mm = mm && mm_count[static_cast<size_t>(node.region.layer)] % 2 == 0;
    if (listed && !every_second_mm) plan.ops[static_cast<size_t>(node.id.index)].save = SavePolicy::kCacheOutput;
  }
}

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
    // HF gradient_checkpointing_enable() wraps every GradientCheckpointingLayer, torchtitan's op-level selective
    // AC every transformer block: every decoder layer.
    for (int32_t i = 0; i < layers; ++i) cp.layers.push_back(i);
  }
  const bool selective = c.mode == CheckpointingMode::kSelective;
  if (selective && c.impl == CheckpointingImpl::kReentrant) {
    throw ConfigError("--checkpointing selective is non-reentrant only (a selective policy needs use_reentrant=False)");
  }
  cp.reentrant = c.impl == CheckpointingImpl::kReentrant;
  // torchtitan checkpoints with preserve_rng_state=False: no RNG state is stashed.
  cp.rng_state_bytes = config.target.is_cpu && !selective ? kCpuRngStateBytes : 0;
  for (const auto& node : graph.nodes()) {
    if (node.region.kind == RegionKind::kDecoderLayer &&
        std::binary_search(cp.layers.begin(), cp.layers.end(), node.region.layer)) {
      plan.ops[static_cast<size_t>(node.id.index)].save = SavePolicy::kRecompute;
    }
  }
  if (selective) ApplySelectivePolicy(graph, config, plan);
  return plan;
}

}  // namespace llmem::sim
