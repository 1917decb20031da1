#include "cli/weights_report.h"

#include <cstdio>
#include <map>
#include <string_view>

#include "graph/dtype.h"

namespace llmem::cli {
namespace {

// Names graph/quantize_rewrite.cc gives the quantization state of a quantized weight (bitsandbytes, torchao).
bool IsQuantState(std::string_view name) {
  for (std::string_view part : {".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                                ".weight.nested_quant_map", ".weight.quant_state.offset", ".weight.quantized_scalers",
                                ".weight.quantization_factor", ".weight.scaler_mean", ".weight.nf4", ".weight.SCB",
                                ".qzeros", ".scales", ".g_idx", ".wf_unsqueeze_zero", ".wf_unsqueeze_neg_one"}) {
    if (name.ends_with(part)) return true;
  }
  return false;
}

std::string Mib(int64_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

std::vector<WeightGroup> GroupWeights(const Graph& graph, sim::Precision precision) {
  std::map<std::pair<int, std::string>, WeightGroup> by_key;  // (order, label)
  for (const Parameter& p : graph.params()) {
    const TensorValue& v = graph.value(p.value);
    const DType d = precision == sim::Precision::kBf16 ? v.dtype_bf16_weights : v.dtype;
    std::pair<int, std::string> key;
    if (p.trainable) {
      key = {0, "trainable " + std::string(DTypeName(d))};
    } else if (IsQuantState(p.name)) {
      key = {3, "frozen quantization state"};
    } else if (d == DType::kU8 && p.name.ends_with(".weight")) {
      key = {2, "frozen 4-bit codes"};
    } else if (d == DType::kI8 && p.name.ends_with(".weight")) {
      key = {2, "frozen int8 codes"};
    } else if (d == DType::kI32 && p.name.ends_with(".qweight")) {
      key = {2, "frozen GPTQ codes (int32)"};
    } else {
      key = {1, "frozen " + std::string(DTypeName(d))};
    }
    WeightGroup& g = by_key[key];
    g.label = key.second;
    ++g.tensors;
    g.elements += NumElements(p.shape);
    g.bytes += ShapeBytes(p.shape, d);
  }
  std::vector<WeightGroup> out;
  for (auto& [key, g] : by_key) out.push_back(std::move(g));
  return out;
}

void PrintWeights(const std::vector<WeightGroup>& groups) {
  std::printf("\nweights by role and format (parameters and buffers):\n");
  for (const auto& g : groups) {
    std::printf("  %-24s %12s  %lld tensors, %lld elements\n", g.label.c_str(), Mib(g.bytes).c_str(),
                static_cast<long long>(g.tensors), static_cast<long long>(g.elements));
  }
}

nlohmann::json WeightsJson(const std::vector<WeightGroup>& groups) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& g : groups) {
    j.push_back({{"group", g.label}, {"tensors", g.tensors}, {"elements", g.elements}, {"bytes", g.bytes}});
  }
  return j;
}

}  // namespace llmem::cli
