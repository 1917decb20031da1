// The documented differences between the two targets an estimate can have: a CUDA GPU, or this machine's CPU
// (which `llmem measure` checks). Everything else the simulator does is shared, so every CPU validation also
// validates the GPU estimate, except for the rules listed here.
//
//  rule                      | cpu target (LibTorch on CPU)                  | gpu target (PyTorch on CUDA)
//  --------------------------+-----------------------------------------------+-----------------------------------------
//  attention kernel          | _scaled_dot_product_flash_attention_for_cpu:  | flash (16-bit) saves q,k,v,out + f32 lse
//                            | saves q,k,v,out, f32 lse [B,H,L] and the      | [B,H,L]; mem-efficient (fp32) also saves
//                            | float mask made from a bool mask              | the float mask, lse padded to 32 rows
//  autocast casts            | AutocastCPU op lists                          | AutocastCUDA op lists
//  dropout (p > 0)           | input * noise: saves a noise tensor in the    | native_dropout: saves a bool mask
//                            | input's dtype                                 |
//  layer_norm mean / rstd    | the input's dtype; float for a 16-bit input   | float (the accumulate type)
//                            | with fp32 weight or bias (param_scalar_type)  |
//  optimizer                 | torch::optim (C++), one parameter at a time:  | torch.optim foreach (default on CUDA):
//                            | AdamW keeps sqrt and denom of one parameter   | AdamW keeps sqrt of all exp_avg_sq
//  library workspaces        | none                                          | cuBLAS + cuBLASLt workspaces (persistent)
//  allocator                 | exact request sizes                           | CUDA caching allocator (512 B rounding,
//                            |                                               | segments, splitting)
//  fixed overhead            | none                                          | CUDA context (outside the allocator)
//
// Sources: the autocast columns of graph/op_registry.h (op lists), aten/src/ATen/native/Dropout.cpp (_dropout_impl vs
// native_dropout), aten/src/ATen/native/transformers/sdp_utils_cpp.cpp and attention.cpp (backend choice and saved
// tensors), aten/src/ATen/native/layer_norm.cpp and cuda/layer_norm_kernel.cu (mean / rstd dtypes; the CPU one
// measured with torch 2.11: bf16 input and weight give bf16 mean and rstd), torch/csrc/api/src/optim/adamw.cpp and torch/optim/adamw.py (_multi_tensor_adamw),
// aten/src/ATen/cuda/CublasHandlePool.cpp (workspaces).
#pragma once

#include <string_view>

#include "graph/dtype.h"
#include "simulator/training_config.h"

namespace llmem::sim {

enum class AutocastClass : uint8_t {
  kLowerPrecision,  // inputs cast to the autocast dtype
  kFp32,            // inputs cast to float32
  kPromote,         // runs in the widest input dtype
  kNone,            // not touched by autocast
};

enum class AttentionKernel : uint8_t {
  kCpuFlash,       // _scaled_dot_product_flash_attention_for_cpu
  kCudaFlash,      // _scaled_dot_product_flash_attention
  kCudaEfficient,  // _scaled_dot_product_efficient_attention
};

enum class DropoutImpl : uint8_t {
  kNoiseTensor,  // CPU: saves a noise tensor in the input dtype
  kBoolMask,     // CUDA: native_dropout saves a 1-byte mask
};

enum class OptimizerImpl : uint8_t {
  kPerParameter,  // C++ torch::optim loop: temporaries of one parameter at a time
  kForeach,       // Python foreach kernels: temporaries for the whole parameter group
};

struct BackendRules {
  bool cuda = false;
  DropoutImpl dropout = DropoutImpl::kNoiseTensor;
  OptimizerImpl optimizer = OptimizerImpl::kPerParameter;
  bool library_workspaces = false;  // cuBLAS/cuBLASLt workspaces allocated at the first matmul
  bool caching_allocator = false;
  int cpu_threads = 1;  // intra-op threads of a CPU target (per-thread kernel buffers)

  AutocastClass Autocast(std::string_view op_kind) const;
  // CUDA: flash attention takes 16-bit inputs without an explicit mask; fp32, or any explicit mask, takes the
  // memory-efficient kernel (sdp_utils.cpp: flash has no attn_mask support).
  AttentionKernel Attention(bool sixteen_bit, bool has_mask) const;
  // The dtype of native_layer_norm's saved mean and rstd for an input of dtype `input`; `fp32_params`: the weight
  // or the bias is fp32.
  DType LayerNormStats(DType input, bool fp32_params) const;
};

BackendRules RulesFor(const Target& target);

}  // namespace llmem::sim
