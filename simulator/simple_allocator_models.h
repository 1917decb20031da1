// Two size-only allocator models without segments, run beside CudaCachingAllocatorModel:
//   ExactBytesModel       allocated = requested = reserved: every byte asked for, nothing more. Models the CPU
//                         allocator as an instrumented allocator sees it, and the "sum of tensor sizes" view.
//   NoFragmentationModel  each request occupies RoundSize(bytes) (c10 round_size, 512 B granules) and
//                         reserved = allocated: the caching allocator with perfect packing and no cached
//                         slack. Its allocated bytes are a lower bound for CudaCachingAllocatorModel's, and the
//                         difference between the two models' reserved bytes is the fragmentation.
// Both accept an optional capacity: an Alloc that would take allocated bytes above it fails (num_ooms).
//
// Deliberately not modelled: addresses, segments, pools, splitting (num_segments, inactive_split_bytes and
// num_alloc_retries stay 0). A zero-byte request succeeds and occupies nothing in both models, as in c10.
#pragma once

#include <cstdint>
#include <string_view>

#include "simulator/allocator_model.h"
#include "simulator/live_id_table.h"

namespace llmem::sim {

// Shared bookkeeping: each live id occupies OccupiedBytes(request) bytes.
class SizeOnlyAllocatorModel : public AllocatorModel {
 public:
  bool Alloc(int64_t id, int64_t bytes) final;
  void Free(int64_t id) final;
  AllocatorStats Stats() const final { return stats_; }
  void ResetPeaks() final;
  int64_t capacity_bytes() const { return capacity_bytes_; }

 protected:
  explicit SizeOnlyAllocatorModel(int64_t capacity_bytes);
  // Bytes a live request of `bytes` (> 0) occupies.
  virtual int64_t OccupiedBytes(int64_t bytes) const = 0;

 private:
  struct Live {
    int64_t occupied_bytes = 0;   // counted in allocated_bytes and reserved_bytes
    int64_t requested_bytes = 0;  // the original request
  };
  int64_t capacity_bytes_;
  LiveIdTable<Live> live_;  // live id -> its bytes
  AllocatorStats stats_;
};

class ExactBytesModel final : public SizeOnlyAllocatorModel {
 public:
  explicit ExactBytesModel(int64_t capacity_bytes = kUnlimitedBytes) : SizeOnlyAllocatorModel(capacity_bytes) {}
  std::string_view Name() const override { return "exact_bytes"; }

 private:
  int64_t OccupiedBytes(int64_t bytes) const override { return bytes; }
};

class NoFragmentationModel final : public SizeOnlyAllocatorModel {
 public:
  // `roundup_power2_divisions` as in CachingAllocatorConfig, so the bound matches the caching model it runs beside.
  explicit NoFragmentationModel(int64_t capacity_bytes = kUnlimitedBytes, int roundup_power2_divisions = 0)
      : SizeOnlyAllocatorModel(capacity_bytes), roundup_power2_divisions_(roundup_power2_divisions) {}
  std::string_view Name() const override { return "no_fragmentation"; }

 private:
  int64_t OccupiedBytes(int64_t bytes) const override;
  int roundup_power2_divisions_;
};

}  // namespace llmem::sim
