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
  double bf16_tflops = 0;            // dense peak, for later cost models
};

const std::vector<GpuSpec>& GpuCatalog();
std::optional<GpuSpec> FindGpu(std::string_view name);
std::string GpuNames();  // "v100-16, v100-32, ..."

}  // namespace llmem::sim
