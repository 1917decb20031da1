#include "distributed/recommend.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "distributed/chunk_manager.h"
#include "distributed/largest_batch_search.h"
#include "distributed/model_dims.h"
#include "distributed/nccl_memory.h"
#include "distributed/rank_estimate.h"
#include "distributed/sharded_params.h"
#include "distributed/tensor_parallel.h"
#include "graph/dtype.h"
#include "graph/error.h"
#include "simulator/passes/fsdp_mixed_precision_pass.h"

namespace llmem::dist {
namespace {

int64_t OptimizerParamBytes(const Graph& rank_graph, const ParallelPlan& plan, sim::Precision precision) {
  int64_t bytes = 0;
  for (const auto& p : ManagedParams(rank_graph, precision)) bytes += p.bytes();
  const bool sharded = plan.engine != DataParallelEngine::kDdp;
  return sharded ? bytes / plan.dp : bytes;
}

// Sweeps one GPU count; reuses the tensor-parallel split per (batch, tp).
class Sweep {
 public:
  Sweep(const RecommendRequest& req, const GraphAtBatch& graph_at)
      : req_(req), graph_at_(graph_at), config_(req.config) {
    config_.keep_labels = false;  // the sweep reads figures only
    // MixedPrecisionPolicy is FSDP2's: the other rows train without it.
    config_without_policy_ = config_;
    config_without_policy_.fsdp_param_dtype.reset();
    config_without_policy_.fsdp_reduce_dtype.reset();
  }

  // One rank's memory under a layout at a micro-batch.
  RankEstimate Estimate(const ParallelPlan& plan, int64_t batch, int gpus_per_node) {
    DistributedOptions opts;
    opts.tp_vocab_parallel = req_.tp_vocab_parallel;
    opts.gpus_per_node = gpus_per_node;
    return EstimateRank(graph_at_(batch), RunsFsdp2(plan) ? config_ : config_without_policy_, plan, opts,
                        Split(batch, plan.tp));
  }

  // Builds what an estimate at (batch, tp) reads; false when it cannot be built (e.g. byte counts that overflow).
  bool Prepare(int64_t batch, int tp) {
    const auto key = std::make_pair(batch, tp);
    if (unbuildable_.count(key)) return false;
    try {
      RankGraph(batch, tp);
      return true;
    } catch (const Error&) {
      unbuildable_.insert(key);
      return false;
    }
  }

  const Graph& RankGraph(int64_t batch, int tp) {
    const TensorParallelRank* s = Split(batch, tp);
    return s ? s->graph : graph_at_(batch);
  }

  std::string Unrunnable(const ParallelPlan& plan) {
    if (plan.tp == 1) return "";
    auto it = tp_errors_.find(plan.tp);
    if (it == tp_errors_.end()) {
      const Graph& g = graph_at_(req_.micro_batch > 0 ? req_.micro_batch : 1);
      it = tp_errors_.emplace(plan.tp, CheckTensorParallelDegree(ReadModelDims(g), plan.tp, req_.tp_vocab_parallel))
               .first;
    }
    return it->second;
  }

 private:
  const TensorParallelRank* Split(int64_t batch, int tp) {
    if (tp == 1) return nullptr;
    auto key = std::make_pair(batch, tp);
    auto it = splits_.find(key);
    if (it == splits_.end()) {
      it = splits_.emplace(key, ShardForTensorParallel(graph_at_(batch), tp, req_.tp_vocab_parallel)).first;
    }
    return &it->second;
  }

  const RecommendRequest& req_;
  const GraphAtBatch& graph_at_;
  sim::TrainingConfig config_;
  sim::TrainingConfig config_without_policy_;
  std::map<std::pair<int64_t, int>, TensorParallelRank> splits_;
  std::map<int, std::string> tp_errors_;
  std::set<std::pair<int64_t, int>> unbuildable_;
};

bool Fits(const RankEstimate& e) { return e.memory.fits; }

// Why an engine cannot run this layout at this precision ("" when it can).
std::string EngineUnavailable(const ParallelPlan& plan, const sim::TrainingConfig& config) {
  if (plan.engine != DataParallelEngine::kGemini) return "";
  if (plan.tp > 1) return "chunk-based ZeRO is modelled without tensor parallelism";
  if (config.precision == sim::Precision::kFp32) return "chunk-based ZeRO trains in 16-bit";
  if (!GeminiModelsOptimizer(config.optimizer)) {
    return "chunk-based ZeRO is modelled with AdamW or SGD, not " + std::string(sim::OptimizerName(config.optimizer));
  }
  return "";
}

// Why a row without FSDP2 cannot be estimated from an export traced with the 16-bit weights of the policy's
// param dtype ("" when it can): such a trace runs in 16 bits whatever the row's precision asks for.
std::string NeedsFp32Export(const Graph& graph, const sim::Recipe& recipe, const ParallelPlan& plan) {
  if (RunsFsdp2(plan) || !sim::FsdpPrecisionOf(recipe).param_dtype) return "";
  for (const Parameter& p : graph.params()) {
    if (p.trainable && IsFloating(p.dtype) && p.dtype != DType::kF32) {
      return "without FSDP2's MixedPrecisionPolicy this engine trains in fp32, which an export traced with 16-bit "
             "weights cannot give";
    }
  }
  return "";
}

// No batch above this fits: the step's inputs alone (token ids and labels, on the GPU) would fill the GPU. Bounds
// the largest-batch search without a constant of its own.
int64_t BatchLimit(const Graph& graph, int64_t capacity_bytes) {
  int64_t input_bytes = 0;
  for (ValueId v : graph.inputs()) input_bytes += ShapeBytes(graph.value(v).shape, graph.value(v).dtype);
  const int64_t per_sample = std::max<int64_t>(1, input_bytes / std::max<int64_t>(1, graph.batch()));
  return std::max<int64_t>(1, capacity_bytes / per_sample);
}

// The sweep's worker threads: LLMEM_THREADS when set (a positive integer), else one per core. The answer does
// not depend on it (every estimate is computed alone, and results and errors are taken in layout order).
size_t SweepThreads() {
  if (const char* env = std::getenv("LLMEM_THREADS"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    errno = 0;
    const long long n = std::strtoll(env, &end, 10);
    if (errno != 0 || *end != '\0' || n < 1 || n > 4096) {
      throw ConfigError("LLMEM_THREADS must be a whole number of threads from 1 to 4096, not '" + std::string(env) +
                        "'");
    }
    return static_cast<size_t>(n);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(0..n-1) on SweepThreads() threads; fn must only read shared state. Of several failures, the one of the
// lowest k is rethrown, as a serial loop would.
void ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
  const size_t threads = std::min<size_t>(n, SweepThreads());
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  size_t error_at = n;
  std::mutex error_mutex;
  auto worker = [&] {
    for (size_t k; (k = next.fetch_add(1)) < n;) {
      try {
        fn(k);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (k < error_at) {
          error = std::current_exception();
          error_at = k;
        }
      }
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

// Rows whose estimate was refused are skipped with the reason and leave the work.
void SkipRefusedRows(const std::vector<std::string>& refused, std::vector<PlanRow>& rows, std::vector<size_t>& work,
                     std::vector<RankEstimate>& at) {
  size_t kept = 0;
  for (size_t k = 0; k < work.size(); ++k) {
    if (!refused[k].empty()) {
      rows[work[k]].skipped = refused[k];
      continue;
    }
    if (kept != k) {  // a self move-assignment would empty the estimate's vectors
      work[kept] = work[k];
      at[kept] = std::move(at[k]);
    }
    ++kept;
  }
  work.resize(kept);
  at.resize(kept);
}

}  // namespace

std::vector<ParallelPlan> EnumeratePlans(int gpus, int gpus_per_node, const std::vector<DataParallelEngine>& engines,
                                         std::optional<int> only_tp) {
  std::vector<ParallelPlan> plans;
  for (int tp = 1; tp <= std::min(gpus, gpus_per_node); ++tp) {
    if (gpus % tp != 0 || (only_tp && *only_tp != tp)) continue;
    const int dp = gpus / tp;
    if (dp == 1) {
      plans.push_back({.dp = 1, .tp = tp, .engine = DataParallelEngine::kDdp});
      continue;
    }
    for (auto e : engines) plans.push_back({.dp = dp, .tp = tp, .engine = e});
  }
  return plans;
}

Recommendation Recommend(const RecommendRequest& req, const GraphAtBatch& graph_at) {
  const NodeLayout nodes = ResolveNodeLayout(req.gpus, req.nodes, req.config.target.gpu);
  if (req.micro_batch < 0 || req.global_batch < 0 || (req.micro_batch == 0) == (req.global_batch == 0)) {
    throw ConfigError("give a positive --batch (per GPU) or a positive --global-batch, not both");
  }
  const int per_node = nodes.gpus_per_node;
  if (req.tp) {
    if (*req.tp < 1)
      throw ConfigError("the tensor-parallel degree must be at least 1 (got " + std::to_string(*req.tp) + ")");
    if (req.gpus % *req.tp != 0) {
      throw ConfigError(std::to_string(req.gpus) + " GPUs are not divisible by the tensor-parallel degree " +
                        std::to_string(*req.tp));
    }
    if (*req.tp > per_node) {
      throw ConfigError("tensor-parallel degree " + std::to_string(*req.tp) + " exceeds the " +
                        std::to_string(per_node) + " GPUs of a node");
    }
    const std::string why = CheckTensorParallelDegree(
        ReadModelDims(graph_at(req.micro_batch > 0 ? req.micro_batch : 1)), *req.tp, req.tp_vocab_parallel);
    if (!why.empty()) throw ConfigError(why);
  }
  Sweep sweep(req, graph_at);
  Recommendation out;
  out.nodes = nodes;
  // 1. The layouts, and what each needs prepared (graphs and tensor-parallel splits are built here, once, so the
  //    estimates below only read them).
  std::vector<size_t> work;  // rows to estimate
  std::map<std::pair<int64_t, int>, GraphCost> costs;
  std::map<std::pair<int64_t, int>, std::vector<bool>> recomputed;  // per (batch, tp): the checkpointed ops
  for (const ParallelPlan& plan : EnumeratePlans(req.gpus, per_node, req.engines, req.tp)) {
    PlanRow row;
    row.plan = plan;
    row.micro_batch = req.global_batch > 0 ? req.global_batch / plan.dp : req.micro_batch;
    if (req.global_batch > 0 && req.global_batch % plan.dp != 0) {
      row.skipped = "global batch " + std::to_string(req.global_batch) + " does not split over " +
                    std::to_string(plan.dp) + " data-parallel ranks";
    } else {
      row.skipped = EngineUnavailable(plan, req.config);
      if (row.skipped.empty() && req.unsupported_layout) row.skipped = req.unsupported_layout(plan);
      if (row.skipped.empty()) row.skipped = NeedsFp32Export(graph_at(row.micro_batch), req.config, plan);
    }
    if (row.skipped.empty()) row.skipped = sweep.Unrunnable(plan);
    if (row.skipped.empty()) {
      try {
        sweep.RankGraph(row.micro_batch, plan.tp);  // the tensor-parallel split, which may not apply to this model
      } catch (const Error& e) {  // e.g. a dim the degree does not divide
        row.skipped = e.what();
      }
    }
    out.rows.push_back(row);
    if (!row.skipped.empty()) continue;
    const auto key = std::make_pair(row.micro_batch, plan.tp);
    if (!costs.count(key)) {
      costs.emplace(key, SumCosts(sweep.RankGraph(row.micro_batch, plan.tp), CostOptionsFor(req.config.precision)));
      recomputed.emplace(key, RecomputedOps(sweep.RankGraph(row.micro_batch, plan.tp), req.config));
    }
    work.push_back(out.rows.size() - 1);
  }
  // 2. The estimates at the requested batch, independent of each other: spread over the cores.
  std::vector<RankEstimate> at(work.size());
  std::vector<std::string> refused(work.size());  // why the engine cannot run the recipe's step on this layout
  ParallelFor(work.size(), [&](size_t k) {
    const PlanRow& row = out.rows[work[k]];
    try {
      at[k] = sweep.Estimate(row.plan, row.micro_batch, per_node);
    } catch (const ConfigError& e) {  // e.g. a training loop the engine does not run
      refused[k] = e.what();
    }
  });
  // A refusal of every layout is one of the request itself (a precision the export cannot take, a step past 64-bit
  // byte counts): the bad input's error, not a table in which nothing fits.
  if (!refused.empty() && std::all_of(refused.begin(), refused.end(), [](const std::string& r) { return !r.empty(); })) {
    throw ConfigError(refused.front());
  }
  SkipRefusedRows(refused, out.rows, work, at);
  // 3. The largest micro-batch of every layout, by exact estimates (largest_batch_search.h), all layouts a round
  //    at a time: the batches a round asks for are built once (shared by the layouts that ask for the same batch),
  //    then estimated in parallel.
  std::vector<LargestBatchSearch> searches;
  for (size_t k = 0; k < work.size(); ++k) {
    const PlanRow& row = out.rows[work[k]];
    searches.emplace_back(req.config.target.gpu.capacity_bytes,
                          BatchLimit(graph_at(row.micro_batch), req.config.target.gpu.capacity_bytes));
    searches.back().Record(row.micro_batch, at[k].memory.nvidia_smi_bytes, Fits(at[k]));
  }
  for (;;) {
    std::vector<std::pair<size_t, int64_t>> probes;  // (search, batch)
    for (size_t k = 0; k < searches.size(); ++k) {
      for (int64_t b : searches[k].NextProbes()) probes.emplace_back(k, b);
    }
    if (probes.empty()) break;
    std::vector<uint8_t> buildable(probes.size(), 0);
    for (size_t p = 0; p < probes.size(); ++p) {
      buildable[p] = sweep.Prepare(probes[p].second, out.rows[work[probes[p].first]].plan.tp);
    }
    std::vector<std::optional<RankEstimate>> estimates(probes.size());
    ParallelFor(probes.size(), [&](size_t p) {
      if (!buildable[p]) return;
      try {
        estimates[p] = sweep.Estimate(out.rows[work[probes[p].first]].plan, probes[p].second, per_node);
      } catch (const Error&) {  // the batch's byte counts cannot be simulated: it does not fit
      }
    });
    for (size_t p = 0; p < probes.size(); ++p) {
      const auto& e = estimates[p];
      searches[probes[p].first].Record(probes[p].second, e ? std::optional(e->memory.nvidia_smi_bytes) : std::nullopt,
                                       e && Fits(*e));
    }
  }
  if (!nodes.assumption.empty()) out.assumptions.push_back(nodes.assumption);
  const bool communicates = std::any_of(out.rows.begin(), out.rows.end(),
                                        [](const PlanRow& r) { return CommunicatorsPerRank(r.plan) > 0; });
  if (communicates) out.assumptions.push_back(NcclAssumption(req.config.target.gpu));
  std::vector<std::string> time_assumptions;  // the same for every row
  for (size_t k = 0; k < work.size(); ++k) {
    PlanRow& row = out.rows[work[k]];
    const ParallelPlan& plan = row.plan;
    row.peak_allocated_bytes = at[k].memory.peak_allocated_bytes;
    row.peak_reserved_bytes = at[k].memory.peak_reserved_bytes;
    row.nvidia_smi_bytes = at[k].memory.nvidia_smi_bytes;
    row.at_peak_bytes = at[k].memory.at_peak;
    row.fits = Fits(at[k]);
    row.max_micro_batch = searches[k].Largest();
    // Step time of the rank.
    StepTimeInputs t;
    const Graph& rank_graph = sweep.RankGraph(row.micro_batch, plan.tp);
    t.per_rank_cost = costs.at({row.micro_batch, plan.tp});
    t.recomputed_ops = recomputed.at({row.micro_batch, plan.tp});
    t.precision = req.config.precision;
    t.gpu = req.config.target.gpu;
    t.intra_node = req.intra_node;
    t.inter_node = req.inter_node;
    t.collectives = at[k].collectives;
    t.optimizer = req.config.optimizer;
    t.optimizer_param_bytes = OptimizerParamBytes(rank_graph, plan, req.config.precision);
    row.time = EstimateStepTime(t);
    const double tokens = static_cast<double>(row.micro_batch) * plan.dp * static_cast<double>(rank_graph.seq());
    row.tokens_per_second = row.time.total_s > 0 ? tokens / row.time.total_s : 0;
    if (time_assumptions.empty()) time_assumptions = row.time.assumptions;
  }
  out.assumptions.insert(out.assumptions.end(), time_assumptions.begin(), time_assumptions.end());
  std::stable_sort(out.rows.begin(), out.rows.end(), [](const PlanRow& a, const PlanRow& b) {
    auto rank = [](const PlanRow& r) { return !r.skipped.empty() ? 2 : (r.fits ? 0 : 1); };
    if (rank(a) != rank(b)) return rank(a) < rank(b);
    if (rank(a) == 0) return a.tokens_per_second > b.tokens_per_second;
    return a.nvidia_smi_bytes < b.nvidia_smi_bytes;
  });
  if (!out.rows.empty() && out.rows[0].skipped.empty() && out.rows[0].fits) {
    out.best = 0;
    const PlanRow& b = out.rows[0];
    int fitting = 0;
    for (const auto& r : out.rows) fitting += r.skipped.empty() && r.fits;
    out.why = b.plan.Name() + (b.plan.dp > 1 ? " (" + std::string(EngineName(b.plan.engine)) + ")" : "") +
              (fitting == 1 ? " is the only layout that fits: "
                            : " is the fastest of the " + std::to_string(fitting) + " layouts that fit: ") +
              std::to_string(std::llround(b.tokens_per_second)) + " tokens/s, " +
              FormatBytes(b.nvidia_smi_bytes) + " per GPU of " + FormatBytes(req.config.target.gpu.capacity_bytes);
    return out;
  }
  // Nothing fits: the smallest GPU count with a layout that fits, searching the most frugal engines (ZeRO-3
  // style) that can train at this precision over growing counts: whole nodes beyond one node.
  std::vector<DataParallelEngine> usable, frugal;
  for (auto e : req.engines) {
    if (!EngineUnavailable({.dp = 2, .tp = 1, .engine = e}, req.config).empty()) continue;
    usable.push_back(e);
    if (e == DataParallelEngine::kFsdp2Zero3 || e == DataParallelEngine::kGemini) frugal.push_back(e);
  }
  if (frugal.empty()) frugal = usable;  // no engine at all: tensor parallelism alone (one data-parallel rank)
  // Growing counts fill nodes of the size given (--nodes) or usual for the GPU kind.
  const int node_capacity = req.nodes ? per_node : UsualGpusPerNode(req.config.target.gpu);
  // The layouts of a count that can run at all: the engine at this precision, degrees that divide the model, a
  // data-parallel degree that divides the global batch.
  auto runnable_at = [&](int n) {
    std::vector<ParallelPlan> plans;
    for (const ParallelPlan& plan : EnumeratePlans(n, std::min(n, node_capacity), frugal, req.tp)) {
      if (!EngineUnavailable(plan, req.config).empty() || !sweep.Unrunnable(plan).empty()) continue;
      if (req.global_batch > 0 && req.global_batch % plan.dp != 0) continue;
      plans.push_back(plan);
    }
    return plans;
  };
  // Every count up to a node, then whole nodes, that has a layout to try (a global batch splits over only some
  // data-parallel degrees; with no usable engine only tensor parallelism within a node is left).
  std::vector<int> counts;
  for (int n = req.gpus + 1; n <= 4096; ++n) {
    if ((n <= node_capacity || n % node_capacity == 0) && !runnable_at(n).empty()) counts.push_back(n);
  }
  auto fits_with = [&](int n) {
    std::vector<std::pair<ParallelPlan, int64_t>> candidates;  // layout, micro-batch
    for (const ParallelPlan& plan : runnable_at(n)) {
      const int64_t b = req.global_batch > 0 ? req.global_batch / plan.dp : req.micro_batch;
      try {
        sweep.RankGraph(b, plan.tp);  // built here, read by the estimates below
      } catch (const Error&) {
        continue;  // this model cannot be split that way
      }
      candidates.emplace_back(plan, b);
    }
    // One layout that fits answers the question: the layouts not yet started are skipped then.
    std::atomic<bool> any_fits{false};
    ParallelFor(candidates.size(), [&](size_t k) {
      if (any_fits.load()) return;
      try {
        if (Fits(sweep.Estimate(candidates[k].first, candidates[k].second, std::min(n, node_capacity)))) {
          any_fits.store(true);
        }
      } catch (const ConfigError&) {  // the engine cannot run the recipe's step: not a layout that fits
      }
    });
    return any_fits.load();
  };
  // Sharded memory shrinks as GPUs are added, down to what every GPU holds whatever the count (activations,
  // autocast copies): if the largest count with a layout does not fit, none does. Otherwise gallop to a count
  // that fits, then bisect below it.
  size_t hi = counts.empty() || !fits_with(counts.back()) ? counts.size() : 0;
  while (hi < counts.size() && !fits_with(counts[hi])) hi = std::min(counts.size() - 1, hi == 0 ? 1 : hi * 2);
  if (hi < counts.size()) {
    size_t lo = hi / 2;  // counts[lo] was checked and does not fit, unless hi == 0
    if (hi == 0) {
      out.smallest_gpu_count_that_fits = counts[0];
    } else {
      while (hi - lo > 1) {
        const size_t mid = (lo + hi) / 2;
        (fits_with(counts[mid]) ? hi : lo) = mid;
      }
      out.smallest_gpu_count_that_fits = counts[hi];
    }
  }
  out.why = "no layout of " + std::to_string(req.gpus) + (req.gpus == 1 ? " GPU fits" : " GPUs fits");
  return out;
}

}  // namespace llmem::dist
