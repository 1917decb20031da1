#include "simulator/passes/precision_pass.h"

#include <optional>

#include "graph/error.h"
#include "graph/op_registry.h"
#include "simulator/backend_rules.h"

namespace llmem::sim {
namespace {

// The ScalarType argument of aten::to, in c10::ScalarType numbering.
std::optional<DType> CastTarget(const OpNode& node) {
  const OpArg* dtype_arg = nullptr;
  if (node.args.size() > 1 && node.args[1].kind == OpArg::Kind::kInt) {
    dtype_arg = &node.args[1];  // to.dtype / to.dtype_layout
  } else if (node.args.size() > 2 && node.args[1].kind == OpArg::Kind::kOther &&
             node.args[2].kind == OpArg::Kind::kInt) {
    dtype_arg = &node.args[2];  // to.device
  }
  if (!dtype_arg) return std::nullopt;
  return DTypeOfScalarType(dtype_arg->int_value);
}

std::vector<DType> SimulatedDTypes(const Graph& graph, Precision precision, Lifetimes lifetimes,
                                   const BackendRules& backend) {
  std::vector<DType> dt(graph.values().size());
  for (const auto& v : graph.values()) dt[static_cast<size_t>(v.id.index)] = v.dtype;
  if (precision == Precision::kFp32) return dt;
  if (precision == Precision::kBf16) {
    if (!graph.runs_with_bf16_weights()) {
      throw ConfigError("this export cannot run with bf16 weights (it bakes fp32 dtypes in); use bf16-autocast, or "
                        "re-export with --dtype bfloat16");
    }
    for (const auto& v : graph.values()) dt[static_cast<size_t>(v.id.index)] = v.dtype_bf16_weights;
    return dt;
  }
  const DType low = precision == Precision::kBf16Autocast ? DType::kBF16 : DType::kF16;
  for (const auto& node : graph.nodes()) {
    const AutocastClass cls = backend.Autocast(node.kind);
    const auto& inputs = graph.tensor_inputs(node.id);
    // Type promotion (c10 result_type): tensors with dimensions decide; 0-dim tensors only when no dimensioned
    // floating tensor takes part (the traced scalar constants are 0-dim float64 tensors).
    std::optional<DType> promoted, promoted_half;  // promoted_half: what the bf16-weights run saw
    for (int pass = 0; pass < 2 && !promoted; ++pass) {
      for (ValueId in : inputs) {
        if ((graph.value(in).shape.empty() ? 1 : 0) != pass) continue;
        const DType d = dt[static_cast<size_t>(in.index)];
        if (IsFloating(d)) promoted = promoted ? Promote(*promoted, d) : d;
        const DType h = graph.value(in).dtype_bf16_weights;
        if (IsFloating(h)) promoted_half = promoted_half ? Promote(*promoted_half, h) : h;
      }
    }
    for (ValueId out : node.outputs) {
      const auto& v = graph.value(out);
      DType& d = dt[static_cast<size_t>(out.index)];
      if (!IsFloating(v.dtype)) continue;
      if (v.alias_of.valid() && !OpHas(node.kind, kCastOp)) {
        // A view has the dtype of the tensor it views: the op's first input when they share storage (the root
        // could be a value that a simulated cast has since copied).
        const bool views_input = !inputs.empty() && graph.StorageRoot(inputs[0]) == graph.StorageRoot(out);
        d = dt[static_cast<size_t>((views_input ? inputs[0] : graph.StorageRoot(out)).index)];
        continue;
      }
      if (cls == AutocastClass::kLowerPrecision) {
        d = low;
      } else if (cls == AutocastClass::kFp32) {
        d = DType::kF32;
      } else if (node.kind == "aten::to") {
        // An explicit cast to the dtype in its schema (to.dtype: arg 1; to.device: arg 2); without one it keeps
        // its input's dtype.
        // The eager program's `x.to(y.dtype)` where autocast made y 16-bit casts to that dtype; the trace (and
        // the TorchScript step that runs it) baked the trace-time fp32.
        const std::optional<DType> target = CastTarget(node);
        if (node.to_autocast_dtype && lifetimes == Lifetimes::kEager) {
          d = low;
        } else {
          d = target ? *target : (promoted ? *promoted : v.dtype);
        }
      } else if (node.kind == "aten::type_as") {
        d = inputs.size() > 1 ? dt[static_cast<size_t>(inputs[1].index)] : v.dtype;
      } else if (promoted && (!graph.runs_with_bf16_weights() || !promoted_half ||
                              v.dtype_bf16_weights == *promoted_half)) {
        d = *promoted;  // follows its inputs
      } else {
        d = v.dtype;  // the op fixed its output dtype
      }
    }
  }
  return dt;
}

}  // namespace

StepPlan PrecisionPass(const Graph& graph, StepPlan plan, const TrainingConfig& config) {
  plan.value_dtypes = SimulatedDTypes(graph, config.precision, config.lifetimes, RulesFor(config.target));
  return plan;
}

}  // namespace llmem::sim
