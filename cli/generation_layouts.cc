#include "cli/generation_layouts.h"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli/generation_time.h"
#include "distributed/generation_search.h"
#include "distributed/tensor_parallel_generation.h"
#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem::cli {
namespace {

constexpr int kExitDoesNotFit = 3;

// One layout of `--gpus N`: T tensor-parallel ranks per copy of the model, N / T copies each generating the batch.
struct GenerationLayout {
  int tp = 1;
  int replicas = 1;
  std::string skipped;  // why the layout cannot run, "" when estimated
  std::optional<int64_t> max_batch;  // --max-batch: the largest batch each copy fits
  sim::GenerationEstimate estimate;
  GenerationTime time;
  double tokens_per_s() const {  // decode tokens per second over every copy, at the last (slowest) step
    return time.decode_step_s > 0 ? replicas / time.decode_step_s : 0;
  }
};

// Fitting layouts first, by decode tokens per second over all copies; the rest in degree order.
void SortGenerationLayouts(std::vector<GenerationLayout>& rows) {
  std::stable_sort(rows.begin(), rows.end(), [](const GenerationLayout& a, const GenerationLayout& b) {
    const bool fa = a.skipped.empty() && a.estimate.fits(), fb = b.skipped.empty() && b.estimate.fits();
    if (fa != fb) return fa;
    return a.tokens_per_s() > b.tokens_per_s();
  });
}

}  // namespace

std::string TensorParallelLayoutName(int tp, int copies, const std::string& unit) {
  const std::string n = tp == 1 ? std::string("1 GPU") : "TP" + std::to_string(tp);
  return copies > 1 ? n + " x " + std::to_string(copies) + " " + unit : n;
}

int RunGenerationLayouts(const InferOptions& o, const sim::GenerationGraphAt& graph_at,
                         const std::function<sim::GenerationRequest(int64_t)>& request_at,
                         const sim::TrainingConfig& config, const Graph& probe_graph,
                         const std::string& no_tp_plan) {
  const sim::GenerationRequest request = request_at(o.batch);
  if (config.target.is_cpu) throw ConfigError("--gpus compares layouts on a GPU: name one with --gpu");
  std::vector<GenerationLayout> rows;
  for (int tp = 1; tp <= o.gpus; ++tp) {
    if (o.gpus % tp != 0) continue;
    GenerationLayout row{.tp = tp, .replicas = o.gpus / tp};
    row.skipped = tp == 1                ? ""
                  : !no_tp_plan.empty() ? no_tp_plan
                                        : dist::CheckTensorParallelGeneration(probe_graph, tp);
    if (row.skipped.empty()) {
      std::vector<dist::CollectiveList> collectives;
      try {
        row.estimate = sim::EstimateGeneration(graph_at, request, config,
                                               dist::TensorParallelGenerationForward(tp, &collectives));
        row.time = TimeGeneration(row.estimate, config, o.new_tokens, collectives);
        if (o.max_batch) {
          row.max_batch = dist::LargestFittingGeneration({.graph_at = graph_at, .request_at = request_at,
                                                          .simulate = dist::TensorParallelGenerationForward(tp),
                                                          .limit = int64_t{1} << 20, .known = &row.estimate,
                                                          .known_value = o.batch},
                                                         config);
        }
      } catch (const UnsupportedOpError& e) {  // a split the model's structure does not allow
        row.skipped = e.what();
      } catch (const ConfigError& e) {  // a degree that does not divide one of its dimensions
        row.skipped = e.what();
      }
    }
    rows.push_back(std::move(row));
  }
  SortGenerationLayouts(rows);
  const auto layout_name = [](const GenerationLayout& r) { return TensorParallelLayoutName(r.tp, r.replicas, "copies"); };
  const bool any_fits = std::any_of(rows.begin(), rows.end(),
                                    [](const GenerationLayout& r) { return r.skipped.empty() && r.estimate.fits(); });
  if (o.json_out) {
    nlohmann::json layouts = nlohmann::json::array();
    for (const auto& r : rows) {
      nlohmann::json j = {{"layout", layout_name(r)}, {"tp", r.tp}, {"replicas", r.replicas}};
      if (!r.skipped.empty()) {
        j["skipped"] = r.skipped;
      } else {
        j.update({{"fits", r.estimate.fits()},
                  {"weights_bytes", r.estimate.peak().weights_bytes},
                  {"cache_bytes", r.estimate.cache_bytes},
                  {"peak_allocated_bytes", r.estimate.peak().peak_allocated_bytes},
                  {"nvidia_smi_bytes", r.estimate.nvidia_smi_bytes()},
                  {"prefill_s", r.time.prefill_s},
                  {"decode_step_s", r.time.decode_step_s},
                  {"decode_tokens_per_s", r.tokens_per_s() * static_cast<double>(o.batch)}});
        if (r.max_batch) j["max_batch"] = *r.max_batch;
      }
      layouts.push_back(std::move(j));
    }
    std::cout << nlohmann::json{{"model", o.model}, {"gpus", o.gpus}, {"batch", o.batch}, {"prompt", o.prompt},
                                {"new_tokens", o.new_tokens}, {"precision", o.precision}, {"layouts", layouts},
                                {"assumptions", rows.empty() ? std::vector<std::string>{} : rows.front().time.assumptions}}
                     .dump(2)
              << "\n";
  } else {
    std::printf("model      %s\n", o.model.c_str());
    std::printf("generate   batch %lld per copy, prompt %lld + %lld new tokens, %s weights, %d x %s (transformers' "
                "tp_plan per copy of the model)\n\n",
                static_cast<long long>(o.batch), static_cast<long long>(o.prompt),
                static_cast<long long>(o.new_tokens), o.precision.c_str(), o.gpus, config.target.gpu.name.c_str());
    std::printf("%-22s %12s %12s %12s %10s %12s %14s%s\n", "layout", "weights/GPU", "cache/GPU", "nvidia-smi", "fits",
                "prefill", "decode tok/s", o.max_batch ? "   max batch" : "");
    for (const auto& r : rows) {
      if (!r.skipped.empty()) {
        std::printf("%-22s skipped: %s\n", layout_name(r).c_str(), r.skipped.c_str());
        continue;
      }
      std::printf("%-22s %12s %12s %12s %10s %10.1f ms %14.0f", layout_name(r).c_str(),
                  FormatBytes(r.estimate.peak().weights_bytes).c_str(), FormatBytes(r.estimate.cache_bytes).c_str(),
                  FormatBytes(r.estimate.nvidia_smi_bytes()).c_str(), r.estimate.fits() ? "yes" : "no",
                  r.time.prefill_s * 1e3, r.tokens_per_s() * static_cast<double>(o.batch));
      if (r.max_batch) std::printf(" %12lld", static_cast<long long>(*r.max_batch));
      std::printf("\n");
    }
    std::printf("\ndecode tok/s: the batch of every copy over the last decode step (a roofline; launch and dispatch "
                "overheads not modelled)%s\n",
                o.max_batch ? "; max batch: the largest batch one copy fits at this prompt and length" : "");
  }
  return any_fits ? 0 : kExitDoesNotFit;
}

}  // namespace llmem::cli
