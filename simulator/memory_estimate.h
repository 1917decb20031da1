// Runs an allocator model over a step's timeline and reports the peak: what torch.cuda.max_memory_allocated /
// max_memory_reserved would show (or, for the cpu target, what an instrumented CPU allocator counts), the
// nvidia-smi figure, where the peak happens and what is live at that moment, by category.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "simulator/memory_timeline.h"
#include "simulator/training_config.h"
#include "simulator/training_step_simulator.h"

namespace llmem::sim {

struct LiveBlock {
  std::string label;
  MemoryCategory category;
  int64_t bytes;
};

struct MemoryEstimate {
  std::string target;                   // "cpu" or a catalog GPU name
  int64_t peak_allocated_bytes = 0;     // max_memory_allocated (cpu: max bytes the allocator handed out)
  int64_t peak_reserved_bytes = 0;      // max_memory_reserved (cpu: equal to allocated)
  int64_t lower_bound_bytes = 0;        // the same step with no fragmentation (512 B rounding only)
  int64_t fixed_overhead_bytes = 0;     // CUDA context (+ NCCL buffers for parallel methods), outside the allocator
  int64_t nvidia_smi_bytes = 0;         // reserved peak + fixed overhead
  int64_t capacity_bytes = 0;           // device memory (0 for cpu)
  bool fits = true;                     // nvidia-smi figure within capacity and no allocator OOM
  Phase peak_phase = Phase::kSetup;     // where the allocated peak happens
  std::string peak_op;                  // "aten::cross_entropy_loss (head)" or "optimizer step"
  std::array<int64_t, kNumCategories> at_peak{};   // live bytes per category at the allocated peak
  std::array<int64_t, 4> phase_peak_bytes{};       // allocated peak within each phase
  // Live bytes per category at each phase's peak, and the op there ("" when the phase peaks as it begins): where
  // the activations are when the step peak is elsewhere (e.g. a checkpointed step peaking in the optimizer).
  std::array<std::array<int64_t, kNumCategories>, 4> phase_at_peak{};
  std::array<std::string, 4> phase_peak_op;
  std::vector<LiveBlock> largest_at_peak;           // the ten largest live blocks at the peak
  int64_t weights_bytes = 0, gradients_bytes = 0, optimizer_state_bytes = 0;
  // Of optimizer_state_bytes, those in CUDA managed memory (paged states): in fixed_overhead_bytes and the
  // nvidia-smi figure while resident, never in allocated / reserved.
  int64_t managed_optimizer_state_bytes = 0;
  std::vector<std::string> unknown_ops;
  std::shared_ptr<const StepSimulation> simulation;  // the timeline the figures come from (for --trace)
};

// `hooks`: the parallel engine of a multi-GPU method (the estimate is then one rank's); `outside_allocator_bytes`:
// device memory the engine takes outside PyTorch's allocator (NCCL buffers), added to the fixed overhead.
MemoryEstimate EstimateMemory(const Graph& graph, const TrainingConfig& config, StepHooks* hooks = nullptr,
                              int64_t outside_allocator_bytes = 0);

// The figures of a timeline simulated elsewhere (a generation forward), by the same allocator models.
MemoryEstimate EstimateFromSimulation(const Graph& graph, const TrainingConfig& config, StepSimulation sim,
                                      int64_t outside_allocator_bytes = 0);

}  // namespace llmem::sim
