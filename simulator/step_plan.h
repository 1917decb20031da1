// Note [Step plan]
// One training step as plain data: what the recipe makes of a graph before anything is simulated. A pipeline of
// passes (simulator/passes/, one recipe concern per file, each a pure function of graph, plan and recipe) fills
// it; the executor (step_executor.h) turns it into the timeline, and parallel engines change that through
// StepHooks. A new recipe feature is a field here, the pass that sets it, and the executor step that reads it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "graph/dtype.h"
#include "graph/graph.h"

namespace llmem::sim {

// How many elements a per-parameter block has, from the parameter's (rank-local) shape.
enum class BlockLayout : uint8_t {
  kElementwise,  // one per parameter element
  kPerBlock,     // one per `count` parameter elements, rounded up (block-wise quantization statistics)
  kRows,         // shape[:-1] (a factored second moment's row factor)
  kColumns,      // shape[:-2] + shape[-1:] (its column factor)
  kFixed,        // `count` elements whatever the parameter (a 0-d scalar, a quantization map)
};

// A tensor the optimizer keeps or makes per parameter, sized from the part of the parameter this rank updates.
struct PerParamBlock {
  std::string name;  // "exp_avg", "sqrt(exp_avg_sq)", ...
  std::optional<DType> dtype;  // element dtype (none: the parameter's)
  BlockLayout layout = BlockLayout::kElementwise;
  int64_t count = 1;  // kPerBlock: elements per block; kFixed: elements
  // CUDA managed memory (cudaMallocManaged) outside PyTorch's caching allocator: bitsandbytes' paged states.
  // Not in memory_allocated / memory_reserved; nvidia-smi counts it while it is resident.
  bool managed = false;
};

struct ParamPlan {
  int32_t param = -1;  // index into Graph::params()
  bool trainable = false;  // requires_grad as the file has it
  bool optimized = false;  // the optimizer updates it: trainable, reached by the loss, first of its storage
  std::vector<PerParamBlock> states;  // the optimizer's state tensors (steady state: they exist from step 1 on)
  // The step's temporaries for this parameter when they differ from OptimizerStepPlan::temporaries (an optimizer
  // that picks a different path per parameter, e.g. 8-bit vs 32-bit states).
  std::optional<std::vector<PerParamBlock>> step_temporaries;
};

// What autograd keeps of an op's inputs and outputs for backward.
enum class SavePolicy : uint8_t {
  kSave,       // what the op's memory rule saves
  kRecompute,  // nothing: a checkpointed region recomputes it during backward
  // In a checkpointed region under a selective policy (MUST_SAVE): the op's kernel outputs are kept from the
  // forward and handed back when the recompute reaches the op, which then saves what its memory rule saves.
  kCacheOutput,
};

struct OpPlan {
  SavePolicy save = SavePolicy::kSave;
};

// The optimizer step's temporaries.
struct OptimizerStepPlan {
  // true: one kernel call per tensor list (torch.optim foreach), so each temporary exists for every parameter at
  // once; false: one parameter at a time.
  bool whole_group = false;
  std::vector<PerParamBlock> temporaries;  // per parameter, alive together
  // Index into `temporaries` of the one a Python local holds (torch.optim's `denom`), or -1. The local is rebound
  // only once the next parameter's value of it exists, so that parameter's temporaries are made while it is
  // still alive; the last one lives until the step returns.
  int held_by_local = -1;
};

// The training loop around the step's ops.
struct LoopPlan {
  // Micro-batches simulated: the first (no gradients yet) and, under gradient accumulation, one later one, whose
  // backward adds into existing .grad; later micro-batches repeat the second exactly.
  int simulated_micro_batches = 1;
  // The loop keeps the model's outputs (logits, loss) bound until the next forward returns.
  bool keep_outputs = false;
  // Each parameter is stepped (and its gradient freed) by a post-accumulate-grad hook; no optimizer phase.
  bool optimizer_in_backward = false;
  // clip_grad_norm_ runs before the step.
  bool clip_grad_norm = false;
  // Generation (graph/generation_forward.h): one forward under torch.no_grad(), nothing after it. The cache
  // entries it reads (graph inputs, dropped when the op that replaces them ran) and makes (held to the end).
  bool forward_only = false;
  std::vector<ValueId> cache_inputs, cache_outputs;
};

// Activation checkpointing (torch.utils.checkpoint around whole decoder layers): their ops are kRecompute (or
// kCacheOutput under a selective policy), the layer keeps its inputs and the RNG state, and backward recomputes
// the layer when the gradient reaches it.
struct CheckpointPlan {
  std::vector<int32_t> layers;  // checkpointed decoder layers, ascending
  bool reentrant = true;        // use_reentrant=True: whole recompute, then an inner backward
  // torch.get_rng_state() that preserve_rng_state stashes per layer (and fork_rng again during the recompute), in
  // the target's memory; a CUDA generator's state is a CPU tensor, so 0 on a GPU target.
  int64_t rng_state_bytes = 0;
};

// The loss the loop computes from the model's last hidden state. By default (no chunks) the graph's own LM head
// and loss ops run; otherwise every op from the LM head's linear on is replaced by torchtune's chunked output and
// CEWithChunkedOutputLoss (Note [Chunked loss] in step_executor.cc) or by Liger-Kernel's fused linear
// cross-entropy (Note [Fused linear cross-entropy]).
struct LossPlan {
  int32_t lm_head_node = -1;  // the LM head's linear; it and every later op are replaced
  // Chunked: sequence positions per chunk (tensor_split). Fused linear: token rows (of batch x seq) per chunk.
  // Empty: the graph's loss.
  std::vector<int64_t> chunk_lengths;
  bool fused_linear = false;
  // Fused linear: the fp32 weight gradient takes each 16-bit chunk product through addmm(out_dtype=float32, out=)
  // (CUDA, compute capability 8.0 or more) instead of a 16-bit product and its fp32 copy.
  bool weight_grad_addmm = false;
};

struct StepPlan {
  std::vector<DType> value_dtypes;  // per IR value: its dtype under the recipe's precision
  std::vector<ParamPlan> params;    // per Graph::params() entry
  std::vector<OpPlan> ops;          // per IR node
  OptimizerStepPlan optimizer_step;
  LoopPlan loop;
  CheckpointPlan checkpointing;
  LossPlan loss;
};

}  // namespace llmem::sim
