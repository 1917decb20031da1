// TorchScript file -> IR. Loads an exported decoder LM whose forward(input_ids, labels) returns the training loss,
// inlines its forward graph and executes it op by op on the meta device at the requested batch and sequence
// length, recording every tensor's shape, dtype, storage sharing and requires_grad, and every op's module scope
// and region. Weights are never materialized: parameters are moved to (or already live on) the meta device.
// Traced and scripted files both work: scripted control flow (prim::If, prim::Loop) is followed where its
// conditions are values the meta run knows (None checks, flags, sizes), and refused where they need tensor data.
//
// It does not decide anything about memory; it only observes what PyTorch does.
//
// Usage:
//   auto model = llmem::TorchScriptModel::Load("llama.pt");     // throws ModelLoadError
//   llmem::Graph g = model.BuildGraph(/*batch=*/4, /*seq=*/512); // throws ModelLoadError / ConfigError
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "graph/module_tree.h"

namespace llmem {

class TorchScriptModel {
 public:
  // Loads the file. Throws ModelLoadError (one line) for a missing, unreadable or non-TorchScript file, or a
  // module without forward(input_ids, labels).
  static TorchScriptModel Load(const std::string& path);

  TorchScriptModel(TorchScriptModel&&) noexcept;
  TorchScriptModel& operator=(TorchScriptModel&&) noexcept;
  ~TorchScriptModel();

  // Runs the forward on meta at [batch, seq] and returns the IR. Throws ConfigError for batch/seq <= 0, sizes
  // whose byte counts overflow, or a sequence longer than the model's positions (a learned position table found
  // in the graph, else the max_position_embeddings of the config the export carries, else the override);
  // ModelLoadError when the graph cannot run (naming the op) or is not a decoder LM (bidirectional attention).
  Graph BuildGraph(int64_t batch, int64_t seq) const;

  // One forward of Hugging Face generation with `tokens` new tokens per sequence after `past_tokens` cached ones,
  // for a model whose attention is eager (q @ k^T, softmax, probs @ v; graph/eager_attention.h): the forward run
  // with each layer's DynamicCache update in place and the masks of the whole context, as generate() feeds it.
  // Its kv_cache() names the entries. For a model with scaled_dot_product_attention, BuildGraph(batch, tokens):
  // graph/generation_forward.h adds the cache to it. Throws as BuildGraph, and ConfigError for an attention whose
  // cache cannot be traced.
  Graph BuildGenerationGraph(int64_t batch, int64_t tokens, int64_t past_tokens) const;

  // Replaces the config's position limit, e.g. for RoPE scaled past it. A learned position table still bounds
  // the sequence: indexing past it fails in the real step. Throws ConfigError for n < 1.
  void set_max_positions(int64_t n);

  const std::string& path() const;
  // The sliding_window of the config the export carries, when the model attends within one (none otherwise).
  std::optional<int64_t> sliding_window() const;
  // Whether the config's layer_types mixes sliding-window and full-attention layers (Gemma-2/3).
  bool hybrid_attention_layers() const;
  // Whether the model's forward takes logits_to_keep (so generate() computes the prompt's logits at its last
  // position only), as the export's config record says; none for an export without the record.
  std::optional<bool> logits_to_keep() const;
  // Whether the generation config the export carries names an eos_token_id; none for an export without the record.
  std::optional<bool> eos_token() const;
  // Whether the model builds masking_utils' bool causal mask (create_causal_mask), not its own mask in the model's
  // dtype; none for an export without the record.
  std::optional<bool> bool_causal_mask() const;
  // Whether the forward without labels returns float32 logits whatever the weights' dtype (GPT-J, CodeGen cast the
  // LM head's output); none for an export without the record.
  std::optional<bool> float32_logits() const;
  // Whether the config has a base_model_tp_plan (transformers' tensor-parallel split); none without the record.
  std::optional<bool> tensor_parallel_plan() const;
  // The module classes from_pretrained(device_map="auto") keeps on one device (_no_split_modules); none without
  // the record.
  std::optional<std::vector<std::string>> no_split_modules() const;
  // A mixture-of-experts model's routing as the export traced it: every layer's experts and top-k, each expert
  // given tokens x top_k / experts rows (balanced); none for a dense model or an export without the record.
  struct MoeRouting {
    int64_t experts = 0;
    int64_t top_k = 0;
  };
  std::optional<MoeRouting> moe_routing() const;
  // The module hierarchy with every parameter and buffer in the file's dtype (graph/module_tree.h).
  const ModuleTree& module_tree() const;

 private:
  struct Impl;
  explicit TorchScriptModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmem
