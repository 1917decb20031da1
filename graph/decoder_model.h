// A loaded decoder LM export, whichever file format it came in: what the simulator asks of it (the IR at a batch and
// sequence length, a generation forward's IR) and what the export's records say about the model.
//
// Usage:
//   std::unique_ptr<llmem::DecoderModel> model = llmem::LoadDecoderModel("llama.pt");  // or "llama.pt2"
//   llmem::Graph g = model->BuildGraph(/*batch=*/4, /*seq=*/512);
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "graph/export_records.h"
#include "graph/graph.h"
#include "graph/module_tree.h"

namespace llmem {

class DecoderModel {
 public:
  using MoeRouting = llmem::MoeRouting;
  virtual ~DecoderModel() = default;

  // Runs the forward on meta at [batch, seq] and returns the IR. Throws ConfigError for batch/seq <= 0, sizes
  // whose byte counts overflow, or a sequence longer than the model's positions (a learned position table found
  // in the graph, else the max_position_embeddings of the config the export carries, else the override);
  // ModelLoadError when the graph cannot run (naming the op) or is not a decoder LM (bidirectional attention).
  virtual Graph BuildGraph(int64_t batch, int64_t seq) const = 0;

  // One forward of Hugging Face generation with `tokens` new tokens per sequence after `past_tokens` cached ones,
  // for a model whose attention is eager (q @ k^T, softmax, probs @ v; graph/eager_attention.h): the forward run
  // with each layer's DynamicCache update in place and the masks of the whole context, as generate() feeds it.
  // Its kv_cache() names the entries. For a model with scaled_dot_product_attention, BuildGraph(batch, tokens):
  // graph/generation_forward.h adds the cache to it. Throws as BuildGraph, and ConfigError for an attention whose
  // cache cannot be traced.
  virtual Graph BuildGenerationGraph(int64_t batch, int64_t tokens, int64_t past_tokens) const = 0;

  virtual const std::string& path() const = 0;
  // The module hierarchy with every parameter and buffer in the file's dtype (graph/module_tree.h).
  virtual const ModuleTree& module_tree() const = 0;

  // Replaces the config's position limit, e.g. for RoPE scaled past it. A learned position table still bounds
  // the sequence: indexing past it fails in the real step. Throws ConfigError for n < 1.
  void set_max_positions(int64_t n);

  // The sliding_window of the config the export carries, when the model attends within one (none otherwise).
  std::optional<int64_t> sliding_window() const { return records().sliding_window; }
  // Whether the config's layer_types mixes sliding-window and full-attention layers (Gemma-2/3).
  bool hybrid_attention_layers() const { return records().hybrid_layers; }
  // Whether the model's forward takes logits_to_keep (so generate() computes the prompt's logits at its last
  // position only), as the export's config record says; none for an export without the record.
  std::optional<bool> logits_to_keep() const { return records().logits_to_keep; }
  // Whether the generation config the export carries names an eos_token_id; none for an export without the record.
  std::optional<bool> eos_token() const { return records().eos_token; }
  // Whether the model builds masking_utils' bool causal mask (create_causal_mask), not its own mask in the model's
  // dtype; none for an export without the record.
  std::optional<bool> bool_causal_mask() const { return records().bool_causal_mask; }
  // Whether the forward without labels returns float32 logits whatever the weights' dtype (GPT-J, CodeGen cast the
  // LM head's output); none for an export without the record.
  std::optional<bool> float32_logits() const { return records().float32_logits; }
  // Whether the config has a base_model_tp_plan (transformers' tensor-parallel split); none without the record.
  std::optional<bool> tensor_parallel_plan() const { return records().tp_plan; }
  // The module classes from_pretrained(device_map="auto") keeps on one device (_no_split_modules); none without
  // the record.
  std::optional<std::vector<std::string>> no_split_modules() const { return records().no_split_modules; }
  // A mixture-of-experts model's routing as the export traced it; none for a dense model or an export without the
  // record.
  std::optional<MoeRouting> moe_routing() const { return records().moe; }

 protected:
  virtual const ExportRecords& records() const = 0;
  virtual ExportRecords& mutable_records() = 0;
};

// Loads a TorchScript export (.pt) or a torch.export ExportedProgram (.pt2), told apart by the archive's content.
// Throws ModelLoadError (one line) for a file that is neither, or is damaged.
std::unique_ptr<DecoderModel> LoadDecoderModel(const std::string& path);

}  // namespace llmem
