// GPUs llmem knows: memory capacity and the fixed costs every PyTorch process pays on them.
//
// Figures and sources:
// - capacity: the vendor's memory size as torch.cuda.get_device_properties().total_memory reports it
//   (16/32/40/80/141/24 GB parts; the GiB figures below are the usual nvidia-smi readings).
// - cuda_context_bytes: CUDA context with lazy module loading (PyTorch >= 1.13 sets CUDA_MODULE_LOADING=LAZY);
//   reported between 256 MiB and 426 MiB depending on GPU and CUDA version (pytorch#107667, pytorch#109888,
//   unsloth-zoo#1053, InvokeAI#9413). Not measured per GPU here: a named, printed assumption.
// - cublas_workspace_bytes: aten/src/ATen/cuda/CublasHandlePool.cpp: 32 MiB on compute capability 9.0, else
//   4096 KiB x 2 + 16 KiB x 8 = 8,519,680 B; allocated through the caching allocator at the first matmul.
// - cublaslt_workspace_bytes: CUBLASLT_WORKSPACE_SIZE default 1024 KiB, also from the caching allocator.
// - Throughput (for the step-time roofline): dense peaks, without 2:4 sparsity, from NVIDIA's datasheets: "NVIDIA
//   Tesla V100 GPU Accelerator" (SXM2), "NVIDIA A100 Tensor Core GPU" (SXM4), "NVIDIA H100 Tensor Core GPU" (SXM5),
//   "NVIDIA H200 Tensor Core GPU" (SXM), "NVIDIA L4 Tensor Core GPU", and for the RTX 4090 the "NVIDIA Ada GPU
//   Architecture" whitepaper (appendix table; tensor figures with FP32 accumulate, which PyTorch uses). Where a
//   datasheet quotes only the sparse figure (H100, H200, L4 tensor cores) the dense one is half of it. Memory
//   bandwidth is the datasheet's GB/s (1e9 B/s). The catalog keys name no form factor: the 16/32 GB V100s, the A100s
//   and the H100 are taken as SXM parts (NVLink), whose capacities and peaks these are.
// - device_names: what `nvidia-smi --query-gpu=name` (and torch.cuda.get_device_name) prints for that part, as it
//   appears in NVIDIA's driver PCI-id table comments (V100: "Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB") and in
//   cloud providers' GPU type lists, which are those names verbatim (RunPod: "NVIDIA A100-SXM4-80GB", "NVIDIA
//   H100 80GB HBM3", "NVIDIA H200", "NVIDIA L4", "NVIDIA GeForce RTX 4090"). Only the form factor whose figures
//   the entry holds is listed: a PCIe A100 or H100 has other bandwidth and clocks, so its name stays unknown.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace llmem::sim {

struct GpuSpec {
  std::string name;                  // catalog key, e.g. "a100-80"
  std::string description;           // "NVIDIA A100 80GB"
  int64_t capacity_bytes = 0;        // total device memory
  int compute_capability = 0;        // 70, 80, 89, 90
  int64_t cuda_context_bytes = 0;    // outside the caching allocator
  int64_t cublas_workspace_bytes = 0;
  int64_t cublaslt_workspace_bytes = 0;
  double bf16_tflops = 0;            // dense bf16 tensor-core peak, TFLOP/s (see bf16_tensor_cores)
  double fp16_tflops = 0;            // dense fp16 tensor-core peak with fp32 accumulate, TFLOP/s
  double tf32_tflops = 0;            // dense tf32 tensor-core peak, TFLOP/s; 0 where there is none (Volta)
  double fp32_tflops = 0;            // fp32 peak of the CUDA cores (no tensor cores), TFLOP/s
  bool bf16_tensor_cores = true;     // false on Volta: bf16 matmuls do not run on tensor cores, whatever
                                     // bf16_tflops says (that figure is the fp16 one there)
  double memory_bandwidth_gb_per_s = 0;  // device memory (HBM or GDDR) peak, GB/s = 1e9 B/s
  std::string intra_node_link;       // default GPU-to-GPU link inside a node, e.g. "nvlink3": a key of the
                                     // interconnect catalog (distributed/interconnect.h)
  std::vector<std::string> device_names;  // names nvidia-smi prints for this part, e.g. "NVIDIA A100-SXM4-80GB"
};

const std::vector<GpuSpec>& GpuCatalog();
// By catalog key or by a name nvidia-smi prints, ignoring case (and a leading "NVIDIA "/"Tesla "), so "A100-80",
// "NVIDIA A100-SXM4-80GB" and "a100-sxm4-80gb" all find a100-80.
std::optional<GpuSpec> FindGpu(std::string_view name);
std::string GpuNames();  // "v100-16, v100-32, ..."

}  // namespace llmem::sim
