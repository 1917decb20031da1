#include "simulator/memory_snapshot.h"

#include <map>
#include <memory>

namespace llmem::sim {
namespace {

// Segments reserved since the last call, and those released (the allocator's retry after a failed cudaMalloc
// releases every entirely free one), as segment events; `known` tracks base address -> size.
void RecordSegmentChanges(const CudaCachingAllocatorModel& model, std::map<int64_t, int64_t>& known,
                          std::vector<SnapshotEvent>& trace) {
  std::map<int64_t, int64_t> now;
  for (const SegmentInfo& segment : model.Segments()) now.emplace(segment.address, segment.size_bytes);
  for (const auto& [address, bytes] : known) {
    if (!now.contains(address)) {
      trace.push_back({.action = SnapshotEvent::Action::kSegmentFree, .address = address, .bytes = bytes});
    }
  }
  for (const auto& [address, bytes] : now) {
    if (!known.contains(address)) {
      trace.push_back({.action = SnapshotEvent::Action::kSegmentAlloc, .address = address, .bytes = bytes});
    }
  }
  known = std::move(now);
}

}  // namespace

MemorySnapshot ReplayForSnapshot(const Timeline& timeline, bool caching_allocator, int64_t capacity_bytes) {
  MemorySnapshot snapshot;
  snapshot.caching_allocator = caching_allocator;
  std::unique_ptr<CudaCachingAllocatorModel> model;
  if (caching_allocator) model = std::make_unique<CudaCachingAllocatorModel>(CachingAllocatorConfig{capacity_bytes});
  std::map<int64_t, int64_t> segments;
  std::vector<int64_t> address(timeline.block_labels.size(), -1);
  int64_t next_address = 0;  // the cpu target: blocks laid out one after another, never reused
  for (size_t i = 0; i < timeline.events.size(); ++i) {
    const MemoryEvent& e = timeline.events[i];
    if (e.bytes == 0) continue;  // no block, as in the estimate
    const auto block = static_cast<size_t>(e.block);
    if (e.is_alloc) {
      if (model) {
        const int64_t reserved = model->Stats().reserved_bytes;
        if (!model->Alloc(e.block, e.bytes)) {
          RecordSegmentChanges(*model, segments, snapshot.trace);  // what the retry released
          const int64_t left = capacity_bytes - model->Stats().reserved_bytes;
          snapshot.trace.push_back({.action = SnapshotEvent::Action::kOom, .bytes = e.bytes,
                                    .event = static_cast<int64_t>(i), .device_free = left});
          snapshot.out_of_memory = true;
          break;
        }
        if (model->Stats().reserved_bytes != reserved) RecordSegmentChanges(*model, segments, snapshot.trace);
        address[block] = model->AddressOf(e.block);
      } else {
        address[block] = next_address;
        next_address += e.bytes;
      }
      snapshot.trace.push_back({.action = SnapshotEvent::Action::kAlloc, .address = address[block], .bytes = e.bytes,
                                .event = static_cast<int64_t>(i)});
    } else {
      if (model) model->Free(e.block);
      for (const auto action : {SnapshotEvent::Action::kFreeRequested, SnapshotEvent::Action::kFreeCompleted}) {
        snapshot.trace.push_back({.action = action, .address = address[block], .bytes = e.bytes,
                                  .event = static_cast<int64_t>(i)});
      }
    }
  }
  if (model) snapshot.segments = model->Segments();
  return snapshot;
}

}  // namespace llmem::sim
