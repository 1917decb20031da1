// The recipe options shared by `estimate` and `recommend` (checkpointing, optimizer implementation and
// placement, gradient clipping and accumulation, loss variant, training-loop semantics, FSDP2 mixed precision):
// the command line's names, turned into the fields of sim::Recipe, and the recipe as JSON and as one line of text.
#pragma once

#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "simulator/recipe.h"

namespace llmem::cli {

struct RecipeOptions {
  std::string checkpointing = "none";
  std::string checkpointing_impl;  // empty: the mode's own (reentrant; selective: non-reentrant)
  std::string optimizer_impl = "default";
  bool optimizer_in_backward = false;
  std::optional<double> grad_clip;
  int64_t grad_accum = 1;
  std::string loss = "standard";
  // The cautious default: the loop that keeps `outputs` has the larger peak, so an estimate for a user whose loop
  // is unknown does not fall short of it (--drop-outputs: HF Trainer's loop).
  bool keep_outputs = true;
  std::string fsdp_param_dtype, fsdp_reduce_dtype;  // empty: not given
  bool fsdp_reduce_every_micro_batch = false;
};

void AddRecipeOptions(CLI::App* cmd, RecipeOptions& o);

// Sets the recipe fields of `recipe` from the options; throws ConfigError naming a bad value and the known ones.
void ApplyRecipeOptions(const RecipeOptions& o, sim::Recipe& recipe);

// An FSDP2 MixedPrecisionPolicy dtype: bf16 | fp16 | fp32, none for ""; throws ConfigError naming `option`.
std::optional<DType> ParseFsdpDtype(const std::string& name, const char* option);

// Every field of the recipe, by the option names.
nlohmann::json RecipeJson(const sim::Recipe& recipe);

// The recipe in words, for text output: "adamw, bf16-autocast, full checkpointing (reentrant), ...".
std::string RecipeSummary(const sim::Recipe& recipe);

}  // namespace llmem::cli
