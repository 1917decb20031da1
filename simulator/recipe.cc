#include "simulator/recipe.h"

namespace llmem::sim {

std::optional<Precision> ParsePrecision(std::string_view name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "bf16-autocast" || name == "amp-bf16") return Precision::kBf16Autocast;
  if (name == "fp16-autocast" || name == "amp-fp16") return Precision::kFp16Autocast;
  if (name == "bf16") return Precision::kBf16;
  return std::nullopt;
}

std::string_view PrecisionName(Precision p) {
  switch (p) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16Autocast: return "bf16-autocast";
    case Precision::kFp16Autocast: return "fp16-autocast";
    case Precision::kBf16: return "bf16";
  }
  return "?";
}

std::optional<OptimizerKind> ParseOptimizer(std::string_view name) {
  if (name == "adamw") return OptimizerKind::kAdamW;
  if (name == "sgd") return OptimizerKind::kSgdMomentum;
  return std::nullopt;
}

std::string_view OptimizerName(OptimizerKind o) {
  return o == OptimizerKind::kAdamW ? "adamw" : "sgd";
}

std::optional<Lifetimes> ParseLifetimes(std::string_view name) {
  if (name == "eager") return Lifetimes::kEager;
  if (name == "torchscript") return Lifetimes::kTorchScript;
  return std::nullopt;
}

std::string_view LifetimesName(Lifetimes l) {
  return l == Lifetimes::kEager ? "eager" : "torchscript";
}

}  // namespace llmem::sim
