#include "cli/recipe_options.h"

#include <cmath>
#include <limits>

#include "graph/error.h"

namespace llmem::cli {

std::optional<DType> ParseFsdpDtype(const std::string& name, const char* option) {
  if (name.empty()) return std::nullopt;
  if (name == "bf16") return DType::kBF16;
  if (name == "fp16") return DType::kF16;
  if (name == "fp32") return DType::kF32;
  throw ConfigError(std::string("unknown ") + option + " '" + name + "' (bf16, fp16, fp32)");
}

namespace {

std::string FsdpDtypeName(DType d) { return d == DType::kBF16 ? "bf16" : d == DType::kF16 ? "fp16" : "fp32"; }

// The loop by the code people run, and what that code does with the model's outputs.
std::string TrainingLoopName(const sim::Recipe& r) {
  return r.keep_outputs ? "accelerate / PEFT example loop (outputs kept until the next forward)"
                        : "HF Trainer loop (outputs dropped before backward)";
}

}  // namespace

void AddRecipeOptions(CLI::App* cmd, RecipeOptions& o) {
  cmd->add_option("--checkpointing", o.checkpointing,
                  "activation checkpointing of decoder layers: none | full | every-K | selective")
      ->capture_default_str();
  cmd->add_option("--checkpointing-impl", o.checkpointing_impl,
                  "torch.utils.checkpoint form: reentrant (HF's default) | non-reentrant (selective's only one)");
  cmd->add_option("--optimizer-impl", o.optimizer_impl, "optimizer kernels: default | foreach | fused | for-loop")
      ->capture_default_str();
  cmd->add_flag("--optimizer-in-backward", o.optimizer_in_backward,
                "step each parameter in backward as its gradient is ready (torchtune)");
  cmd->add_option("--grad-clip", o.grad_clip, "clip_grad_norm_ to this max norm before the step");
  cmd->add_option("--grad-accum", o.grad_accum, "micro-batches per optimizer step")->capture_default_str();
  cmd->add_option("--loss", o.loss, "loss: standard | chunked-N | fused-linear")->capture_default_str();
  auto* keep = cmd->add_flag("--keep-outputs", o.keep_outputs,
                             "the default: the loop keeps `outputs` (logits, loss) bound until the next forward "
                             "returns (accelerate / PEFT examples)");
  auto* drop = cmd->add_flag_callback("--drop-outputs", [&o] { o.keep_outputs = false; },
                                      "HF Trainer's loop: compute_loss drops the outputs before backward");
  keep->excludes(drop);
  cmd->add_option("--fsdp-param-dtype", o.fsdp_param_dtype, "FSDP2 MixedPrecisionPolicy param_dtype: bf16 | fp16 | fp32");
  cmd->add_option("--fsdp-reduce-dtype", o.fsdp_reduce_dtype,
                  "FSDP2 MixedPrecisionPolicy reduce_dtype: bf16 | fp16 | fp32");
  cmd->add_flag("--fsdp-reduce-every-micro-batch", o.fsdp_reduce_every_micro_batch,
                "FSDP2 with --grad-accum: reduce-scatter every micro-batch (torchtitan) instead of keeping unsharded "
                "gradients until the last (accelerate, HF Trainer)");
}

void ApplyRecipeOptions(const RecipeOptions& o, sim::Recipe& recipe) {
  const auto checkpointing = sim::ParseCheckpointing(o.checkpointing, "reentrant");
  if (!checkpointing) {
    throw ConfigError("unknown --checkpointing '" + o.checkpointing + "' (none, full, every-K with K >= 1, selective)");
  }
  // A selective policy needs use_reentrant=False, so that is its default; reentrant is refused by the pass.
  const std::string impl_name = !o.checkpointing_impl.empty() ? o.checkpointing_impl
                                : checkpointing && checkpointing->mode == sim::CheckpointingMode::kSelective
                                    ? "non-reentrant"
                                    : "reentrant";
  const auto impl = sim::ParseCheckpointing("none", impl_name);
  if (!impl) {
    throw ConfigError("unknown --checkpointing-impl '" + o.checkpointing_impl + "' (reentrant, non-reentrant)");
  }
  recipe.checkpointing = *checkpointing;
  recipe.checkpointing.impl = impl->impl;
  const auto optimizer_impl = sim::ParseOptimizerImpl(o.optimizer_impl);
  if (!optimizer_impl) {
    throw ConfigError("unknown --optimizer-impl '" + o.optimizer_impl + "' (default, foreach, fused, for-loop)");
  }
  recipe.optimizer_impl = *optimizer_impl;
  recipe.optimizer_in_backward = o.optimizer_in_backward;
  if (o.grad_clip && !(std::isfinite(*o.grad_clip) && *o.grad_clip > 0)) {
    throw ConfigError("--grad-clip must be a positive max norm (got " + std::to_string(*o.grad_clip) + ")");
  }
  recipe.grad_clip = o.grad_clip;
  if (o.grad_accum < 1 || o.grad_accum > std::numeric_limits<int>::max()) {
    throw ConfigError("--grad-accum must be at least 1 (got " + std::to_string(o.grad_accum) + ")");
  }
  recipe.grad_accum = static_cast<int>(o.grad_accum);
  int chunks = 1;
  const auto loss = sim::ParseLoss(o.loss, chunks);
  if (!loss) throw ConfigError("unknown --loss '" + o.loss + "' (standard, chunked-N with N >= 1, fused-linear)");
  recipe.loss = *loss;
  recipe.loss_chunks = chunks;
  recipe.keep_outputs = o.keep_outputs;
  recipe.fsdp_param_dtype = ParseFsdpDtype(o.fsdp_param_dtype, "--fsdp-param-dtype");
  recipe.fsdp_reduce_dtype = ParseFsdpDtype(o.fsdp_reduce_dtype, "--fsdp-reduce-dtype");
  if (o.fsdp_reduce_every_micro_batch && o.grad_accum == 1) {
    throw ConfigError("--fsdp-reduce-every-micro-batch needs --grad-accum 2 or more");
  }
  recipe.fsdp_reduce_every_micro_batch = o.fsdp_reduce_every_micro_batch;
}

nlohmann::json RecipeJson(const sim::Recipe& r) {
  nlohmann::json j{
      {"precision", sim::PrecisionName(r.precision)},
      {"optimizer", sim::OptimizerName(r.optimizer)},
      {"optimizer_impl", sim::OptimizerImplName(r.optimizer_impl)},
      {"optimizer_in_backward", r.optimizer_in_backward},
      {"grad_clip", r.grad_clip ? nlohmann::json(*r.grad_clip) : nlohmann::json(nullptr)},
      {"lifetimes", sim::LifetimesName(r.lifetimes)},
      {"checkpointing", sim::CheckpointingName(r.checkpointing)},
      {"checkpointing_impl", sim::CheckpointingImplName(r.checkpointing.impl)},
      {"grad_accum", r.grad_accum},
      {"loss", sim::LossName(r.loss, r.loss_chunks)},
      {"keep_outputs", r.keep_outputs},
      {"training_loop", TrainingLoopName(r)},
      {"fsdp_param_dtype", r.fsdp_param_dtype ? nlohmann::json(FsdpDtypeName(*r.fsdp_param_dtype)) : nlohmann::json(nullptr)},
      {"fsdp_reduce_dtype",
       r.fsdp_reduce_dtype ? nlohmann::json(FsdpDtypeName(*r.fsdp_reduce_dtype)) : nlohmann::json(nullptr)},
      {"fsdp_reduce_every_micro_batch", r.fsdp_reduce_every_micro_batch},
  };
  return j;
}

std::string RecipeSummary(const sim::Recipe& r) {
  std::string s = std::string(sim::PrecisionName(r.precision)) + ", " + std::string(sim::OptimizerName(r.optimizer));
  if (r.optimizer_impl != sim::OptimizerImplChoice::kDefault) {
    s += " (" + std::string(sim::OptimizerImplName(r.optimizer_impl)) + ")";
  }
  if (r.optimizer_in_backward) s += " in backward";
  if (r.grad_clip) s += ", grad clip";
  if (r.checkpointing.mode != sim::CheckpointingMode::kNone) {
    s += ", " + sim::CheckpointingName(r.checkpointing) + " checkpointing (" +
         std::string(sim::CheckpointingImplName(r.checkpointing.impl)) + ")";
  }
  if (r.grad_accum > 1) s += ", " + std::to_string(r.grad_accum) + " micro-batches";
  if (r.fsdp_reduce_every_micro_batch) s += " (FSDP2 reduce-scatters each)";
  if (r.loss != sim::LossVariant::kStandard) s += ", " + sim::LossName(r.loss, r.loss_chunks) + " loss";
  if (r.fsdp_param_dtype || r.fsdp_reduce_dtype) {
    s += ", FSDP2 MixedPrecisionPolicy (param " + (r.fsdp_param_dtype ? FsdpDtypeName(*r.fsdp_param_dtype) : "default") +
         ", reduce " + (r.fsdp_reduce_dtype ? FsdpDtypeName(*r.fsdp_reduce_dtype) : "default") + ")";
  }
  s += ", " + TrainingLoopName(r);
  return s;
}

}  // namespace llmem::cli
