#include "simulator/gpu_catalog.h"

#include "graph/dtype.h"

namespace llmem::sim {
namespace {
// CublasHandlePool.cpp default workspace: 4096 KiB x 2 + 16 KiB x 8 below Hopper, 32 MiB on sm90.
constexpr int64_t kCublasWorkspacePreHopper = 4096 * kKiB * 2 + 16 * kKiB * 8;
constexpr int64_t kCublasWorkspaceHopper = 32 * kMiB;
constexpr int64_t kCublasLtWorkspace = 1024 * kKiB;
// Lazy-loading CUDA context; see the header for the reported range. One value for every GPU: an assumption.
constexpr int64_t kCudaContext = 400 * kMiB;

GpuSpec Make(std::string name, std::string description, int64_t capacity_bytes, int cc, double tflops) {
  GpuSpec g;
  g.name = std::move(name);
  g.description = std::move(description);
  g.capacity_bytes = capacity_bytes;
  g.compute_capability = cc;
  g.cuda_context_bytes = kCudaContext;
  g.cublas_workspace_bytes = cc == 90 ? kCublasWorkspaceHopper : kCublasWorkspacePreHopper;
  g.cublaslt_workspace_bytes = kCublasLtWorkspace;
  g.bf16_tflops = tflops;
  return g;
}
}  // namespace

const std::vector<GpuSpec>& GpuCatalog() {
  // Capacities: total_memory as PyTorch reports it for each part (binary units as nvidia-smi shows them).
  static const std::vector<GpuSpec> catalog = {
      Make("v100-16", "NVIDIA V100 16GB", 16 * kGiB - 512 * kMiB, 70, 125),
      Make("v100-32", "NVIDIA V100 32GB", 32 * kGiB - 512 * kMiB, 70, 125),
      Make("a100-40", "NVIDIA A100 40GB", 40 * kGiB - 448 * kMiB, 80, 312),
      Make("a100-80", "NVIDIA A100 80GB", 80 * kGiB - 512 * kMiB, 80, 312),
      Make("h100-80", "NVIDIA H100 80GB", 80 * kGiB - 512 * kMiB, 90, 989),
      Make("h200-141", "NVIDIA H200 141GB", 141 * kGiB - 2 * kGiB, 90, 989),
      Make("l4-24", "NVIDIA L4 24GB", 23 * kGiB, 89, 121),
      Make("rtx4090-24", "NVIDIA GeForce RTX 4090 24GB", 24 * kGiB - 512 * kMiB, 89, 165),
  };
  return catalog;
}

std::optional<GpuSpec> FindGpu(std::string_view name) {
  for (const auto& g : GpuCatalog()) {
    if (g.name == name) return g;
  }
  return std::nullopt;
}

std::string GpuNames() {
  std::string s;
  for (const auto& g : GpuCatalog()) s += (s.empty() ? "" : ", ") + g.name;
  return s;
}

}  // namespace llmem::sim
