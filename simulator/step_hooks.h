// How a parallel engine changes one rank's training step. The simulator calls these hooks at the points where
// PyTorch's engines act (module pre/post-forward and pre/post-backward, gradient reduction, optimizer step);
// distributed/ implements them per method. Without hooks the step is the single-GPU one.
//
// Region boundaries: a region (embedding, decoder layer i, head) starts at its first op and ends after its last
// op, in forward order for the forward pass and in reverse order for the backward pass. FSDP-style engines wrap
// exactly these units.
#pragma once

#include <cstdint>
#include <string>

#include "graph/graph.h"
#include "simulator/memory_timeline.h"
#include "simulator/step_plan.h"

namespace llmem::sim {

// What a hook may do to the rank's memory.
class StepMemory {
 public:
  virtual ~StepMemory() = default;
  virtual int64_t Alloc(int64_t bytes, MemoryCategory category, const std::string& label) = 0;
  virtual void Free(int64_t block) = 0;
  // Hands the gradient the parameter holds (its .grad) to the engine, which frees it when it is done (-1 when the
  // parameter has no gradient yet).
  virtual int64_t TakeParamGrad(int32_t param) = 0;
  // Runs the optimizer step of parameter `param` (its step temporaries) as its post-accumulate-grad hook does,
  // for an engine that runs those hooks itself (StepHooks::RunsPostAccumulateGradHooks).
  virtual void StepParam(int32_t param) = 0;
};

class StepHooks {
 public:
  virtual ~StepHooks() = default;
  // Bytes of a parameter's own storage between steps: a shard for sharded engines. `full_bytes` is the whole
  // tensor in the simulated dtype. Gathered copies are the engine's own blocks (StepMemory::Alloc).
  virtual int64_t ResidentParamBytes(const Parameter& p, int64_t full_bytes) const { return full_bytes; }
  // Whether the op runs on this device: what another device's op allocates is not this device's memory (a model
  // placed over several GPUs, distributed/device_map_generation.h).
  virtual bool RunsOnThisDevice(const OpNode& node) const { return true; }
  // Whether a graph input lives on this device.
  virtual bool InputOnThisDevice(const TensorValue& input) const { return true; }
  // Bytes of p this rank's optimizer updates (its states and step temporaries have this size; 0: not this rank's).
  virtual int64_t OptimizedBytes(const Parameter& p, int64_t full_bytes) const { return full_bytes; }
  // True when the engine keeps the trainable weights in 16-bit for compute (chunk-based ZeRO): autocast then makes
  // no weight copies.
  virtual bool ComputesWithLowPrecisionWeights() const { return false; }
  // Called once the rank's resident memory (weights, optimizer states, inputs) is in place.
  virtual void OnSetup(StepMemory& mem) {}
  virtual void OnRegionStart(Phase phase, const Region& region, StepMemory& mem) {}
  virtual void OnRegionEnd(Phase phase, const Region& region, StepMemory& mem) {}
  // A collective replaces the op's output by a fresh tensor (e.g. the all-reduce of a row-parallel linear's
  // partial sum): the simulator allocates the copy and releases the op's own output.
  virtual bool OutputReplacedByCollective(const OpNode& node) const { return false; }
  // The same in backward for the gradient of tensor input `input` (e.g. a column-parallel linear's input gradient).
  virtual bool InputGradReplacedByCollective(const OpNode& node, size_t input) const { return false; }
  // Bytes of the gradient an op's backward makes for tensor input `input` (`bytes`: the input's own size), when the
  // parallel implementation makes it larger (DTensor's vocab-parallel embedding returns a replicated gradient).
  virtual int64_t InputGradBytes(const OpNode& node, size_t input, int64_t bytes) const { return bytes; }
  // Temporaries the parallel implementation of an op allocates beyond the single-GPU rule, alive while the op
  // runs in `phase` (e.g. the shifted logits of a vocab-parallel log-softmax).
  virtual int64_t ExtraTransientBytes(const OpNode& node, Phase phase) const { return 0; }
  // The model's forward has returned and the loss runs outside it (the chunked loop's cross-entropy): the
  // engine's post-forward hooks of the outermost module run here, not after the loss.
  virtual void OnModelForwardEnd(StepMemory& mem) {}
  // Such a loss's backward has run: the gradients of the model's outputs are ready (hooks on them run here).
  virtual void OnModelOutputsGrad(StepMemory& mem) {}
  virtual void OnBackwardEnd(StepMemory& mem) {}
  virtual void OnOptimizerStepEnd(StepMemory& mem) {}

  // The training loop (LoopPlan). Why the engine cannot run the plan's loop, in one line ("": it can). An engine
  // that does not say otherwise models neither gradient accumulation nor an optimizer stepped in backward.
  virtual std::string UnmodelledLoop(const LoopPlan& loop) const;
  // The next micro-batch of an accumulating step begins (its forward follows).
  virtual void OnNextMicroBatch(StepMemory& mem) {}
  // True when the engine runs the parameters' post-accumulate-grad hooks itself (FSDP2 runs them on the sharded
  // gradient after its reduce-scatter, not autograd on the unsharded one): an optimizer in backward then steps
  // through StepMemory::StepParam.
  virtual bool RunsPostAccumulateGradHooks() const { return false; }
  // The loss (LossPlan). Why the engine cannot run the plan's replaced loss, in one line ("": it can). The chunked
  // loss only reshapes the LM head's work: its weight's gradient is summed over the chunks by autograd before its
  // AccumulateGrad runs, so an engine's gradient hooks see it once, as they see the unchunked one. The fused
  // linear loss makes the LM head's gradients in forward; no engine models that.
  virtual std::string UnmodelledLoss(const LossPlan& loss) const;
};

// "--grad-accum > 1" or "--optimizer-in-backward": the loop feature of `loop` an engine may refuse.
std::string LoopFeature(const LoopPlan& loop);
// "--loss chunked-N" or "--loss fused-linear": the loss of `loss` an engine may refuse ("" for the graph's own).
std::string LossFeature(const LossPlan& loss);

}  // namespace llmem::sim
