// `llmem recommend`: the ranked table of parallel layouts over N GPUs, and the fastest one that fits.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>

#include "cli/hf_config_export.h"
#include "cli/lora_options.h"
#include "cli/recipe_options.h"
#include "distributed/recommend.h"

namespace llmem::cli {

struct RecommendOptions {
  ModelSource source;
  std::string model;  // the export read: source.file, or the export of source.hf_config
  int gpus = 8;
  std::string gpu = "a100-80";
  std::string gpu_memory;  // --gpu-memory: capacity of a GPU the catalog lacks (other figures from --gpu)
  int64_t seq = 2048;
  // Unset options keep these sentinels (so an explicit 0 is an error, not "unset").
  static constexpr int64_t kUnset = std::numeric_limits<int64_t>::min();
  int64_t batch = kUnset;         // default: 1 per GPU
  int64_t global_batch = kUnset;
  int64_t tp = kUnset;            // default: every degree
  int64_t nodes = kUnset;         // default: whole nodes of the GPU kind's usual size
  std::string precision = "bf16-autocast";
  std::string optimizer = "adamw";
  std::string interconnect;      // default: the GPU's own link
  std::string inter_node = "ib-ndr";
  std::string engines = "ddp,zero1,zero2,zero3,gemini";
  bool no_vocab_parallel = false;
  bool json_out = false;
  bool timings = false;  // --timings: also the seconds spent loading, building graphs and sweeping
  std::string plot_path;  // --plot FILE.svg|FILE.html: memory per GPU and throughput of every layout
  std::string lifetimes = "eager";
  std::optional<int64_t> max_positions;  // replaces the config's position limit (scaled RoPE)
  RecipeOptions recipe;
  std::string lora, lora_modules_to_save, quant;  // as estimate's --lora, --lora-modules-to-save, --quant
  std::optional<int64_t> quant_group;             // as estimate's --quant-group
};

void AddRecommendOptions(CLI::App* cmd, RecommendOptions& o);

// What the options ask for before a model is read: the sweep's request and its adapters (which the request's
// layout check points into, hence held by pointer).
struct RecommendSetup {
  dist::RecommendRequest request;
  std::unique_ptr<const AdapterRecipe> adapters;
};

// Checks the options that need no model (ranges, names, combinations) and builds the request. Throws ConfigError.
RecommendSetup PrepareRecommend(const RecommendOptions& o);

// Exit codes as the rest of the CLI: 0 a layout fits, 3 none does; bad input throws llmem::ConfigError.
int RunRecommend(const RecommendOptions& o);

}  // namespace llmem::cli
