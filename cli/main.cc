// llmem command line: parses flags and calls the library.
// Exit codes: 0 ok, 2 bad input (model file or options, or the host ran out of memory), 3 the job does not fit,
// 4 a validation against measured runs is outside its limits, 1 an internal error (a bug in llmem).
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <malloc.h>
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

#include "graph/error.h"
#include "graph/ir_printer.h"
#include "graph/decoder_model.h"
#include "measure/training_step_runner.h"
#include "cli/category_report.h"
#include "cli/command_line.h"
#include "cli/hf_config_export.h"
#include "cli/lora_options.h"
#include "cli/memory_plot.h"
#include "cli/memory_snapshot_file.h"
#include "cli/recipe_options.h"
#include "cli/infer_command.h"
#include "cli/recommend_command.h"
#include "cli/trace_file.h"
#include "cli/training_options.h"
#include "cli/validate_command.h"
#include "cli/weights_report.h"
#include "distributed/nccl_memory.h"
#include "distributed/parallel_plan.h"
#include "distributed/rank_estimate.h"
#include "simulator/backend_rules.h"
#include "simulator/memory_estimate.h"
#include "simulator/memory_snapshot.h"

namespace {

using llmem::FormatBytes;
using nlohmann::json;

using llmem::cli::CheckLayoutOptions;
using llmem::cli::kExitBadInput;
using llmem::cli::MakeConfig;
using llmem::cli::StepOptions;
constexpr int kExitDoesNotFit = 3;

// The step's options, common to the JSON of estimate and measure.
json StepJson(const StepOptions& o) {
  return json{{"model", o.model}, {"batch", o.batch}, {"seq", o.seq}, {"precision", o.precision},
              {"optimizer", o.optimizer}};
}

json EstimateJson(const llmem::sim::MemoryEstimate& e, const StepOptions& o, const llmem::sim::Recipe& recipe,
                  const std::vector<std::string>& assumptions) {
  json j = StepJson(o);
  j["recipe"] = llmem::cli::RecipeJson(recipe);
  if (o.dp > 1 || o.tp > 1) j["layout"] = {{"dp", o.dp}, {"tp", o.tp}, {"engine", o.engine}};
  if (!assumptions.empty()) j["assumptions"] = assumptions;
  j["target"] = e.target;
  j["peak_allocated_bytes"] = e.peak_allocated_bytes;
  j["peak_reserved_bytes"] = e.peak_reserved_bytes;
  j["lower_bound_bytes"] = e.lower_bound_bytes;
  j["fixed_overhead_bytes"] = e.fixed_overhead_bytes;
  j["nvidia_smi_bytes"] = e.nvidia_smi_bytes;
  if (e.managed_optimizer_state_bytes > 0) j["managed_optimizer_state_bytes"] = e.managed_optimizer_state_bytes;
  j["capacity_bytes"] = e.capacity_bytes;
  j["fits"] = e.fits;
  j["peak_phase"] = std::string(llmem::sim::PhaseName(e.peak_phase));
  j["peak_op"] = e.peak_op;
  j["at_peak_bytes"] = llmem::cli::CategoriesJson(e.at_peak);
  json phases = json::object();
  for (size_t p = 0; p < 4; ++p) phases[std::string(llmem::sim::PhaseName(static_cast<llmem::sim::Phase>(p)))] = e.phase_peak_bytes[p];
  j["phase_peak_bytes"] = phases;
  json phase_breakdowns = json::object();
  for (size_t p = 0; p < 4; ++p) {
    phase_breakdowns[std::string(llmem::sim::PhaseName(static_cast<llmem::sim::Phase>(p)))] = {
        {"op", e.phase_peak_op[p]}, {"at_peak_bytes", llmem::cli::CategoriesJson(e.phase_at_peak[p])}};
  }
  j["phase_peaks"] = phase_breakdowns;
  j["weights_bytes"] = e.weights_bytes;
  j["gradients_bytes"] = e.gradients_bytes;
  j["optimizer_state_bytes"] = e.optimizer_state_bytes;
  j["unknown_ops"] = e.unknown_ops;
  return j;
}

void PrintEstimate(const llmem::sim::MemoryEstimate& e, const llmem::Graph& g, const StepOptions& o,
                   const llmem::sim::Recipe& recipe, const std::vector<std::string>& assumptions) {
  std::printf("model      %s (%d layers, %zu parameter tensors)\n", o.model.c_str(), g.num_layers(), g.params().size());
  std::printf("step       batch %lld x seq %lld, %s, %s, target %s\n", static_cast<long long>(o.batch),
              static_cast<long long>(o.seq), o.precision.c_str(), o.optimizer.c_str(), e.target.c_str());
  std::printf("recipe     %s\n", llmem::cli::RecipeSummary(recipe).c_str());
  const bool parallel = o.dp > 1 || o.tp > 1;
  if (parallel) {
    const auto engine = llmem::dist::ParseEngine(o.engine);
    std::printf("layout     one rank of %s\n",
                llmem::dist::ParallelPlan{.dp = o.dp, .tp = o.tp, .engine = *engine}.Name().c_str());
  }
  std::printf("\nlive at the peak (%s, %s):\n", std::string(llmem::sim::PhaseName(e.peak_phase)).c_str(), e.peak_op.c_str());
  llmem::cli::PrintCategories(e.at_peak);
  // The optimizer step holds no activations: show them where they peak too.
  if (e.peak_phase == llmem::sim::Phase::kOptimizer) {
    for (const auto phase : {llmem::sim::Phase::kForward, llmem::sim::Phase::kBackward}) {
      const size_t p = static_cast<size_t>(phase);
      const std::string& op = e.phase_peak_op[p];
      std::printf("\nlive at the %s peak (%s, %s):\n", std::string(llmem::sim::PhaseName(phase)).c_str(),
                  FormatBytes(e.phase_peak_bytes[p]).c_str(), op.empty() ? "as the phase begins" : op.c_str());
      llmem::cli::PrintCategories(e.phase_at_peak[p]);
    }
  }
  std::printf("\npeak per phase: forward %s, backward %s, optimizer %s\n",
              FormatBytes(e.phase_peak_bytes[1]).c_str(), FormatBytes(e.phase_peak_bytes[2]).c_str(),
              FormatBytes(e.phase_peak_bytes[3]).c_str());
  std::printf("peak allocated   %s   (max_memory_allocated)\n", FormatBytes(e.peak_allocated_bytes).c_str());
  std::printf("peak reserved    %s   (max_memory_reserved; no-fragmentation bound %s)\n",
              FormatBytes(e.peak_reserved_bytes).c_str(), FormatBytes(e.lower_bound_bytes).c_str());
  if (e.capacity_bytes > 0) {
    std::printf("nvidia-smi       %s   (reserved + CUDA context%s %s, %s)\n", FormatBytes(e.nvidia_smi_bytes).c_str(),
                (std::string(parallel ? " and NCCL buffers" : "") +
                 (e.managed_optimizer_state_bytes > 0 ? " and paged optimizer states" : ""))
                    .c_str(),
                FormatBytes(e.fixed_overhead_bytes).c_str(),
                parallel ? "assumptions" : "an assumption");
    if (e.managed_optimizer_state_bytes > 0) {
      std::printf("                 (of which %s paged optimizer states in CUDA managed memory: outside PyTorch's "
                  "allocator, not in allocated / reserved; nvidia-smi counts them while resident)\n",
                  FormatBytes(e.managed_optimizer_state_bytes).c_str());
    }
    std::printf("capacity         %s   -> %s\n", FormatBytes(e.capacity_bytes).c_str(),
                e.fits ? "fits" : "DOES NOT FIT (out of memory)");
    if (!o.gpu_memory.empty()) {
      std::printf("                 (%s)\n", llmem::cli::GpuMemoryAssumption(o.gpu).c_str());
    }
  }
  if (!assumptions.empty()) {
    std::printf("\nassumptions:\n");
    for (const auto& a : assumptions) std::printf("  - %s\n", a.c_str());
  }
}

// On stderr, so that --json output stays parseable.
void WarnAboutUnknownOps(const llmem::sim::MemoryEstimate& e) {
  if (e.unknown_ops.empty()) return;
  std::string kinds;
  for (const auto& k : e.unknown_ops) kinds += " " + k;
  std::fprintf(stderr, "llmem: warning: ops without a memory rule were estimated conservatively:%s\n", kinds.c_str());
}

int RunInspect(const std::string& path, int64_t batch, int64_t seq, std::optional<int64_t> max_positions,
               bool print_ir, bool json_out, bool timings) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::unique_ptr<llmem::DecoderModel> loaded = llmem::LoadDecoderModel(path);
  llmem::DecoderModel& model = *loaded;
  if (max_positions) model.set_max_positions(*max_positions);
  auto graph = model.BuildGraph(batch, seq);
  const auto& positions = graph.position_limit();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (print_ir) {
    std::cout << llmem::PrintGraph(graph);
    return 0;
  }
  std::map<std::string, std::pair<int64_t, int64_t>> regions;  // name -> (elements, bytes)
  int64_t total = 0, total_bytes = 0;
  std::map<std::string, int64_t> dtypes;
  int64_t buffer_elems = 0, buffer_bytes = 0;
  for (const auto& p : graph.params()) {
    if (graph.value(p.value).alias_of.valid()) continue;  // tied to another parameter
    if (!p.trainable) {
      buffer_elems += llmem::NumElements(p.shape);
      buffer_bytes += p.bytes;
      continue;
    }
    const int64_t elems = llmem::NumElements(p.shape);
    const std::string region = p.region.kind == llmem::RegionKind::kDecoderLayer ? "decoder layers" : llmem::RegionName(p.region);
    regions[region].first += elems;
    regions[region].second += p.bytes;
    dtypes[std::string(llmem::DTypeName(p.dtype))] += elems;
    total += elems;
    total_bytes += p.bytes;
  }
  std::map<std::string, int64_t> ops;
  for (const auto& n : graph.nodes()) ops[n.kind]++;
  if (json_out) {
    json j;
    j["model"] = path;
    j["layers"] = graph.num_layers();
    j["parameters"] = total;
    j["parameter_bytes"] = total_bytes;
    j["buffer_elements"] = buffer_elems;
    j["buffer_bytes"] = buffer_bytes;
    for (const auto& [r, v] : regions) j["regions"][r] = {{"parameters", v.first}, {"bytes", v.second}};
    j["dtypes"] = dtypes;
    j["ops"] = ops;
    j["max_positions"] = positions ? json(positions->max_seq) : json(nullptr);
    j["max_positions_source"] = positions ? positions->source : "none known";
    if (timings) j["seconds"] = seconds;
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("model       %s\nlayers      %d\nparameters  %lld (%s)\n", path.c_str(), graph.num_layers(),
              static_cast<long long>(total), FormatBytes(total_bytes).c_str());
  for (const auto& [r, v] : regions) {
    std::printf("  %-16s %14lld  %s\n", r.c_str(), static_cast<long long>(v.first), FormatBytes(v.second).c_str());
  }
  std::printf("buffers     %lld elements (%s), not trained\n", static_cast<long long>(buffer_elems),
              FormatBytes(buffer_bytes).c_str());
  if (positions) {
    std::printf("positions   %lld (%s)\n", static_cast<long long>(positions->max_seq), positions->source.c_str());
  } else {
    std::printf("positions   no limit known (no position table in the graph, no config in the export)\n");
  }
  std::printf("dtypes     ");
  for (const auto& [d, n] : dtypes) std::printf(" %s:%lld", d.c_str(), static_cast<long long>(n));
  std::printf("\nops         %zu in the forward graph (at batch %lld, seq %lld)\n", graph.nodes().size(),
              static_cast<long long>(batch), static_cast<long long>(seq));
  for (const auto& [k, n] : ops) std::printf("  %-40s %lld\n", k.c_str(), static_cast<long long>(n));
  if (timings) std::printf("analysed in %.2f s\n", seconds);
  return 0;
}

int RunEstimate(const StepOptions& o, const std::string& target) {
  auto config = MakeConfig(o, target);
  const auto engine = llmem::dist::ParseEngine(o.engine);
  if (!engine) throw llmem::ConfigError("unknown engine '" + o.engine + "' (ddp, zero1, zero2, zero3, gemini)");
  CheckLayoutOptions(o);
  if (o.batch <= 0 || o.seq <= 0) throw llmem::ConfigError("batch and sequence length must be positive");
  const std::unique_ptr<llmem::DecoderModel> loaded = llmem::LoadDecoderModel(o.model);
  llmem::DecoderModel& model = *loaded;
  llmem::cli::CheckMoeImbalance(o.source, model);
  if (o.max_positions) model.set_max_positions(*o.max_positions);
  auto graph = model.BuildGraph(o.batch, o.seq);
  std::vector<std::string> assumptions;  // of a parallel layout on a GPU: NCCL's buffers; of QLoRA's precision
  if (const auto moe = model.moe_routing()) assumptions.push_back(llmem::cli::MoeRoutingAssumption(*moe));
  const llmem::cli::AdapterRecipe adapters(o.lora, o.lora_modules_to_save, o.quant, o.quant_group, config);
  if (adapters.active()) {
    const llmem::dist::ParallelPlan layout{.dp = o.dp, .tp = o.tp, .engine = *engine};
    const std::string why = adapters.UnsupportedLayout(o.dp, o.tp, *engine == llmem::dist::DataParallelEngine::kGemini,
                                                       llmem::dist::RunsFsdp2(layout));
    if (!why.empty()) throw llmem::ConfigError(why);
    if (!adapters.assumption().empty()) assumptions.push_back(adapters.assumption());
    if (llmem::dist::RunsFsdp2(layout) && !adapters.ShardingAssumption().empty()) {
      assumptions.push_back(adapters.ShardingAssumption());
    }
    graph = adapters.Apply(graph);
  }
  llmem::sim::MemoryEstimate est;
  if (config.fsdp_reduce_every_micro_batch && !llmem::dist::RunsFsdp2({.dp = o.dp, .tp = o.tp, .engine = *engine})) {
    throw llmem::ConfigError("--fsdp-reduce-every-micro-batch applies to FSDP2: --engine zero2 or zero3 with --dp 2 "
                             "or more");
  }
  if (o.dp == 1 && o.tp == 1) {
    llmem::dist::CheckFsdpMixedPrecision(config, {.dp = 1, .tp = 1, .engine = *engine});
    est = llmem::sim::EstimateMemory(graph, config);
  } else {
    llmem::dist::DistributedOptions dopts;
    dopts.tp_vocab_parallel = !o.no_vocab_parallel;
    const llmem::dist::ParallelPlan plan{.dp = o.dp, .tp = o.tp, .engine = *engine};
    est = llmem::dist::EstimateRank(graph, config, plan, dopts).memory;
    if (!config.target.is_cpu) assumptions.push_back(llmem::dist::NcclRankAssumption(plan, config.target.gpu));
    if (o.dp > 1) {
      const std::string loop = llmem::dist::DataParallelLoopAssumption(config, {plan.engine});
      if (!loop.empty()) assumptions.push_back(loop);
    }
  }
  if (!o.trace_path.empty()) llmem::cli::WriteEstimateTrace(o.trace_path, est.simulation->timeline);
  // The allocator may reserve what the GPU has left beside the memory outside it (CUDA context, NCCL).
  const bool caching = llmem::sim::RulesFor(config.target).caching_allocator;
  const int64_t allocator_capacity = std::max<int64_t>(0, est.capacity_bytes - est.fixed_overhead_bytes);
  if (!o.snapshot_path.empty()) {
    llmem::cli::WriteMemorySnapshot(
        o.snapshot_path,
        llmem::sim::ReplayForSnapshot(est.simulation->timeline, caching,
                                      caching ? allocator_capacity : llmem::sim::kUnlimitedBytes),
        est.simulation->timeline);
  }
  if (!o.plot_path.empty()) {
    const std::string file = std::filesystem::path(o.model).filename().string();
    char title[512];
    std::snprintf(title, sizeof(title), "%s: %lld x %lld tokens, %s, %s, on %s%s", file.c_str(),
                  static_cast<long long>(o.batch), static_cast<long long>(o.seq), o.precision.c_str(),
                  o.optimizer.c_str(), target.c_str(),
                  o.dp * o.tp > 1 ? (" (one rank of dp " + std::to_string(o.dp) + " x tp " + std::to_string(o.tp) +
                                     ", " + o.engine + ")").c_str()
                                  : "");
    llmem::cli::WriteMemoryPlot(o.plot_path, est.simulation->timeline,
                                {.title = title, .peak_allocated = est.peak_allocated_bytes,
                                 .capacity = caching ? allocator_capacity : 0, .capacity_name = target});
  }
  if (o.json_out) {
    json j = EstimateJson(est, o, config, assumptions);
    if (adapters.active()) {
      llmem::cli::AddAdapterJson(adapters, j["recipe"]);
      j["weights"] = llmem::cli::WeightsJson(llmem::cli::GroupWeights(graph, config.precision));
    }
    std::cout << j.dump(2) << "\n";
  } else {
    PrintEstimate(est, graph, o, config, assumptions);
    if (adapters.active()) {
      llmem::cli::PrintWeights(llmem::cli::GroupWeights(graph, config.precision));
      if (llmem::dist::RunsFsdp2({.dp = o.dp, .tp = o.tp, .engine = *engine})) {
        std::printf("  (whole tensors: under FSDP2 each of the %d ranks keeps a 1/%d shard of every parameter)\n",
                    o.dp, o.dp);
      }
    }
  }
  WarnAboutUnknownOps(est);
  return est.fits ? 0 : kExitDoesNotFit;
}

int RunMeasure(const StepOptions& o, const std::string& device, int64_t steps) {
  llmem::MeasureOptions m;
  m.model_path = o.model;
  m.device = llmem::ParseMeasureDevice(device);
  m.batch = o.batch;
  m.seq = o.seq;
  m.precision = llmem::ParseMeasurePrecision(o.precision);
  m.optimizer = llmem::ParseMeasureOptimizer(o.optimizer);
  m.steps = steps;
  m.record_events = !o.trace_path.empty();
  if (o.batch <= 0 || o.seq <= 0) throw llmem::ConfigError("batch and sequence length must be positive");
  auto r = llmem::MeasureTrainingStep(m);
  if (!o.trace_path.empty()) llmem::cli::WriteMeasureTrace(o.trace_path, r.events);
  if (o.json_out) {
    json j = StepJson(o);
    j["device"] = r.device_name;
    j["weights_bytes"] = r.weights_bytes;
    j["inputs_bytes"] = r.inputs_bytes;
    j["loader_bytes"] = r.loader_bytes;
    j["peak_allocated_bytes"] = r.peak_bytes;
    j["peak_reserved_bytes"] = r.peak_reserved_bytes;
    j["seconds"] = r.seconds;
    json steps_json = json::array();
    for (const auto& s : r.steps) {
      steps_json.push_back({{"forward_peak_bytes", s.forward.peak_bytes},
                            {"backward_peak_bytes", s.backward.peak_bytes},
                            {"optimizer_peak_bytes", s.optimizer.peak_bytes},
                            {"end_bytes", s.optimizer.end_bytes}});
    }
    j["steps"] = steps_json;
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("measured on %s: batch %lld x seq %lld, %s, %s, %lld steps in %.2f s\n", r.device_name.c_str(),
              static_cast<long long>(o.batch), static_cast<long long>(o.seq), o.precision.c_str(),
              o.optimizer.c_str(), static_cast<long long>(steps), r.seconds);
  std::printf("weights          %s\n", FormatBytes(r.weights_bytes).c_str());
  for (size_t i = 0; i < r.steps.size(); ++i) {
    const auto& s = r.steps[i];
    std::printf("step %zu peaks     forward %s, backward %s, optimizer %s\n", i + 1,
                FormatBytes(s.forward.peak_bytes).c_str(), FormatBytes(s.backward.peak_bytes).c_str(),
                FormatBytes(s.optimizer.peak_bytes).c_str());
  }
  std::printf("peak allocated   %s (%lld B) by tensors", FormatBytes(r.peak_bytes).c_str(),
              static_cast<long long>(r.peak_bytes));
  if (r.loader_bytes > 0) {
    std::printf("; + %s held by the TorchScript loader (host memory on a GPU)", FormatBytes(r.loader_bytes).c_str());
  }
  std::printf("\n");
  if (r.peak_reserved_bytes > 0) std::printf("peak reserved    %s\n", FormatBytes(r.peak_reserved_bytes).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Simulations allocate and free megabytes of bookkeeping each; keeping freed memory in the heap instead of
  // returning it to the OS spares the page faults that otherwise dominate a recommend sweep.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  spdlog::set_level(spdlog::level::warn);
  llmem::cli::CommandLine line;
  if (const std::optional<int> exit = llmem::cli::ParseCommandLine(line, argc, argv)) return *exit;
  try {
    using llmem::cli::ExportDtypeFor;
    using llmem::cli::ModelFile;
    llmem::cli::CheckCommandOptions(line);
    if (*line.inspect) {
      return RunInspect(ModelFile(line.inspect_source, "float32", line.inspect_json), line.inspect_batch,
                        line.inspect_seq, line.inspect_max_positions, line.print_ir, line.inspect_json,
                        line.inspect_timings);
    }
    if (*line.estimate) {
      StepOptions& o = line.est_opts;
      o.model = ModelFile(o.source, ExportDtypeFor(o.precision), o.json_out);
      return RunEstimate(o, o.gpu);
    }
    if (*line.measure) {
      if (!line.measure_opts.source.hf_config.empty())  // a config's export has no weights to run
        throw llmem::Error("measure runs an export with weights: make one with models/export_hf.py --config PATH "
                           "--out FILE");
      line.measure_opts.model = ModelFile(line.measure_opts.source, "float32", line.measure_opts.json_out);
      return RunMeasure(line.measure_opts, line.device, line.steps);
    }
    if (*line.recommend) {
      llmem::cli::RecommendOptions& o = line.rec_opts;
      o.model = ModelFile(o.source, ExportDtypeFor(o.precision), o.json_out);
      return llmem::cli::RunRecommend(o);
    }
    if (*line.validate) return llmem::cli::RunValidate(line.val_opts);
    if (*line.infer) {
      llmem::cli::InferOptions& o = line.infer_opts;
      o.model = ModelFile(o.source, ExportDtypeFor(o.precision), o.json_out);
      return llmem::cli::RunInfer(o);
    }
  } catch (const llmem::Error& e) {
    std::fprintf(stderr, "llmem: error: %s\n", e.what());
    return kExitBadInput;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "llmem: error: this machine ran out of memory (host RAM or the process's memory limit)\n");
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmem: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
