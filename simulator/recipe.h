// The training recipe: the user's choices that change a step's memory, independent of the model and the GPU.
// Passes (simulator/passes/) turn a recipe and a graph into a step plan (step_plan.h); nothing else reads the
// recipe's fields to decide what a step allocates.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "graph/dtype.h"

namespace llmem::sim {

enum class Precision : uint8_t {
  kFp32,          // fp32 weights, activations, grads and optimizer states
  kBf16Autocast,  // fp32 weights/grads/states; matmuls run in bf16 under torch.autocast (AMP)
  kFp16Autocast,  // as above with fp16
  kBf16,          // pure bf16: weights, grads and optimizer states in bf16
};

enum class OptimizerKind : uint8_t {
  kAdamW,           // torch.optim.AdamW: two states per parameter (exp_avg, exp_avg_sq)
  kSgdMomentum,      // torch.optim.SGD(momentum=0.9): one momentum buffer per parameter
  kSgdNoMomentum,    // torch.optim.SGD(momentum=0): no state
  kAdafactor,        // HF transformers Adafactor as Trainer's optim="adafactor" builds it: factored second moment
  kAdamW8bit,        // bitsandbytes AdamW(optim_bits=8) as Trainer's optim="adamw_bnb_8bit" builds it
  kPagedAdamW8bit,   // the same with is_paged=True: on CUDA the large states live in CUDA managed memory
};

// Which program's value lifetimes the forward follows (simulator/forward_lifetimes.h, Note [Eager lifetimes]).
enum class Lifetimes : uint8_t {
  kEager,        // eager PyTorch / Hugging Face in Python: values handed between module calls live in their frames
  kTorchScript,  // the TorchScript interpreter (what `llmem measure` runs): every value dies at its last use
};

// Activation checkpointing of decoder layers (torch.utils.checkpoint).
enum class CheckpointingMode : uint8_t {
  kNone,
  kFull,       // every decoder layer, as HF gradient_checkpointing_enable() wraps them
  kEveryK,     // every K-th decoder layer (torchtitan's selective layer AC)
  kSelective,  // torchtitan's op-level selective AC policy in every decoder layer
};
enum class CheckpointingImpl : uint8_t {
  kReentrant,     // use_reentrant=True: HF transformers' default
  kNonReentrant,  // use_reentrant=False: saved-tensor hooks (torchtitan, torch's recommended form)
};
struct Checkpointing {
  CheckpointingMode mode = CheckpointingMode::kNone;
  int every_k = 0;  // kEveryK only
  CheckpointingImpl impl = CheckpointingImpl::kReentrant;
};

enum class LossVariant : uint8_t {
  kStandard,     // the model's own loss: full logits, then the loss upcasts them (HF ForCausalLMLoss)
  kChunked,      // torchtune's CEWithChunkedOutputLoss: LM head and upcast per chunk of the sequence
  kFusedLinear,  // a fused linear + cross-entropy (Liger-style): the logits are never materialized
};

// Which kernels the optimizer step runs (torch.optim's foreach / fused / for-loop choice).
enum class OptimizerImplChoice : uint8_t {
  kDefault,   // the backend's default: foreach on CUDA (torch.optim), per parameter on the cpu target (torch::optim)
  kForeach,   // _foreach_* kernels over the whole parameter group
  kFused,     // one fused kernel per group (fused=True)
  kForLoop,   // one parameter at a time (foreach=False)
};

struct Recipe {
  Precision precision = Precision::kFp32;
  OptimizerKind optimizer = OptimizerKind::kAdamW;
  Lifetimes lifetimes = Lifetimes::kEager;
  OptimizerImplChoice optimizer_impl = OptimizerImplChoice::kDefault;
  Checkpointing checkpointing;
  int grad_accum = 1;  // micro-batches per optimizer step
  LossVariant loss = LossVariant::kStandard;
  int loss_chunks = 1;                  // kChunked only
  bool keep_outputs = false;            // the loop keeps the model's outputs alive through backward
  bool optimizer_in_backward = false;   // per-parameter step in a post-accumulate-grad hook
  std::optional<double> grad_clip;      // clip_grad_norm_ max norm before the step
  std::optional<DType> fsdp_param_dtype, fsdp_reduce_dtype;  // FSDP2 MixedPrecisionPolicy (FSDP2 rows only)
  // FSDP2 under gradient accumulation: reduce-scatter every micro-batch (torchtitan) instead of keeping the
  // unsharded gradients until the last one (accelerate's no_sync(), what HF Trainer runs).
  bool fsdp_reduce_every_micro_batch = false;
};

std::optional<Precision> ParsePrecision(std::string_view name);  // fp32 | bf16-autocast | fp16-autocast | bf16
std::string_view PrecisionName(Precision p);
std::optional<OptimizerKind> ParseOptimizer(std::string_view name);  // adamw | sgd | sgd-nomomentum | adafactor | adamw8bit | paged-adamw8bit
std::string_view OptimizerName(OptimizerKind o);
std::optional<Lifetimes> ParseLifetimes(std::string_view name);  // eager | torchscript
std::string_view LifetimesName(Lifetimes l);
std::optional<Checkpointing> ParseCheckpointing(std::string_view mode, std::string_view impl);  // none|full|every-K|selective
std::string CheckpointingName(const Checkpointing& c);  // "none", "full", "every-2", "selective"
std::string_view CheckpointingImplName(CheckpointingImpl impl);
std::optional<OptimizerImplChoice> ParseOptimizerImpl(std::string_view name);  // default|foreach|fused|for-loop
std::string_view OptimizerImplName(OptimizerImplChoice impl);
// standard | chunked-N | fused-linear; `chunks` gets N (1 otherwise).
std::optional<LossVariant> ParseLoss(std::string_view name, int& chunks);
std::string LossName(LossVariant loss, int chunks);

}  // namespace llmem::sim
