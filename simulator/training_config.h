// What one simulated training step looks like: numeric precision, optimizer, and the target that runs it
// (a GPU from the catalog, or this machine's CPU, which `llmem measure` can check).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "simulator/gpu_catalog.h"

namespace llmem::sim {

enum class Precision : uint8_t {
  kFp32,          // fp32 weights, activations, grads and optimizer states
  kBf16Autocast,  // fp32 weights/grads/states; matmuls run in bf16 under torch.autocast (AMP)
  kFp16Autocast,  // as above with fp16
  kBf16,          // pure bf16: weights, grads and optimizer states in bf16
};

enum class OptimizerKind : uint8_t {
  kAdamW,        // two states per parameter (exp_avg, exp_avg_sq)
  kSgdMomentum,  // one momentum buffer per parameter
};

// Which program's value lifetimes the forward follows (simulator/forward_lifetimes.h, Note [Eager lifetimes]).
enum class Lifetimes : uint8_t {
  kEager,        // eager PyTorch / Hugging Face in Python: values handed between module calls live in their frames
  kTorchScript,  // the TorchScript interpreter (what `llmem measure` runs): every value dies at its last use
};

std::optional<Precision> ParsePrecision(std::string_view name);  // fp32 | bf16-autocast | fp16-autocast | bf16
std::string_view PrecisionName(Precision p);
std::optional<OptimizerKind> ParseOptimizer(std::string_view name);  // adamw | sgd
std::string_view OptimizerName(OptimizerKind o);
std::optional<Lifetimes> ParseLifetimes(std::string_view name);  // eager | torchscript
std::string_view LifetimesName(Lifetimes l);

struct Target {
  bool is_cpu = false;  // true: predict what an instrumented CPU run of the same step allocates
  GpuSpec gpu;          // used when !is_cpu
  std::string name() const { return is_cpu ? "cpu" : gpu.name; }
};

struct TrainingConfig {
  Precision precision = Precision::kFp32;
  OptimizerKind optimizer = OptimizerKind::kAdamW;
  Lifetimes lifetimes = Lifetimes::kEager;
  Target target;
  bool allow_unknown_ops = false;  // estimate unknown ops conservatively instead of failing
  bool keep_labels = true;         // name every block of the timeline (for --trace and the peak's largest blocks);
                                   // sweeps that only need the figures turn it off
};

}  // namespace llmem::sim
