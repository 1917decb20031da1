// The simulated step as the allocator history PyTorch records (torch.cuda.memory._record_memory_history): every
// allocation and free at the address the caching allocator model gives it, every segment it reserves or
// releases, and, on a GPU that the step does not fit, the failing request as an out-of-memory event where the
// history of the real step would end. Replays the timeline the estimate came from; the file format is the CLI's.
#pragma once

#include <cstdint>
#include <vector>

#include "simulator/caching_allocator_model.h"
#include "simulator/memory_timeline.h"

namespace llmem::sim {

struct SnapshotEvent {
  enum class Action : uint8_t { kAlloc, kFreeRequested, kFreeCompleted, kSegmentAlloc, kSegmentFree, kOom };
  Action action = Action::kAlloc;
  int64_t address = 0;
  int64_t bytes = 0;        // the block's request (alloc, frees, oom) or the segment's size
  int64_t event = -1;       // index into the timeline's events (the block's label, category, phase); -1: none
  int64_t device_free = 0;  // oom: bytes the device had left
};

struct MemorySnapshot {
  std::vector<SnapshotEvent> trace;
  std::vector<SegmentInfo> segments;  // the allocator's segments when the history ends
  bool caching_allocator = false;     // false: the cpu target's exact-size allocator (no segments)
  bool out_of_memory = false;         // the history ends at an allocation the device could not hold
};

// `capacity_bytes`: what the allocator may reserve (the GPU less the memory outside the allocator);
// kUnlimitedBytes for the cpu target, which has no caching allocator (each block gets its own address).
MemorySnapshot ReplayForSnapshot(const Timeline& timeline, bool caching_allocator, int64_t capacity_bytes);

}  // namespace llmem::sim
