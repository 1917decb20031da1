// One collective operation a parallel method issues per training step, as the cost model and the memory model see
// it. Plain data, produced by the method descriptions (data_parallel, fsdp, tensor_parallel, chunk_manager).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace llmem::dist {

enum class CollectiveKind : uint8_t { kAllReduce, kAllGather, kReduceScatter, kBroadcast };
std::string_view CollectiveName(CollectiveKind kind);

// When the collective runs, and whether the engine overlaps it with computation.
enum class StepPhase : uint8_t { kForward, kBackward, kOptimizer };

struct Collective {
  CollectiveKind kind = CollectiveKind::kAllReduce;
  // Bytes of the full (unsharded) buffer the collective works on: all-reduce: the tensor; all-gather: the
  // gathered output; reduce-scatter: the input before scattering.
  int64_t bytes = 0;
  int group_size = 1;         // ranks taking part
  bool crosses_nodes = false; // the group spans more than one node (slowest link: the inter-node network)
  StepPhase phase = StepPhase::kBackward;
  bool overlapped = false;    // the engine runs it concurrently with computation (DDP buckets, FSDP prefetch)
  int count = 1;              // how many identical collectives of this kind per step
  std::string what;           // "DDP gradient bucket", "FSDP2 all-gather layer params", ...
};

using CollectiveList = std::vector<Collective>;

}  // namespace llmem::dist
