// A parallel layout over N GPUs: data-parallel degree × tensor-parallel degree, and how the data-parallel
// dimension holds the model states (plain replicas, ZeRO stages with PyTorch engines, or chunk-based ZeRO as in
// Colossal-AI Gemini).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace llmem::dist {

enum class DataParallelEngine : uint8_t {
  kDdp,         // DistributedDataParallel: full replicas, gradient buckets
  kZero1,       // DDP + ZeroRedundancyOptimizer: optimizer states sharded
  kFsdp2Zero2,  // fully_shard(reshard_after_forward=False): params stay gathered between forward and backward
  kFsdp2Zero3,  // fully_shard(reshard_after_forward=True): params gathered per layer, forward and backward
  kGemini,      // chunk-based ZeRO-3 (Colossal-AI Gemini): params packed in fixed-size chunks
};
std::string_view EngineName(DataParallelEngine e);  // "DDP", "ZeRO-1", "ZeRO-2 (FSDP2)", ...
std::optional<DataParallelEngine> ParseEngine(std::string_view name);  // ddp | zero1 | zero2 | zero3 | gemini

struct ParallelPlan {
  int dp = 1;  // data-parallel degree
  int tp = 1;  // tensor-parallel degree (Megatron-style, within a node when possible)
  DataParallelEngine engine = DataParallelEngine::kDdp;
  int gpus() const { return dp * tp; }
  std::string Name() const;  // "DP8", "ZeRO-3×4 (FSDP2) × TP2", "TP8", ...
};

}  // namespace llmem::dist
