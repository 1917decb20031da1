#include "cli/recommend_command.h"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/category_report.h"
#include "cli/layout_plot.h"
#include "cli/lora_options.h"
#include "cli/progress_line.h"
#include "cli/training_options.h"
#include "distributed/interconnect.h"
#include "distributed/rank_estimate.h"
#include "distributed/recommend.h"
#include "graph/error.h"
#include "graph/decoder_model.h"
#include "simulator/gpu_catalog.h"
#include "simulator/passes/fsdp_mixed_precision_pass.h"

namespace llmem::cli {
namespace {

using nlohmann::json;

std::vector<dist::DataParallelEngine> ParseEngines(const std::string& list) {
  std::vector<dist::DataParallelEngine> out;
  std::stringstream ss(list);
  std::string name;
  while (std::getline(ss, name, ',')) {
    auto e = dist::ParseEngine(name);
    if (!e) throw ConfigError("unknown engine '" + name + "' in --engines (ddp, zero1, zero2, zero3, gemini)");
    out.push_back(*e);
  }
  if (out.empty()) throw ConfigError("--engines names no engine");
  return out;
}

// Left-aligns `s` in `width` columns, counting UTF-8 code points ("×" is one column, two bytes).
std::string Pad(const std::string& s, size_t width) {
  size_t columns = 0;
  for (unsigned char c : s) columns += (c & 0xC0) != 0x80;
  return s + std::string(columns < width ? width - columns : 0, ' ');
}

std::string Seconds(double s) {
  char buf[32];
  if (s >= 1) {
    std::snprintf(buf, sizeof buf, "%.2f s", s);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f ms", s * 1e3);
  }
  return buf;
}

// The data-parallel engine, or "none" when there is no data parallelism (TP alone, one GPU).
std::string EngineOf(const dist::ParallelPlan& p) { return p.dp > 1 ? std::string(dist::EngineName(p.engine)) : "none"; }

json RowJson(const dist::PlanRow& r) {
  json j{{"layout", r.plan.Name()}, {"dp", r.plan.dp}, {"tp", r.plan.tp}, {"engine", EngineOf(r.plan)},
         {"micro_batch", r.micro_batch}};
  if (!r.skipped.empty()) {
    j["skipped"] = r.skipped;
    return j;
  }
  j["fits"] = r.fits;
  j["peak_allocated_bytes"] = r.peak_allocated_bytes;
  j["peak_reserved_bytes"] = r.peak_reserved_bytes;
  j["nvidia_smi_bytes"] = r.nvidia_smi_bytes;
  j["at_peak_bytes"] = NonZeroCategoriesJson(r.at_peak_bytes);
  j["max_micro_batch"] = r.max_micro_batch;
  j["step_seconds"] = r.time.total_s;
  j["tokens_per_second"] = r.tokens_per_second;
  j["time"] = {{"forward_s", r.time.forward_s},   {"backward_s", r.time.backward_s},
               {"optimizer_s", r.time.optimizer_s}, {"comm_s", r.time.comm_s},
               {"exposed_comm_s", r.time.exposed_comm_s}};
  if (r.time.recompute_s > 0) j["time"]["recompute_s"] = r.time.recompute_s;  // only with checkpointing
  return j;
}

// How the rows treat the precision: autocast everywhere, or FSDP2's MixedPrecisionPolicy in the FSDP2 rows only.
std::string MixedPrecisionAssumption(const sim::Recipe& r) {
  if (!r.fsdp_param_dtype && !r.fsdp_reduce_dtype) {
    return "an autocast precision keeps autocast's 16-bit weight copies for the whole forward, under FSDP2 too "
           "(measured); FSDP2's MixedPrecisionPolicy applies only when --fsdp-param-dtype / --fsdp-reduce-dtype "
           "are given";
  }
  const sim::FsdpPrecision p = sim::FsdpPrecisionOf(r);
  auto name = [](DType d) { return std::string(d == DType::kBF16 ? "bf16" : d == DType::kF16 ? "fp16" : "fp32"); };
  return "the FSDP2 rows, with tensor parallelism too, run MixedPrecisionPolicy: " + name(p.Compute(DType::kF32)) +
         " gathered parameters and compute, reduce-scatter in " + name(p.Reduce(DType::kF32)) +
         ", fp32 sharded parameters, gradients and optimizer states, no autocast; the other rows (DDP, ZeRO-1, "
         "tensor parallelism alone) have no such policy and ignore it: they train in fp32";
}

}  // namespace

void AddRecommendOptions(CLI::App* cmd, RecommendOptions& o) {
  AddModelSource(cmd, o.source, "TorchScript export (.pt) or torch.export program (.pt2) of the model (forward(input_ids, labels) -> loss)");
  cmd->add_option("--gpus,-n", o.gpus, "number of GPUs")->capture_default_str();
  cmd->add_option("--plot", o.plot_path, "write a chart of every layout's memory per GPU and throughput (.svg or .html)")
      ->check([](const std::string& v) { return v.empty() ? std::string("an empty path") : std::string(); });
  cmd->add_option("--nodes", o.nodes, "number of nodes the GPUs are spread over; default: nodes of 8 GPUs");
  cmd->add_option("--gpu,-g", o.gpu, "GPU from the catalog")->capture_default_str();
  cmd->add_option("--gpu-memory", o.gpu_memory,
                  "memory of each GPU (e.g. 24GiB, 80GB) for a part the catalog lacks; other figures from --gpu");
  cmd->add_option("--seq,-s", o.seq, "sequence length in tokens")->capture_default_str();
  cmd->add_option("--batch,-b", o.batch, "micro-batch per GPU (data-parallel rank); default 1");
  cmd->add_option("--global-batch", o.global_batch, "global batch, split over the data-parallel ranks");
  cmd->add_option("--tp", o.tp, "only layouts with this tensor-parallel degree");
  cmd->add_option("--precision,-p", o.precision, "fp32 | bf16-autocast | fp16-autocast | bf16")->capture_default_str();
  cmd->add_option("--optimizer,-o", o.optimizer, "adamw | sgd (momentum 0.9) | sgd-nomomentum | adafactor | adamw8bit | paged-adamw8bit")->capture_default_str();
  cmd->add_option("--interconnect", o.interconnect, "link inside a node (default: the GPU's own; " +
                                                        dist::InterconnectNames() + ")");
  cmd->add_option("--inter-node", o.inter_node, "network between nodes")->capture_default_str();
  cmd->add_option("--engines", o.engines, "data-parallel engines to consider")->capture_default_str();
  cmd->add_flag("--no-vocab-parallel", o.no_vocab_parallel, "keep the embedding and LM head whole under TP");
  cmd->add_option("--max-positions", o.max_positions, "longest sequence the model allows (e.g. scaled RoPE)");
  cmd->add_flag("--json", o.json_out, "print JSON");
  cmd->add_flag("--timings", o.timings,
                "also print the seconds spent (which vary run to run; the answer does not)");
  AddRecipeOptions(cmd, o.recipe);
  cmd->add_option("--lifetimes", o.lifetimes, "forward value lifetimes: eager | torchscript")->capture_default_str();
  cmd->add_option("--lora", o.lora, "PEFT LoRA adapters on a frozen base, as estimate's --lora (layouts it cannot "
                                    "run yet are listed as skipped)");
  cmd->add_option("--lora-modules-to-save", o.lora_modules_to_save, "with --lora: modules trained in full");
  cmd->add_option("--quant", o.quant, "with --lora: a quantized base, as estimate's --quant");
  cmd->add_option("--quant-group", o.quant_group, "with --quant gptq-4|gptq-8: as estimate's --quant-group");
}

RecommendSetup PrepareRecommend(const RecommendOptions& o) {
  RecommendSetup setup;
  dist::RecommendRequest& req = setup.request;
  req.gpus = o.gpus;
  constexpr int64_t kUnset = RecommendOptions::kUnset;
  if (o.nodes != kUnset) {
    if (o.nodes < 1 || o.nodes > std::numeric_limits<int>::max()) {
      throw ConfigError("the node count must be at least 1 (got " + std::to_string(o.nodes) + ")");
    }
    req.nodes = static_cast<int>(o.nodes);
  }
  if (o.batch != kUnset && o.batch <= 0) throw ConfigError("--batch must be positive (got " + std::to_string(o.batch) + ")");
  if (o.global_batch != kUnset && o.global_batch <= 0) {
    throw ConfigError("--global-batch must be positive (got " + std::to_string(o.global_batch) + ")");
  }
  if (o.tp != kUnset) {
    if (o.tp < 1 || o.tp > std::numeric_limits<int>::max()) {
      throw ConfigError("the tensor-parallel degree must be at least 1 (got " + std::to_string(o.tp) + ")");
    }
    req.tp = static_cast<int>(o.tp);
  }
  req.micro_batch = o.batch == kUnset ? 0 : o.batch;
  req.global_batch = o.global_batch == kUnset ? 0 : o.global_batch;
  if (req.micro_batch == 0 && req.global_batch == 0) req.micro_batch = 1;
  if (o.seq <= 0) throw ConfigError("the sequence length must be positive (got " + std::to_string(o.seq) + ")");
  if (o.gpu == "cpu") throw ConfigError("recommend needs a GPU from the catalog (" + sim::GpuNames() + ")");
  req.config = ParseTrainingConfig(o.precision, o.optimizer, o.gpu, o.gpu_memory);
  req.config.lifetimes = ParseLifetimesOption(o.lifetimes);
  ApplyRecipeOptions(o.recipe, req.config);
  setup.adapters =
      std::make_unique<const AdapterRecipe>(o.lora, o.lora_modules_to_save, o.quant, o.quant_group, req.config);
  if (const AdapterRecipe* adapters = setup.adapters.get(); adapters->active()) {
    req.unsupported_layout = [adapters](const dist::ParallelPlan& plan) {
      return adapters->UnsupportedLayout(plan.dp, plan.tp, plan.engine == dist::DataParallelEngine::kGemini,
                                        dist::RunsFsdp2(plan));
    };
  }
  sim::CheckFsdpPolicyPrecision(req.config);  // before the sweep, which takes a failed estimate as not fitting
  const auto gpu = &req.config.target.gpu;
  const std::string intra_name = o.interconnect.empty() ? gpu->intra_node_link : o.interconnect;
  auto intra = dist::FindInterconnect(intra_name);
  if (!intra) throw ConfigError("unknown interconnect '" + intra_name + "' (known: " + dist::InterconnectNames() + ")");
  auto inter = dist::FindInterconnect(o.inter_node);
  if (!inter) throw ConfigError("unknown interconnect '" + o.inter_node + "' (known: " + dist::InterconnectNames() + ")");
  req.intra_node = *intra;
  req.inter_node = *inter;
  req.engines = ParseEngines(o.engines);
  req.tp_vocab_parallel = !o.no_vocab_parallel;
  if (o.gpus < 1) throw ConfigError("the GPU count must be at least 1 (got " + std::to_string(o.gpus) + ")");
  return setup;
}

int RunRecommend(const RecommendOptions& o) {
  RecommendSetup setup = PrepareRecommend(o);
  dist::RecommendRequest& req = setup.request;
  const AdapterRecipe& adapters = *setup.adapters;
  const auto* gpu = &req.config.target.gpu;
  const auto* intra = &req.intra_node;
  const auto* inter = &req.inter_node;
  const auto t0 = std::chrono::steady_clock::now();
  const std::unique_ptr<DecoderModel> loaded = LoadDecoderModel(o.model);
  DecoderModel& model = *loaded;
  CheckMoeImbalance(o.source, model);
  if (o.max_positions) model.set_max_positions(*o.max_positions);
  std::map<int64_t, std::unique_ptr<Graph>> graphs;
  double build_seconds = 0;
  ProgressLine progress("recommend", o.json_out);
  // The sweep asks for every batch it needs before estimating in parallel; later calls only look up.
  auto graph_at = [&](int64_t batch) -> const Graph& {
    auto it = graphs.find(batch);
    if (it == graphs.end()) {
      const auto b0 = std::chrono::steady_clock::now();
      progress.Update("the step's graph at micro-batch " + std::to_string(batch));
      it = graphs.emplace(batch, std::make_unique<Graph>(adapters.Apply(model.BuildGraph(batch, o.seq)))).first;
      build_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - b0).count();
    }
    return *it->second;
  };
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto s0 = std::chrono::steady_clock::now();
  dist::Recommendation rec = dist::Recommend(req, graph_at);
  if (!o.gpu_memory.empty()) {
    rec.assumptions.push_back(FormatBytes(gpu->capacity_bytes) + " GPU " + GpuMemoryAssumption(o.gpu) +
                              " (and its links)");
  }
  rec.assumptions.push_back(MixedPrecisionAssumption(req.config));
  if (const auto moe = model.moe_routing()) rec.assumptions.push_back(MoeRoutingAssumption(*moe));
  if (!adapters.assumption().empty()) rec.assumptions.push_back(adapters.assumption());
  if (!adapters.ShardingAssumption().empty()) rec.assumptions.push_back(adapters.ShardingAssumption());
  if (const std::string loop = dist::DataParallelLoopAssumption(req.config, req.engines); !loop.empty()) {
    rec.assumptions.push_back(loop);
  }
  const double sweep_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count() - build_seconds;

  if (!o.plot_path.empty()) {
    char title[512];
    std::snprintf(title, sizeof title, "%s on %d x %s, seq %lld, %s, %s",
                  std::filesystem::path(o.model).filename().string().c_str(), o.gpus, o.gpu.c_str(),
                  static_cast<long long>(o.seq), o.precision.c_str(), o.optimizer.c_str());
    WriteLayoutPlot(o.plot_path, rec, gpu->capacity_bytes, title);
  }
  if (o.json_out) {
    json j{{"model", o.model},
           {"gpus", o.gpus},
           {"nodes", rec.nodes.nodes},
           {"gpu", o.gpu},
           {"capacity_bytes", gpu->capacity_bytes},
           {"interconnect", {{"intra_node", intra->name}, {"inter_node", inter->name}}},
           {"seq", o.seq},
           {"precision", o.precision},
           {"optimizer", o.optimizer},
           {"recipe", RecipeJson(req.config)}};
    if (req.global_batch > 0) {
      j["global_batch"] = req.global_batch;
    } else {
      j["micro_batch"] = req.micro_batch;
    }
    json rows = json::array();
    for (const auto& r : rec.rows) rows.push_back(RowJson(r));
    j["plans"] = rows;
    j["recommended"] = rec.best >= 0 ? json(rec.rows[static_cast<size_t>(rec.best)].plan.Name()) : json(nullptr);
    j["why"] = rec.why;
    if (rec.best < 0) j["smallest_gpu_count_that_fits"] = rec.smallest_gpu_count_that_fits;
    j["assumptions"] = rec.assumptions;
    if (o.timings) j["seconds"] = {{"load", load_seconds}, {"graphs", build_seconds}, {"sweep", sweep_seconds}};
    std::cout << j.dump(2) << "\n";
    return rec.best >= 0 ? 0 : 3;
  }

  std::printf("%s on %d x %s (%d node%s, %s inside a node%s), seq %lld, %s %lld, %s, %s\n", o.model.c_str(), o.gpus,
              o.gpu.c_str(), rec.nodes.nodes, rec.nodes.nodes > 1 ? "s" : "", intra->name.c_str(),
              rec.nodes.nodes > 1 ? (", " + inter->name + " between nodes").c_str() : "", static_cast<long long>(o.seq),
              req.global_batch > 0 ? "global batch" : "batch per GPU",
              static_cast<long long>(req.global_batch > 0 ? req.global_batch : req.micro_batch), o.precision.c_str(),
              o.optimizer.c_str());
  std::printf("recipe: %s\n\n", RecipeSummary(req.config).c_str());
  std::printf(" %-3s %s %s %6s %13s %5s %9s %10s %12s\n", "#", Pad("layout", 14).c_str(), Pad("engine", 16).c_str(),
              "batch", "memory/GPU", "fits", "max batch", "step time", "tokens/s");
  int index = 0;
  for (const auto& r : rec.rows) {
    ++index;
    if (!r.skipped.empty()) {
      std::printf(" %-3d %s %s %6lld  n/a: %s\n", index, Pad(r.plan.Name(), 14).c_str(),
                  Pad(EngineOf(r.plan), 16).c_str(), static_cast<long long>(r.micro_batch), r.skipped.c_str());
      continue;
    }
    std::printf(" %-3d %s %s %6lld %13s %5s %9lld %10s %12.0f\n", index, Pad(r.plan.Name(), 14).c_str(),
                Pad(EngineOf(r.plan), 16).c_str(), static_cast<long long>(r.micro_batch),
                FormatBytes(r.nvidia_smi_bytes).c_str(), r.fits ? "yes" : "OOM",
                static_cast<long long>(r.max_micro_batch), Seconds(r.time.total_s).c_str(), r.tokens_per_second);
  }
  std::printf("\n");
  if (rec.best >= 0) {
    std::printf("recommended: %s\n", rec.why.c_str());
  } else if (rec.smallest_gpu_count_that_fits > 0) {
    std::printf("nothing fits: %s; the smallest count of %s that fits is %d\n", rec.why.c_str(), o.gpu.c_str(),
                rec.smallest_gpu_count_that_fits);
  } else {
    std::printf("nothing fits: %s, nor on up to 4096 of them\n", rec.why.c_str());
  }
  std::printf("\nmemory/GPU: peak reserved + CUDA context + NCCL buffers (what nvidia-smi shows); max batch: "
              "the largest batch whose exact estimate fits (the next one does not)\n");
  std::printf("assumptions:\n");
  for (const auto& a : rec.assumptions) std::printf("  - %s\n", a.c_str());
  if (o.timings) {
    std::printf("\nloaded in %.2f s, graphs built in %.2f s, sweep in %.3f s\n", load_seconds, build_seconds,
                sweep_seconds);
  }
  return rec.best >= 0 ? 0 : 3;
}

}  // namespace llmem::cli
