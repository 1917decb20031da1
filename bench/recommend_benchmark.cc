// Benchmarks of the estimator on a 70B-shaped export (models/llama-3-70b.meta.pt), after loading: one rank's
// estimate per parallel method, and the whole `recommend` sweep over 8 GPUs (default recipe, and with full
// activation checkpointing).
//
//   build/bench/recommend_benchmark [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <map>
#include <string>

#include "distributed/interconnect.h"
#include "distributed/rank_estimate.h"
#include "distributed/recommend.h"
#include "simulator/training_step_simulator.h"
#include "graph/decoder_model.h"
#include "simulator/gpu_catalog.h"

#ifndef LLMEM_SOURCE_DIR
#error "LLMEM_SOURCE_DIR must name the source tree"
#endif

namespace {

const llmem::Graph& Llama70b() {
  static const llmem::Graph graph = [] {
    const std::unique_ptr<llmem::DecoderModel> loaded = llmem::LoadDecoderModel(std::string(LLMEM_SOURCE_DIR) + "/models/llama-3-70b.meta.pt");
  llmem::DecoderModel& model = *loaded;
    return model.BuildGraph(1, 4096);
  }();
  return graph;
}

llmem::sim::TrainingConfig H100Config() {
  llmem::sim::TrainingConfig c;
  c.precision = llmem::sim::Precision::kBf16Autocast;
  c.target.gpu = *llmem::sim::FindGpu("h100-80");
  return c;
}

void BM_SingleGpuEstimate(benchmark::State& state) {
  const auto& g = Llama70b();
  const auto config = H100Config();
  for (auto _ : state) benchmark::DoNotOptimize(llmem::sim::EstimateMemory(g, config));
}
BENCHMARK(BM_SingleGpuEstimate)->Unit(benchmark::kMillisecond);

void BM_SingleGpuEstimateCheckpointed(benchmark::State& state) {
  const auto& g = Llama70b();
  auto config = H100Config();
  config.checkpointing.mode = llmem::sim::CheckpointingMode::kFull;
  for (auto _ : state) benchmark::DoNotOptimize(llmem::sim::EstimateMemory(g, config));
}
BENCHMARK(BM_SingleGpuEstimateCheckpointed)->Unit(benchmark::kMillisecond);

void BM_TimelineOnly(benchmark::State& state) {
  const auto& g = Llama70b();
  const auto config = H100Config();
  for (auto _ : state) benchmark::DoNotOptimize(llmem::sim::SimulateTrainingStep(g, config));
}
BENCHMARK(BM_TimelineOnly)->Unit(benchmark::kMillisecond);

void BM_RankEstimate(benchmark::State& state) {
  const auto& g = Llama70b();
  const auto config = H100Config();
  const llmem::dist::ParallelPlan plan{.dp = static_cast<int>(state.range(0)), .tp = static_cast<int>(state.range(1)),
                                       .engine = static_cast<llmem::dist::DataParallelEngine>(state.range(2))};
  for (auto _ : state) benchmark::DoNotOptimize(llmem::dist::EstimateRank(g, config, plan));
}
BENCHMARK(BM_RankEstimate)
    ->Args({8, 1, 0})
    ->Args({8, 1, 3})
    ->Args({1, 8, 0})
    ->Args({4, 2, 3})
    ->Unit(benchmark::kMillisecond);

// The whole `llmem recommend --gpus 8 --gpu h100-80 --seq 4096 --batch 1` sweep (16 layouts, none fits at batch
// 1, so no larger batch is searched; then the smallest GPU count that fits) after loading. Graphs are built on
// demand and kept across iterations, so the time is the sweep's alone.
void RecommendSweep8Gpus(benchmark::State& state, const llmem::sim::TrainingConfig& config) {
  static const std::unique_ptr<llmem::DecoderModel> loaded = llmem::LoadDecoderModel(std::string(LLMEM_SOURCE_DIR) + "/models/llama-3-70b.meta.pt");
  llmem::DecoderModel& model = *loaded;
  static std::map<int64_t, llmem::Graph> graphs;
  llmem::dist::RecommendRequest req;
  req.gpus = 8;
  req.micro_batch = 1;
  req.config = config;
  req.intra_node = *llmem::dist::FindInterconnect("nvlink4");
  req.inter_node = *llmem::dist::FindInterconnect("ib-ndr");
  const llmem::dist::GraphAtBatch graph_at = [&](int64_t b) -> const llmem::Graph& {
    auto it = graphs.find(b);
    if (it == graphs.end()) it = graphs.emplace(b, model.BuildGraph(b, 4096)).first;
    return it->second;
  };
  benchmark::DoNotOptimize(llmem::dist::Recommend(req, graph_at));  // builds every graph the sweep asks for
  for (auto _ : state) benchmark::DoNotOptimize(llmem::dist::Recommend(req, graph_at));
}

void BM_RecommendSweep8Gpus(benchmark::State& state) { RecommendSweep8Gpus(state, H100Config()); }
BENCHMARK(BM_RecommendSweep8Gpus)->Unit(benchmark::kMillisecond);

// The same sweep with `--checkpointing full` (HF gradient_checkpointing_enable: every decoder layer, reentrant).
void BM_RecommendSweep8GpusCheckpointed(benchmark::State& state) {
  llmem::sim::TrainingConfig config = H100Config();
  config.checkpointing.mode = llmem::sim::CheckpointingMode::kFull;
  RecommendSweep8Gpus(state, config);
}
BENCHMARK(BM_RecommendSweep8GpusCheckpointed)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  // As the llmem binary does (cli/main.cc): keep freed memory in the heap between simulations.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
