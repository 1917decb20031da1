#include "cli/lora_options.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "graph/error.h"

namespace llmem::cli {
namespace {

std::vector<std::string> Split(const std::string& text, const std::string& separators) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : text) {
    if (separators.find(c) != std::string::npos) {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

double Number(const std::string& key, const std::string& value) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(value.c_str(), &end);
  if (value.empty() || end != value.c_str() + value.size() || errno != 0 || !std::isfinite(v)) {
    throw ConfigError("--lora " + key + "=" + value + " is not a number");
  }
  return v;
}

}  // namespace

LoraSettings ParseLoraOption(const std::string& text, const std::string& modules_to_save) {
  LoraSettings s;
  std::string last_key;
  for (const std::string& entry : Split(text, ",")) {
    const size_t eq = entry.find('=');
    if (eq == std::string::npos) {
      if (last_key != "targets" || entry.empty()) {
        throw ConfigError("--lora entry '" + entry + "' is not key=value (keys: r, alpha, dropout, targets)");
      }
      for (const auto& t : Split(entry, "+")) s.targets.push_back(t);
      continue;
    }
    const std::string key = entry.substr(0, eq), value = entry.substr(eq + 1);
    last_key = key;
    if (key == "r") {
      const double r = Number(key, value);
      // Bounded before the cast to an integer, which is undefined past int64's range.
      if (r < 1 || r > static_cast<double>(std::numeric_limits<int32_t>::max()) || r != std::floor(r)) {
        throw ConfigError("--lora r must be a positive integer, not " + value);
      }
      s.rank = static_cast<int64_t>(r);
    } else if (key == "alpha") {
      s.alpha = Number(key, value);
    } else if (key == "dropout") {
      s.dropout = Number(key, value);
    } else if (key == "targets") {
      for (const auto& t : Split(value, "+")) s.targets.push_back(t);
    } else {
      throw ConfigError("unknown --lora key '" + key + "' (keys: r, alpha, dropout, targets)");
    }
  }
  for (const auto& t : s.targets) {
    if (t.empty()) throw ConfigError("--lora targets has an empty module name");
  }
  if (!modules_to_save.empty()) {
    for (const auto& m : Split(modules_to_save, ",+")) {
      if (m.empty()) throw ConfigError("--lora-modules-to-save has an empty module name");
      s.modules_to_save.push_back(m);
    }
  }
  return s;  // ApplyLora checks the ranges and the targets
}

QuantSettings ParseQuantOption(const std::string& name, sim::Precision precision) {
  QuantSettings q;
  if (name == "torchao-nf4") {
    q.library = QuantLibrary::kTorchao;
    return q;
  }
  if (name == "nf4" || name == "nf4-dq") {
    q.format = QuantFormat::kNf4;
  } else if (name == "fp4" || name == "fp4-dq") {
    q.format = QuantFormat::kFp4;
  } else if (name == "int8") {
    q.format = QuantFormat::kInt8;
  } else if (name == "gptq-4" || name == "gptq-8") {
    q.library = QuantLibrary::kGptq;
    q.bits = name == "gptq-4" ? 4 : 8;
    return q;
  } else if (name.starts_with("awq")) {
    throw ConfigError("--quant " + name + " is not modelled: AutoAWQ 0.2.9, its last release, does not import under "
                      "transformers 4.57, and PEFT adapts AWQ layers only through gptqmodel 7, which needs "
                      "transformers 5");
  } else {
    throw ConfigError("unknown --quant '" + name + "' (nf4, fp4, nf4-dq, fp4-dq: bitsandbytes 4-bit, -dq with double "
                      "quantization; int8: bitsandbytes LLM.int8(); torchao-nf4: torchtune's QLoRA; gptq-4, gptq-8: "
                      "a GPTQ checkpoint, with --quant-group)");
  }
  q.double_quant = name.ends_with("-dq");
  switch (precision) {
    case sim::Precision::kFp32: q.compute_dtype = DType::kF32; break;
    case sim::Precision::kFp16Autocast: q.compute_dtype = DType::kF16; break;
    case sim::Precision::kBf16Autocast:
    case sim::Precision::kBf16: q.compute_dtype = DType::kBF16; break;
  }
  q.load_dtype = q.compute_dtype;
  return q;
}

bool EnablesInputRequireGrads(const sim::Checkpointing& checkpointing, bool quantized) {
  if (checkpointing.mode == sim::CheckpointingMode::kNone) return false;
  return !quantized || checkpointing.impl == sim::CheckpointingImpl::kReentrant;
}

std::optional<QuantSettings> ParseQuantOptions(const std::string& name, std::optional<int64_t> quant_group,
                                               sim::Precision precision) {
  std::optional<QuantSettings> q;
  if (!name.empty() && name != "none") q = ParseQuantOption(name, precision);
  if (quant_group) {
    if (!q || q->library != QuantLibrary::kGptq) {
      throw ConfigError("--quant-group applies to --quant gptq-4 and gptq-8 (bitsandbytes and torchao quantize in "
                        "fixed blocks of 64)");
    }
    q->group_size = *quant_group;
  }
  return q;
}

AdapterRecipe::AdapterRecipe(const std::string& lora, const std::string& modules_to_save, const std::string& quant,
                             std::optional<int64_t> quant_group, sim::Recipe& recipe) {
  if (lora.empty()) {
    if (!modules_to_save.empty()) throw ConfigError("--lora-modules-to-save needs --lora");
    if (!quant.empty()) throw ConfigError("--quant needs --lora: a quantized base is frozen, nothing would train");
    if (quant_group) throw ConfigError("--quant-group needs --quant gptq-4 or gptq-8");
    return;
  }
  lora_ = ParseLoraOption(lora, modules_to_save);
  quant_ = ParseQuantOptions(quant, quant_group, recipe.precision);
  if (quant_ && quant_->library == QuantLibrary::kGptq) {
    // PEFT's GPTQ layer combines like lora.Linear; prepare_model_for_kbit_training leaves a GPTQ model's dtypes.
    lora_->input_requires_grad = EnablesInputRequireGrads(recipe.checkpointing, true);
    assumption_ = "--quant " + QuantName(*quant_) + ": GPTQConfig(use_exllama=False) with gptqmodel 5's trainable "
                  "kernels (the whole weight dequantized per linear and kept for backward) and PEFT <= 0.18, the "
                  "stack that adapts GPTQ layers under transformers 4.x; modelled from the sources, not measured";
    return;
  }
  if (quant_ && quant_->library == QuantLibrary::kTorchao) {
    // torchtune's recipe: its LoRALinear, the model in one dtype, non-reentrant checkpointing without the hook.
    lora_->torchtune = true;
    if (recipe.checkpointing.mode != sim::CheckpointingMode::kNone &&
        recipe.checkpointing.impl == sim::CheckpointingImpl::kReentrant) {
      assumption_ = "--quant torchao-nf4 with reentrant checkpointing as asked: torchtune's own activation "
                    "checkpointing is non-reentrant (add --checkpointing-impl non-reentrant for its recipe)";
    }
  } else if (quant_) {
    lora_->base_layer =
        quant_->format == QuantFormat::kInt8 ? LoraBaseLayer::kBnb8bit : LoraBaseLayer::kBnb4bit;
    const bool int8 = quant_->format == QuantFormat::kInt8;
    if (recipe.precision == sim::Precision::kBf16) {
      assumption_ = std::string("--quant with --precision bf16: peft.prepare_model_for_kbit_training casts the "
                                "embeddings, norms and LM head to fp32, so activations between the quantized linears "
                                "are fp32") + (int8 ? "" : " (the 4-bit linears compute in bf16)");
    }
    if (int8) {
      assumption_ += std::string(assumption_.empty() ? "" : "; ") +
                     "--quant int8 on a GPU: no activation column above LLM.int8()'s outlier threshold 6.0 (each one "
                     "would keep 2 bytes per token more for backward)";
    }
    recipe.precision = QuantizedStepPrecision(recipe.precision);
  }
  lora_->input_requires_grad = !lora_->torchtune && EnablesInputRequireGrads(recipe.checkpointing, quant_.has_value());
}

std::string AdapterRecipe::ShardingAssumption() const {
  if (!quant_ || quant_->library != QuantLibrary::kBitsandbytes || quant_->format == QuantFormat::kInt8) return "";
  return "--quant under FSDP2: bnb_4bit_quant_storage set to the model's float dtype, as FSDP-QLoRA setups do (FSDP "
         "shards only floating parameters); the packed codes keep their bytes, sharded and gathered per layer like "
         "any frozen weight, and the quantization state stays whole on every rank";
}

std::string AdapterRecipe::UnsupportedLayout(int dp, int tp, bool gemini, bool fsdp2) const {
  if (!lora_) return "";
  // DDP and ZeRO-1 replicate the frozen base, FSDP2 shards and gathers it with the adapters; all of them reduce only
  // what requires grad.
  if (tp > 1) return "LoRA with tensor parallelism is not modelled yet";
  if (dp > 1 && gemini) return "LoRA under chunk-based ZeRO (Gemini) is not modelled yet";
  if (dp > 1 && quant_ && quant_->library == QuantLibrary::kTorchao) {
    return "--quant torchao-nf4 is modelled on one GPU (torchtune's FSDP2 all-gather of NF4 shards is not modelled "
           "yet)";
  }
  if (dp > 1 && fsdp2 && quant_ && quant_->library == QuantLibrary::kGptq) {
    return "--quant " + QuantName(*quant_) + " under FSDP2: gptqmodel keeps the packed weights as buffers, which FSDP "
           "does not shard; use --engine ddp or zero1";
  }
  if (dp > 1 && fsdp2 && quant_ && quant_->format == QuantFormat::kInt8) {
    return "--quant int8 under FSDP2: bitsandbytes' Int8Params are int8 tensors, which FSDP cannot shard; use "
           "--engine ddp or zero1, or a 4-bit --quant";
  }
  return "";
}

Graph AdapterRecipe::Apply(const Graph& graph) const {
  if (!lora_) return graph;
  Graph adapted = ApplyLora(graph, *lora_);
  return quant_ ? QuantizeLinears(adapted, *quant_) : adapted;
}

void AddAdapterJson(const AdapterRecipe& adapters, nlohmann::json& recipe) {
  const auto& lora = adapters.lora();
  if (!lora) return;
  recipe["lora"] = {{"r", lora->rank},
                    {"alpha", lora->alpha},
                    {"dropout", lora->dropout},
                    {"targets", lora->targets},
                    {"modules_to_save", lora->modules_to_save},
                    {"input_requires_grad", lora->input_requires_grad}};
  if (const auto& q = adapters.quant()) {
    if (q->library == QuantLibrary::kGptq) {
      recipe["quant"] = {{"format", QuantName(*q)},
                         {"library", "gptqmodel QuantLinear (trainable kernels)"},
                         {"bits", q->bits},
                         {"group_size", q->group_size}};
    } else if (q->format == QuantFormat::kInt8) {
      recipe["quant"] = {{"format", QuantName(*q)},
                         {"library", "bitsandbytes Linear8bitLt"},
                         {"threshold", 6.0},
                         {"outlier_columns_assumed", 0}};
    } else {
      recipe["quant"] = {{"format", QuantName(*q)},
                         {"library", q->library == QuantLibrary::kTorchao ? "torchao NF4Tensor (torchtune)"
                                                                          : "bitsandbytes Linear4bit"},
                         {"blocksize", q->blocksize},
                         {"compute_dtype", std::string(DTypeName(q->compute_dtype))}};
    }
  }
}

sim::Precision QuantizedStepPrecision(sim::Precision requested) {
  return requested == sim::Precision::kBf16 ? sim::Precision::kFp32 : requested;
}

}  // namespace llmem::cli
