#include "simulator/recipe.h"

#include <charconv>

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
  if (name == "sgd-nomomentum") return OptimizerKind::kSgdNoMomentum;
  if (name == "adafactor") return OptimizerKind::kAdafactor;
  if (name == "adamw8bit") return OptimizerKind::kAdamW8bit;
  if (name == "paged-adamw8bit") return OptimizerKind::kPagedAdamW8bit;
  return std::nullopt;
}

std::string_view OptimizerName(OptimizerKind o) {
  switch (o) {
    case OptimizerKind::kAdamW: return "adamw";
    case OptimizerKind::kSgdMomentum: return "sgd";
    case OptimizerKind::kSgdNoMomentum: return "sgd-nomomentum";
    case OptimizerKind::kAdafactor: return "adafactor";
    case OptimizerKind::kAdamW8bit: return "adamw8bit";
    case OptimizerKind::kPagedAdamW8bit: return "paged-adamw8bit";
  }
  return "?";
}

std::optional<Lifetimes> ParseLifetimes(std::string_view name) {
  if (name == "eager") return Lifetimes::kEager;
  if (name == "torchscript") return Lifetimes::kTorchScript;
  return std::nullopt;
}

std::string_view LifetimesName(Lifetimes l) {
  return l == Lifetimes::kEager ? "eager" : "torchscript";
}

namespace {

// A positive int after `prefix` ("every-4", "chunked-8"), or nullopt.
std::optional<int> SuffixCount(std::string_view name, std::string_view prefix) {
  if (name.substr(0, prefix.size()) != prefix) return std::nullopt;
  const std::string_view digits = name.substr(prefix.size());
  int n = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
  if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || n < 1) return std::nullopt;
  return n;
}

}  // namespace

std::optional<Checkpointing> ParseCheckpointing(std::string_view mode, std::string_view impl) {
  Checkpointing c;
  if (impl == "reentrant") {
    c.impl = CheckpointingImpl::kReentrant;
  } else if (impl == "non-reentrant") {
    c.impl = CheckpointingImpl::kNonReentrant;
  } else {
    return std::nullopt;
  }
  if (mode == "none") {
    c.mode = CheckpointingMode::kNone;
  } else if (mode == "full") {
    c.mode = CheckpointingMode::kFull;
  } else if (mode == "selective") {
    c.mode = CheckpointingMode::kSelective;
  } else if (const auto k = SuffixCount(mode, "every-")) {
    c.mode = CheckpointingMode::kEveryK;
    c.every_k = *k;
  } else {
    return std::nullopt;
  }
  return c;
}

std::string CheckpointingName(const Checkpointing& c) {
  switch (c.mode) {
    case CheckpointingMode::kNone: return "none";
    case CheckpointingMode::kFull: return "full";
    case CheckpointingMode::kEveryK: return "every-" + std::to_string(c.every_k);
    case CheckpointingMode::kSelective: return "selective";
  }
  return "?";
}

std::string_view CheckpointingImplName(CheckpointingImpl impl) {
  return impl == CheckpointingImpl::kReentrant ? "reentrant" : "non-reentrant";
}

std::optional<OptimizerImplChoice> ParseOptimizerImpl(std::string_view name) {
  if (name == "default") return OptimizerImplChoice::kDefault;
  if (name == "foreach") return OptimizerImplChoice::kForeach;
  if (name == "fused") return OptimizerImplChoice::kFused;
  if (name == "for-loop") return OptimizerImplChoice::kForLoop;
  return std::nullopt;
}

std::string_view OptimizerImplName(OptimizerImplChoice impl) {
  switch (impl) {
    case OptimizerImplChoice::kDefault: return "default";
    case OptimizerImplChoice::kForeach: return "foreach";
    case OptimizerImplChoice::kFused: return "fused";
    case OptimizerImplChoice::kForLoop: return "for-loop";
  }
  return "?";
}

std::optional<LossVariant> ParseLoss(std::string_view name, int& chunks) {
  chunks = 1;
  if (name == "standard") return LossVariant::kStandard;
  if (name == "fused-linear") return LossVariant::kFusedLinear;
  if (const auto n = SuffixCount(name, "chunked-")) {
    chunks = *n;
    return LossVariant::kChunked;
  }
  return std::nullopt;
}

std::string LossName(LossVariant loss, int chunks) {
  switch (loss) {
    case LossVariant::kStandard: return "standard";
    case LossVariant::kChunked: return "chunked-" + std::to_string(chunks);
    case LossVariant::kFusedLinear: return "fused-linear";
  }
  return "?";
}

}  // namespace llmem::sim
