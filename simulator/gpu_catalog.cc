#include "simulator/gpu_catalog.h"

#include <algorithm>
#include <cctype>

#include "graph/dtype.h"

namespace llmem::sim {
namespace {
// CublasHandlePool.cpp default workspace: 4096 KiB x 2 + 16 KiB x 8 below Hopper, 32 MiB on sm90.
constexpr int64_t kCublasWorkspacePreHopper = 4096 * kKiB * 2 + 16 * kKiB * 8;
constexpr int64_t kCublasWorkspaceHopper = 32 * kMiB;
constexpr int64_t kCublasLtWorkspace = 1024 * kKiB;
// Lazy-loading CUDA context; see the header for the reported range. One value for every GPU: an assumption.
constexpr int64_t kCudaContext = 400 * kMiB;

// What a roofline needs of a GPU: dense peaks in TFLOP/s, memory bandwidth in GB/s, the default intra-node link.
struct Throughput {
  double bf16_tflops;
  double fp16_tflops;
  double tf32_tflops;
  double fp32_tflops;
  double memory_gb_per_s;
  const char* intra_node_link;
  bool bf16_tensor_cores = true;
};

GpuSpec Make(std::string name, std::string description, int64_t capacity_bytes, int cc, const Throughput& t,
             std::vector<std::string> device_names) {
  GpuSpec g;
  g.device_names = std::move(device_names);
  g.name = std::move(name);
  g.description = std::move(description);
  g.capacity_bytes = capacity_bytes;
  g.compute_capability = cc;
  g.cuda_context_bytes = kCudaContext;
  g.cublas_workspace_bytes = cc == 90 ? kCublasWorkspaceHopper : kCublasWorkspacePreHopper;
  g.cublaslt_workspace_bytes = kCublasLtWorkspace;
  g.bf16_tflops = t.bf16_tflops;
  g.fp16_tflops = t.fp16_tflops;
  g.tf32_tflops = t.tf32_tflops;
  g.fp32_tflops = t.fp32_tflops;
  g.bf16_tensor_cores = t.bf16_tensor_cores;
  g.memory_bandwidth_gb_per_s = t.memory_gb_per_s;
  g.intra_node_link = t.intra_node_link;
  return g;
}

// Datasheet figures (see the header for the documents). Columns: bf16, fp16, tf32, fp32 TFLOP/s; GB/s; link.
// V100 SXM2: "Tensor Performance 125 TFLOPS" (fp16), "Single-Precision 15.7 TFLOPS", 900 GB/s, "NVLink 300 GB/s"
//   (NVLink 2). No bf16 or tf32 tensor cores.
constexpr Throughput kV100Sxm2{125, 125, 0, 15.7, 900, "nvlink2", /*bf16_tensor_cores=*/false};
// A100 SXM4: BF16/FP16 Tensor Core 312, TF32 Tensor Core 156, FP32 19.5; 40GB: 1,555 GB/s, 80GB SXM: 2,039 GB/s;
//   "NVLink: 600 GB/s" (NVLink 3).
constexpr Throughput kA100Sxm40{312, 312, 156, 19.5, 1555, "nvlink3"};
constexpr Throughput kA100Sxm80{312, 312, 156, 19.5, 2039, "nvlink3"};
// H100 SXM5: BF16/FP16 Tensor Core 1,979 and TF32 989 with sparsity (dense: half), FP32 67; 3.35 TB/s;
//   "NVLink: 900 GB/s" (NVLink 4).
constexpr Throughput kH100Sxm{989, 989, 494.5, 67, 3350, "nvlink4"};
// H200 SXM: the H100's compute figures; 4.8 TB/s of HBM3e; NVLink 900 GB/s.
constexpr Throughput kH200Sxm{989, 989, 494.5, 67, 4800, "nvlink4"};
// L4: BF16/FP16 Tensor Core 242 and TF32 120 with sparsity (dense: half), FP32 30.3; 300 GB/s; PCIe Gen4 x16.
constexpr Throughput kL4{121, 121, 60, 30.3, 300, "pcie4"};
// RTX 4090 (Ada whitepaper): FP16/BF16 tensor with FP32 accumulate 165.2, TF32 tensor 82.6, FP32 82.6; 1,008 GB/s;
//   PCIe Gen4 x16 and no NVLink. GeForce drivers also disable PCIe peer-to-peer, so NCCL goes through host
//   memory: pcie4 is an upper bound there.
constexpr Throughput kRtx4090{165, 165.2, 82.6, 82.6, 1008, "pcie4"};
}  // namespace

const std::vector<GpuSpec>& GpuCatalog() {
  // Capacities: total_memory as PyTorch reports it for each part (binary units as nvidia-smi shows them).
  static const std::vector<GpuSpec> catalog = {
      Make("v100-16", "NVIDIA V100 16GB", 16 * kGiB - 512 * kMiB, 70, kV100Sxm2, {"Tesla V100-SXM2-16GB"}),
      Make("v100-32", "NVIDIA V100 32GB", 32 * kGiB - 512 * kMiB, 70, kV100Sxm2, {"Tesla V100-SXM2-32GB"}),
      Make("a100-40", "NVIDIA A100 40GB", 40 * kGiB - 448 * kMiB, 80, kA100Sxm40, {"NVIDIA A100-SXM4-40GB"}),
      Make("a100-80", "NVIDIA A100 80GB", 80 * kGiB - 512 * kMiB, 80, kA100Sxm80, {"NVIDIA A100-SXM4-80GB"}),
      Make("h100-80", "NVIDIA H100 80GB", 80 * kGiB - 512 * kMiB, 90, kH100Sxm, {"NVIDIA H100 80GB HBM3"}),
      Make("h200-141", "NVIDIA H200 141GB", 141 * kGiB - 2 * kGiB, 90, kH200Sxm, {"NVIDIA H200"}),
      Make("l4-24", "NVIDIA L4 24GB", 23 * kGiB, 89, kL4, {"NVIDIA L4"}),
      Make("rtx4090-24", "NVIDIA GeForce RTX 4090 24GB", 24 * kGiB - 512 * kMiB, 89, kRtx4090,
           {"NVIDIA GeForce RTX 4090"}),
  };
  return catalog;
}

namespace {
// Lower case without the vendor prefix nvidia-smi puts before the product ("NVIDIA ", older parts "Tesla ").
std::string NormalizedGpuName(std::string_view name) {
  std::string n(name);
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (std::string_view prefix : {"nvidia ", "tesla "}) {
    if (n.starts_with(prefix)) n.erase(0, prefix.size());
  }
  return n;
}
}  // namespace

std::optional<GpuSpec> FindGpu(std::string_view name) {
  const std::string wanted = NormalizedGpuName(name);
  for (const auto& g : GpuCatalog()) {
    if (NormalizedGpuName(g.name) == wanted) return g;
    for (const auto& device_name : g.device_names) {
      if (NormalizedGpuName(device_name) == wanted) return g;
    }
  }
  return std::nullopt;
}

std::string GpuNames() {
  std::string s;
  for (const auto& g : GpuCatalog()) s += (s.empty() ? "" : ", ") + g.name;
  return s;
}

}  // namespace llmem::sim
