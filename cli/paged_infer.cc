#include "cli/paged_infer.h"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "cli/generation_layouts.h"
#include "distributed/model_dims.h"
#include "distributed/tensor_parallel_generation.h"
#include "graph/dtype.h"
#include "graph/error.h"
#include "simulator/generation_simulator.h"
#include "simulator/paged_kv_pool.h"

namespace llmem::cli {
namespace {

constexpr int kExitDoesNotFit = 3;

// vLLM's kv_cache_dtype values by element size; "auto" keeps the model's dtype.
int64_t KvElementBytes(const std::string& kv_dtype, int64_t weights_element_bytes) {
  if (kv_dtype == "auto") return weights_element_bytes;
  if (kv_dtype == "bf16" || kv_dtype == "fp16") return 2;
  if (kv_dtype == "fp8" || kv_dtype == "fp8_e4m3" || kv_dtype == "fp8_e5m2" || kv_dtype == "int8") return 1;
  throw ConfigError("unknown --kv-dtype '" + kv_dtype + "' (auto, bf16, fp16, fp8, fp8_e4m3, fp8_e5m2, int8)");
}

// The linears whose outputs become the cache entries `values` of `g` (k_proj, v_proj): walking back from each entry
// through the ops between (views, RoPE, the cache's cat) to the first linear on every path.
std::set<int32_t> CacheProjectionParams(const Graph& g, const std::vector<ValueId>& values) {
  std::set<int32_t> params;
  std::set<int32_t> seen;
  std::vector<ValueId> todo = values;
  while (!todo.empty()) {
    const ValueId v = todo.back();
    todo.pop_back();
    if (!v.valid() || !seen.insert(v.index).second) continue;
    const TensorValue& tv = g.value(v);
    if (!tv.producer.valid()) continue;
    const OpNode& node = g.node(tv.producer);
    const bool linear = node.kind == "aten::linear" || node.kind == "aten::addmm";
    for (ValueId in : g.tensor_inputs(node.id)) {
      const TensorValue& iv = g.value(in);
      if (linear) {
        if (iv.param >= 0) params.insert(iv.param);
      } else if (iv.param < 0) {
        todo.push_back(in);
      }
    }
  }
  return params;
}

// Rank 0's weights under vLLM's key/value replication, from the profile run split at degree kv (`est`): the key/value
// projections as they are there (one head), every other split parameter `factor` (= tp / kv) times smaller.
int64_t ReplicatedKvRankWeights(const Graph& full, const sim::GenerationEstimate& est, int64_t factor) {
  const Graph& rank = est.prefill_graph;
  if (rank.params().size() != full.params().size()) {
    throw ModelLoadError("the generation forward changed the export's parameters: cannot follow vLLM's replication");
  }
  const std::set<int32_t> kv = CacheProjectionParams(rank, est.cache_values);
  int64_t weights = est.prefill.weights_bytes;
  std::set<int32_t> storages;
  for (size_t i = 0; i < rank.params().size(); ++i) {
    const Parameter& p = rank.params()[i];
    const bool split = p.bytes < full.params()[i].bytes;
    if (!split || kv.count(static_cast<int32_t>(i)) || !storages.insert(rank.StorageRoot(p.value).index).second) {
      continue;
    }
    weights -= p.bytes - p.bytes / factor;
  }
  return weights;
}

// One engine's start-up on each of its o.tp ranks, and what the request gets from it.
struct PagedEngine {
  sim::PagedPoolInputs in;
  sim::PagedPool pool;
  std::string target, peak_op;
  int64_t weights = 0, activations = 0, max_model_len = 0;
  int64_t profile_requests = 0, profile_each = 0, profile_tokens = 0;
  int64_t per_sequence = 0, concurrent = 0, max_batch = 0, max_prompt = 0;
  bool starts = false, all_at_once = false, replicate_kv = false;
  int split_degree = 1;
  int64_t kv_heads_total = 0;
  int64_t fixed_overhead = 0;
};

PagedEngine SizePagedEngine(const InferOptions& o, const DecoderModel& model,
                            const sim::GenerationGraphAt& graph_at, const Graph& probe_graph,
                            const sim::TrainingConfig& config) {
  const std::optional<PositionLimit> limit = probe_graph.position_limit();
  if (config.target.is_cpu) throw ConfigError("--cache paged sizes vLLM's KV pool on a GPU: name one with --gpu");
  static const std::vector<int64_t> kBlockSizes = {1, 8, 16, 32, 64, 128, 256};  // vLLM's BlockSize
  if (std::find(kBlockSizes.begin(), kBlockSizes.end(), o.block_size) == kBlockSizes.end()) {
    throw ConfigError("--block-size must be one of vLLM's 1, 8, 16, 32, 64, 128, 256 (got " +
                      std::to_string(o.block_size) + ")");
  }
  if (o.max_num_batched_tokens < 1 || o.max_num_seqs < 1) {
    throw ConfigError("--max-num-batched-tokens and --max-num-seqs must be positive");
  }
  if (model.sliding_window().value_or(0) > 0) {
    throw ConfigError("this model attends within a sliding window of " + std::to_string(*model.sliding_window()) +
                      " tokens: vLLM's sliding-window pool (SlidingWindowSpec) is not modelled; use --cache dynamic");
  }
  if (!o.max_model_len && !limit) {
    throw ConfigError("the export does not say how long a sequence may be: give vLLM's --max-model-len");
  }
  const int64_t max_model_len = o.max_model_len.value_or(limit ? limit->max_seq : 0);
  if (max_model_len < 1) throw ConfigError("--max-model-len must be positive");
  if (limit && max_model_len > limit->max_seq) {
    throw ConfigError("--max-model-len " + std::to_string(max_model_len) + " exceeds the model's " +
                      std::to_string(limit->max_seq) + " positions (" + limit->source +
                      "); --max-positions overrides it for a RoPE-scaled model");
  }
  const int64_t request_len = CheckedAdd(o.prompt, o.new_tokens, "prompt + new tokens");
  if (request_len > max_model_len) {
    throw ConfigError("prompt " + std::to_string(o.prompt) + " + " + std::to_string(o.new_tokens) +
                      " new tokens exceeds max_model_len " + std::to_string(max_model_len) +
                      " (vLLM rejects such a request)");
  }
  const dist::ModelDims dims = dist::ReadModelDims(probe_graph);
  // vLLM replicates the key/value heads when the degree exceeds them (QKVParallelLinear: each rank one head, shared by
  // tp / kv ranks; the degree must then be a multiple of the key/value heads).
  const bool replicate_kv = o.tp > dims.kv_heads && o.tp % dims.kv_heads == 0;
  dist::ModelDims split_dims = dims;
  if (replicate_kv) split_dims.kv_heads = o.tp;  // checked apart: any multiple of them replicates
  if (std::string why = dist::CheckTensorParallelDegree(split_dims, o.tp, /*vocab_parallel=*/false); !why.empty()) {
    throw ConfigError(why);
  }
  // vLLM splits the embedding and the LM head by vocabulary (padding it to a multiple of 64 per rank, not counted).
  const bool vocab_parallel = o.tp > 1 && dims.vocab % o.tp == 0;
  // With replication the rank is modelled from the split at degree kv (one key/value head per rank), whose other
  // split parameters then shrink by tp / kv more (ReplicatedKvRankWeights).
  const int split_degree = replicate_kv ? static_cast<int>(dims.kv_heads) : o.tp;

  // The start-up profile run (gpu_model_runner.py profile_run / _dummy_run): max_num_batched_tokens tokens spread
  // evenly over min(tokens, max_num_seqs) requests, no cache yet, then the logits of each request's last token.
  const int64_t profile_requests = std::min(o.max_num_batched_tokens, o.max_num_seqs);
  const int64_t profile_each = o.max_num_batched_tokens / profile_requests;
  const int64_t profile_tokens = profile_requests * profile_each;
  if (limit && profile_each > limit->max_seq) {
    throw ConfigError("--max-num-batched-tokens " + std::to_string(o.max_num_batched_tokens) + " over " +
                      std::to_string(profile_requests) + " profile requests gives " + std::to_string(profile_each) +
                      " tokens each, past the model's " + std::to_string(limit->max_seq) + " positions");
  }
  const sim::GenerationRequest profile_request{
      .batch = profile_requests, .prompt = profile_each, .new_tokens = 1,
      .loop = {.last_position_logits = true, .min_length_processors = false}};
  const sim::GenerationEstimate profile = sim::EstimateGeneration(
      graph_at, profile_request, config,
      dist::TensorParallelGenerationForward(split_degree, nullptr, vocab_parallel && split_degree > 1));
  const sim::MemoryEstimate& run = profile.prefill;
  const int64_t weights = replicate_kv ? ReplicatedKvRankWeights(probe_graph, profile, o.tp / split_degree)
                                       : run.weights_bytes;
  const auto at = [&](sim::MemoryCategory c) { return run.at_peak[static_cast<size_t>(c)]; };
  // vLLM's input buffers exist before the profile and its attention writes no cache then: neither is in the peak.
  const int64_t activations = run.peak_allocated_bytes - run.weights_bytes - at(sim::MemoryCategory::kInputs) -
                              at(sim::MemoryCategory::kKvCache);

  if (profile.cache_values.empty() || profile.prefill_graph.value(profile.cache_values.front()).shape.size() != 4) {
    throw ConfigError("this model's cache entries are not [batch, heads, tokens, head size]: not modelled for "
                      "--cache paged");
  }
  const std::vector<int64_t>& entry = profile.prefill_graph.value(profile.cache_values.front()).shape;
  const int64_t weights_element =
      ElementSize(config.precision == sim::Precision::kBf16 ? DType::kBF16 : DType::kF32);
  sim::PagedPoolInputs in{.total_memory_bytes = config.target.gpu.capacity_bytes,
                          .free_at_start_bytes = config.target.gpu.capacity_bytes - run.fixed_overhead_bytes,
                          .gpu_memory_utilization = o.gpu_memory_utilization,
                          .weights_bytes = weights,
                          .profile_peak_bytes = activations,
                          .non_torch_bytes = 0,
                          .block_size = o.block_size,
                          .layers = static_cast<int64_t>(profile.cache_values.size() / 2),
                          .kv_heads = entry[1],
                          .head_size = entry[3],
                          .kv_element_bytes = KvElementBytes(o.kv_dtype, weights_element),
                          .max_model_len = max_model_len};
  const sim::PagedPool pool = sim::SizePagedPool(in);

  // The request: every token but the last generated one is fed, so each sequence holds P + N - 1 tokens' blocks.
  const int64_t per_sequence = sim::BlocksFor(request_len - 1, o.block_size);
  const int64_t by_blocks = pool.num_blocks / per_sequence;
  const int64_t concurrent = std::min({o.batch, o.max_num_seqs, by_blocks});
  const bool starts = pool.starts();
  const bool all_at_once = starts && concurrent == o.batch;
  // Searches: both answers follow from the pool, which no request changes.
  const int64_t max_batch = starts ? std::min(o.max_num_seqs, by_blocks) : 0;
  const int64_t blocks_each = o.batch > 0 ? pool.num_blocks / o.batch : 0;
  const int64_t max_prompt =
      starts ? std::max<int64_t>(0, std::min(blocks_each * o.block_size, max_model_len - 1) - o.new_tokens + 1) : 0;

  PagedEngine e{.in = in, .pool = pool, .target = run.target, .peak_op = run.peak_op, .weights = weights,
                 .activations = activations, .max_model_len = max_model_len, .profile_requests = profile_requests,
                 .profile_each = profile_each, .profile_tokens = profile_tokens, .per_sequence = per_sequence,
                 .concurrent = concurrent, .max_batch = max_batch, .max_prompt = max_prompt, .starts = starts,
                 .all_at_once = all_at_once, .replicate_kv = replicate_kv, .split_degree = split_degree,
                 .kv_heads_total = dims.kv_heads, .fixed_overhead = run.fixed_overhead_bytes};
  return e;
}

}  // namespace

// `--gpus N --cache paged`: one vLLM engine per T GPUs (T dividing N and the model), N / T engines; fitting ones
// first by the request's sequences they run at once in all.
int RunPagedLayouts(const InferOptions& o, const DecoderModel& model,
                    const sim::GenerationGraphAt& graph_at, const Graph& probe_graph,
                    const sim::TrainingConfig& config) {
  struct Row {
    int tp = 1, copies = 1;
    std::string skipped;
    PagedEngine engine;
    int64_t sequences() const { return engine.starts ? engine.max_batch * copies : 0; }
  };
  std::vector<Row> rows;
  for (int tp = 1; tp <= o.gpus; ++tp) {
    if (o.gpus % tp != 0) continue;
    InferOptions at = o;
    at.tp = tp;
    Row row{.tp = tp, .copies = o.gpus / tp};
    if (tp == 1) {
      row.engine = SizePagedEngine(at, model, graph_at, probe_graph, config);  // bad input fails here, once
    } else {
      try {
        row.engine = SizePagedEngine(at, model, graph_at, probe_graph, config);
      } catch (const ConfigError& e) {  // a degree the model's dimensions do not allow
        row.skipped = e.what();
      } catch (const UnsupportedOpError& e) {
        row.skipped = e.what();
      }
    }
    rows.push_back(std::move(row));
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    const bool sa = a.skipped.empty() && a.engine.starts, sb = b.skipped.empty() && b.engine.starts;
    if (sa != sb) return sa;
    return a.sequences() > b.sequences();
  });
  const auto name = [](const Row& r) { return TensorParallelLayoutName(r.tp, r.copies, "engines"); };
  const bool any = std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.skipped.empty() && r.engine.starts; });
  if (o.json_out) {
    nlohmann::json layouts = nlohmann::json::array();
    for (const Row& r : rows) {
      nlohmann::json j = {{"layout", name(r)}, {"tp", r.tp}, {"engines", r.copies}};
      if (!r.skipped.empty()) {
        j["skipped"] = r.skipped;
      } else {
        j.update({{"engine_starts", r.engine.starts},
                  {"weights_bytes", r.engine.weights},
                  {"kv_cache_bytes", r.engine.pool.num_blocks * r.engine.pool.block_bytes},
                  {"num_blocks", r.engine.pool.num_blocks},
                  {"max_concurrency", r.engine.pool.max_concurrency * r.copies},
                  {"concurrent_sequences", r.sequences()}});
      }
      layouts.push_back(std::move(j));
    }
    std::cout << nlohmann::json{{"model", o.model}, {"engine", "vllm"}, {"gpus", o.gpus}, {"prompt", o.prompt},
                                {"new_tokens", o.new_tokens}, {"kv_dtype", o.kv_dtype}, {"layouts", layouts}}
                     .dump(2)
              << "\n";
  } else {
    std::printf("model      %s\n", o.model.c_str());
    std::printf("engine     vLLM V1 on %d x %s, %lld-token blocks, kv_cache_dtype %s; requests of %lld + %lld tokens\n\n",
                o.gpus, config.target.gpu.name.c_str(), static_cast<long long>(o.block_size), o.kv_dtype.c_str(),
                static_cast<long long>(o.prompt), static_cast<long long>(o.new_tokens));
    std::printf("%-22s %12s %12s %10s %18s %16s\n", "layout", "weights/GPU", "KV pool/GPU", "starts",
                "at max_model_len", "requests at once");
    for (const Row& r : rows) {
      if (!r.skipped.empty()) {
        std::printf("%-22s skipped: %s\n", name(r).c_str(), r.skipped.c_str());
        continue;
      }
      std::printf("%-22s %12s %12s %10s %18.1f %16lld\n", name(r).c_str(), FormatBytes(r.engine.weights).c_str(),
                  FormatBytes(r.engine.pool.num_blocks * r.engine.pool.block_bytes).c_str(),
                  r.engine.starts ? "yes" : "no", r.engine.pool.max_concurrency * r.copies,
                  static_cast<long long>(r.sequences()));
    }
    std::printf("\nrequests at once: sequences of this request's length all engines run together (each engine's pool, "
                "at most --max-num-seqs); the assumptions of `--cache paged` alone apply\n");
  }
  return any ? 0 : kExitDoesNotFit;
}

int RunPagedInfer(const InferOptions& o, const DecoderModel& model,
                  const sim::GenerationGraphAt& graph_at, const Graph& probe_graph,
                  const sim::TrainingConfig& config) {
  if (o.gpus > 0) return RunPagedLayouts(o, model, graph_at, probe_graph, config);
  const PagedEngine e = SizePagedEngine(o, model, graph_at, probe_graph, config);
  const sim::PagedPool& pool = e.pool;
  const sim::PagedPoolInputs& in = e.in;
  const std::vector<std::string> assumptions = {
      "vLLM V1's start-up: requested = total x gpu_memory_utilization; the pool gets what the weights and the "
      "profile run's peak leave of it (gpu_worker.py determine_available_memory); blocks of every layer "
      "(kv_cache_utils.py)",
      "the profile run's activation peak is llmem's forward of its dummy batch (max_num_batched_tokens tokens over "
      "min(tokens, max_num_seqs) requests, the remainder dropped; each request's last-token logits and a greedy "
      "pick) with the Hugging Face model's ops and without their cache: vLLM's fused kernels (qkv and gate/up "
      "projections, in-place RoPE and residual norms) allocate less, so the pool is sized on the small side",
      "outside the requested fraction: the CUDA context, NCCL's communicators and the CUDA graphs vLLM captures "
      "after allocating the pool (none with --enforce-eager); no non-torch memory grows during the profile",
      "a sequence holds the blocks of its P + N - 1 fed tokens; sequences beyond the pool or max_num_seqs wait "
      "(vLLM schedules them later) rather than fail"};
  std::vector<std::string> all_assumptions = assumptions;
  if (e.replicate_kv) {
    all_assumptions.push_back(
        "each of the " + std::to_string(e.kv_heads_total) + " key/value heads on " + std::to_string(o.tp / e.split_degree) +
        " ranks (vLLM's replication): the profile run is the split at degree " + std::to_string(e.split_degree) +
        " (more query heads and MLP columns per rank than the real one, so its activations are a bound from above)");
  }
  if (o.json_out) {
    nlohmann::json j = {{"model", o.model},
                        {"target", e.target},
                        {"engine", "vllm"},
                        {"tp", o.tp},
                        {"batch", o.batch},
                        {"prompt", o.prompt},
                        {"new_tokens", o.new_tokens},
                        {"precision", o.precision},
                        {"kv_dtype", o.kv_dtype},
                        {"weights_bytes", e.weights},
                        {"capacity_bytes", config.target.gpu.capacity_bytes},
                        {"fits", e.all_at_once},
                        {"paged",
                         {{"block_size", o.block_size},
                          {"gpu_memory_utilization", o.gpu_memory_utilization},
                          {"max_model_len", e.max_model_len},
                          {"max_num_batched_tokens", o.max_num_batched_tokens},
                          {"max_num_seqs", o.max_num_seqs},
                          {"profile_tokens", e.profile_tokens},
                          {"requested_bytes", pool.requested_bytes},
                          {"profile_activation_bytes", e.activations},
                          {"available_bytes", pool.available_bytes},
                          {"page_bytes", pool.page_bytes},
                          {"block_bytes", pool.block_bytes},
                          {"num_blocks", pool.num_blocks},
                          {"tokens", pool.tokens},
                          {"kv_cache_bytes", pool.num_blocks * pool.block_bytes},
                          {"max_concurrency", pool.max_concurrency},
                          {"engine_starts", e.starts},
                          {"requested_is_free", pool.requested_is_free},
                          {"blocks_per_sequence", e.per_sequence},
                          {"concurrent_sequences", e.concurrent}}},
                        {"assumptions", all_assumptions}};
    if (o.max_batch) j["max_batch"] = e.max_batch;
    if (o.max_prompt) j["max_prompt"] = e.max_prompt;
    std::cout << j.dump(2) << "\n";
  } else {
    std::printf("model      %s\n", o.model.c_str());
    std::printf("engine     vLLM V1, paged KV cache of %lld-token blocks, kv_cache_dtype %s, max_model_len %lld, "
                "target %s%s\n",
                static_cast<long long>(o.block_size), o.kv_dtype.c_str(), static_cast<long long>(e.max_model_len),
                e.target.c_str(),
                o.tp > 1 ? (" x " + std::to_string(o.tp) + " (tensor parallel; figures per GPU)").c_str() : "");
    std::printf("requested  %s (%.2f of %s)\n", FormatBytes(pool.requested_bytes).c_str(), o.gpu_memory_utilization,
                FormatBytes(config.target.gpu.capacity_bytes).c_str());
    std::printf("  weights                %12s%s\n", FormatBytes(e.weights).c_str(),
                e.replicate_kv ? ("   (each key/value head on " + std::to_string(o.tp / e.split_degree) + " ranks)").c_str()
                             : "");
    std::printf("  profile activations    %12s   (%lld requests x %lld tokens, peak at %s)\n",
                FormatBytes(e.activations).c_str(), static_cast<long long>(e.profile_requests),
                static_cast<long long>(e.profile_each), e.peak_op.c_str());
    std::printf("  KV pool                %12s   %lld blocks x %s (%lld layers x %lld key/value heads x %lld)\n",
                FormatBytes(pool.num_blocks * pool.block_bytes).c_str(), static_cast<long long>(pool.num_blocks),
                FormatBytes(pool.block_bytes).c_str(), static_cast<long long>(in.layers),
                static_cast<long long>(in.kv_heads), static_cast<long long>(in.head_size));
    std::printf("pool       %lld tokens; %.2f sequences of max_model_len at once\n",
                static_cast<long long>(pool.tokens), pool.max_concurrency);
    if (!pool.requested_is_free) {
      std::printf("vLLM does not start: %s is requested, but only %s is free once the CUDA context%s exists (lower "
                  "--gpu-memory-utilization)\n",
                  FormatBytes(pool.requested_bytes).c_str(),
                  FormatBytes(config.target.gpu.capacity_bytes - e.fixed_overhead).c_str(),
                  o.tp > 1 ? " and NCCL's buffers" : "");
    } else if (!e.starts) {
      std::printf("vLLM does not start: one request of max_model_len %lld tokens needs %lld blocks, the pool has %lld "
                  "(lower --max-model-len, or raise --gpu-memory-utilization)\n",
                  static_cast<long long>(e.max_model_len), static_cast<long long>(pool.blocks_per_max_len_request),
                  static_cast<long long>(pool.num_blocks));
    } else {
      std::printf("request    %lld x (%lld + %lld): %lld blocks each; %lld of the %lld sequences run at once%s\n",
                  static_cast<long long>(o.batch), static_cast<long long>(o.prompt),
                  static_cast<long long>(o.new_tokens), static_cast<long long>(e.per_sequence),
                  static_cast<long long>(e.concurrent), static_cast<long long>(o.batch),
                  e.all_at_once ? "" : (e.concurrent == o.max_num_seqs ? " (max_num_seqs)" : " (the rest wait for blocks)"));
    }
    if (o.max_batch) {
      std::printf("largest batch at once: %lld (prompt %lld + %lld new tokens)\n", static_cast<long long>(e.max_batch),
                  static_cast<long long>(o.prompt), static_cast<long long>(o.new_tokens));
    }
    if (o.max_prompt) {
      std::printf("longest prompt with all %lld sequences at once: %lld tokens (+ %lld new)\n",
                  static_cast<long long>(o.batch), static_cast<long long>(e.max_prompt),
                  static_cast<long long>(o.new_tokens));
    }
    std::printf("\nassumptions:\n");
    for (const auto& a : all_assumptions) std::printf("  - %s\n", a.c_str());
  }
  return e.all_at_once ? 0 : kExitDoesNotFit;
}

}  // namespace llmem::cli
