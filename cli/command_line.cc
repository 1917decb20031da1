#include "cli/command_line.h"

#include <algorithm>
#include <cstdio>
#include <string_view>
#include <vector>

#include "cli/lora_options.h"
#include "cli/training_options.h"
#include "distributed/parallel_plan.h"
#include "graph/error.h"

namespace llmem::cli {
namespace {

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

void AddStepOptions(CLI::App* cmd, StepOptions& o) {
  AddModelSource(cmd, o.source, "TorchScript export (.pt) or torch.export program (.pt2) of the model (forward(input_ids, labels) -> loss)");
  cmd->add_option("--batch,-b", o.batch, "micro-batch size per GPU")->capture_default_str();
  cmd->add_option("--seq,-s", o.seq, "sequence length in tokens")->capture_default_str();
  cmd->add_option("--precision,-p", o.precision, "fp32 | bf16-autocast | fp16-autocast | bf16")->capture_default_str();
  cmd->add_option("--optimizer,-o", o.optimizer, "adamw | sgd (momentum 0.9) | sgd-nomomentum | adafactor | adamw8bit | paged-adamw8bit (estimate; measure: adamw | sgd)")->capture_default_str();
  cmd->add_flag("--json", o.json_out, "print JSON");
}

sim::TrainingConfig MakeConfig(const StepOptions& o, const std::string& target) {
  auto cfg = ParseTrainingConfig(o.precision, o.optimizer, target, o.gpu_memory);
  cfg.allow_unknown_ops = o.allow_unknown_ops;
  cfg.lifetimes = ParseLifetimesOption(o.lifetimes);
  ApplyRecipeOptions(o.recipe, cfg);
  return cfg;
}


// Layout options that only mean something with several GPUs are refused rather than silently ignored.
void CheckLayoutOptions(const StepOptions& o) {
  if (o.dp < 1 || o.tp < 1) throw ConfigError("--dp and --tp must be at least 1");
  if (o.engine_given && o.dp == 1) {
    throw ConfigError("--engine " + o.engine + " needs data parallelism: add --dp 2 or more");
  }
  if (o.no_vocab_parallel && o.tp == 1) {
    throw ConfigError("--no-vocab-parallel needs tensor parallelism: add --tp 2 or more");
  }
}

CommandLine::CommandLine() {
  measure_opts.precision = "fp32";
  app.require_subcommand(1);

  inspect = app.add_subcommand("inspect", "parameters per region, layers, op counts, dtypes");
  AddModelSource(inspect, inspect_source, "TorchScript export (.pt) or torch.export program (.pt2)");
  inspect->add_option("--batch,-b", inspect_batch, "batch size for the op graph")->capture_default_str();
  inspect->add_option("--seq,-s", inspect_seq, "sequence length for the op graph")->capture_default_str();
  inspect->add_option("--max-positions", inspect_max_positions, "longest sequence the model allows (scaled RoPE)");
  inspect->add_flag("--ir", print_ir, "print the IR, one op per line");
  inspect->add_flag("--json", inspect_json, "print JSON");
  inspect->add_flag("--timings", inspect_timings, "also print the seconds the analysis took");

  estimate = app.add_subcommand("estimate", "peak memory of one training step on a GPU (or --gpu cpu)");
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
  engine_option =
      estimate->add_option("--engine", est_opts.engine, "data-parallel engine: ddp | zero1 | zero2 | zero3 | gemini")
          ->capture_default_str();
  estimate->add_option("--max-positions", est_opts.max_positions,
                       "longest sequence the model allows, replacing the export's config (scaled RoPE)");
  estimate->add_flag("--no-vocab-parallel", est_opts.no_vocab_parallel,
                     "with --tp: keep the embedding and LM head whole on every rank");
  estimate->add_option("--lifetimes", est_opts.lifetimes,
                       "forward value lifetimes: eager (Python frames) | torchscript (freed at last use)")
      ->capture_default_str();
  AddRecipeOptions(estimate, est_opts.recipe);
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

  measure = app.add_subcommand("measure", "run real training steps with LibTorch and record the peak");
  AddStepOptions(measure, measure_opts);
  measure->add_option("--device,-d", device, "cpu | cuda | meta (PyTorch's own allocations, no real memory)")
      ->capture_default_str();
  measure->add_option("--trace", measure_opts.trace_path, "write every allocation and free (TSV) to this file")
      ->check(kNonEmptyPath);
  measure->add_option("--steps", steps, "training steps to run (the steady state shows from step 2)")
      ->capture_default_str();

  recommend = app.add_subcommand(
      "recommend", "every parallel layout over N GPUs: memory per GPU, largest batch, step time; the fastest that fits");
  AddRecommendOptions(recommend, rec_opts);

  infer = app.add_subcommand("infer", "memory of Hugging Face generation: prefill and decode with a KV cache");
  AddInferOptions(infer, infer_opts);

  validate = app.add_subcommand("validate", "compare measured per-rank peaks of distributed runs with estimates");
  AddValidateOptions(validate, val_opts);

}

std::optional<int> ParseCommandLine(CommandLine& line, int argc, char** argv) {
  if (const auto unknown = UnknownSubcommand(line.app, argc, argv)) {
    std::fprintf(stderr, "llmem: error: %s\n", unknown->c_str());
    return kExitBadInput;
  }
  try {
    line.app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return ReportParseError(line.app, e);
  }
  line.est_opts.engine_given = line.engine_option->count() > 0;
  return std::nullopt;
}

void CheckCommandOptions(const CommandLine& line) {
  if (*line.estimate) {
    const StepOptions& o = line.est_opts;
    sim::TrainingConfig config = MakeConfig(o, o.gpu);
    if (!dist::ParseEngine(o.engine)) {
      throw ConfigError("unknown engine '" + o.engine + "' (ddp, zero1, zero2, zero3, gemini)");
    }
    CheckLayoutOptions(o);
    if (o.batch <= 0 || o.seq <= 0) throw ConfigError("batch and sequence length must be positive");
    const AdapterRecipe adapters(o.lora, o.lora_modules_to_save, o.quant, o.quant_group, config);
  } else if (*line.recommend) {
    PrepareRecommend(line.rec_opts);
  } else if (*line.infer) {
    CheckInferOptions(line.infer_opts);
  } else if (*line.validate) {
    CheckValidateOptions(line.val_opts);
  }
}

}  // namespace llmem::cli
