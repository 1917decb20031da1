#include "distributed/parallel_plan.h"

namespace llmem::dist {

std::string_view EngineName(DataParallelEngine e) {
  switch (e) {
    case DataParallelEngine::kDdp: return "DDP";
    case DataParallelEngine::kZero1: return "ZeRO-1";
    case DataParallelEngine::kFsdp2Zero2: return "ZeRO-2 (FSDP2)";
    case DataParallelEngine::kFsdp2Zero3: return "ZeRO-3 (FSDP2)";
    case DataParallelEngine::kGemini: return "ZeRO-3 (chunks)";
  }
  return "?";
}

std::optional<DataParallelEngine> ParseEngine(std::string_view name) {
  if (name == "ddp") return DataParallelEngine::kDdp;
  if (name == "zero1") return DataParallelEngine::kZero1;
  if (name == "zero2") return DataParallelEngine::kFsdp2Zero2;
  if (name == "zero3" || name == "fsdp2") return DataParallelEngine::kFsdp2Zero3;
  if (name == "gemini") return DataParallelEngine::kGemini;
  return std::nullopt;
}

std::string ParallelPlan::Name() const {
  std::string name;
  if (dp > 1 || tp == 1) {
    switch (engine) {
      case DataParallelEngine::kDdp: name = "DP" + std::to_string(dp); break;
      case DataParallelEngine::kZero1: name = "ZeRO-1×" + std::to_string(dp); break;
      case DataParallelEngine::kFsdp2Zero2: name = "ZeRO-2×" + std::to_string(dp); break;
      case DataParallelEngine::kFsdp2Zero3: name = "ZeRO-3×" + std::to_string(dp); break;
      case DataParallelEngine::kGemini: name = "Gemini×" + std::to_string(dp); break;
    }
  }
  if (tp > 1) name += (name.empty() ? "" : "×") + std::string("TP") + std::to_string(tp);
  return name;
}

}  // namespace llmem::dist
