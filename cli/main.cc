// llmem command line: parses flags and calls the library.
// Exit codes: 0 ok, 1 internal error, 2 bad input (model file or options), 3 the job does not fit, 4 a validation
// against measured runs is outside its limits.
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <malloc.h>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "graph/error.h"
#include "graph/ir_printer.h"
#include "graph/torchscript_importer.h"
#include "measure/training_step_runner.h"
#include "cli/recommend_command.h"
#include "cli/training_options.h"
#include "cli/validate_command.h"
#include "distributed/parallel_plan.h"
#include "distributed/rank_estimate.h"
#include "simulator/memory_estimate.h"

namespace {

using llmem::FormatBytes;
using nlohmann::json;

constexpr int kExitBadInput = 2;
constexpr int kExitDoesNotFit = 3;

struct StepOptions {
  std::string model;
  int64_t batch = 1;
  int64_t seq = 512;
  std::string precision = "bf16-autocast";
  std::string optimizer = "adamw";
  std::string gpu = "a100-80";
  bool json_out = false;
  bool allow_unknown_ops = false;
  std::string trace_path;
  std::string lifetimes = "eager";
  // Parallel layout (estimate): one rank of dp × tp GPUs.
  int dp = 1;
  int tp = 1;
  std::string engine = "ddp";
  bool no_vocab_parallel = false;
};

void AddStepOptions(CLI::App* cmd, StepOptions& o) {
  cmd->add_option("model", o.model, "TorchScript export of the model (forward(input_ids, labels) -> loss)")->required();
  cmd->add_option("--batch,-b", o.batch, "micro-batch size per GPU")->capture_default_str();
  cmd->add_option("--seq,-s", o.seq, "sequence length in tokens")->capture_default_str();
  cmd->add_option("--precision,-p", o.precision, "fp32 | bf16-autocast | fp16-autocast | bf16")->capture_default_str();
  cmd->add_option("--optimizer,-o", o.optimizer, "adamw | sgd (momentum 0.9)")->capture_default_str();
  cmd->add_flag("--json", o.json_out, "print JSON");
}

llmem::sim::TrainingConfig MakeConfig(const StepOptions& o, const std::string& target) {
  auto cfg = llmem::cli::ParseTrainingConfig(o.precision, o.optimizer, target);
  cfg.allow_unknown_ops = o.allow_unknown_ops;
  cfg.lifetimes = llmem::cli::ParseLifetimesOption(o.lifetimes);
  return cfg;
}

// The step's options, common to the JSON of estimate and measure.
json StepJson(const StepOptions& o) {
  return json{{"model", o.model}, {"batch", o.batch}, {"seq", o.seq}, {"precision", o.precision},
              {"optimizer", o.optimizer}};
}

json EstimateJson(const llmem::sim::MemoryEstimate& e, const StepOptions& o) {
  json j = StepJson(o);
  if (o.dp > 1 || o.tp > 1) j["layout"] = {{"dp", o.dp}, {"tp", o.tp}, {"engine", o.engine}};
  j["target"] = e.target;
  j["peak_allocated_bytes"] = e.peak_allocated_bytes;
  j["peak_reserved_bytes"] = e.peak_reserved_bytes;
  j["lower_bound_bytes"] = e.lower_bound_bytes;
  j["fixed_overhead_bytes"] = e.fixed_overhead_bytes;
  j["nvidia_smi_bytes"] = e.nvidia_smi_bytes;
  j["capacity_bytes"] = e.capacity_bytes;
  j["fits"] = e.fits;
  j["peak_phase"] = std::string(llmem::sim::PhaseName(e.peak_phase));
  j["peak_op"] = e.peak_op;
  json cats = json::object();
  for (size_t c = 0; c < llmem::sim::kNumCategories; ++c) {
    cats[std::string(llmem::sim::CategoryName(static_cast<llmem::sim::MemoryCategory>(c)))] = e.at_peak[c];
  }
  j["at_peak_bytes"] = cats;
  json phases = json::object();
  for (size_t p = 0; p < 4; ++p) phases[std::string(llmem::sim::PhaseName(static_cast<llmem::sim::Phase>(p)))] = e.phase_peak_bytes[p];
  j["phase_peak_bytes"] = phases;
  j["weights_bytes"] = e.weights_bytes;
  j["gradients_bytes"] = e.gradients_bytes;
  j["optimizer_state_bytes"] = e.optimizer_state_bytes;
  j["unknown_ops"] = e.unknown_ops;
  return j;
}

void PrintEstimate(const llmem::sim::MemoryEstimate& e, const llmem::Graph& g, const StepOptions& o) {
  std::printf("model      %s (%d layers, %zu parameter tensors)\n", o.model.c_str(), g.num_layers(), g.params().size());
  std::printf("step       batch %lld x seq %lld, %s, %s, target %s\n", static_cast<long long>(o.batch),
              static_cast<long long>(o.seq), o.precision.c_str(), o.optimizer.c_str(), e.target.c_str());
  const bool parallel = o.dp > 1 || o.tp > 1;
  if (parallel) {
    const auto engine = llmem::dist::ParseEngine(o.engine);
    std::printf("layout     one rank of %s\n",
                llmem::dist::ParallelPlan{.dp = o.dp, .tp = o.tp, .engine = *engine}.Name().c_str());
  }
  std::printf("\nlive at the peak (%s, %s):\n", std::string(llmem::sim::PhaseName(e.peak_phase)).c_str(), e.peak_op.c_str());
  for (size_t c = 0; c < llmem::sim::kNumCategories; ++c) {
    if (e.at_peak[c] == 0) continue;
    std::printf("  %-22s %12s\n", std::string(llmem::sim::CategoryName(static_cast<llmem::sim::MemoryCategory>(c))).c_str(),
                FormatBytes(e.at_peak[c]).c_str());
  }
  std::printf("\npeak per phase: forward %s, backward %s, optimizer %s\n",
              FormatBytes(e.phase_peak_bytes[1]).c_str(), FormatBytes(e.phase_peak_bytes[2]).c_str(),
              FormatBytes(e.phase_peak_bytes[3]).c_str());
  std::printf("peak allocated   %s   (max_memory_allocated)\n", FormatBytes(e.peak_allocated_bytes).c_str());
  std::printf("peak reserved    %s   (max_memory_reserved; no-fragmentation bound %s)\n",
              FormatBytes(e.peak_reserved_bytes).c_str(), FormatBytes(e.lower_bound_bytes).c_str());
  if (e.capacity_bytes > 0) {
    std::printf("nvidia-smi       %s   (reserved + CUDA context%s %s, %s)\n", FormatBytes(e.nvidia_smi_bytes).c_str(),
                parallel ? " and NCCL buffers" : "", FormatBytes(e.fixed_overhead_bytes).c_str(),
                parallel ? "assumptions" : "an assumption");
    std::printf("capacity         %s   -> %s\n", FormatBytes(e.capacity_bytes).c_str(),
                e.fits ? "fits" : "DOES NOT FIT (out of memory)");
  }
  if (!e.unknown_ops.empty()) {
    std::printf("WARNING: ops without a memory rule were estimated conservatively:");
    for (const auto& k : e.unknown_ops) std::printf(" %s", k.c_str());
    std::printf("\n");
  }
}

int RunInspect(const std::string& path, int64_t batch, int64_t seq, bool print_ir, bool json_out) {
  const auto t0 = std::chrono::steady_clock::now();
  auto model = llmem::TorchScriptModel::Load(path);
  auto graph = model.BuildGraph(batch, seq);
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
  if (o.dp < 1 || o.tp < 1) throw llmem::ConfigError("--dp and --tp must be at least 1");
  if (o.batch <= 0 || o.seq <= 0) throw llmem::ConfigError("batch and sequence length must be positive");
  auto model = llmem::TorchScriptModel::Load(o.model);
  auto graph = model.BuildGraph(o.batch, o.seq);
  llmem::sim::MemoryEstimate est;
  if (o.dp == 1 && o.tp == 1) {
    est = llmem::sim::EstimateMemory(graph, config);
  } else {
    llmem::dist::DistributedOptions dopts;
    dopts.tp_vocab_parallel = !o.no_vocab_parallel;
    est = llmem::dist::EstimateRank(graph, config, {.dp = o.dp, .tp = o.tp, .engine = *engine}, dopts).memory;
  }
  if (!o.trace_path.empty()) {
    // One line per event: +/- bytes category phase label.
    const auto& sim = *est.simulation;
    std::FILE* f = std::fopen(o.trace_path.c_str(), "w");
    if (!f) throw llmem::ConfigError("cannot write trace file " + o.trace_path);
    int64_t live = 0;
    for (const auto& e : sim.timeline.events) {
      live += e.is_alloc ? e.bytes : -e.bytes;
      std::fprintf(f, "%c %lld %s %s %s | live %lld\n", e.is_alloc ? '+' : '-', static_cast<long long>(e.bytes),
                   std::string(llmem::sim::CategoryName(e.category)).c_str(),
                   std::string(llmem::sim::PhaseName(e.phase)).c_str(),
                   sim.timeline.block_labels[static_cast<size_t>(e.block)].c_str(), static_cast<long long>(live));
    }
    std::fclose(f);
  }
  if (o.json_out) {
    std::cout << EstimateJson(est, o).dump(2) << "\n";
  } else {
    PrintEstimate(est, graph, o);
  }
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
  if (!o.trace_path.empty()) {
    std::FILE* f = std::fopen(o.trace_path.c_str(), "w");
    if (!f) throw llmem::ConfigError("cannot write trace file " + o.trace_path);
    for (const auto& e : r.events) {
      std::fprintf(f, "%c %lld %s | live %lld\n", e.is_alloc ? '+' : '-', static_cast<long long>(e.bytes),
                   e.phase.c_str(), static_cast<long long>(e.current_bytes_after));
    }
    std::fclose(f);
  }
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
  CLI::App app{"llmem: will this LLM fine-tuning step fit in GPU memory?"};
  app.require_subcommand(1);

  std::string inspect_path;
  int64_t inspect_batch = 1, inspect_seq = 128;
  bool print_ir = false, inspect_json = false;
  auto* inspect = app.add_subcommand("inspect", "parameters per region, layers, op counts, dtypes");
  inspect->add_option("model", inspect_path, "TorchScript export")->required();
  inspect->add_option("--batch,-b", inspect_batch, "batch size for the op graph")->capture_default_str();
  inspect->add_option("--seq,-s", inspect_seq, "sequence length for the op graph")->capture_default_str();
  inspect->add_flag("--ir", print_ir, "print the IR, one op per line");
  inspect->add_flag("--json", inspect_json, "print JSON");

  StepOptions est_opts;
  auto* estimate = app.add_subcommand("estimate", "peak memory of one training step on a GPU (or --gpu cpu)");
  AddStepOptions(estimate, est_opts);
  estimate->add_option("--gpu,-g", est_opts.gpu, "GPU from the catalog, or 'cpu' to predict `llmem measure`")
      ->capture_default_str();
  estimate->add_option("--trace", est_opts.trace_path, "write the simulated allocation timeline to this file");
  estimate->add_flag("--allow-unknown-ops", est_opts.allow_unknown_ops,
                     "estimate ops without a memory rule conservatively (with a warning)");
  estimate->add_option("--dp", est_opts.dp, "data-parallel degree (the estimate is one rank's)")->capture_default_str();
  estimate->add_option("--tp", est_opts.tp, "tensor-parallel degree")->capture_default_str();
  estimate->add_option("--engine", est_opts.engine, "data-parallel engine: ddp | zero1 | zero2 | zero3 | gemini")
      ->capture_default_str();
  estimate->add_flag("--no-vocab-parallel", est_opts.no_vocab_parallel,
                     "with --tp: keep the embedding and LM head whole on every rank");
  estimate->add_option("--lifetimes", est_opts.lifetimes,
                       "forward value lifetimes: eager (Python frames) | torchscript (freed at last use)")
      ->capture_default_str();

  StepOptions measure_opts;
  measure_opts.precision = "fp32";
  std::string device = "cpu";
  int64_t steps = 2;
  auto* measure = app.add_subcommand("measure", "run real training steps with LibTorch and record the peak");
  AddStepOptions(measure, measure_opts);
  measure->add_option("--device,-d", device, "cpu | cuda | meta (PyTorch's own allocations, no real memory)")
      ->capture_default_str();
  measure->add_option("--trace", measure_opts.trace_path, "write every allocation and free to this file");
  measure->add_option("--steps", steps, "training steps to run (the steady state shows from step 2)")
      ->capture_default_str();

  llmem::cli::RecommendOptions rec_opts;
  auto* recommend = app.add_subcommand(
      "recommend", "every parallel layout over N GPUs: memory per GPU, largest batch, step time; the fastest that fits");
  llmem::cli::AddRecommendOptions(recommend, rec_opts);

  llmem::cli::ValidateOptions val_opts;
  auto* validate = app.add_subcommand("validate", "compare measured per-rank peaks of distributed runs with estimates");
  llmem::cli::AddValidateOptions(validate, val_opts);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitBadInput;
  }
  try {
    if (*inspect) return RunInspect(inspect_path, inspect_batch, inspect_seq, print_ir, inspect_json);
    if (*estimate) return RunEstimate(est_opts, est_opts.gpu);
    if (*measure) return RunMeasure(measure_opts, device, steps);
    if (*recommend) return llmem::cli::RunRecommend(rec_opts);
    if (*validate) return llmem::cli::RunValidate(val_opts);
  } catch (const llmem::Error& e) {
    std::fprintf(stderr, "llmem: error: %s\n", e.what());
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmem: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
