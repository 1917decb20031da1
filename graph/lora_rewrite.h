// LoRA adapters on a base model's graph, as PEFT's LoraModel builds them (peft 0.21, tuners/lora/layer.py):
// one export serves every adapter choice.
//
// Note [LoRA forward]
// Every targeted linear module `m` (a module whose dotted name equals a target or ends in "." + target, PEFT's
// list matching; `all-linear`: every linear module but the output head) becomes
//     result = m.base_layer(x)                        the frozen base linear, unchanged
//     x' = x.to(A.dtype)                              PEFT's _cast_input_dtype: a copy only when the dtypes differ
//     x'' = m.lora_dropout(x')                        nn.Dropout(p); nn.Identity (no op) when p = 0
//     result = result + m.lora_B(m.lora_A(x'')) * scaling      out of place; scaling = alpha / r
//     result = result.to(base result dtype)           a copy only when the sum was promoted (fp32 adapters on a
//                                                     16-bit base)
// A is r x in and B is out x r, fp32 whatever the base dtype (get_peft_model's autocast_adapter_dtype upcasts
// 16-bit adapters), trainable. Every base parameter is frozen (requires_grad False: no gradient, no optimizer
// state), and requires_grad of every activation is derived again from what still requires grad.
// On a bitsandbytes 4-bit base (peft tuners/lora/bnb.py Linear4bit) the base result is cloned first ("defensively",
// PEFT's comment) and no final cast follows: outside autocast the adapter output is cast to the result's dtype
// instead, a no-op on the fp32 activations prepare_model_for_kbit_training leaves.
// `modules_to_save` modules get a trainable copy that the forward uses, in the base dtype, while the frozen
// original stays in memory (ModulesToSaveWrapper keeps both).
//
// Not modelled: DoRA, rsLoRA scaling, bias="all"/"lora_only" (biases stay frozen), layers_to_transform, PEFT's
// Conv1D adapters (GPT-2's attention and MLP are Conv1D, traced as addmm: they are not linear targets here).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/graph.h"

namespace llmem {

// Which PEFT layer wraps a target: how its forward combines the base result with the adapter output.
enum class LoraBaseLayer : uint8_t {
  kLinear,       // lora.Linear: result + adapter, then result.to(the base result's dtype)
  kBnb4bit,      // lora.bnb.Linear4bit: result.clone() + adapter, nothing cast back
  kBnb8bit,      // lora.bnb.Linear8bitLt: result + adapter (cast only outside autocast: a no-op on fp32 activations)
};

struct LoraSettings {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  std::vector<std::string> targets;          // module-name suffixes, or the single entry "all-linear"
  std::vector<std::string> modules_to_save;  // module-name suffixes whose linear gets a trainable copy
  LoraBaseLayer base_layer = LoraBaseLayer::kLinear;
  // torchtune's LoRALinear instead of PEFT's: lora_a / lora_b in the model's dtype, no cast of the input, the base
  // output plus (alpha / r) * lora_b(lora_a(dropout(x))), nothing cast back.
  bool torchtune = false;
  // enable_input_require_grads(): the token embeddings' output becomes a leaf that requires grad. PEFT turns it on
  // whenever gradient checkpointing is (PeftModel._prepare_model_for_gradient_checkpointing); for a quantized base
  // prepare_model_for_kbit_training does, with reentrant checkpointing only.
  bool input_requires_grad = false;
};

// The graph with adapters added and the base frozen. Throws ConfigError for settings out of range and for a
// target (or module to save) that matches no linear module, naming the modules there are.
Graph ApplyLora(const Graph& base, const LoraSettings& settings);

}  // namespace llmem
