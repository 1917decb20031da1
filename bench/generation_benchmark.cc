// Benchmarks of `llmem infer`'s searches on a 70B-shaped bf16 export (models/llama-3-70b-bf16.meta.pt), after
// loading: the longest prompt and the largest batch whose generation (HF generate(), DynamicCache, 512 new tokens)
// fits an H100 on each of 8 tensor-parallel ranks, every probe an exact estimate of the prefill and the last decode
// step (as `llmem infer ... --tp 8 --max-context` / `--max-batch` run them).
//
//   build/bench/generation_benchmark [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <map>
#include <string>

#include "distributed/generation_search.h"
#include "distributed/tensor_parallel_generation.h"
#include "graph/torchscript_importer.h"
#include "simulator/gpu_catalog.h"

#ifndef LLMEM_SOURCE_DIR
#error "LLMEM_SOURCE_DIR must name the source tree"
#endif

namespace {

constexpr int64_t kNewTokens = 512;

const llmem::TorchScriptModel& Llama70bBf16() {
  static const auto model =
      llmem::TorchScriptModel::Load(std::string(LLMEM_SOURCE_DIR) + "/models/llama-3-70b-bf16.meta.pt");
  return model;
}

llmem::sim::TrainingConfig H100Bf16Weights() {
  llmem::sim::TrainingConfig c;
  c.precision = llmem::sim::Precision::kBf16;
  c.lifetimes = llmem::sim::Lifetimes::kEager;
  c.target.gpu = *llmem::sim::FindGpu("h100-80");
  return c;
}

// One search as the CLI runs it: the request's own estimate first (batch 64 or a 4,096-token prompt), then the
// probes; decode graphs built once per batch, prefill graphs per probe.
int64_t Search(bool over_prompt, int64_t batch, int64_t prompt) {
  const auto& model = Llama70bBf16();
  std::map<int64_t, llmem::Graph> decode_graphs;
  // Llama's attention is scaled_dot_product_attention: its graphs do not depend on the cached tokens.
  const auto graph_at = [&](int64_t b, int64_t s, int64_t /*past*/) {
    if (s != 1) return model.BuildGraph(b, s);
    auto it = decode_graphs.find(b);
    if (it == decode_graphs.end()) it = decode_graphs.emplace(b, model.BuildGraph(b, 1)).first;
    return it->second;
  };
  const llmem::GenerationLoop loop{.last_position_logits = model.logits_to_keep().value_or(false),
                                   .min_length_processors = model.eos_token().value_or(true)};
  const int64_t positions = model.BuildGraph(1, 2).position_limit()->max_seq;
  const auto request_at = [&](int64_t v) {
    return llmem::sim::GenerationRequest{.batch = over_prompt ? batch : v, .prompt = over_prompt ? v : prompt,
                                         .new_tokens = kNewTokens, .loop = loop};
  };
  const auto simulate = llmem::dist::TensorParallelGenerationForward(8);
  const int64_t requested = over_prompt ? 4096 : 64;
  const auto known = llmem::sim::EstimateGeneration(graph_at, request_at(requested), H100Bf16Weights(), simulate);
  llmem::dist::GenerationSearch s{.graph_at = graph_at,
                                  .request_at = request_at,
                                  .simulate = simulate,
                                  .limit = over_prompt ? positions - kNewTokens + 1 : int64_t{1} << 20,
                                  .known = &known,
                                  .known_value = requested};
  return llmem::dist::LargestFittingGeneration(s, H100Bf16Weights());
}

// --max-context at batch 64: 5,403 prompt tokens fit, 5,404 do not.
void BM_MaxContext70bTp8(benchmark::State& state) {
  Llama70bBf16();
  for (auto _ : state) {
    if (Search(true, 64, 0) != 5403) state.SkipWithError("the search's answer changed");
  }
}
BENCHMARK(BM_MaxContext70bTp8)->Unit(benchmark::kMillisecond);

// --max-batch at a 4,096-token prompt: 84 sequences fit, 85 do not.
void BM_MaxBatch70bTp8(benchmark::State& state) {
  Llama70bBf16();
  for (auto _ : state) {
    if (Search(false, 0, 4096) != 84) state.SkipWithError("the search's answer changed");
  }
}
BENCHMARK(BM_MaxBatch70bTp8)->Unit(benchmark::kMillisecond);

}  // namespace


BENCHMARK_MAIN();
