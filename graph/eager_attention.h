// Where a model that computes attention itself ("eager": scores = q @ k^T, softmax, probs @ v, as Hugging Face's
// GPT-Neo, CodeGen and BLOOM do; no scaled_dot_product_attention op) meets a key/value cache, read from its
// training graph.
//
// Note [Eager attention sites]
// Hugging Face's eager attention updates the cache between making the keys and values and using them
// (`key, value = layer_past.update(key, value, layer_idx)`), so a generation forward reads the cached tokens
// everywhere after that point, and every size the code takes from the keys (`key.size(-2)`, a mask sliced to the
// key length) follows. What the cache receives is found from the attention's two products: walking back from the
// score op's key operand (tokens its last dim) and the context op's value operand (tokens its second-to-last)
// through ops that only re-index or cast a tensor, the cached tensor is the earliest [batch, heads, tokens, dim]
// value there in the weights' dtype (CodeGen casts its fp32 rotary keys to the model's dtype before caching them,
// and both it and GPT-Neo cast to fp32 after).
// Two model-level tensors are made for the key length of the training forward and must be remade for the cache:
// the 4-D mask the layers slice to the key length ([B or 1, 1, S, >= S], made in the model's forward before its
// first layer), and, where the forward makes its own attention mask when given none (BLOOM's
// `torch.ones(batch, seq_length_with_past)`, from which it builds its mask and alibi), that [B, S] tensor.
#pragma once

#include <string>
#include <vector>

#include "graph/graph.h"

namespace llmem {

struct EagerAttention {
  ValueId keys;    // [B, kv_heads, S, D] as the layer's cache update receives them
  ValueId values;
  std::string scope;  // the attention module
};

struct EagerAttentionSites {
  std::vector<EagerAttention> layers;  // in op order, one per attention
  ValueId model_mask;      // the layers' 4-D mask; invalid when none
  ValueId attention_mask;  // the [B, S] mask the forward makes itself; invalid when none
};

// The sites of `g`'s eager attentions; no layers when it has none (or uses scaled_dot_product_attention). Throws
// ConfigError for a softmax in a decoder layer whose keys or values cannot be traced back to a cached tensor.
EagerAttentionSites FindEagerAttention(const Graph& g);

}  // namespace llmem
