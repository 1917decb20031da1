#include "cli/validate_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cli/lora_options.h"
#include "cli/progress_line.h"
#include "cli/recipe_options.h"
#include "cli/training_options.h"
#include "distributed/rank_estimate.h"
#include "graph/error.h"
#include "graph/decoder_model.h"
#include "simulator/gpu_catalog.h"

namespace llmem::cli {
namespace {

using nlohmann::json;

constexpr int kExitValidationFailed = 4;

// One line of the runs file: one rank of one measured run, with its types and ranges checked.
struct RankRecord {
  int line = 0;  // 1-based line of the runs file
  std::string export_path, method, precision, optimizer, device, device_name;
  int dp = 1, tp = 1, world_size = 1, rank = 0;
  int64_t batch = 0, seq = 0, peak_bytes = 0;
  bool vocab_parallel = false;
  std::string fsdp_param_dtype, fsdp_reduce_dtype;  // the run's MixedPrecisionPolicy ("": not set)
  int grad_accum = 1;                  // the run's loop (its "recipe")
  bool optimizer_in_backward = false;
  bool fsdp_reduce_every_micro_batch = false;
  std::string loss = "standard";                      // the run's loss and checkpointing (recipe keys)
  std::string checkpointing = "none", checkpointing_impl = "reentrant";
  std::string lora;             // the run's PEFT LoRA as --lora items ("": none), its modules to save and quant
  std::string lora_modules_to_save, quant;
  std::string key;  // arch-size method dp×tp BxS precision optimizer [vocab-parallel] device: the run it belongs to
};

// One measured run (all its ranks).
struct Case {
  std::string key;
  RankRecord first;                                 // the first line seen, for the settings
  std::map<int, std::pair<int, int64_t>> rank_peaks;  // rank -> (line, measured peak bytes)
  int64_t estimate = 0;
};

std::string AtLine(int line) { return "runs line " + std::to_string(line); }

template <typename T>
bool HasType(const json& v) {
  if constexpr (std::is_same_v<T, std::string>) return v.is_string();
  else if constexpr (std::is_same_v<T, bool>) return v.is_boolean();
  else return v.is_number_integer();
}

template <typename T>
T Get(const json& j, const char* key, int line) {
  if (!j.contains(key)) throw ConfigError(AtLine(line) + " has no \"" + key + "\"");
  const json& v = j.at(key);
  if (!HasType<T>(v)) {
    throw ConfigError(AtLine(line) + ": \"" + key + "\" must be " +
                      (std::is_same_v<T, std::string> ? "a string" : std::is_same_v<T, bool> ? "true or false"
                                                                                                : "an integer") +
                      ", not " + v.dump());
  }
  try {
    return v.get<T>();
  } catch (const json::exception&) {  // an integer out of T's range
    throw ConfigError(AtLine(line) + ": \"" + key + "\" is out of range: " + v.dump());
  }
}

template <typename T>
T GetOr(const json& j, const char* key, T fallback, int line) {
  return j.contains(key) ? Get<T>(j, key, line) : fallback;
}

void CheckAtLeast(int64_t value, int64_t minimum, const char* key, int line) {
  if (value < minimum) {
    throw ConfigError(AtLine(line) + ": \"" + key + "\" must be at least " + std::to_string(minimum) + ", not " +
                      std::to_string(value));
  }
}

// The engine of a recorded method (scripts/distributed_runs.py), and the layouts each method runs.
dist::ParallelPlan PlanOf(const RankRecord& r) {
  dist::ParallelPlan p{.dp = r.dp, .tp = r.tp, .engine = dist::DataParallelEngine::kDdp};
  bool layout_ok = r.tp == 1;
  if (r.method == "single") layout_ok = r.dp == 1 && r.tp == 1;
  else if (r.method == "tp") layout_ok = r.dp == 1;
  else if (r.method == "fsdp2_tp") layout_ok = true, p.engine = dist::DataParallelEngine::kFsdp2Zero3;
  else if (r.method == "zero1") p.engine = dist::DataParallelEngine::kZero1;
  else if (r.method == "zero2") p.engine = dist::DataParallelEngine::kFsdp2Zero2;
  else if (r.method == "fsdp2") p.engine = dist::DataParallelEngine::kFsdp2Zero3;
  else if (r.method != "ddp") {
    throw ConfigError(AtLine(r.line) + ": unknown method '" + r.method +
                      "' (single, ddp, zero1, zero2, fsdp2, tp, fsdp2_tp)");
  }
  if (!layout_ok) {
    throw ConfigError(AtLine(r.line) + ": method " + r.method + " does not run on dp " + std::to_string(r.dp) +
                      " x tp " + std::to_string(r.tp));
  }
  return p;
}

// The loop options of a run's "recipe" (scripts/training_recipe.py keys); any other key is refused.
void ParseLoopRecipe(const json& recipe, int line, RankRecord& r) {
  for (const auto& [key, value] : recipe.items()) {
    if (key == "grad-accum") {
      r.grad_accum = Get<int>(recipe, "grad-accum", line);
      CheckAtLeast(r.grad_accum, 1, "grad-accum", line);
    } else if (key == "optimizer-in-backward") {
      r.optimizer_in_backward = Get<bool>(recipe, "optimizer-in-backward", line);
    } else if (key == "fsdp-reduce-every-micro-batch") {
      r.fsdp_reduce_every_micro_batch = Get<bool>(recipe, "fsdp-reduce-every-micro-batch", line);
    } else if (key == "loss") {
      r.loss = Get<std::string>(recipe, "loss", line);
      int chunks = 1;
      if (!sim::ParseLoss(r.loss, chunks)) throw ConfigError(AtLine(line) + ": unknown loss '" + r.loss + "'");
    } else if (key == "checkpointing") {
      r.checkpointing = Get<std::string>(recipe, "checkpointing", line);
    } else if (key == "checkpointing-impl") {
      r.checkpointing_impl = Get<std::string>(recipe, "checkpointing-impl", line);
    } else if (key == "lora-r") {
      r.lora += ",r=" + std::to_string(Get<int>(recipe, "lora-r", line));
    } else if (key == "lora-alpha" || key == "lora-dropout") {
      if (!value.is_number()) throw ConfigError(AtLine(line) + ": recipe " + key + " is not a number");
      r.lora += (key == "lora-alpha" ? ",alpha=" : ",dropout=") + value.dump();
    } else if (key == "lora-targets") {
      r.lora += ",targets=" + Get<std::string>(recipe, "lora-targets", line);
    } else if (key == "lora-modules-to-save") {
      r.lora_modules_to_save = Get<std::string>(recipe, "lora-modules-to-save", line);
    } else if (key == "quant") {
      r.quant = Get<std::string>(recipe, "quant", line);
    } else {
      throw ConfigError(AtLine(line) + ": the run's recipe carries \"" + key + "\", which validate does not apply "
                        "yet (it applies grad-accum, optimizer-in-backward, fsdp-reduce-every-micro-batch, loss, "
                        "checkpointing, checkpointing-impl and the lora-* and quant keys); compare it with `llmem estimate`");
    }
  }
}

RankRecord ParseRecord(const std::string& text, int line) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception&) {
    throw ConfigError(AtLine(line) + " is not JSON");
  }
  if (!j.is_object()) throw ConfigError(AtLine(line) + " is not a JSON object but " + std::string(j.type_name()));
  RankRecord r;
  r.line = line;
  const std::string arch = Get<std::string>(j, "arch", line), size = Get<std::string>(j, "size", line);
  r.export_path = Get<std::string>(j, "export", line);
  r.method = Get<std::string>(j, "method", line);
  r.dp = Get<int>(j, "dp", line);
  r.tp = Get<int>(j, "tp", line);
  CheckAtLeast(r.dp, 1, "dp", line);
  CheckAtLeast(r.tp, 1, "tp", line);
  const int64_t ranks = int64_t{r.dp} * r.tp;
  if (ranks > std::numeric_limits<int>::max()) {
    throw ConfigError(AtLine(line) + ": dp x tp = " + std::to_string(ranks) + " ranks is out of range");
  }
  r.world_size = GetOr<int>(j, "world_size", static_cast<int>(ranks), line);
  if (r.world_size != ranks) {
    throw ConfigError(AtLine(line) + ": world_size " + std::to_string(r.world_size) + " is not dp x tp = " +
                      std::to_string(ranks));
  }
  r.rank = Get<int>(j, "rank", line);
  if (r.rank < 0 || r.rank >= r.world_size) {
    throw ConfigError(AtLine(line) + ": rank " + std::to_string(r.rank) + " is outside 0.." +
                      std::to_string(r.world_size - 1));
  }
  r.batch = Get<int64_t>(j, "batch", line);
  r.seq = Get<int64_t>(j, "seq", line);
  CheckAtLeast(r.batch, 1, "batch", line);
  CheckAtLeast(r.seq, 1, "seq", line);
  r.precision = Get<std::string>(j, "precision", line);
  r.optimizer = Get<std::string>(j, "optimizer", line);
  if (!sim::ParsePrecision(r.precision)) {
    throw ConfigError(AtLine(line) + ": unknown precision '" + r.precision + "' (fp32, bf16-autocast, fp16-autocast, bf16)");
  }
  if (!sim::ParseOptimizer(r.optimizer)) {
    throw ConfigError(AtLine(line) + ": unknown optimizer '" + r.optimizer + "' (adamw, sgd, sgd-nomomentum, adafactor, adamw8bit, paged-adamw8bit)");
  }
  // A run made with recipe options validate does not apply (an optimizer implementation, a loop recipe other
  // than the ones below) would be scored as the plain step: such runs are refused. FSDP2 mixed-precision dtypes
  // and the loop's accumulation and optimizer in backward are applied.
  for (const char* field : {"optimizer_impl_requested", "recipe"}) {
    const auto it = j.find(field);
    const bool plain = it == j.end() || it->is_null() || (it->is_string() && (*it == "" || *it == "default")) ||
                       (it->is_object() && it->empty());
    if (!plain && !(it->is_object() && std::string(field) == "recipe")) {
      throw ConfigError(AtLine(line) + ": the run carries \"" + field + "\", which validate does not apply yet; "
                        "compare it with `llmem estimate` and the matching recipe options");
    }
  }
  if (const auto it = j.find("recipe"); it != j.end() && it->is_object()) {
    ParseLoopRecipe(*it, line, r);
    if (!r.lora.empty() && r.lora.find("r=") == std::string::npos) {
      throw ConfigError(AtLine(line) + ": the run's recipe has lora keys without lora-r");
    }
    if (!r.lora.empty()) r.lora.erase(0, 1);  // the leading ','
    if (r.lora.empty() && (!r.quant.empty() || !r.lora_modules_to_save.empty())) {
      throw ConfigError(AtLine(line) + ": the run's recipe has quant or lora-modules-to-save without lora-r");
    }
    if (!sim::ParseCheckpointing(r.checkpointing, r.checkpointing_impl)) {
      throw ConfigError(AtLine(line) + ": unknown checkpointing '" + r.checkpointing + "' / '" +
                        r.checkpointing_impl + "'");
    }
  }
  r.vocab_parallel = GetOr<bool>(j, "tp_vocab_parallel", false, line);
  r.device = GetOr<std::string>(j, "device", "cpu", line);
  if (r.device != "cpu" && r.device != "cuda") {
    throw ConfigError(AtLine(line) + ": unknown device '" + r.device + "' (cpu, cuda)");
  }
  r.device_name = GetOr<std::string>(j, "device_name", "", line);
  for (auto [key, field] : {std::pair{"fsdp_param_dtype", &r.fsdp_param_dtype},
                            std::pair{"fsdp_reduce_dtype", &r.fsdp_reduce_dtype}}) {
    if (!j.contains(key) || j.at(key).is_null()) continue;  // no policy
    *field = Get<std::string>(j, key, line);
    try {
      ParseFsdpDtype(*field, key);
    } catch (const ConfigError& e) {
      throw ConfigError(AtLine(line) + ": " + e.what());
    }
  }
  r.peak_bytes = Get<int64_t>(j, "peak_bytes", line);
  CheckAtLeast(r.peak_bytes, 1, "peak_bytes", line);
  PlanOf(r);  // the method is known and runs on this layout
  r.key = arch + "-" + size + " " + r.method + " dp" + std::to_string(r.dp) + "×tp" + std::to_string(r.tp) + " " +
          std::to_string(r.batch) + "×" + std::to_string(r.seq) + " " + r.precision + " " + r.optimizer +
          (r.vocab_parallel ? " vocab-parallel" : "") +
          (r.fsdp_param_dtype.empty() && r.fsdp_reduce_dtype.empty()
               ? ""
               : " param-" + (r.fsdp_param_dtype.empty() ? "default" : r.fsdp_param_dtype) + "-reduce-" +
                     (r.fsdp_reduce_dtype.empty() ? "default" : r.fsdp_reduce_dtype)) +
          (r.grad_accum > 1 ? " grad-accum=" + std::to_string(r.grad_accum) : "") +
          (r.optimizer_in_backward ? " optimizer-in-backward" : "") +
          (r.fsdp_reduce_every_micro_batch ? " fsdp-reduce-every-micro-batch" : "") +
          (r.loss != "standard" ? " loss=" + r.loss : "") +
          (r.checkpointing != "none" ? " checkpointing=" + r.checkpointing + "/" + r.checkpointing_impl : "") +
          (r.lora.empty() ? "" : " lora(" + r.lora + ")") +
          (r.lora_modules_to_save.empty() ? "" : " modules-to-save=" + r.lora_modules_to_save) +
          (r.quant.empty() || r.quant == "none" ? "" : " quant=" + r.quant) + " " + r.device;
  return r;
}

// Every rank 0..world_size-1 of a run exactly once.
void CheckRanks(const Case& c) {
  std::string missing;
  for (int rank = 0; rank < c.first.world_size; ++rank) {
    if (!c.rank_peaks.contains(rank)) missing += (missing.empty() ? "" : ", ") + std::to_string(rank);
  }
  if (!missing.empty()) {
    throw ConfigError(AtLine(c.first.line) + ": run " + c.key + " of " + std::to_string(c.first.world_size) +
                      " ranks has no line for rank " + missing);
  }
}

// The catalog GPU of a CUDA run: --gpu, else the device name the run recorded (as nvidia-smi prints it).
std::string GpuOf(const RankRecord& r, const std::string& gpu_option) {
  if (!gpu_option.empty()) return gpu_option;
  if (const auto gpu = sim::FindGpu(r.device_name)) return gpu->name;
  throw ConfigError(AtLine(r.line) + ": run " + r.key + " was on '" + r.device_name +
                    "', which the GPU catalog lacks; name the GPU with --gpu (" + sim::GpuNames() + ")");
}

double Percent(int64_t est, int64_t real) { return 100.0 * static_cast<double>(est - real) / static_cast<double>(real); }

// The measured runs of a runs file, each with every rank once, in the order the file names them.
struct Runs {
  std::map<std::string, Case> cases;
  std::vector<std::string> order;
};

Runs ReadRuns(std::istream& in, const std::string& name) {
  Runs runs;
  std::string text;
  int line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    RankRecord record = ParseRecord(text, line);
    auto [it, fresh] = runs.cases.emplace(record.key, Case{});
    Case& c = it->second;
    if (fresh) {
      c.key = record.key;
      runs.order.push_back(record.key);
    }
    const auto [seen, first_time] = c.rank_peaks.emplace(record.rank, std::make_pair(line, record.peak_bytes));
    if (!first_time) {
      throw ConfigError(AtLine(line) + ": rank " + std::to_string(record.rank) + " of run " + record.key +
                        " appears again (first on line " + std::to_string(seen->second.first) + ")");
    }
    if (fresh) c.first = std::move(record);
  }
  if (runs.cases.empty()) throw ConfigError("runs file " + name + " holds no runs");
  for (const auto& key : runs.order) CheckRanks(runs.cases[key]);
  return runs;
}

}  // namespace

void AddValidateOptions(CLI::App* cmd, ValidateOptions& o) {
  cmd->add_option("runs", o.runs, "JSON lines of measured runs (scripts/distributed_runs.py)")->required();
  cmd->add_option("--gpu", o.gpu, "catalog GPU for CUDA runs (default: from the recorded device name)");
  cmd->add_option("--max-mean-error", o.max_mean_error, "limit on the mean |error| over ranks, percent")
      ->capture_default_str();
  cmd->add_option("--max-error", o.max_case_error, "limit on any case's |error|, percent")->capture_default_str();
  cmd->add_option("--markdown", o.markdown, "write the comparison table to this file");
  cmd->add_flag("--json", o.json_out, "print JSON");
}

size_t CheckRunsLines(std::istream& in) { return ReadRuns(in, "<input>").order.size(); }

void CheckValidateOptions(const ValidateOptions& o) {
  // A negative or NaN limit would fail every run, an infinite one pass every run.
  for (const auto& [flag, limit] :
       {std::pair{"--max-mean-error", o.max_mean_error}, std::pair{"--max-error", o.max_case_error}}) {
    if (!std::isfinite(limit) || limit < 0) {
      char text[32];
      std::snprintf(text, sizeof text, "%g", limit);
      throw ConfigError(std::string(flag) + " must be a finite percentage of 0 or more, not " + text);
    }
  }
  if (!o.gpu.empty() && !sim::FindGpu(o.gpu)) {
    throw ConfigError("unknown GPU '" + o.gpu + "' (known: " + sim::GpuNames() + ")");
  }
}

int RunValidate(const ValidateOptions& o) {
  CheckValidateOptions(o);
  std::ifstream in(o.runs);
  if (!in) throw ConfigError("cannot read runs file " + o.runs);
  Runs runs = ReadRuns(in, o.runs);
  std::map<std::string, Case>& cases = runs.cases;
  const std::vector<std::string>& order = runs.order;

  std::map<std::string, std::unique_ptr<DecoderModel>> models;
  std::map<std::tuple<std::string, int64_t, int64_t>, std::unique_ptr<Graph>> graphs;
  json out_cases = json::array();
  double sum_abs = 0, max_case = 0;
  int ranks = 0;
  ProgressLine progress("validate", o.json_out);
  size_t done = 0;
  for (const auto& key : order) {
    progress.Update("run " + std::to_string(++done) + " of " + std::to_string(order.size()));
    Case& c = cases[key];
    const RankRecord& r = c.first;
    const std::string target = r.device == "cpu" ? "cpu" : GpuOf(r, o.gpu);
    sim::TrainingConfig config = ParseTrainingConfig(r.precision, r.optimizer, target);
    config.fsdp_param_dtype = ParseFsdpDtype(r.fsdp_param_dtype, "fsdp_param_dtype");
    config.fsdp_reduce_dtype = ParseFsdpDtype(r.fsdp_reduce_dtype, "fsdp_reduce_dtype");
    // A run without a loop recipe ran HF Trainer's loop (scripts/distributed_worker.py): outputs dropped before
    // backward, not estimate's cautious default.
    config.keep_outputs = false;
    config.grad_accum = r.grad_accum;
    config.optimizer_in_backward = r.optimizer_in_backward;
    config.fsdp_reduce_every_micro_batch = r.fsdp_reduce_every_micro_batch;
    config.loss = *sim::ParseLoss(r.loss, config.loss_chunks);
    config.checkpointing = *sim::ParseCheckpointing(r.checkpointing, r.checkpointing_impl);
    auto& model = models[r.export_path];
    auto& graph = graphs[{r.export_path, r.batch, r.seq}];
    try {
      if (!model) model = LoadDecoderModel(r.export_path);
      if (!graph) graph = std::make_unique<Graph>(model->BuildGraph(r.batch, r.seq));
      // The run's LoRA / QLoRA (and the precision its QLoRA step runs in).
      const AdapterRecipe adapters(r.lora, r.lora_modules_to_save, r.quant == "none" ? "" : r.quant, std::nullopt,
                                   config);
      const std::optional<Graph> adapted =
          adapters.active() ? std::optional<Graph>(adapters.Apply(*graph)) : std::nullopt;
      dist::DistributedOptions opts;
      opts.tp_vocab_parallel = r.vocab_parallel;
      opts.gpus_per_node = 0;  // the runs say where their ranks are
      // CUDA runs record max_memory_allocated; the cpu target's peak is the counting allocator's.
      c.estimate = dist::EstimateRank(adapted ? *adapted : *graph, config, PlanOf(r), opts).memory.peak_allocated_bytes;
    } catch (const Error& e) {
      throw ConfigError(AtLine(r.line) + " (run " + r.key + "): " + e.what());
    }
    int64_t real_max = 0;
    json rank_json = json::array();
    for (const auto& [rank, line_and_peak] : c.rank_peaks) {
      const int64_t peak = line_and_peak.second;
      const double err = Percent(c.estimate, peak);
      sum_abs += std::fabs(err);
      ++ranks;
      real_max = std::max(real_max, peak);
      rank_json.push_back({{"rank", rank}, {"measured_bytes", peak}, {"error_percent", err}});
    }
    const double case_err = Percent(c.estimate, real_max);
    max_case = std::max(max_case, std::fabs(case_err));
    out_cases.push_back({{"case", key}, {"estimated_bytes", c.estimate}, {"measured_max_bytes", real_max},
                         {"error_percent", case_err}, {"ranks", rank_json}});
  }
  const double mean_abs = ranks ? sum_abs / ranks : 0;
  const bool ok = mean_abs <= o.max_mean_error && max_case <= o.max_case_error;

  if (!o.markdown.empty()) {
    std::ofstream md(o.markdown);
    if (!md) throw ConfigError("cannot write " + o.markdown);
    md << "| case | ranks | measured peak (max over ranks) | estimated | error | per-rank errors |\n";
    md << "|---|---:|---:|---:|---:|---|\n";
    for (const auto& c : out_cases) {
      std::string per_rank;
      for (const auto& r : c["ranks"]) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%+.3f%%", r["error_percent"].get<double>());
        per_rank += (per_rank.empty() ? "" : " ") + std::string(buf);
      }
      char line_buf[512];
      std::snprintf(line_buf, sizeof line_buf, "| %s | %zu | %lld | %lld | %+.3f%% | %s |\n",
                    c["case"].get<std::string>().c_str(), c["ranks"].size(),
                    static_cast<long long>(c["measured_max_bytes"].get<int64_t>()),
                    static_cast<long long>(c["estimated_bytes"].get<int64_t>()), c["error_percent"].get<double>(),
                    per_rank.c_str());
      md << line_buf;
    }
  }
  if (o.json_out) {
    std::cout << json{{"cases", out_cases}, {"ranks", ranks}, {"mean_abs_error_percent", mean_abs},
                      {"max_abs_case_error_percent", max_case}, {"ok", ok}}
                     .dump(2)
              << "\n";
  } else {
    for (const auto& c : out_cases) {
      std::printf("%-70s measured %12lld  estimated %12lld  %+8.3f%%\n", c["case"].get<std::string>().c_str(),
                  static_cast<long long>(c["measured_max_bytes"].get<int64_t>()),
                  static_cast<long long>(c["estimated_bytes"].get<int64_t>()), c["error_percent"].get<double>());
    }
    std::printf("%zu cases, %d ranks: mean |error| %.3f%% (limit %.1f%%), max case |error| %.3f%% (limit %.1f%%): %s\n",
                out_cases.size(), ranks, mean_abs, o.max_mean_error, max_case, o.max_case_error, ok ? "PASS" : "FAIL");
  }
  return ok ? 0 : kExitValidationFailed;
}

}  // namespace llmem::cli
