// The policy interface every allocator model implements, and the statistics it reports.
//
// A simulator drives a model with a sequence of Alloc(id, bytes) / Free(id) calls (XLA's heap-simulator
// interface, with block ids instead of buffers) and reads Stats() after any call. Models are pure in-memory
// bookkeeping: deterministic, no clocks, no real memory.
//
// Usage:
//   CudaCachingAllocatorModel model(CachingAllocatorConfig{.capacity_bytes = 80 * kGiB});
//   if (!model.Alloc(/*id=*/7, /*bytes=*/4096)) { /* out of memory: nothing was allocated */ }
//   model.Free(7);
//   int64_t peak_reserved_bytes = model.Stats().peak_reserved_bytes;
//
// Deliberately not here: streams (every call is on the default stream), events and record_stream, CUDA-graph
// private pools. Models that need them extend the interface in their own header.
#pragma once

#include <cstdint>
#include <limits>
#include <string_view>

namespace llmem::sim {

// Capacity meaning "the device never runs out".
constexpr int64_t kUnlimitedBytes = std::numeric_limits<int64_t>::max();

// Counters mirroring c10::CachingDeviceAllocator::DeviceStats (aggregate over both pools).
struct AllocatorStats {
  int64_t allocated_bytes = 0;       // bytes of live blocks, after rounding and unsplit slack (memory_allocated)
  int64_t peak_allocated_bytes = 0;  // max of allocated_bytes since construction or ResetPeaks (max_memory_allocated)
  int64_t reserved_bytes = 0;        // bytes of all segments obtained from the device (memory_reserved)
  int64_t peak_reserved_bytes = 0;   // max of reserved_bytes since construction or ResetPeaks (max_memory_reserved)
  int64_t requested_bytes = 0;       // sum of the original request sizes of live blocks
  int64_t peak_requested_bytes = 0;  // max of requested_bytes since construction or ResetPeaks
  int64_t num_segments = 0;          // segments currently held (count, not bytes)
  int64_t num_ooms = 0;              // Alloc calls that returned false (count)
  int64_t inactive_split_bytes = 0;  // free bytes inside segments that also hold other blocks (fragmentation)
  int64_t num_alloc_retries = 0;     // device allocations retried after releasing cached segments (count)
};

class AllocatorModel {
 public:
  virtual ~AllocatorModel() = default;

  // Short stable name for reports, e.g. "cuda_caching".
  virtual std::string_view Name() const = 0;

  // Allocates `bytes` (>= 0) for block `id`, which must not be live. Returns false when the model runs out of
  // memory; then nothing is allocated, `id` stays free, and num_ooms is incremented.
  virtual bool Alloc(int64_t id, int64_t bytes) = 0;

  // Frees block `id`, which must be live (LLMEM_CHECK).
  virtual void Free(int64_t id) = 0;

  virtual AllocatorStats Stats() const = 0;

  // Sets every peak_* counter to its current value, like torch.cuda.reset_peak_memory_stats.
  virtual void ResetPeaks() = 0;
};

}  // namespace llmem::sim
