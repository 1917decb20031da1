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

constexpr int kExitBadInput = 2;
constexpr int kExitDoesNotFit = 3;

struct StepOptions {
  llmem::cli::ModelSource source;
  std::string model;  // the export read: source.file, or the export of source.hf_config
  int64_t batch = 1;
  int64_t seq = 512;
  std::string precision = "bf16-autocast";
  std::string optimizer = "adamw";
  std::string gpu = "a100-80";
  std::string gpu_memory;  // --gpu-memory: capacity of a GPU the catalog lacks (other figures from --gpu)
  bool json_out = false;
  bool allow_unknown_ops = false;
  std::string trace_path;
  std::string snapshot_path;  // estimate: --snapshot FILE (a PyTorch memory snapshot)
  std::string plot_path;      // estimate: --plot FILE.svg|FILE.html
  std::string lifetimes = "eager";
  // Parallel layout (estimate): one rank of dp × tp GPUs.
  int dp = 1;
  int tp = 1;
  std::string engine = "ddp";
  bool no_vocab_parallel = false;
  bool engine_given = false;  // --engine was on the command line
  std::optional<int64_t> max_positions;  // replaces the config's position limit (scaled RoPE)
  llmem::cli::RecipeOptions recipe;      // estimate only: checkpointing, accumulation, loss, loop, ...
  std::string lora;                      // estimate only: --lora r=..,alpha=..,dropout=..,targets=..
  std::string lora_modules_to_save;
  std::string quant;                     // estimate only: --quant nf4|fp4|nf4-dq|fp4-dq|int8|... (needs --lora)
  std::optional<int64_t> quant_group;    // estimate only: --quant-group (GPTQ)
};

void AddStepOptions(CLI::App* cmd, StepOptions& o) {
  llmem::cli::AddModelSource(cmd, o.source, "TorchScript export (.pt) or torch.export program (.pt2) of the model (forward(input_ids, labels) -> loss)");
  cmd->add_option("--batch,-b", o.batch, "micro-batch size per GPU")->capture_default_str();
  cmd->add_option("--seq,-s", o.seq, "sequence length in tokens")->capture_default_str();
  cmd->add_option("--precision,-p", o.precision, "fp32 | bf16-autocast | fp16-autocast | bf16")->capture_default_str();
  cmd->add_option("--optimizer,-o", o.optimizer, "adamw | sgd (momentum 0.9) | sgd-nomomentum | adafactor | adamw8bit | paged-adamw8bit (estimate; measure: adamw | sgd)")->capture_default_str();
  cmd->add_flag("--json", o.json_out, "print JSON");
}

llmem::sim::TrainingConfig MakeConfig(const StepOptions& o, const std::string& target) {
  auto cfg = llmem::cli::ParseTrainingConfig(o.precision, o.optimizer, target, o.gpu_memory);
  cfg.allow_unknown_ops = o.allow_unknown_ops;
  cfg.lifetimes = llmem::cli::ParseLifetimesOption(o.lifetimes);
  llmem::cli::ApplyRecipeOptions(o.recipe, cfg);
  return cfg;
}

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

// Layout options that only mean something with several GPUs are refused rather than silently ignored.
void CheckLayoutOptions(const StepOptions& o) {
  if (o.dp < 1 || o.tp < 1) throw llmem::ConfigError("--dp and --tp must be at least 1");
  if (o.engine_given && o.dp == 1) {
    throw llmem::ConfigError("--engine " + o.engine + " needs data parallelism: add --dp 2 or more");
  }
  if (o.no_vocab_parallel && o.tp == 1) {
    throw llmem::ConfigError("--no-vocab-parallel needs tensor parallelism: add --tp 2 or more");
  }
}

int RunInspect(const std::string& path, int64_t batch, int64_t seq, std::optional<int64_t> max_positions,
               bool print_ir, bool json_out) {
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
    j["seconds"] = seconds;
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
  std::printf("analysed in %.2f s\n", seconds);
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

// CLI11 rejects a trace path that is empty (it would silently write nothing).
const CLI::Validator kNonEmptyPath(
    [](std::string& path) { return path.empty() ? std::string("needs a file name") : std::string(); }, "FILE");

// Levenshtein distance, to suggest the subcommand a typo meant.
size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

// The first argument names the subcommand; CLI11 would only say that one is required. Names the unknown one and
// the closest known.
std::optional<std::string> UnknownSubcommand(const CLI::App& app, int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') return std::nullopt;
  const std::string given = argv[1];
  std::string closest;
  size_t best = std::string::npos;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
    if (sub->get_name() == given) return std::nullopt;
    const size_t d = EditDistance(given, sub->get_name());
    if (d < best) best = d, closest = sub->get_name();
  }
  std::string message = "unknown subcommand '" + given + "'";
  if (best <= given.size() / 2 + 1) message += " (did you mean '" + closest + "'?)";
  return message + "; run llmem --help for the list";
}

// One line on stderr for every parse error (CLI11 adds a "Run with --help" line); help and version exit 0.
int ReportParseError(const CLI::App& app, const CLI::ParseError& e) {
  if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
  std::string message = e.what();
  std::replace(message.begin(), message.end(), '\n', ' ');
  std::fprintf(stderr, "llmem: error: %s\n", message.c_str());
  return kExitBadInput;
}

}  // namespace

int main(int argc, char** argv) {
  // Simulations allocate and free megabytes of bookkeeping each; keeping freed memory in the heap instead of
  // returning it to the OS spares the page faults that otherwise dominate a recommend sweep.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  spdlog::set_level(spdlog::level::warn);
  CLI::App app{"llmem: will this LLM fine-tuning step fit in GPU memory?"};
  app.require_subcommand(1);

  llmem::cli::ModelSource inspect_source;
  int64_t inspect_batch = 1, inspect_seq = 128;
  std::optional<int64_t> inspect_max_positions;
  bool print_ir = false, inspect_json = false;
  auto* inspect = app.add_subcommand("inspect", "parameters per region, layers, op counts, dtypes");
  llmem::cli::AddModelSource(inspect, inspect_source, "TorchScript export (.pt) or torch.export program (.pt2)");
  inspect->add_option("--batch,-b", inspect_batch, "batch size for the op graph")->capture_default_str();
  inspect->add_option("--seq,-s", inspect_seq, "sequence length for the op graph")->capture_default_str();
  inspect->add_option("--max-positions", inspect_max_positions, "longest sequence the model allows (scaled RoPE)");
  inspect->add_flag("--ir", print_ir, "print the IR, one op per line");
  inspect->add_flag("--json", inspect_json, "print JSON");

  StepOptions est_opts;
  auto* estimate = app.add_subcommand("estimate", "peak memory of one training step on a GPU (or --gpu cpu)");
  AddStepOptions(estimate, est_opts);
  estimate->add_option("--gpu,-g", est_opts.gpu,
                       "GPU from the catalog (or the name nvidia-smi prints), or 'cpu' to predict `llmem measure`")
      ->capture_default_str();
  estimate->add_option("--gpu-memory", est_opts.gpu_memory,
                       "memory of a GPU the catalog lacks, e.g. 24GiB or 81920MiB (other figures from --gpu)");
  estimate->add_option("--trace", est_opts.trace_path, "write the simulated allocation timeline (TSV) to this file")
      ->check(kNonEmptyPath);
  estimate->add_option("--snapshot", est_opts.snapshot_path,
                       "write the simulated step as a PyTorch memory snapshot (pickle) for PyTorch's memory viewer")
      ->check(kNonEmptyPath);
  estimate->add_option("--plot", est_opts.plot_path,
                       "write a picture of the step's memory by category over time (.svg, or .html: the same SVG)")
      ->check(kNonEmptyPath);
  estimate->add_flag("--allow-unknown-ops", est_opts.allow_unknown_ops,
                     "estimate ops without a memory rule conservatively (with a warning)");
  estimate->add_option("--dp", est_opts.dp, "data-parallel degree (the estimate is one rank's)")->capture_default_str();
  estimate->add_option("--tp", est_opts.tp, "tensor-parallel degree")->capture_default_str();
  auto* engine_option =
      estimate->add_option("--engine", est_opts.engine, "data-parallel engine: ddp | zero1 | zero2 | zero3 | gemini")
          ->capture_default_str();
  estimate->add_option("--max-positions", est_opts.max_positions,
                       "longest sequence the model allows, replacing the export's config (scaled RoPE)");
  estimate->add_flag("--no-vocab-parallel", est_opts.no_vocab_parallel,
                     "with --tp: keep the embedding and LM head whole on every rank");
  estimate->add_option("--lifetimes", est_opts.lifetimes,
                       "forward value lifetimes: eager (Python frames) | torchscript (freed at last use)")
      ->capture_default_str();
  llmem::cli::AddRecipeOptions(estimate, est_opts.recipe);
  estimate->add_option("--lora", est_opts.lora,
                       "PEFT LoRA adapters on a frozen base: r=R,alpha=A,dropout=P,targets=q_proj,v_proj (or all-linear)");
  estimate->add_option("--lora-modules-to-save", est_opts.lora_modules_to_save,
                       "with --lora: modules trained in full, as a trainable copy (PEFT modules_to_save), e.g. lm_head");
  estimate->add_option("--quant", est_opts.quant,
                       "with --lora: a quantized base: nf4 | fp4 | nf4-dq | fp4-dq (bitsandbytes 4-bit, PEFT; -dq: "
                       "double quantization) | int8 (bitsandbytes LLM.int8()) | torchao-nf4 (torchtune) | gptq-4 | "
                       "gptq-8 (a GPTQ checkpoint)");
  estimate->add_option("--quant-group", est_opts.quant_group,
                       "with --quant gptq-4|gptq-8: input features per scale and zero point (default 128; -1: one "
                       "group)");

  StepOptions measure_opts;
  measure_opts.precision = "fp32";
  std::string device = "cpu";
  int64_t steps = 2;
  auto* measure = app.add_subcommand("measure", "run real training steps with LibTorch and record the peak");
  AddStepOptions(measure, measure_opts);
  measure->add_option("--device,-d", device, "cpu | cuda | meta (PyTorch's own allocations, no real memory)")
      ->capture_default_str();
  measure->add_option("--trace", measure_opts.trace_path, "write every allocation and free (TSV) to this file")
      ->check(kNonEmptyPath);
  measure->add_option("--steps", steps, "training steps to run (the steady state shows from step 2)")
      ->capture_default_str();

  llmem::cli::RecommendOptions rec_opts;
  auto* recommend = app.add_subcommand(
      "recommend", "every parallel layout over N GPUs: memory per GPU, largest batch, step time; the fastest that fits");
  llmem::cli::AddRecommendOptions(recommend, rec_opts);

  llmem::cli::InferOptions infer_opts;
  auto* infer = app.add_subcommand("infer", "memory of Hugging Face generation: prefill and decode with a KV cache");
  llmem::cli::AddInferOptions(infer, infer_opts);

  llmem::cli::ValidateOptions val_opts;
  auto* validate = app.add_subcommand("validate", "compare measured per-rank peaks of distributed runs with estimates");
  llmem::cli::AddValidateOptions(validate, val_opts);

  if (const auto unknown = UnknownSubcommand(app, argc, argv)) {
    std::fprintf(stderr, "llmem: error: %s\n", unknown->c_str());
    return kExitBadInput;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return ReportParseError(app, e);
  }
  est_opts.engine_given = engine_option->count() > 0;
  try {
    using llmem::cli::ExportDtypeFor;
    using llmem::cli::ModelFile;
    if (*inspect) {
      return RunInspect(ModelFile(inspect_source, "float32", inspect_json), inspect_batch, inspect_seq,
                        inspect_max_positions, print_ir, inspect_json);
    }
    if (*estimate) {
      est_opts.model = ModelFile(est_opts.source, ExportDtypeFor(est_opts.precision), est_opts.json_out);
      return RunEstimate(est_opts, est_opts.gpu);
    }
    if (*measure) {
      if (!measure_opts.source.hf_config.empty())  // a config's export has no weights to run
        throw llmem::Error("measure runs an export with weights: make one with models/export_hf.py --config PATH "
                           "--out FILE");
      measure_opts.model = ModelFile(measure_opts.source, "float32", measure_opts.json_out);
      return RunMeasure(measure_opts, device, steps);
    }
    if (*recommend) {
      rec_opts.model = ModelFile(rec_opts.source, ExportDtypeFor(rec_opts.precision), rec_opts.json_out);
      return llmem::cli::RunRecommend(rec_opts);
    }
    if (*validate) return llmem::cli::RunValidate(val_opts);
    if (*infer) {
      infer_opts.model = ModelFile(infer_opts.source, ExportDtypeFor(infer_opts.precision), infer_opts.json_out);
      return llmem::cli::RunInfer(infer_opts);
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
