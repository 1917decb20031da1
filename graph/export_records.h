// What models/export_hf.py stores beside the graph, in either format (TorchScript's extra files, a .pt2 archive's
// extra/): the Hugging Face config's facts llmem uses, and how each module class's forward treats the results of
// its child calls (temporaries of an expression, names rebound by a later statement).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "graph/graph.h"

namespace llmem {

// The extra files (names shared with models/export_hf.py).
inline constexpr const char* kConfigFile = "hf_config.json";
// Per cast of the graph, whether a trace under autocast casts to autocast's 16-bit dtype there.
inline constexpr const char* kAutocastCastsFile = "autocast_casts.json";
// Per module class, which child calls of its forward are nested in an expression.
inline constexpr const char* kExpressionCallsFile = "expression_calls.json";
// Which statement rebinds the name a child call's result is bound to.
inline constexpr const char* kRebindingsFile = "rebound_names.json";

// A mixture-of-experts model's routing as the export traced it: every layer's experts and top-k, each expert given
// tokens x top_k / experts rows (balanced), or expert 0 given `busiest` times that and the others the rest.
struct MoeRouting {
  int64_t experts = 0;
  int64_t top_k = 0;
  double busiest = 1.0;  // the busiest expert's rows over the balanced rows (1: balanced; export_hf --moe-imbalance)
};

struct ExportRecords {
  // From the config record.
  std::optional<int64_t> max_positions;   // max_position_embeddings
  std::string model_type;                 // "" without a config
  std::optional<int64_t> sliding_window;  // when the model attends within one
  bool hybrid_layers = false;             // layer_types mixes windowed and full-attention layers
  std::optional<bool> logits_to_keep;     // whether the model's forward takes logits_to_keep
  std::optional<bool> eos_token;          // whether its generation config names an eos_token_id
  std::optional<bool> float32_logits;     // whether its forward without labels casts the logits to float32
  std::optional<bool> tp_plan;            // whether its config has a base_model_tp_plan
  std::optional<std::vector<std::string>> no_split_modules;
  std::optional<bool> bool_causal_mask;   // whether its causal mask is masking_utils' bool one
  std::optional<MoeRouting> moe;          // the routing its MoE layers were traced with
  std::optional<int64_t> max_positions_override;  // --max-positions

  // Per module class (its Python class name), the children whose calls in its forward are nested in an expression:
  // their results are temporaries.
  std::map<std::string, std::set<std::string>, std::less<>> expression_calls;
  // Per module class, per child: how the class's forward drops the child call's result it bound to a name.
  std::map<std::string, std::map<std::string, std::shared_ptr<const NameRebinding>, std::less<>>, std::less<>>
      rebindings;

  // Each reads one extra file's text (nothing when empty); `path` names the model in errors (ModelLoadError).
  void ReadConfig(const std::string& text, const std::string& path);
  void ReadExpressionCalls(const std::string& text, const std::string& path);
  void ReadRebindings(const std::string& text, const std::string& path);

  // Notes on `op` how the forward of `parent_class` treats its call of child `child`, which starts at component
  // `depth` of the op's module path (OpNode::temporary_calls, OpNode::rebindings).
  void NoteChildCall(const std::string& parent_class, const std::string& child, size_t depth, OpNode& op) const;
};

}  // namespace llmem
