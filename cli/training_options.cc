#include "cli/training_options.h"

#include "graph/error.h"

namespace llmem::cli {

sim::TrainingConfig ParseTrainingConfig(const std::string& precision, const std::string& optimizer,
                                        const std::string& target) {
  sim::TrainingConfig cfg;
  auto p = sim::ParsePrecision(precision);
  if (!p) throw ConfigError("unknown precision '" + precision + "' (fp32, bf16-autocast, fp16-autocast, bf16)");
  auto o = sim::ParseOptimizer(optimizer);
  if (!o) throw ConfigError("unknown optimizer '" + optimizer + "' (adamw, sgd)");
  cfg.precision = *p;
  cfg.optimizer = *o;
  if (target == "cpu") {
    cfg.target.is_cpu = true;
  } else {
    auto gpu = sim::FindGpu(target);
    if (!gpu) throw ConfigError("unknown GPU '" + target + "' (known: " + sim::GpuNames() + ", cpu)");
    cfg.target.gpu = *gpu;
  }
  return cfg;
}

sim::Lifetimes ParseLifetimesOption(const std::string& name) {
  auto l = sim::ParseLifetimes(name);
  if (!l) throw ConfigError("unknown lifetimes '" + name + "' (eager, torchscript)");
  return *l;
}

}  // namespace llmem::cli
