// Megatron-style tensor parallelism as one rank sees it (what PyTorch's DTensor ColwiseParallel/RowwiseParallel
// plans run): in every decoder layer, a linear fed by a replicated activation is column-parallel (weight rows
// split, output split on its last dim) and a linear fed by a split activation is row-parallel (weight columns
// split, partial output all-reduced). Optionally the token embedding and the LM head are vocab-parallel
// (embedding rows split, partial output all-reduced; LM head column-parallel with the loss on split logits).
//
// The rank's graph is the model's graph with every split tensor's shape divided along its split dim, found by
// propagating the split from the linears through views, transposes, elementwise ops and attention. The memory
// simulator then runs unchanged on it; the collectives' extra tensors come from TensorParallelHooks.
//
// All-reduce tensors (torch.distributed._functional_collectives.all_reduce clones its input, then reduces in
// place): a row-parallel output is produced twice (partial, then the reduced copy) and the partial is freed; in
// backward, a column-parallel input gradient is likewise partial, then all-reduced into a copy.
//
// Vocab-parallel cross entropy (DTensor loss_parallel, torch/distributed/tensor/parallel/loss.py): the forward
// log-softmax keeps `shifted = x - max` while `exp(shifted)` and then the result exist, and the fused backward
// holds zeros_like(x), grad + exp(x) and the product at once: one logits-shard-sized fp32 temporary more than the
// single-GPU kernels in each direction.
//
// DTensor's vocab-parallel embedding (RowwiseParallel(input_layouts=Replicate()) on nn.Embedding) returns the
// weight gradient as a Replicate()d tensor of the whole vocabulary on every rank (measured: 8,388,608 B for a
// [4096, 256] shard of an [8192, 256] table at 2 ranks), held until zero_grad.
//
// A fused projection (one column-parallel linear whose output is cut into pieces along its features: GPT-2's
// c_attn, Phi-3's qkv_proj and gate_up_proj) follows Megatron's fused layout, each rank holding 1/tp of every
// piece; cut into pieces of unequal widths (fused GQA/MQA q/k/v) it is refused (Note [Fused projections]).
//
// A reshape or contiguous() whose operand is split may become a view where the whole tensor needed a copy (e.g.
// GQA's repeat_kv with one key/value head per rank), so the rank graph recomputes view-or-copy with ATen's rule.
//
// An all-reduce moves its tensor in the dtype the step gives it, which the split alone does not know: under
// autocast a row-parallel linear's partial output is 16-bit, while a column-parallel input gradient is reduced
// in its input's dtype, after autocast's ToCopyBackward (DTensor redistributes the Partial gradient where
// ColwiseParallel's from_local wrapped the input, before the cast; torch/distributed/tensor/_api.py
// _FromTorchTensor.backward). TensorParallelCollectives sizes them from the simulated dtypes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distributed/collective.h"
#include "graph/dtype.h"
#include "graph/graph.h"
#include "simulator/step_hooks.h"

namespace llmem::dist {

// One all-reduce the split adds to the step: the tensor reduced (replicated on every rank once reduced; for a
// backward one, the gradient of this value) and when it runs.
struct TensorParallelAllReduce {
  ValueId value;                       // a row-parallel output, a column-parallel input (its gradient), ...
  StepPhase phase = StepPhase::kForward;
  std::string what;                    // "row-parallel output all-reduce (model.layers.0.attn.o_proj)"
};

struct TensorParallelRank {
  int tp = 1;                                            // ranks the split tensors are divided over
  Graph graph;                                           // the rank's shapes: split parameters and activations
  std::vector<uint8_t> output_all_reduced;               // per node: the forward output is all-reduced
  std::vector<std::vector<uint8_t>> input_grad_all_reduced;  // per node, per tensor input: its gradient is
  std::vector<int> split_dim;                            // per value: the dim split across ranks, -1 if replicated
  std::vector<int64_t> loss_workspace_bytes;             // per node: vocab-parallel cross-entropy temporaries
  std::vector<uint8_t> replicated_weight_grad;           // per node: the weight gradient is whole on every rank
  std::vector<TensorParallelAllReduce> all_reduces;     // per step, in graph order, group = the tp ranks
};

// Throws ConfigError when tp does not divide a split dimension, UnsupportedOpError when the layer's structure
// cannot be split (e.g. a fused q/k/v projection cut into pieces of unequal widths).
TensorParallelRank ShardForTensorParallel(const Graph& graph, int tp, bool vocab_parallel);

// The rank's collectives per step, each tensor's bytes in its dtype under the simulated precision
// (`value_dtypes`: sim::StepSimulation::value_dtypes of the rank graph).
CollectiveList TensorParallelCollectives(const TensorParallelRank& rank, const std::vector<DType>& value_dtypes);

class TensorParallelHooks : public sim::StepHooks {
 public:
  // `rank` null: no tensor parallelism (nothing is replaced).
  explicit TensorParallelHooks(const TensorParallelRank* rank) : rank_(rank) {}
  bool OutputReplacedByCollective(const OpNode& node) const override;
  bool InputGradReplacedByCollective(const OpNode& node, size_t input) const override;
  int64_t ExtraTransientBytes(const OpNode& node, sim::Phase phase) const override;
  int64_t InputGradBytes(const OpNode& node, size_t input, int64_t bytes) const override;
  // No data-parallel reduction: the local shards' gradients accumulate, or a per-parameter optimizer steps them,
  // exactly as a single GPU's do.
  std::string UnmodelledLoop(const sim::LoopPlan&) const override { return ""; }
  std::string UnmodelledLoss(const sim::LossPlan& loss) const override;

 private:
  const TensorParallelRank* rank_;
};

}  // namespace llmem::dist
