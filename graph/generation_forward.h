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
// generate() feeds position ids per sequence ([B, S], `attention_mask.long().cumsum(-1) - 1`) where the training
// forward broadcasts `cache_position.unsqueeze(0)` ([1, S]): that value becomes a graph input of B rows, and what
// is computed from it (RoPE's frequencies, cos and sin; learned position embeddings) gets B rows where it had 1.
// With a StaticCache (cache_implementation="static", transformers 4.57 StaticLayer) each layer's keys and values are
// zeros of the whole length L = P + N - 1, made at the layer's first update (the prefill), and each forward copies
// its new tokens in place (`index_copy_`); the attention reads all L positions. A StaticCache is compileable, so
// create_causal_mask never skips the mask: every forward makes a bool [B, 1, S, L], held by the model's forward
// (models with their own _update_causal_mask, as OPT, are refused: not modelled); with a mask HF's
// sdpa_attention_forward passes no enable_gqa, so repeat_kv copies the keys and values to every query head (a view
// where there is one key/value head).
// A model that attends within a window of W tokens (Mistral) gets a DynamicSlidingWindowLayer per layer: each
// forward concatenates the kept tokens with its new ones and keeps a view of the last W - 1, so the cache holds the
// storage of the previous forward's whole tensor; once the keys reach the window the mask cannot be skipped
// (create_sliding_window_causal_mask), and with it come the repeat_kv copies.
// The mask's computation is then dead and goes, as does the loss. When the model's forward takes logits_to_keep,
// generate() passes 1 and the LM head runs on the last position only (`lm_head(hidden_states[:, -1:, :])`, [B, 1, V]
// logits); a forward without it (OPT, GPT-BigCode in transformers 4.57) computes [B, S, V] logits, of which the loop
// copies the last position (`outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)`) while the full logits
// live until `del outputs`. The logits are what the forward returns, in the model's dtype.
// Everything is frozen: no value requires grad.
#pragma once

#include <cstdint>
#include <vector>

#include "graph/graph.h"

namespace llmem {

// What the model's generation loop does around the forward, from its forward's signature and generation config.
enum class CacheKind : uint8_t {
  kDynamic,  // DynamicCache: each layer's entry grows by torch.cat
  kStatic,   // StaticCache (cache_implementation="static"): entries of the whole length, updated in place
};

struct GenerationLoop {
  CacheKind cache = CacheKind::kDynamic;
  int64_t static_cache_tokens = 0;    // kStatic: the entries' length (generate()'s max_length - 1 = P + N - 1)
  int64_t sliding_window = 0;         // kDynamic: W > 0 when every layer attends within W tokens
                                      // (DynamicSlidingWindowLayer keeps the last W - 1)
  int64_t previous_tokens = 0;        // with a window: the tokens the previous forward fed (its full tensor's
                                      // storage stays under the kept view)
  bool last_position_logits = true;   // the forward takes logits_to_keep
  bool float32_logits = false;        // the forward casts the LM head's output to float32 (GPT-J, CodeGen)
  bool min_length_processors = true;  // an eos_token_id: min_new_tokens makes generate() add MinLengthLogitsProcessor
                                      // and MinNewTokensLengthLogitsProcessor (without one it adds neither)
};

struct GenerationForward {
  Graph graph;                   // its loss() is the logits
  std::vector<ValueId> past;     // graph inputs: per layer its cached keys, then its values (empty in a prefill)
  std::vector<ValueId> present;  // per layer the cache entries after this forward (keys, then values)
  ValueId logits;
};

// `graph` is the training export's graph built for B x S new tokens (S = the prompt for the prefill, 1 for a
// decode step); `past_tokens` the tokens already cached. Throws ConfigError when the graph has no attention op the
// rewrite recognizes or no LM head.
GenerationForward MakeGenerationForward(const Graph& graph, int64_t past_tokens, const GenerationLoop& loop);

}  // namespace llmem
