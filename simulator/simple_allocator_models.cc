#include "simulator/simple_allocator_models.h"

#include <algorithm>

#include "graph/error.h"
#include "simulator/caching_allocator_rules.h"

namespace llmem::sim {

SizeOnlyAllocatorModel::SizeOnlyAllocatorModel(int64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {
  LLMEM_CHECK(capacity_bytes_ >= 0) << "capacity_bytes=" << capacity_bytes_;
}

bool SizeOnlyAllocatorModel::Alloc(int64_t id, int64_t bytes) {
  LLMEM_CHECK(bytes >= 0) << "block " << id << " requests " << bytes << " B";
  LLMEM_CHECK(!live_.Contains(id)) << "block " << id << " is already live";
  const int64_t occupied_bytes = bytes == 0 ? 0 : OccupiedBytes(bytes);
  if (occupied_bytes > capacity_bytes_ - stats_.allocated_bytes) {
    ++stats_.num_ooms;
    return false;
  }
  live_.Insert(id, Live{.occupied_bytes = occupied_bytes, .requested_bytes = bytes});
  stats_.allocated_bytes += occupied_bytes;
  stats_.reserved_bytes += occupied_bytes;
  stats_.requested_bytes += bytes;
  stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
  stats_.peak_requested_bytes = std::max(stats_.peak_requested_bytes, stats_.requested_bytes);
  return true;
}

void SizeOnlyAllocatorModel::Free(int64_t id) {
  const Live* live = live_.Find(id);
  LLMEM_CHECK(live != nullptr) << "free of block " << id << ", which is not live";
  stats_.allocated_bytes -= live->occupied_bytes;
  stats_.reserved_bytes -= live->occupied_bytes;
  stats_.requested_bytes -= live->requested_bytes;
  live_.Erase(id);
}

void SizeOnlyAllocatorModel::ResetPeaks() {
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
  stats_.peak_reserved_bytes = stats_.reserved_bytes;
  stats_.peak_requested_bytes = stats_.requested_bytes;
}

int64_t NoFragmentationModel::OccupiedBytes(int64_t bytes) const { return RoundSize(bytes, roundup_power2_divisions_); }

}  // namespace llmem::sim
