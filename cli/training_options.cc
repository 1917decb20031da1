#include "cli/training_options.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "graph/dtype.h"
#include "graph/error.h"
#include "measure/torch_threads.h"

namespace llmem::cli {

sim::TrainingConfig ParseTrainingConfig(const std::string& precision, const std::string& optimizer,
                                        const std::string& target, const std::string& gpu_memory) {
  sim::TrainingConfig cfg;
  auto p = sim::ParsePrecision(precision);
  if (!p) throw ConfigError("unknown precision '" + precision + "' (fp32, bf16-autocast, fp16-autocast, bf16)");
  auto o = sim::ParseOptimizer(optimizer);
  if (!o) throw ConfigError("unknown optimizer '" + optimizer + "' (adamw, sgd, sgd-nomomentum, adafactor, adamw8bit, paged-adamw8bit)");
  cfg.precision = *p;
  cfg.optimizer = *o;
  if (target == "cpu") {
    if (!gpu_memory.empty()) throw ConfigError("--gpu-memory needs a GPU target, not --gpu cpu");
    cfg.target.is_cpu = true;
    cfg.target.cpu_threads = measure::TorchIntraOpThreads();  // what a PyTorch process here runs with
  } else {
    auto gpu = sim::FindGpu(target);
    if (!gpu) {
      throw ConfigError("unknown GPU '" + target + "' (known: " + sim::GpuNames() +
                        ", cpu; for another GPU, name the nearest with --gpu and its memory with --gpu-memory)");
    }
    cfg.target.gpu = *gpu;
    if (!gpu_memory.empty()) {
      const int64_t capacity = ParseByteSize(gpu_memory);
      if (capacity <= gpu->cuda_context_bytes) {
        throw ConfigError("--gpu-memory " + gpu_memory + " does not even hold the CUDA context (" +
                          FormatBytes(gpu->cuda_context_bytes) + ")");
      }
      cfg.target.gpu.capacity_bytes = capacity;
    }
  }
  return cfg;
}

int64_t ParseByteSize(const std::string& text) {
  static const std::pair<const char*, double> kUnits[] = {
      {"B", 1},           {"KiB", 0x1p10}, {"MiB", 0x1p20}, {"GiB", 0x1p30}, {"TiB", 0x1p40},
      {"KB", 1e3},        {"MB", 1e6},     {"GB", 1e9},     {"TB", 1e12},
  };
  const std::string bad = "invalid memory size '" + text + "' (expected a number and a unit: 24GiB, 81920MiB, 80GB)";
  const char* begin = text.c_str();
  char* end = nullptr;
  const double number = std::strtod(begin, &end);
  if (end == begin || !std::isdigit(static_cast<unsigned char>(*begin))) throw ConfigError(bad);
  std::string unit(end);
  while (!unit.empty() && unit.front() == ' ') unit.erase(0, 1);
  for (const auto& [name, factor] : kUnits) {
    if (unit != name) continue;
    const double bytes = number * factor;
    // 2^63 is the first double past int64's range.
    if (!std::isfinite(bytes) || bytes < 1 || bytes >= 0x1p63) throw ConfigError(bad);
    return static_cast<int64_t>(bytes);
  }
  throw ConfigError(bad);
}

std::string GpuMemoryAssumption(const std::string& gpu) {
  return "capacity from --gpu-memory; CUDA context, cuBLAS workspaces, compute capability and throughput of " + gpu +
         " assumed";
}

sim::Lifetimes ParseLifetimesOption(const std::string& name) {
  auto l = sim::ParseLifetimes(name);
  if (!l) throw ConfigError("unknown lifetimes '" + name + "' (eager, torchscript)");
  return *l;
}

std::string MoeRoutingAssumption(const DecoderModel::MoeRouting& moe) {
  const std::string balanced = "tokens x " + std::to_string(moe.top_k) + " / " + std::to_string(moe.experts) + " rows";
  if (moe.busiest > 1.0) {
    char f[32];
    std::snprintf(f, sizeof(f), "%g", moe.busiest);
    return std::string("mixture of experts: routing taken as imbalanced, the busiest of the ") +
           std::to_string(moe.experts) + " experts of a layer gets " + f + " x " + balanced +
           " and the others share the rest (--moe-imbalance; what autograd keeps over a layer does not depend on the "
           "routing; the busiest expert's transient peak does)";
  }
  return "mixture of experts: routing taken as balanced, each of the " + std::to_string(moe.experts) +
         " experts of a layer gets " + balanced +
         " (what autograd keeps over a layer does not depend on the routing; the busiest expert's transient peak "
         "does; --moe-imbalance F bounds a router that favours one)";
}

}  // namespace llmem::cli
