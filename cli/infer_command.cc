#include "cli/infer_command.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli/category_report.h"
#include "cli/device_map_infer.h"
#include "cli/generation_layouts.h"
#include "cli/generation_time.h"
#include "cli/lora_options.h"
#include "cli/paged_infer.h"
#include "cli/progress_line.h"
#include "cli/training_options.h"
#include "graph/dtype.h"
#include "graph/error.h"
#include "graph/decoder_model.h"
#include "distributed/generation_search.h"
#include "distributed/tensor_parallel_generation.h"
#include "graph/quantize_rewrite.h"
#include "simulator/generation_simulator.h"

namespace llmem::cli {
namespace {

constexpr int kExitDoesNotFit = 3;

nlohmann::json PhaseJson(const sim::MemoryEstimate& e) {
  return {{"peak_allocated_bytes", e.peak_allocated_bytes},
          {"peak_reserved_bytes", e.peak_reserved_bytes},
          {"nvidia_smi_bytes", e.nvidia_smi_bytes},
          {"peak_op", e.peak_op},
          {"at_peak_bytes", NonZeroCategoriesJson(e.at_peak)}};
}

void PrintPhase(const char* name, const sim::MemoryEstimate& e) {
  std::printf("%s peak %s allocated, %s reserved (at %s):\n", name, FormatBytes(e.peak_allocated_bytes).c_str(),
              FormatBytes(e.peak_reserved_bytes).c_str(), e.peak_op.empty() ? "its start" : e.peak_op.c_str());
  PrintCategories(e.at_peak);
  // The largest blocks at the peak besides the weights (which the breakdown above already sums).
  const sim::Timeline& tl = e.simulation->timeline;
  int64_t live = 0, best = -1;
  size_t at = 0;
  for (size_t i = 0; i < tl.events.size(); ++i) {
    live += tl.events[i].is_alloc ? tl.events[i].bytes : -tl.events[i].bytes;
    if (live > best) best = live, at = i;
  }
  std::map<int64_t, const sim::MemoryEvent*> blocks;
  for (size_t i = 0; i <= at && i < tl.events.size(); ++i) {
    if (tl.events[i].is_alloc) blocks[tl.events[i].block] = &tl.events[i];
    else blocks.erase(tl.events[i].block);
  }
  std::vector<const sim::MemoryEvent*> other;
  for (const auto& [id, ev] : blocks) {
    if (ev->category != sim::MemoryCategory::kWeights) other.push_back(ev);
  }
  std::sort(other.begin(), other.end(), [](auto* a, auto* b) { return a->bytes > b->bytes; });
  std::printf("  largest other blocks:");
  for (size_t i = 0; i < other.size() && i < 4; ++i) {
    std::printf("%s %s (%s)", i ? "," : "", FormatBytes(other[i]->bytes).c_str(),
                tl.block_labels.at(static_cast<size_t>(other[i]->block)).c_str());
  }
  std::printf("\n");
}

}  // namespace

void AddInferOptions(CLI::App* cmd, InferOptions& o) {
  AddModelSource(cmd, o.source, "TorchScript export (.pt) or torch.export program (.pt2) of models/export_hf.py");
  cmd->add_option("--gpu", o.gpu, "GPU kind, or cpu (what an instrumented CPU run allocates)")->capture_default_str();
  cmd->add_option("--gpu-memory", o.gpu_memory, "capacity of a GPU the catalog lacks (other figures from --gpu)");
  cmd->add_option("-b,--batch", o.batch, "sequences generated together")->capture_default_str();
  cmd->add_option("--prompt", o.prompt, "prompt tokens per sequence")->required();
  cmd->add_option("--new-tokens", o.new_tokens, "tokens generated per sequence")->required();
  cmd->add_option("-p,--precision", o.precision, "the weights' dtype: bf16 (a bf16 export) | fp32")
      ->capture_default_str();
  cmd->add_option("--cache", o.cache, "dynamic (HF DynamicCache) | static (HF cache_implementation=\"static\") | "
                  "paged (vLLM's block pool)")->capture_default_str();
  cmd->add_option("--quant", o.quant, "the linears quantized on loading: nf4 | fp4 | nf4-dq | fp4-dq (bitsandbytes "
                  "4-bit) | gptq-4 | gptq-8; the LM head stays in the weights' dtype");
  cmd->add_option("--quant-group", o.quant_group, "--quant gptq-*: input features per scale (default 128)");
  cmd->add_option("--kv-dtype", o.kv_dtype, "the cache's dtype: auto (the weights') | bf16 | fp16 | fp8 | fp8_e4m3 | "
                  "fp8_e5m2 | int8 (other than auto: --cache paged)")->capture_default_str();
  cmd->add_option("--block-size", o.block_size, "--cache paged: tokens per KV block")->capture_default_str();
  cmd->add_option("--gpu-memory-utilization", o.gpu_memory_utilization,
                  "--cache paged: the fraction of the GPU vLLM may use")->capture_default_str();
  cmd->add_option("--max-model-len", o.max_model_len, "--cache paged: longest request vLLM admits (default: the "
                  "model's positions)");
  cmd->add_option("--max-num-batched-tokens", o.max_num_batched_tokens,
                  "--cache paged: tokens of vLLM's start-up profile run")->capture_default_str();
  cmd->add_option("--max-num-seqs", o.max_num_seqs, "--cache paged: sequences vLLM runs at once at most")
      ->capture_default_str();
  cmd->add_option("--max-positions", o.max_positions, "longest sequence the model allows (e.g. scaled RoPE)");
  cmd->add_option("--gpus", o.gpus, "compare the tensor-parallel layouts over this many GPUs (T ranks per copy of "
                  "the model, the batch on each of the N / T copies)");
  cmd->add_option("--device-map", o.device_map, "auto: the model loaded with from_pretrained(device_map=\"auto\") "
                  "over --gpus GPUs (accelerate's layer placement; each GPU's weights, cache and peaks)");
  cmd->add_option("--tp", o.tp, "tensor-parallel GPUs (transformers' tp_plan: each decoder layer split, the "
                  "embedding and LM head replicated); figures are per GPU")->capture_default_str();
  cmd->add_flag("--max-batch", o.max_batch, "also find the largest batch that fits (GPU targets)");
  cmd->add_flag("--max-context", o.max_prompt,
                "also find the longest prompt that fits with --new-tokens at --batch (GPU targets)");
  cmd->add_flag("--json", o.json_out, "print JSON");
}

sim::TrainingConfig CheckInferOptions(const InferOptions& o) {
  if (o.precision != "bf16" && o.precision != "fp32") {
    throw ConfigError("unknown --precision '" + o.precision + "' for infer (bf16, fp32)");
  }
  if (o.cache != "dynamic" && o.cache != "static" && o.cache != "paged") {
    throw ConfigError("unknown --cache '" + o.cache + "' (dynamic, static, paged)");
  }
  if (o.cache != "paged" && o.kv_dtype != "auto" && o.kv_dtype != o.precision) {
    throw ConfigError("--kv-dtype " + o.kv_dtype + ": Hugging Face's " + (o.cache == "static" ? "StaticCache" : "DynamicCache") +
                      " keeps keys and values in the weights' dtype (" + o.precision +
                      "); other cache dtypes are modelled for vLLM's --cache paged");
  }
  if (o.batch <= 0) throw ConfigError("--batch must be positive");

  if (o.tp < 1) throw ConfigError("--tp must be at least 1 (got " + std::to_string(o.tp) + ")");
  if (o.gpus < 0) throw ConfigError("--gpus must be positive (got " + std::to_string(o.gpus) + ")");
  if (!o.device_map.empty()) {
    if (o.device_map != "auto" && o.device_map != "balanced") {
      throw ConfigError("unknown --device-map '" + o.device_map + "' (auto)");
    }
    if (o.tp != 1 || o.cache == "paged" || !o.quant.empty()) {
      throw ConfigError("--device-map auto is modelled alone: drop --tp, --cache paged and --quant");
    }
  } else if (o.gpus > 0 && (o.tp != 1 || o.max_prompt)) {
    throw ConfigError("--gpus compares the tensor-parallel layouts: drop --tp and --max-context");
  }
  if (o.prompt <= 0) throw ConfigError("--prompt must be positive");
  if (o.new_tokens <= 0) throw ConfigError("--new-tokens must be positive");
  sim::TrainingConfig config = ParseTrainingConfig(o.precision, "sgd", o.gpu, o.gpu_memory);
  config.lifetimes = sim::Lifetimes::kEager;
  return config;
}

int RunInfer(const InferOptions& o) {
  sim::TrainingConfig config = CheckInferOptions(o);
  const std::unique_ptr<DecoderModel> loaded = LoadDecoderModel(o.model);
  DecoderModel& model = *loaded;
  CheckMoeImbalance(o.source, model);
  if (o.max_positions) model.set_max_positions(*o.max_positions);
  // The linears quantized as transformers' quantizers load them (graph/quantize_rewrite.h); the rest as exported.
  if (o.quant_group && (o.quant.empty() || o.quant == "none")) {
    throw ConfigError("--quant-group needs --quant gptq-4 or gptq-8");
  }
  std::optional<QuantSettings> quant = ParseQuantOptions(o.quant, o.quant_group, config.precision);
  if (quant) {
    quant->for_generation = true;
    if (quant->library == QuantLibrary::kTorchao) {
      throw ConfigError("--quant torchao-nf4 is torchtune's training recipe; for generation use bitsandbytes' nf4");
    }
    if (quant->format == QuantFormat::kInt8 && quant->library == QuantLibrary::kBitsandbytes) {
      throw ConfigError("--quant int8 is not modelled for generation: bitsandbytes runs LLM.int8() differently without "
                        "gradients than the training path llmem models (a CPU generate() prefill peaks up to 14 % "
                        "above it); use nf4, fp4, nf4-dq or fp4-dq");
    }
    if (o.tp > 1) throw ConfigError("--quant with --tp is not modelled yet");
    if (o.cache == "paged") throw ConfigError("--quant with --cache paged is not modelled yet (vLLM's own kernels)");
  }
  const auto export_graph = [&](int64_t b, int64_t s, int64_t past) {
    Graph g = model.BuildGenerationGraph(b, s, past);
    return quant ? QuantizeLinears(g, *quant) : g;
  };
  // The export's prefill at 1 x 2 tokens: its position limit and the dimensions a split must divide.
  const Graph probe_graph = model.BuildGenerationGraph(1, 2, 0);
  // An eager attention's graph carries its cache, so its shapes depend on the cached tokens.
  const bool graph_depends_on_past = probe_graph.kv_cache().has_value();
  if ((o.max_batch || o.max_prompt) && config.target.is_cpu) {
    throw ConfigError("--max-batch and --max-context search what fits a GPU: name one with --gpu");
  }
  if (config.precision == sim::Precision::kBf16 && !probe_graph.runs_with_bf16_weights()) {
    throw ConfigError("this export cannot run with bf16 weights (its trace bakes fp32 dtypes in): re-export it with "
                      "--dtype bfloat16, or use -p fp32");
  }
  if (model.hybrid_attention_layers()) {
    throw ConfigError("this model mixes sliding-window and full-attention layers (its config's layer_types, as "
                      "Gemma-2/3): their per-layer caches are not modelled yet");
  }
  if (o.cache == "paged") return RunPagedInfer(o, model, export_graph, probe_graph, config);
  if (o.cache == "static" && !model.bool_causal_mask().value_or(false)) {
    throw ConfigError("--cache static is modelled for models that build transformers' create_causal_mask mask; this "
                      "export's model builds its own (or the export does not say): not modelled yet");
  }
  const int64_t window = model.sliding_window().value_or(0);
  if (window > 0 && o.cache == "static") {
    throw ConfigError("this model attends within a sliding window of " + std::to_string(window) +
                      " tokens: its static cache (StaticSlidingWindowLayer) is not modelled yet; use --cache dynamic");
  }
  // The positions generation feeds: 0 .. P + N - 2 (the last token is generated, never fed back).
  const int64_t context = CheckedAdd(o.prompt, o.new_tokens - 1, "prompt + new tokens");
  const std::optional<PositionLimit> limit = probe_graph.position_limit();
  // transformers splits a model for generate() only by its config's base_model_tp_plan.
  const std::string no_tp_plan =
      model.tensor_parallel_plan().value_or(true)
          ? ""
          : "this model's config has no base_model_tp_plan, so transformers has no tensor-parallel split for it "
            "(--cache paged --tp sizes vLLM's engines)";
  if (o.tp > 1) {
    if (!no_tp_plan.empty()) throw ConfigError("--tp: " + no_tp_plan);
    if (const std::string why = dist::CheckTensorParallelGeneration(probe_graph, o.tp); !why.empty()) {
      throw ConfigError(why);
    }
  }
  if (limit && context > limit->max_seq) {
    throw ConfigError("prompt " + std::to_string(o.prompt) + " + " + std::to_string(o.new_tokens) +
                      " new tokens needs " + std::to_string(context) + " positions, but the model allows " +
                      std::to_string(limit->max_seq) + " (" + limit->source + "); --max-positions overrides it for "
                      "a RoPE-scaled model");
  }
  // An export without the record may come from a model whose forward lacks logits_to_keep: assume the larger
  // logits of every prompt position.
  const bool last_logits = model.logits_to_keep().value_or(false);
  const auto request_at = [&](int64_t b, int64_t p) {
    return sim::GenerationRequest{.batch = b, .prompt = p, .new_tokens = o.new_tokens,
                                  .loop = {.cache = o.cache == "static" ? CacheKind::kStatic : CacheKind::kDynamic,
                                           .sliding_window = window,
                                           .last_position_logits = last_logits,
                                           .float32_logits = model.float32_logits().value_or(false),
                                           .min_length_processors = model.eos_token().value_or(true)}};
  };
  const sim::GenerationRequest request = request_at(o.batch, o.prompt);
  // Every estimate's decode step is a graph of 1 new token: built once per batch.
  std::map<std::pair<int64_t, int64_t>, Graph> decode_graphs;
  const auto graph_at = [&](int64_t b, int64_t s, int64_t past) {
    if (s != 1) return export_graph(b, s, past);
    const std::pair<int64_t, int64_t> key{b, graph_depends_on_past ? past : 0};
    auto it = decode_graphs.find(key);
    if (it == decode_graphs.end()) it = decode_graphs.emplace(key, export_graph(b, 1, past)).first;
    return it->second;
  };
  const std::string loop =
      std::string("HF generate(): greedy, ") +
      (o.cache == "static" ? "StaticCache of prompt + new tokens - 1"
       : window > 0        ? "DynamicCache of sliding-window layers (the last " + std::to_string(window - 1) + " tokens)"
                           : std::string("DynamicCache")) +
      ", no padding, " +
      (last_logits ? "the prompt's logits at its last position only (logits_to_keep=1)"
                   : model.logits_to_keep() ? "the prompt's logits at every position (the forward takes no logits_to_keep)"
                                            : "the prompt's logits at every position (the export does not say whether "
                                              "its forward takes logits_to_keep)") +
      (quant ? "; linears loaded " + QuantName(*quant) +
                   (quant->library == QuantLibrary::kGptq
                        ? " (a GPTQ checkpoint; its layout from gptqmodel's source, not compared with a run)"
                        : " by transformers' bitsandbytes quantizer (the LM head stays in the weights' dtype)")
             : std::string()) +
      (o.tp > 1 ? "; on each of " + std::to_string(o.tp) + " tensor-parallel ranks (transformers' tp_plan: q/k/v and "
                  "gate/up ColwiseParallel, o and down RowwiseParallel, embedding and LM head replicated)"
                : std::string());
  if (!o.device_map.empty()) return RunDeviceMapInfer(o, model, graph_at, request_at, config, limit, loop);
  if (o.gpus > 0) {
    return RunGenerationLayouts(o, graph_at, [&](int64_t b) { return request_at(b, o.prompt); }, config, probe_graph,
                                no_tp_plan);
  }
  std::vector<dist::CollectiveList> collectives;
  const sim::GenerationEstimate est =
      sim::EstimateGeneration(graph_at, request, config, dist::TensorParallelGenerationForward(o.tp, &collectives));
  const sim::GenerationForwardSimulator rank_forward = dist::TensorParallelGenerationForward(o.tp);
  // The searches start from the request's own estimate.
  ProgressLine progress("infer", o.json_out);
  auto largest = [&](int64_t limit, int64_t requested, const char* what,
                     std::function<sim::GenerationRequest(int64_t)> request) {
    auto at = ReportingTries(progress, what, std::move(request));
    return dist::LargestFittingGeneration({.graph_at = graph_at, .request_at = std::move(at), .simulate = rank_forward,
                                           .limit = limit, .known = &est, .known_value = requested},
                                          config);
  };
  std::optional<int64_t> max_batch, max_prompt;
  if (o.max_batch) {
    max_batch = largest(int64_t{1} << 20, o.batch, "the largest batch",
                        [&](int64_t b) { return request_at(b, o.prompt); });
  }
  if (o.max_prompt) {
    const int64_t cap = limit ? limit->max_seq - o.new_tokens + 1 : int64_t{1} << 24;
    max_prompt = cap < 1 ? 0
                         : largest(cap, o.prompt, "the longest prompt", [&](int64_t p) { return request_at(o.batch, p); });
  }
  const sim::MemoryEstimate& peak = est.peak();
  std::optional<GenerationTime> time;
  if (!config.target.is_cpu) time = TimeGeneration(est, config, o.new_tokens, collectives);
  if (o.json_out) {
    nlohmann::json j = {{"model", o.model},         {"target", peak.target},
                        {"batch", o.batch},         {"prompt", o.prompt},
                        {"new_tokens", o.new_tokens}, {"precision", o.precision},
                        {"tp", o.tp},
                        {"quant", quant ? QuantName(*quant) : "none"},
                        {"loop", loop},             {"weights_bytes", peak.weights_bytes},
                        {"cache_bytes", est.cache_bytes}, {"peak_allocated_bytes", peak.peak_allocated_bytes},
                        {"peak_reserved_bytes", est.peak_reserved_bytes()}, {"nvidia_smi_bytes", est.nvidia_smi_bytes()},
                        {"capacity_bytes", peak.capacity_bytes}, {"fits", est.fits()},
                        {"prefill", PhaseJson(est.prefill)}};
    j["peak_phase"] = est.decode && &peak == &*est.decode ? "decode" : "prefill";
    if (est.decode) j["decode"] = PhaseJson(*est.decode);
    if (max_batch) j["max_batch"] = *max_batch;
    if (max_prompt) j["max_prompt"] = *max_prompt;
    if (time) {
      nlohmann::json tj = {{"prefill_s", time->prefill_s},
                           {"prefill_tokens_per_s", static_cast<double>(o.batch * o.prompt) / time->prefill_s},
                           {"generate_s", time->generate_s},
                           {"assumptions", time->assumptions}};
      if (est.decode) {
        tj["decode_step_s"] = time->decode_step_s;
        tj["decode_tokens_per_s"] = static_cast<double>(o.batch) / time->decode_step_s;
      }
      j["time"] = tj;
    }
    std::cout << j.dump(2) << "\n";
  } else {
    std::printf("model      %s\n", o.model.c_str());
    std::printf("generate   batch %lld, prompt %lld + %lld new tokens, %s weights, target %s%s\n",
                static_cast<long long>(o.batch), static_cast<long long>(o.prompt),
                static_cast<long long>(o.new_tokens), o.precision.c_str(), peak.target.c_str(),
                o.tp > 1 ? (" x " + std::to_string(o.tp) + " (tensor parallel; figures per GPU)").c_str() : "");
    std::printf("loop       %s\n", loop.c_str());
    std::printf("weights    %s; KV cache after the last step %s\n\n", FormatBytes(peak.weights_bytes).c_str(),
                FormatBytes(est.cache_bytes).c_str());
    PrintPhase("prefill", est.prefill);
    if (est.decode) PrintPhase("last decode step", *est.decode);
    std::printf("\npeak allocated   %s   (max_memory_allocated)\n", FormatBytes(peak.peak_allocated_bytes).c_str());
    if (!config.target.is_cpu) {
      std::printf("peak reserved    %s   (the larger phase's: the allocator keeps the prefill's segments)\n"
                  "nvidia-smi       %s of %s: %s\n", FormatBytes(est.peak_reserved_bytes()).c_str(),
                  FormatBytes(est.nvidia_smi_bytes()).c_str(), FormatBytes(peak.capacity_bytes).c_str(),
                  est.fits() ? "fits" : "does not fit");
    }
    if (time) {
      std::printf("\ntime (a GPU roofline; kernel launch and CPU dispatch overheads not modelled):\n");
      std::printf("  prefill            %8.2f ms   %12.0f tokens/s\n", time->prefill_s * 1e3,
                  static_cast<double>(o.batch * o.prompt) / time->prefill_s);
      if (est.decode) {
        std::printf("  last decode step   %8.2f ms   %12.1f tokens/s (%lld sequences)\n", time->decode_step_s * 1e3,
                    static_cast<double>(o.batch) / time->decode_step_s, static_cast<long long>(o.batch));
      }
      std::printf("  generate()       <= %8.3f s\n", time->generate_s);
    }
    if (max_batch) {
      std::printf("largest batch that fits: %lld (prompt %lld + %lld new tokens)\n", static_cast<long long>(*max_batch),
                  static_cast<long long>(o.prompt), static_cast<long long>(o.new_tokens));
    }
    if (max_prompt) {
      std::printf("longest prompt that fits: %lld tokens (+ %lld new: %lld positions fed, batch %lld)%s\n",
                  static_cast<long long>(*max_prompt), static_cast<long long>(o.new_tokens),
                  static_cast<long long>(*max_prompt + o.new_tokens - 1), static_cast<long long>(o.batch),
                  limit && *max_prompt + o.new_tokens - 1 >= limit->max_seq ? " (the model's position limit)" : "");
    }
  }
  return est.fits() ? 0 : kExitDoesNotFit;
}

}  // namespace llmem::cli
