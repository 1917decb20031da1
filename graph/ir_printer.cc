#include "graph/ir_printer.h"

#include <sstream>

namespace llmem {
namespace {
std::string Dims(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

std::string PrintArg(const Graph& graph, const OpArg& arg) {
  switch (arg.kind) {
    case OpArg::Kind::kTensor:
      return graph.value(arg.tensors.at(0)).name;
    case OpArg::Kind::kTensorList: {
      std::string s = "[";
      for (size_t i = 0; i < arg.tensors.size(); ++i) s += (i ? ", " : "") + graph.value(arg.tensors[i]).name;
      return s + "]";
    }
    case OpArg::Kind::kInt:
      return std::to_string(arg.int_value);
    case OpArg::Kind::kBool:
      return arg.int_value ? "True" : "False";
    case OpArg::Kind::kDouble: {
      std::ostringstream os;
      os << arg.double_value;
      return os.str();
    }
    case OpArg::Kind::kIntList:
      return Dims(arg.ints);
    case OpArg::Kind::kString:
      return "\"" + arg.text + "\"";
    case OpArg::Kind::kNone:
      return "None";
    case OpArg::Kind::kOther:
      return arg.text;
  }
  return "?";
}
}  // namespace

std::string PrintValue(const Graph& graph, ValueId id) {
  const auto& v = graph.value(id);
  std::string s = v.name + ":" + std::string(DTypeName(v.dtype)) + Dims(v.shape);
  if (v.alias_of.valid()) s += "@" + graph.value(v.alias_of).name;
  return s;
}

std::string PrintOp(const Graph& graph, const OpNode& node) {
  std::string s;
  for (size_t i = 0; i < node.outputs.size(); ++i) s += (i ? ", " : "") + PrintValue(graph, node.outputs[i]);
  s += " = " + node.kind + "(";
  for (size_t i = 0; i < node.args.size(); ++i) s += (i ? ", " : "") + PrintArg(graph, node.args[i]);
  s += ")  # " + RegionName(node.region);
  if (!node.scope.empty()) s += " " + node.scope;
  return s;
}

std::string PrintGraph(const Graph& graph) {
  std::string s;
  for (const auto& p : graph.params()) {
    s += "param " + PrintValue(graph, p.value) + (p.trainable ? "" : " buffer") + "\n";
  }
  for (const auto& node : graph.nodes()) s += PrintOp(graph, node) + "\n";
  s += "return " + graph.value(graph.loss()).name + "\n";
  return s;
}

}  // namespace llmem
