#include "graph/export_records.h"

#include <nlohmann/json.hpp>

#include <algorithm>

#include "graph/error.h"
#include "graph/json_record.h"

namespace llmem {

void ExportRecords::ReadConfig(const std::string& text, const std::string& path) {
  if (text.empty()) return;
  const nlohmann::json config = ParseJsonRecord(text, std::string(kConfigFile) + " of " + path);
  if (!config.is_object()) throw ModelLoadError(std::string(kConfigFile) + " of " + path + " is not a JSON object");
  if (auto it = config.find("model_type"); it != config.end() && it->is_string()) {
    model_type = it->get<std::string>();
  }
  if (auto it = config.find("max_position_embeddings"); it != config.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 1) {
      throw ModelLoadError(std::string(kConfigFile) + " of " + path + ": max_position_embeddings is not a positive "
                           "integer");
    }
    max_positions = it->get<int64_t>();
  }
  if (auto it = config.find("logits_to_keep"); it != config.end() && it->is_boolean()) {
    logits_to_keep = it->get<bool>();
  }
  if (auto it = config.find("eos_token_id"); it != config.end()) eos_token = !it->is_null();
  if (auto it = config.find("tp_plan"); it != config.end() && it->is_boolean()) tp_plan = it->get<bool>();
  if (auto it = config.find("no_split_modules"); it != config.end() && it->is_array()) {
    no_split_modules.emplace();
    for (const auto& c : *it) {
      if (c.is_string()) no_split_modules->push_back(c.get<std::string>());
    }
  }
  if (auto it = config.find("moe_routing"); it != config.end() && it->is_object()) {
    const auto experts = it->find("experts"), top_k = it->find("top_k");
    if (experts != it->end() && top_k != it->end() && experts->is_number_integer() && top_k->is_number_integer() &&
        experts->get<int64_t>() > 0 && top_k->get<int64_t>() > 0) {
      moe = MoeRouting{experts->get<int64_t>(), top_k->get<int64_t>()};
      if (const auto busiest = it->find("busiest"); busiest != it->end() && busiest->is_number() &&
                                                    busiest->get<double>() >= 1.0) {
        moe->busiest = busiest->get<double>();
      }
    }
  }
  if (auto it = config.find("logits_dtype"); it != config.end() && it->is_string()) {
    float32_logits = it->get<std::string>() == "float32";
  }
  if (auto it = config.find("causal_mask"); it != config.end() && it->is_string()) {
    bool_causal_mask = it->get<std::string>() == "create_causal_mask";
  }
  // Qwen2-style configs carry a window but switch it off with use_sliding_window.
  const auto use = config.find("use_sliding_window");
  const bool off = use != config.end() && use->is_boolean() && !use->get<bool>();
  if (auto it = config.find("sliding_window"); !off && it != config.end() && it->is_number_integer()) {
    sliding_window = it->get<int64_t>();
  }
  // layer_types decides each layer's cache (transformers' DynamicCache(config)): a window only where a layer says so.
  if (auto it = config.find("layer_types"); it != config.end() && it->is_array() && !it->empty()) {
    size_t windowed = 0;
    for (const auto& t : *it) {
      const std::string kind = t.is_string() ? t.get<std::string>() : "";
      if (kind == "sliding_attention" || kind == "chunked_attention") ++windowed;
    }
    if (windowed == 0) sliding_window.reset();
    hybrid_layers = windowed > 0 && windowed < it->size();
  }
}

void ExportRecords::ReadExpressionCalls(const std::string& text, const std::string& path) {
  if (text.empty()) return;
  const nlohmann::json record = ParseJsonRecord(text, std::string(kExpressionCallsFile) + " of " + path);
  if (!record.is_object()) throw ModelLoadError(std::string(kExpressionCallsFile) + " of " + path + " is not an object");
  for (const auto& [cls, children] : record.items()) {
    if (!children.is_array()) continue;
    for (const auto& c : children) {
      if (c.is_string()) expression_calls[cls].insert(c.get<std::string>());
    }
  }
}

void ExportRecords::ReadRebindings(const std::string& text, const std::string& path) {
  if (text.empty()) return;
  const std::string where = std::string(kRebindingsFile) + " of " + path;
  const nlohmann::json record = ParseJsonRecord(text, where);
  if (!record.is_object()) throw ModelLoadError(where + " is not an object");
  auto names = [&](const nlohmann::json& rule, const char* key) {
    std::vector<std::string> out;
    const auto it = rule.find(key);
    if (it == rule.end() || !it->is_array()) throw ModelLoadError(where + ": a rule has no \"" + key + "\" list");
    for (const auto& n : *it) {
      if (!n.is_string()) throw ModelLoadError(where + ": \"" + key + "\" holds a non-string");
      out.push_back(n.get<std::string>());
    }
    return out;
  };
  for (const auto& [cls, children] : record.items()) {
    if (!children.is_object()) throw ModelLoadError(where + ": the entry of " + cls + " is not an object");
    for (const auto& [child, rule] : children.items()) {
      if (!rule.is_object()) throw ModelLoadError(where + ": the rule of " + cls + "." + child + " is not an object");
      NameRebinding r;
      r.between = names(rule, "between");
      r.rebinders = names(rule, "rebinder");
      const auto several = rule.find("one_of_several");
      r.one_of_several = several != rule.end() && several->is_boolean() && several->get<bool>();
      const auto own = rule.find("own_rebindings");
      if (own != rule.end() && own->is_number_integer()) r.own_rebindings = std::max(0, own->get<int>());
      rebindings[cls][child] = std::make_shared<const NameRebinding>(std::move(r));
    }
  }
}

void ExportRecords::NoteChildCall(const std::string& parent_class, const std::string& child, size_t depth,
                                  OpNode& op) const {
  const auto cls = expression_calls.find(parent_class);
  const bool nested = cls != expression_calls.end() && cls->second.count(child) > 0;
  if (op.temporary_calls.size() <= depth) op.temporary_calls.resize(depth + 1, 0);
  op.temporary_calls[depth] = nested ? 1 : 0;
  if (const auto rb = rebindings.find(parent_class); rb != rebindings.end()) {
    if (const auto it = rb->second.find(child); it != rb->second.end()) {
      if (op.rebindings.size() <= depth) op.rebindings.resize(depth + 1);
      op.rebindings[depth] = it->second;
    }
  }
}

}  // namespace llmem
