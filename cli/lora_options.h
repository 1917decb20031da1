// --lora r=R,alpha=A,dropout=P,targets=LIST and --lora-modules-to-save LIST: parsed into LoraSettings.
#pragma once

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "graph/lora_rewrite.h"
#include "graph/quantize_rewrite.h"
#include "simulator/recipe.h"

namespace llmem::cli {

// "r=8,alpha=16,dropout=0.05,targets=q_proj,v_proj" (targets last or not: a comma-separated entry without '='
// continues the list before it; `+` also separates targets). r defaults to 8, alpha to 16, dropout to 0 (PEFT's
// LoraConfig defaults). Throws ConfigError naming an entry that does not parse; ApplyLora checks the values.
LoraSettings ParseLoraOption(const std::string& text, const std::string& modules_to_save);

// --quant nf4|fp4|nf4-dq|fp4-dq (bitsandbytes 4-bit; -dq: double quantization), int8 (bitsandbytes LLM.int8()),
// torchao-nf4 (torchtune) or gptq-4 / gptq-8 (group size 128 unless --quant-group says otherwise) under the step's
// precision: the 4-bit compute and load dtype are the precision's 16-bit dtype (fp32 under fp32), as
// BitsAndBytesConfig (bnb_4bit_compute_dtype) and from_pretrained(dtype=...) are set for QLoRA. Throws ConfigError
// naming the formats for another name.
QuantSettings ParseQuantOption(const std::string& name, sim::Precision precision);

// --quant ("" or none: nullopt) with --quant-group applied, which only a GPTQ format takes (ConfigError otherwise).
std::optional<QuantSettings> ParseQuantOptions(const std::string& name, std::optional<int64_t> quant_group,
                                               sim::Precision precision);

// The precision the step runs in once peft.prepare_model_for_kbit_training has cast every unquantized 16-bit
// parameter (embeddings, norms, LM head) to fp32: pure bf16 becomes an fp32 step around 16-bit 4-bit linears.
sim::Precision QuantizedStepPrecision(sim::Precision requested);

// Whether the PEFT setup calls enable_input_require_grads(): PeftModel does under any gradient checkpointing of an
// unquantized base; prepare_model_for_kbit_training does for a quantized one only with reentrant checkpointing
// (peft 0.21 utils/other.py; non-reentrant needs no hook).
bool EnablesInputRequireGrads(const sim::Checkpointing& checkpointing, bool quantized);

// The LoRA / QLoRA part of a step, parsed once and applied to the graph of every shape a command builds.
class AdapterRecipe {
 public:
  AdapterRecipe() = default;
  // From --lora, --lora-modules-to-save, --quant ("" when absent) and --quant-group. Sets `recipe.precision` to the
  // precision the QLoRA step runs in. Throws ConfigError for a bad option, for --lora-modules-to-save, --quant or
  // --quant-group without --lora.
  AdapterRecipe(const std::string& lora, const std::string& modules_to_save, const std::string& quant,
                std::optional<int64_t> quant_group, sim::Recipe& recipe);

  bool active() const { return lora_.has_value(); }
  const std::optional<LoraSettings>& lora() const { return lora_; }
  const std::optional<QuantSettings>& quant() const { return quant_; }
  // What the step assumes beyond the options ("" when nothing): QLoRA's fp32 activations under --precision bf16.
  const std::string& assumption() const { return assumption_; }
  // What a sharded layout assumes of the quantized base ("" when nothing): FSDP2 shards bitsandbytes' 4-bit codes
  // only when they are stored in a float dtype.
  std::string ShardingAssumption() const;
  // Why `plan`'s engine cannot run these adapters yet ("" when it can).
  std::string UnsupportedLayout(int dp, int tp, bool gemini, bool fsdp2) const;
  // The graph with adapters added and the base frozen (and quantized).
  Graph Apply(const Graph& graph) const;

 private:
  std::optional<LoraSettings> lora_;
  std::optional<QuantSettings> quant_;
  std::string assumption_;
};

// recipe["lora"] and, with --quant, recipe["quant"]: the settings as the step runs them.
void AddAdapterJson(const AdapterRecipe& adapters, nlohmann::json& recipe);

}  // namespace llmem::cli
