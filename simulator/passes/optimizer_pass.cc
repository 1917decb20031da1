#include "simulator/passes/optimizer_pass.h"

#include <optional>
#include <set>

#include "graph/error.h"
#include "graph/op_registry.h"
#include "simulator/backend_rules.h"

namespace llmem::sim {
namespace {

// Layouts and step temporaries as docs/OPTIMIZER_STATES.md records them from the libraries' sources.

// HF Adafactor (transformers/optimization.py): factored second moment for >= 2-D parameters, states in fp32
// whatever the parameter dtype (the gradient is upcast first), and a 0-d fp32 RMS.
std::vector<PerParamBlock> AdafactorStates(size_t rank) {
  if (rank >= 2) {
    return {{"exp_avg_sq_row", DType::kF32, BlockLayout::kRows},
            {"exp_avg_sq_col", DType::kF32, BlockLayout::kColumns},
            {"RMS", DType::kF32, BlockLayout::kFixed, 1}};
  }
  return {{"exp_avg_sq", DType::kF32}, {"RMS", DType::kF32, BlockLayout::kFixed, 1}};
}

// The peak of Adafactor's step for one parameter: `update = grad**2 + eps` with `grad**2` (2 x 4N), the
// row/column factors next to the old update for a factored parameter; 16-bit parameters add grad.float() and
// p.float(), alive through the whole step.
std::vector<PerParamBlock> AdafactorTemporaries(size_t rank, DType param) {
  std::vector<PerParamBlock> t = {{"grad**2", DType::kF32}, {"update", DType::kF32}};
  if (rank >= 2) {
    t.push_back({"r_factor", DType::kF32, BlockLayout::kRows});
    t.push_back({"c_factor", DType::kF32, BlockLayout::kColumns});
  }
  if (param != DType::kF32) {
    t.push_back({"grad.float()", DType::kF32});
    t.push_back({"p.float()", DType::kF32});
  }
  return t;
}

// bitsandbytes Optimizer2State.init_state: 8-bit below min_8bit_size (4096 elements) or under Trainer's 32-bit
// override of nn.Embedding weights is 32-bit: fp32 state1/state2 whatever the parameter dtype.
constexpr int64_t kBnbMin8bitSize = 4096;
constexpr int64_t kBnbBlockSize = 256;         // blocksize of the block-wise 8-bit states (every device)
constexpr int64_t kBnbPagedMinElements = 100000;  // get_state_buffer: paged only from 1e5 elements

std::vector<PerParamBlock> Bnb8bitStates(bool eight_bit, bool paged) {
  if (!eight_bit) return {{"state1", DType::kF32, BlockLayout::kElementwise, 1, paged},
                          {"state2", DType::kF32, BlockLayout::kElementwise, 1, paged}};
  return {{"state1", DType::kU8, BlockLayout::kElementwise, 1, paged},
          {"state2", DType::kU8, BlockLayout::kElementwise, 1, paged},
          {"absmax1", DType::kF32, BlockLayout::kPerBlock, kBnbBlockSize},
          {"absmax2", DType::kF32, BlockLayout::kPerBlock, kBnbBlockSize}};
}

// bitsandbytes' CPU backend runs a PyTorch reference of the step (backends/cpu/ops.py). 8-bit: both states
// dequantized to fp32, g.float() * gnorm_scale, the sqrt and the quotient of denom (5 x 4N), plus p.float() for
// a 16-bit parameter. 32-bit: g.float() * gnorm_scale and state2.sqrt() + eps next to the quotient (3 x 4N),
// plus p.float(). CUDA runs one kernel that allocates nothing.
std::vector<PerParamBlock> Bnb8bitCpuTemporaries(bool eight_bit, DType param) {
  std::vector<PerParamBlock> t;
  if (eight_bit) {
    t = {{"state1 fp32", DType::kF32}, {"state2 fp32", DType::kF32}, {"grad fp32", DType::kF32},
         {"sqrt(state2)", DType::kF32}, {"denom", DType::kF32}};
  } else {
    t = {{"grad fp32", DType::kF32}, {"sqrt(state2) + eps", DType::kF32}, {"update", DType::kF32}};
  }
  if (param != DType::kF32) t.push_back({"p fp32", DType::kF32});
  return t;
}

// Storage roots of the weights an embedding lookup reads (HF Trainer keeps nn.Embedding weights in 32 bits).
std::set<int32_t> EmbeddingWeightRoots(const Graph& graph) {
  std::set<int32_t> roots;
  for (const OpNode& node : graph.nodes()) {
    const OpInfo* op = FindOp(node.kind);
    if (op == nullptr || op->grad != GradFormula::kEmbedding || node.args.empty()) continue;
    const OpArg& weight = node.args[0];
    if (weight.kind == OpArg::Kind::kTensor && !weight.tensors.empty()) {
      roots.insert(graph.StorageRoot(weight.tensors[0]).index);
    }
  }
  return roots;
}

void CheckOptimizerImpl(const TrainingConfig& config) {
  if (config.optimizer_impl == OptimizerImplChoice::kDefault) return;
  const bool torch_optim = config.optimizer == OptimizerKind::kAdamW ||
                           config.optimizer == OptimizerKind::kSgdMomentum ||
                           config.optimizer == OptimizerKind::kSgdNoMomentum;
  if (!torch_optim) {
    throw ConfigError("--optimizer-impl " + std::string(OptimizerImplName(config.optimizer_impl)) +
                      " applies to adamw and sgd (torch.optim), not to " + std::string(OptimizerName(config.optimizer)));
  }
}

}  // namespace

StepPlan OptimizerPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  CheckOptimizerImpl(config);
  const BackendRules backend = RulesFor(config.target);
  const bool bnb = config.optimizer == OptimizerKind::kAdamW8bit || config.optimizer == OptimizerKind::kPagedAdamW8bit;
  const std::set<int32_t> embeddings = bnb ? EmbeddingWeightRoots(graph) : std::set<int32_t>{};
  bool first_8bit = true;
  for (ParamPlan& pp : plan.params) {
    pp.states.clear();
    pp.step_temporaries.reset();
    if (!pp.optimized) continue;
    const Parameter& p = graph.params()[static_cast<size_t>(pp.param)];
    // torch.optim keeps the states in the parameter's dtype (zeros_like / torch.zeros_like(p) in _init_group).
    const DType d = plan.value_dtypes[static_cast<size_t>(p.value.index)];
    switch (config.optimizer) {
      case OptimizerKind::kAdamW:
        pp.states = {{"state", d}, {"exp_avg_sq", d}};
        break;
      case OptimizerKind::kSgdMomentum:
        pp.states = {{"state", d}};
        break;
      case OptimizerKind::kSgdNoMomentum:
        break;
      case OptimizerKind::kAdafactor:
        pp.states = AdafactorStates(p.shape.size());
        pp.step_temporaries = AdafactorTemporaries(p.shape.size(), d);
        break;
      case OptimizerKind::kAdamW8bit:
      case OptimizerKind::kPagedAdamW8bit: {
        // bitsandbytes decides on the whole parameter's numel.
        const int64_t numel = NumElements(p.shape);
        const bool eight_bit = numel >= kBnbMin8bitSize && !embeddings.count(graph.StorageRoot(p.value).index);
        const bool paged = config.optimizer == OptimizerKind::kPagedAdamW8bit && backend.cuda &&
                           numel >= kBnbPagedMinElements;
        pp.states = Bnb8bitStates(eight_bit, paged);
        if (eight_bit && first_8bit) {
          // name2qmap: the optimizer's two 256-entry fp32 maps, made once and shared by every 8-bit state.
          pp.states.push_back({"qmap1", DType::kF32, BlockLayout::kFixed, 256});
          pp.states.push_back({"qmap2", DType::kF32, BlockLayout::kFixed, 256});
          first_8bit = false;
        }
        pp.step_temporaries = backend.cuda ? std::vector<PerParamBlock>{} : Bnb8bitCpuTemporaries(eight_bit, d);
        break;
      }
    }
  }
  plan.optimizer_step = {};
  if (config.optimizer == OptimizerKind::kAdamW) {
    OptimizerImpl impl = backend.optimizer;
    if (config.optimizer_impl == OptimizerImplChoice::kForeach) impl = OptimizerImpl::kForeach;
    if (config.optimizer_impl == OptimizerImplChoice::kForLoop) impl = OptimizerImpl::kPerParameter;
    // Every temporary has the parameter's dtype: the step runs in it.
    if (config.optimizer_impl == OptimizerImplChoice::kFused) {
      // _fused_adamw: one kernel per group, no parameter-sized temporary.
    } else if (impl == OptimizerImpl::kForeach) {
      // _multi_tensor_adamw: exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs) for the whole group, freed after
      // addcdiv_.
      plan.optimizer_step.whole_group = true;
      plan.optimizer_step.temporaries = {{"sqrt(exp_avg_sq)", std::nullopt}};
    } else {
      // torch::optim::AdamW / _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps):
      // the sqrt temporary and the quotient are alive together; the quotient (denom) lives until addcdiv_. In
      // torch.optim (eager Python) `denom` is a local of the loop over parameters: it still holds the previous
      // parameter's quotient while the next one's sqrt and quotient are made (torch/optim/adam.py,
      // _single_tensor_adam). C++ torch::optim (the TorchScript step) scopes it to one parameter.
      plan.optimizer_step.temporaries = {{"sqrt(exp_avg_sq)", std::nullopt}, {"denom", std::nullopt}};
      if (config.lifetimes == Lifetimes::kEager) plan.optimizer_step.held_by_local = 1;
    }
  }
  // SGD updates in place, with or without momentum, in every implementation.
  return plan;
}

}  // namespace llmem::sim
