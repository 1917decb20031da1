// The llmem command line: its subcommands and their options, parsed by CLI11, and the checks of those options that
// need no model file, so that a bad option is refused before an export is read (or traced from a config).
//
// Usage:
//   llmem::cli::CommandLine line;
//   if (const std::optional<int> exit = llmem::cli::ParseCommandLine(line, argc, argv)) return *exit;
//   llmem::cli::CheckCommandOptions(line);  // throws llmem::Error
//   if (*line.estimate) ...
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <optional>
#include <string>

#include "cli/hf_config_export.h"
#include "cli/infer_command.h"
#include "cli/recipe_options.h"
#include "cli/recommend_command.h"
#include "cli/validate_command.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// Exit status of bad input (options or model file).
constexpr int kExitBadInput = 2;

// Options of a training step (estimate, measure).
struct StepOptions {
  ModelSource source;
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
  RecipeOptions recipe;      // estimate only: checkpointing, accumulation, loss, loop, ...
  std::string lora;                      // estimate only: --lora r=..,alpha=..,dropout=..,targets=..
  std::string lora_modules_to_save;
  std::string quant;                     // estimate only: --quant nf4|fp4|nf4-dq|fp4-dq|int8|... (needs --lora)
  std::optional<int64_t> quant_group;    // estimate only: --quant-group (GPTQ)
};

// The step's training configuration on `target` from the options. Throws ConfigError for a bad option.
sim::TrainingConfig MakeConfig(const StepOptions& o, const std::string& target);

// Layout options that only mean something with several GPUs are refused rather than silently ignored.
void CheckLayoutOptions(const StepOptions& o);

// Every subcommand with its options; the members are what CLI11 parses into.
struct CommandLine {
  CommandLine();
  CommandLine(const CommandLine&) = delete;
  CommandLine& operator=(const CommandLine&) = delete;

  CLI::App app{"llmem: will this LLM fine-tuning step fit in GPU memory?"};
  CLI::App* inspect = nullptr;
  CLI::App* estimate = nullptr;
  CLI::App* measure = nullptr;
  CLI::App* recommend = nullptr;
  CLI::App* infer = nullptr;
  CLI::App* validate = nullptr;

  ModelSource inspect_source;
  int64_t inspect_batch = 1, inspect_seq = 128;
  std::optional<int64_t> inspect_max_positions;
  bool print_ir = false, inspect_json = false, inspect_timings = false;

  StepOptions est_opts;
  CLI::Option* engine_option = nullptr;

  StepOptions measure_opts;
  std::string device = "cpu";
  int64_t steps = 2;

  RecommendOptions rec_opts;
  InferOptions infer_opts;
  ValidateOptions val_opts;
};

// Parses argv into `line`. Returns the exit status when the command ends here (0 after --help; kExitBadInput after
// one line on stderr for an unknown subcommand or a parse error), none when a subcommand is to run.
std::optional<int> ParseCommandLine(CommandLine& line, int argc, char** argv);

// The parsed subcommand's checks that need no model: names, ranges and combinations of its options. Throws
// llmem::Error with one line.
void CheckCommandOptions(const CommandLine& line);

}  // namespace llmem::cli
