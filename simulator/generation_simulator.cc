#include "simulator/generation_simulator.h"

#include "graph/error.h"
#include "graph/generation_forward.h"
#include "simulator/step_executor.h"
#include "simulator/step_plan_builder.h"
#include "simulator/timeline_invariants.h"

namespace llmem::sim {
MemoryEstimate SimulateGenerationForward(const GenerationForward& fw, const TrainingConfig& config, StepHooks* hooks,
                                         int64_t outside_allocator_bytes) {
  StepPlan plan = BuildStepPlan(fw.graph, config);
  plan.loop.forward_only = true;
  plan.loop.cache_inputs = fw.past;
  plan.loop.cache_outputs = fw.present;
  StepSimulation sim = ExecuteStepPlan(fw.graph, plan, config, hooks);
  CheckTimelineInvariants(sim.timeline);
  return EstimateFromSimulation(fw.graph, config, std::move(sim), outside_allocator_bytes);
}

GenerationEstimate EstimateGeneration(const GenerationGraphAt& graph_at,
                                      const GenerationRequest& r, const TrainingConfig& config,
                                      const GenerationForwardSimulator& simulate) {
  if (r.batch <= 0 || r.prompt <= 0 || r.new_tokens <= 0) {
    throw ConfigError("batch, prompt and new tokens must be positive");
  }
  const auto SimulateForward = [&](GenerationForward& fw, const TrainingConfig& c) {
    return simulate ? simulate(fw, c) : SimulateGenerationForward(fw, c);
  };
  GenerationEstimate est;
  GenerationLoop loop = r.loop;
  loop.static_cache_tokens = r.prompt + r.new_tokens - 1;  // generate()'s max_length - 1: the last token is not fed
  GenerationForward prefill = MakeGenerationForward(graph_at(r.batch, r.prompt, 0), 0, loop);
  est.prefill = SimulateForward(prefill, config);
  const int64_t cached = r.prompt + r.new_tokens - 1;
  if (r.new_tokens >= 2) {
    loop.previous_tokens = r.new_tokens >= 3 ? 1 : r.prompt;  // the forward before the last: a decode step or the prefill
    GenerationForward last = MakeGenerationForward(graph_at(r.batch, 1, cached - 1), cached - 1, loop);
    est.decode = SimulateForward(last, config);
    est.decode_graph = std::move(last.graph);
  }
  // The cache after the last forward; a sliding window keeps the storage of that forward's full tensor.
  const int64_t window = r.loop.sliding_window;
  const int64_t held = window <= 0 ? cached
                       : r.new_tokens >= 2 ? std::min(window - 1, cached - 1) + 1
                                            : r.prompt;
  for (ValueId v : prefill.present) {
    const TensorValue& tv = prefill.graph.value(v);
    est.cache_values.push_back(v);
    std::vector<int64_t> shape = tv.shape;
    shape[2] = held;
    const DType d = config.precision == Precision::kBf16 ? tv.dtype_bf16_weights : tv.dtype;
    est.cache_bytes += ShapeBytes(shape, d);
  }
  est.prefill_graph = std::move(prefill.graph);
  return est;
}

}  // namespace llmem::sim
