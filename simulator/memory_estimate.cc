#include "simulator/memory_estimate.h"

#include <algorithm>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "graph/error.h"
#include "simulator/backend_rules.h"
#include "simulator/caching_allocator_model.h"
#include "simulator/passes/fsdp_mixed_precision_pass.h"
#include "simulator/simple_allocator_models.h"

namespace llmem::sim {
namespace {

// A trace bakes its casts in (RMSNorm's .to(input_dtype), the loss's .float()), so the graph of an export traced
// with 16-bit weights runs in that dtype whatever precision is asked for: an fp32 or autocast step simulated from
// it would be the 16-bit step under another name. The export's weight dtype must be the precision's, or that of
// FSDP2's param_dtype: then the graph runs exactly as the 16-bit gathered parameters do, and the policy keeps the
// stored parameters in fp32.
void CheckPrecisionMatchesExport(const Graph& graph, const TrainingConfig& config) {
  const Precision precision = config.precision;
  const DType wanted = precision == Precision::kBf16 ? DType::kBF16 : DType::kF32;
  const std::optional<DType> gathered = FsdpPrecisionOf(config).param_dtype;
  for (const Parameter& p : graph.params()) {
    if (!p.trainable || !IsFloating(p.dtype) || p.dtype == DType::kF32 || p.dtype == wanted) continue;
    if (gathered && p.dtype == *gathered) continue;
    const std::string found(DTypeName(p.dtype));
    const std::string instead = p.dtype == DType::kBF16 ? "use --precision bf16 with it, or" : "";
    throw ConfigError("the export holds " + found + " weights (" + p.name + "), so a " +
                      std::string(PrecisionName(precision)) + " step cannot be simulated from it: " + instead +
                      " export the model in float32 (models/export_hf.py --dtype float32) for fp32 and autocast");
  }
}

}  // namespace

MemoryEstimate EstimateMemory(const Graph& graph, const TrainingConfig& config, StepHooks* hooks,
                              int64_t outside_allocator_bytes) {
  // Step 1: the timeline, of a precision the export can run.
  CheckPrecisionMatchesExport(graph, config);
  return EstimateFromSimulation(graph, config, SimulateTrainingStep(graph, config, hooks), outside_allocator_bytes);
}

MemoryEstimate EstimateFromSimulation(const Graph& graph, const TrainingConfig& config, StepSimulation sim,
                                      int64_t outside_allocator_bytes) {
  const Timeline& tl = sim.timeline;
  const BackendRules backend = RulesFor(config.target);

  // Step 2: the allocator models. The cpu target counts exact request sizes.
  MemoryEstimate est;
  est.target = config.target.name();
  est.unknown_ops = sim.unknown_ops;
  // Two runs of the allocator model: one with unlimited memory reports what the step asks for (the numbers a
  // larger GPU would show), one limited to the GPU decides whether it fits, including the caching allocator's
  // release-and-retry on a failed cudaMalloc.
  std::unique_ptr<AllocatorModel> model;
  std::unique_ptr<AllocatorModel> limited;
  int64_t limited_capacity = 0;  // what the GPU-limited run may reserve
  if (backend.caching_allocator) {
    est.capacity_bytes = config.target.gpu.capacity_bytes;
    est.managed_optimizer_state_bytes = sim.managed_bytes;
    est.fixed_overhead_bytes = CheckedAdd(config.target.gpu.cuda_context_bytes + outside_allocator_bytes,
                                          est.managed_optimizer_state_bytes, "the memory outside the allocator");
    CachingAllocatorConfig cfg;
    model = std::make_unique<CudaCachingAllocatorModel>(cfg);
    cfg.capacity_bytes = std::max<int64_t>(0, est.capacity_bytes - est.fixed_overhead_bytes);
    limited_capacity = cfg.capacity_bytes;
    limited = std::make_unique<CudaCachingAllocatorModel>(cfg);
  } else {
    model = std::make_unique<ExactBytesModel>();
  }
  // Lower bound: no fragmentation. On CUDA that is 512 B rounding; the CPU allocator hands out exact sizes.
  std::unique_ptr<AllocatorModel> lower_bound_model;
  if (backend.caching_allocator) {
    lower_bound_model = std::make_unique<NoFragmentationModel>();
  } else {
    lower_bound_model = std::make_unique<ExactBytesModel>();
  }
  AllocatorModel& lower_bound = *lower_bound_model;
  bool limited_oom = false;

  // Step 3: replay, tracking live blocks to explain the peak.
  // Block ids are dense (0 .. number of blocks): the live set is a table indexed by id.
  std::vector<const MemoryEvent*> live(tl.block_labels.size(), nullptr);
  std::array<int64_t, kNumCategories> live_by_category{};
  // A phase's peak is at least what is live when it begins, also when it allocates nothing (SGD's in-place step).
  size_t phase_entered = 0;
  std::array<size_t, 4> phase_peak_event{};
  std::array<bool, 4> phase_peaks_at_start{};
  auto enter_phases_up_to = [&](size_t phase, int64_t allocated) {
    for (; phase_entered < phase; ++phase_entered) {
      const size_t next = phase_entered + 1;  // entered once, so its peak so far is this
      est.phase_peak_bytes[next] = allocated;
      est.phase_at_peak[next] = live_by_category;
      phase_peaks_at_start[next] = true;
    }
  };
  size_t peak_event = 0;
  int64_t peak = -1;
  for (size_t i = 0; i < tl.events.size(); ++i) {
    const MemoryEvent& e = tl.events[i];
    enter_phases_up_to(static_cast<size_t>(e.phase), model->Stats().allocated_bytes);
    if (e.bytes == 0) continue;  // empty tensors take no memory, in PyTorch and in the models
    if (e.is_alloc) {
      // The unlimited model fails only when its reserved bytes would pass the largest 64-bit count.
      if (!model->Alloc(e.block, e.bytes) || !lower_bound.Alloc(e.block, e.bytes)) {
        throw ConfigError("batch " + std::to_string(graph.batch()) + " x sequence " + std::to_string(graph.seq()) +
                          " is too large: the step's memory overflows a 64-bit byte count");
      }
      live[static_cast<size_t>(e.block)] = &e;
      int64_t& category_bytes = live_by_category[static_cast<size_t>(e.category)];
      category_bytes = CheckedAdd(category_bytes, e.bytes, "the live tensors of the step");
      switch (e.category) {
        case MemoryCategory::kWeights: est.weights_bytes = CheckedAdd(est.weights_bytes, e.bytes, "the weights"); break;
        case MemoryCategory::kGradients:
          est.gradients_bytes = CheckedAdd(est.gradients_bytes, e.bytes, "the gradients");
          break;
        case MemoryCategory::kOptimizerState:
          est.optimizer_state_bytes = CheckedAdd(est.optimizer_state_bytes, e.bytes, "the optimizer states");
          break;
        default: break;
      }
    } else {
      const MemoryEvent*& it = live.at(static_cast<size_t>(e.block));
      LLMEM_CHECK(it != nullptr) << "free of a block that is not live";
      model->Free(e.block);
      lower_bound.Free(e.block);
      live_by_category[static_cast<size_t>(it->category)] -= it->bytes;
      it = nullptr;
    }
    const int64_t allocated = model->Stats().allocated_bytes;
    const size_t phase = static_cast<size_t>(e.phase);
    if (allocated > est.phase_peak_bytes[phase]) {
      est.phase_peak_bytes[phase] = allocated;
      est.phase_at_peak[phase] = live_by_category;
      phase_peak_event[phase] = i;
      phase_peaks_at_start[phase] = false;
    }
    if (allocated > peak) {
      peak = allocated;
      peak_event = i;
      est.at_peak = live_by_category;
    }
  }
  enter_phases_up_to(est.phase_peak_bytes.size() - 1, model->Stats().allocated_bytes);
  // Step 4: the blocks live at the peak, by replaying up to it once.
  std::fill(live.begin(), live.end(), nullptr);
  for (size_t i = 0; i <= peak_event && i < tl.events.size(); ++i) {
    const MemoryEvent& e = tl.events[i];
    if (e.bytes == 0) continue;
    live[static_cast<size_t>(e.block)] = e.is_alloc ? &e : nullptr;
  }
  for (size_t block = 0; block < live.size(); ++block) {
    if (const MemoryEvent* ev = live[block]) {
      est.largest_at_peak.push_back({tl.block_labels[block], ev->category, ev->bytes});
    }
  }
  std::sort(est.largest_at_peak.begin(), est.largest_at_peak.end(), [](const LiveBlock& a, const LiveBlock& b) {
    return a.bytes != b.bytes ? a.bytes > b.bytes : a.label < b.label;
  });
  if (est.largest_at_peak.size() > 10) est.largest_at_peak.resize(10);

  const AllocatorStats stats = model->Stats();
  est.peak_allocated_bytes = stats.peak_allocated_bytes;
  // The categories are a breakdown of the peak: the requested bytes live at it, which the allocator rounds up
  // (CUDA) or hands out exactly (cpu).
  int64_t categories_at_peak = 0;
  for (int64_t b : est.at_peak) categories_at_peak += b;
  LLMEM_CHECK(tl.events.empty() || (backend.caching_allocator ? categories_at_peak <= est.peak_allocated_bytes
                                                              : categories_at_peak == est.peak_allocated_bytes))
      << "the categories at the peak sum to " << categories_at_peak << " bytes, the peak is "
      << est.peak_allocated_bytes;
  // The GPU-limited run differs from the unlimited one only when the demand exceeds the device: below it no
  // allocation fails and nothing is released, so it is replayed only then.
  // Every block the GPU-limited run holds is at least its 512 B-rounded request, so a step whose unfragmented
  // peak alone passes the device's free bytes runs out of memory there: that is known without replaying it.
  const bool unfragmented_exceeds = limited && lower_bound.Stats().peak_allocated_bytes > limited_capacity;
  if (unfragmented_exceeds) {
    limited_oom = true;
  } else if (limited && CheckedAdd(stats.peak_reserved_bytes, est.fixed_overhead_bytes, "the nvidia-smi figure") >
                            est.capacity_bytes) {
    std::vector<bool> limited_live(tl.block_labels.size(), false);
    for (const MemoryEvent& e : tl.events) {
      if (e.bytes == 0) continue;
      if (e.is_alloc) {
        limited_oom = !limited->Alloc(e.block, e.bytes);
        if (limited_oom) break;
        limited_live[static_cast<size_t>(e.block)] = true;
      } else if (limited_live[static_cast<size_t>(e.block)]) {
        limited_live[static_cast<size_t>(e.block)] = false;
        limited->Free(e.block);
      }
    }
  } else {
    limited.reset();  // same figures as the unlimited run
  }
  // When the step fits, the GPU-limited run is what the device would show: near capacity the allocator releases
  // cached segments and retries instead of growing. When it does not fit, report the unlimited demand.
  if (limited && !limited_oom) {
    est.peak_reserved_bytes = limited->Stats().peak_reserved_bytes;
  } else {
    est.peak_reserved_bytes = backend.caching_allocator ? stats.peak_reserved_bytes : stats.peak_allocated_bytes;
  }
  est.lower_bound_bytes = lower_bound.Stats().peak_allocated_bytes;
  est.nvidia_smi_bytes = CheckedAdd(est.peak_reserved_bytes, est.fixed_overhead_bytes, "the nvidia-smi figure");
  est.optimizer_state_bytes =
      CheckedAdd(est.optimizer_state_bytes, est.managed_optimizer_state_bytes, "the optimizer states");
  if (limited_oom || (est.capacity_bytes > 0 && est.nvidia_smi_bytes > est.capacity_bytes)) est.fits = false;
  auto op_of = [&](const MemoryEvent& e) {
    if (e.node < 0) return std::string(PhaseName(e.phase)) + " step";
    const auto& node = graph.node(NodeId{e.node});
    return node.kind + " (" + RegionName(node.region) + (node.scope.empty() ? "" : ", " + node.scope) + ")";
  };
  if (!tl.events.empty()) {
    const MemoryEvent& e = tl.events[peak_event];
    est.peak_phase = e.phase;
    est.peak_op = op_of(e);
    for (size_t p = 0; p < est.phase_peak_op.size(); ++p) {
      if (!phase_peaks_at_start[p]) est.phase_peak_op[p] = op_of(tl.events[phase_peak_event[p]]);
    }
  }
  est.simulation = std::make_shared<const StepSimulation>(std::move(sim));
  return est;
}

}  // namespace llmem::sim
