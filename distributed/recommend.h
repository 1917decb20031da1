// The sweep behind `llmem recommend`: every parallel layout of N GPUs (data-parallel degree × tensor-parallel
// degree × data-parallel engine), each with one rank's peak memory at the requested batch, the largest per-GPU
// micro-batch that fits (found by exact estimates, largest_batch_search.h), the estimated step time and
// throughput; ranked so that the fastest layout that fits comes first. When nothing fits, the smallest GPU count
// that would.
//
// Throughput is compared in tokens per second over all GPUs, so layouts with different data-parallel degrees
// compare fairly at a fixed per-GPU micro-batch; with a global batch every layout trains the same tokens per step.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "distributed/interconnect.h"
#include "distributed/node_layout.h"
#include "distributed/parallel_plan.h"
#include "distributed/step_time_model.h"
#include "graph/graph.h"
#include "simulator/memory_timeline.h"
#include "simulator/training_config.h"

namespace llmem::dist {

struct RecommendRequest {
  int gpus = 8;
  std::optional<int> nodes;       // gpus split evenly over nodes (unset: whole nodes of the GPU kind's usual
                                  // size, node_layout.h); tensor-parallel groups stay inside a node
  std::optional<int> tp;          // only layouts with this tensor-parallel degree
  int64_t micro_batch = 0;        // per data-parallel rank (when global_batch is 0)
  int64_t global_batch = 0;       // split over the data-parallel ranks (must divide evenly)
  sim::TrainingConfig config;     // precision, optimizer, GPU
  Interconnect intra_node;        // link inside a node
  Interconnect inter_node;        // network between nodes
  bool tp_vocab_parallel = true;
  std::vector<DataParallelEngine> engines = {DataParallelEngine::kDdp, DataParallelEngine::kZero1,
                                             DataParallelEngine::kFsdp2Zero2, DataParallelEngine::kFsdp2Zero3,
                                             DataParallelEngine::kGemini};
  // Why the step's graph cannot run on a layout ("" when it can), for what the graph carries beyond the recipe
  // (LoRA adapters on a frozen base); unset: every layout can.
  std::function<std::string(const ParallelPlan&)> unsupported_layout;
};

struct PlanRow {
  ParallelPlan plan;
  int64_t micro_batch = 0;
  std::string skipped;            // why this layout cannot run; empty when the figures below are set
  int64_t peak_allocated_bytes = 0;
  int64_t peak_reserved_bytes = 0;
  int64_t nvidia_smi_bytes = 0;   // reserved + CUDA context + NCCL buffers
  std::array<int64_t, sim::kNumCategories> at_peak_bytes{};  // live per category at the peak (body vs LM head, ...)
  bool fits = false;
  int64_t max_micro_batch = 0;    // largest per-GPU micro-batch whose exact estimate fits (0: not even 1); the
                                  // next one was estimated and does not fit
  StepTime time;
  double tokens_per_second = 0;   // over all GPUs
};

struct Recommendation {
  NodeLayout nodes;               // how the GPUs are spread over nodes (given or assumed)
  std::vector<PlanRow> rows;      // fitting layouts fastest first, then those that do not fit, then skipped ones
  int best = -1;                  // index into rows, -1 when nothing fits
  std::string why;                // one sentence on the choice
  int smallest_gpu_count_that_fits = 0;  // when nothing fits (0: none up to the search limit)
  std::vector<std::string> assumptions;  // the node size when assumed, NCCL's buffers, then the time model's
};

// The IR at a batch size (the caller builds and caches it; the sweep asks for each micro-batch it simulates, one
// call at a time, and only reads the graphs while it estimates in parallel). A ConfigError means the batch cannot
// be built (e.g. its byte counts overflow): the largest-batch search takes it as not fitting.
using GraphAtBatch = std::function<const Graph&(int64_t batch)>;

// Throws ConfigError for bad requests (counts < 1, GPUs not divisible by nodes or by the requested TP degree, a
// TP degree that does not divide the model).
Recommendation Recommend(const RecommendRequest& request, const GraphAtBatch& graph_at);

// The layouts of `gpus` GPUs with `gpus_per_node` per node (tp divides gpus and is at most gpus_per_node).
std::vector<ParallelPlan> EnumeratePlans(int gpus, int gpus_per_node, const std::vector<DataParallelEngine>& engines,
                                         std::optional<int> only_tp);

}  // namespace llmem::dist
