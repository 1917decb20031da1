// The 4-D causal mask a Hugging Face model with its own mask code (GPT-J's _update_causal_mask, copied into GPT-Neo,
// CodeGen, BLOOM and others; transformers 4.57) makes for eager attention when generate() passes its attention
// mask: `_prepare_4d_causal_attention_mask_with_cache_position`, run on meta, each op handed to the caller.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace llmem {

// Receives each op the mask code runs: its ATen kind, its arguments, its output.
using RecordOp = std::function<void(const char* kind, const std::vector<c10::IValue>& args, const at::Tensor& out)>;

// [batch, 1, tokens, past + tokens] in `dtype`: `attention_mask` is generate()'s [batch, past + tokens] mask.
at::Tensor MakeHfGenerationMask(const RecordOp& record, int64_t batch, int64_t tokens, int64_t past_tokens,
                                at::ScalarType dtype, const at::Tensor& attention_mask);

}  // namespace llmem
