#include "cli/validate_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <tuple>

#include "cli/training_options.h"
#include "distributed/rank_estimate.h"
#include "graph/error.h"
#include "graph/torchscript_importer.h"
#include "simulator/gpu_catalog.h"

namespace llmem::cli {
namespace {

using nlohmann::json;

constexpr int kExitValidationFailed = 4;

// One measured run (all its ranks).
struct Case {
  std::string key;     // arch/size/method/dp×tp/BxS/precision/optimizer/vocab
  json first;          // the rank-0 (or first) line, for the settings
  std::vector<std::pair<int, int64_t>> rank_peaks;
  int64_t estimate = 0;
};

template <typename T>
T Get(const json& j, const char* key, int line) {
  if (!j.contains(key)) throw ConfigError("runs line " + std::to_string(line) + " has no \"" + key + "\"");
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw ConfigError("runs line " + std::to_string(line) + ": \"" + key + "\" has the wrong type");
  }
}

dist::ParallelPlan PlanOf(const std::string& method, int dp, int tp, int line) {
  dist::ParallelPlan p{.dp = dp, .tp = tp, .engine = dist::DataParallelEngine::kDdp};
  if (method == "single" || method == "ddp" || method == "tp") return p;
  if (method == "zero1") p.engine = dist::DataParallelEngine::kZero1;
  else if (method == "zero2") p.engine = dist::DataParallelEngine::kFsdp2Zero2;
  else if (method == "fsdp2" || method == "fsdp2_tp") p.engine = dist::DataParallelEngine::kFsdp2Zero3;
  else throw ConfigError("runs line " + std::to_string(line) + ": unknown method '" + method + "'");
  return p;
}

std::string GpuFromDeviceName(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), ::tolower);
  if (n.find("h200") != std::string::npos) return "h200-141";
  if (n.find("h100") != std::string::npos) return "h100-80";
  if (n.find("a100") != std::string::npos) return n.find("40") != std::string::npos ? "a100-40" : "a100-80";
  return "";
}

double Percent(int64_t est, int64_t real) { return 100.0 * static_cast<double>(est - real) / static_cast<double>(real); }

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

int RunValidate(const ValidateOptions& o) {
  std::ifstream in(o.runs);
  if (!in) throw ConfigError("cannot read runs file " + o.runs);
  std::map<std::string, Case> cases;
  std::vector<std::string> order;
  std::string text;
  int line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception&) {
      throw ConfigError("runs line " + std::to_string(line) + " is not JSON");
    }
    const std::string key = Get<std::string>(j, "arch", line) + "-" + Get<std::string>(j, "size", line) + " " +
                            Get<std::string>(j, "method", line) + " dp" + std::to_string(Get<int>(j, "dp", line)) +
                            "×tp" + std::to_string(Get<int>(j, "tp", line)) + " " +
                            std::to_string(Get<int64_t>(j, "batch", line)) + "×" +
                            std::to_string(Get<int64_t>(j, "seq", line)) + " " + Get<std::string>(j, "precision", line) +
                            " " + Get<std::string>(j, "optimizer", line) +
                            (j.value("tp_vocab_parallel", false) ? " vocab-parallel" : "") + " " +
                            j.value("device", std::string("cpu"));
    auto [it, fresh] = cases.emplace(key, Case{});
    if (fresh) {
      it->second.key = key;
      it->second.first = j;
      order.push_back(key);
    }
    it->second.rank_peaks.emplace_back(Get<int>(j, "rank", line), Get<int64_t>(j, "peak_bytes", line));
  }
  if (cases.empty()) throw ConfigError("runs file " + o.runs + " holds no runs");

  std::map<std::string, std::unique_ptr<TorchScriptModel>> models;
  std::map<std::tuple<std::string, int64_t, int64_t>, std::unique_ptr<Graph>> graphs;
  json out_cases = json::array();
  double sum_abs = 0, max_case = 0;
  int ranks = 0;
  for (const auto& key : order) {
    Case& c = cases[key];
    const json& j = c.first;
    const std::string path = Get<std::string>(j, "export", 0);
    const int64_t batch = Get<int64_t>(j, "batch", 0), seq = Get<int64_t>(j, "seq", 0);
    auto& model = models[path];
    if (!model) model = std::make_unique<TorchScriptModel>(TorchScriptModel::Load(path));
    auto& graph = graphs[{path, batch, seq}];
    if (!graph) graph = std::make_unique<Graph>(model->BuildGraph(batch, seq));
    std::string target = "cpu";
    if (j.value("device", std::string("cpu")) != "cpu") {
      target = o.gpu.empty() ? GpuFromDeviceName(j.value("device_name", std::string())) : o.gpu;
      if (target.empty()) throw ConfigError("run " + key + ": name the GPU with --gpu (" + sim::GpuNames() + ")");
    }
    const sim::TrainingConfig config =
        ParseTrainingConfig(Get<std::string>(j, "precision", 0), Get<std::string>(j, "optimizer", 0), target);
    dist::DistributedOptions opts;
    opts.tp_vocab_parallel = j.value("tp_vocab_parallel", false);
    opts.gpus_per_node = 0;  // the runs say where their ranks are
    const auto plan = PlanOf(Get<std::string>(j, "method", 0), Get<int>(j, "dp", 0), Get<int>(j, "tp", 0), 0);
    const auto est = dist::EstimateRank(*graph, config, plan, opts).memory;
    // CUDA runs record max_memory_allocated; the cpu target's peak is the counting allocator's.
    c.estimate = est.peak_allocated_bytes;
    int64_t real_max = 0;
    json rank_json = json::array();
    for (const auto& [rank, peak] : c.rank_peaks) {
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
