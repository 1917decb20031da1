// One forward of Hugging Face generation (GenerationMixin.generate, transformers 4.57) as a graph: the training
// export's forward rewritten to what the model runs under torch.no_grad() with a key/value cache and no padding.
//
// Note [Generation forward]
// For each decoder layer's attention (aten::scaled_dot_product_attention):
//   - its keys and values before repeat_kv, [B, kv_heads, S, D], are appended to the layer's DynamicCache entry:
//     `torch.cat([self.keys, key_states], dim=-2)` (cache_utils DynamicLayer.update) makes [B, kv, past + S, D],
//     a new tensor while the previous entry (a graph input of `past` tokens, none in the prefill) still exists,
//     which is dropped when the entry is rebound;
//   - the attention reads the cached tensors with no mask (create_causal_mask returns None for an unpadded
//     batch), so sdpa_attention_forward passes enable_gqa instead of repeat_kv copies and is_causal = S > 1.
// The mask's computation is then dead and goes, as does the loss. The LM head runs on the last position only
// (generate's logits_to_keep=1: `lm_head(hidden_states[:, -1:, :])`), and its [B, 1, V] logits are what the
// forward returns, in the model's dtype.
// Everything is frozen: no value requires grad.
#pragma once

#include <cstdint>
#include <vector>

#include "graph/graph.h"

namespace llmem {

struct GenerationForward {
  Graph graph;                   // its loss() is the logits
  std::vector<ValueId> past;     // graph inputs: per layer its cached keys, then its values (empty in a prefill)
  std::vector<ValueId> present;  // per layer the cache entries after this forward (keys, then values)
  ValueId logits;
};

// `graph` is the training export's graph built for B x S new tokens (S = the prompt for the prefill, 1 for a
// decode step); `past_tokens` the tokens already cached. Throws ConfigError when the graph has no attention op the
// rewrite recognizes or no LM head.
GenerationForward MakeGenerationForward(const Graph& graph, int64_t past_tokens);

}  // namespace llmem
