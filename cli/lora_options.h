// --lora r=R,alpha=A,dropout=P,targets=LIST and --lora-modules-to-save LIST: parsed into LoraSettings.
#pragma once

#include <optional>
#include <string>

#include "graph/lora_rewrite.h"
#include "graph/quantize_rewrite.h"
#include "simulator/recipe.h"

namespace llmem::cli {

// "r=8,alpha=16,dropout=0.05,targets=q_proj,v_proj" (targets last or not: a comma-separated entry without '='
// continues the list before it; `+` also separates targets). r defaults to 8, alpha to 16, dropout to 0 (PEFT's
// LoraConfig defaults). Throws ConfigError naming an entry that does not parse; ApplyLora checks the values.
LoraSettings ParseLoraOption(const std::string& text, const std::string& modules_to_save);

// --quant nf4|fp4|nf4-dq|fp4-dq (bitsandbytes 4-bit; -dq: double quantization) under the step's precision: the
// compute and load dtype are the precision's 16-bit dtype (fp32 under fp32), as BitsAndBytesConfig
// (bnb_4bit_compute_dtype) and from_pretrained(dtype=...) are set for QLoRA. Throws ConfigError naming the formats
// for another name, and for the formats this version does not model (int8, gptq, awq).
QuantSettings ParseQuantOption(const std::string& name, sim::Precision precision);

// The precision the step runs in once peft.prepare_model_for_kbit_training has cast every unquantized 16-bit
// parameter (embeddings, norms, LM head) to fp32: pure bf16 becomes an fp32 step around 16-bit 4-bit linears.
sim::Precision QuantizedStepPrecision(sim::Precision requested);

// Whether the PEFT setup calls enable_input_require_grads(): PeftModel does under any gradient checkpointing of an
// unquantized base; prepare_model_for_kbit_training does for a quantized one only with reentrant checkpointing
// (peft 0.21 utils/other.py; non-reentrant needs no hook).
bool EnablesInputRequireGrads(const sim::Checkpointing& checkpointing, bool quantized);

}  // namespace llmem::cli
