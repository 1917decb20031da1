// What one simulated training step looks like: the recipe (recipe.h) and the target that runs it (a GPU from the
// catalog, or this machine's CPU, which `llmem measure` can check).
#pragma once

#include <string>

#include "simulator/gpu_catalog.h"
#include "simulator/recipe.h"

namespace llmem::sim {

struct Target {
  bool is_cpu = false;  // true: predict what an instrumented CPU run of the same step allocates
  int cpu_threads = 1;  // with is_cpu: PyTorch's intra-op threads (at::get_num_threads()), which per-thread kernel
                        // buffers scale with
  GpuSpec gpu;          // used when !is_cpu
  std::string name() const { return is_cpu ? "cpu" : gpu.name; }
};

struct TrainingConfig : Recipe {
  Target target;
  bool allow_unknown_ops = false;  // estimate unknown ops conservatively instead of failing
  bool keep_labels = true;         // name every block of the timeline (for --trace and the peak's largest blocks);
                                   // sweeps that only need the figures turn it off
};

}  // namespace llmem::sim
