#include "simulator/caching_allocator_model.h"

#include <algorithm>

#include "graph/dtype.h"
#include "graph/error.h"
#include "simulator/caching_allocator_rules.h"

namespace llmem::sim {
namespace {

void Increase(int64_t& current, int64_t& peak, int64_t delta_bytes) {
  current = CheckedAdd(current, delta_bytes, "the allocator's statistics");
  peak = std::max(peak, current);
}

}  // namespace

CudaCachingAllocatorModel::CudaCachingAllocatorModel(CachingAllocatorConfig config) : config_(config) {
  LLMEM_CHECK(config_.capacity_bytes >= 0) << "capacity_bytes=" << config_.capacity_bytes;
}

bool CudaCachingAllocatorModel::Alloc(int64_t id, int64_t bytes) {
  LLMEM_CHECK(bytes >= 0) << "block " << id << " requests " << bytes << " B";
  LLMEM_CHECK(!live_.Contains(id)) << "block " << id << " is already live";
  if (bytes == 0) {
    live_.Insert(id, kNoBlock);
    return true;
  }
  // Step 1: round and pick the pool.
  const int64_t rounded_bytes = RoundSize(bytes, config_.roundup_power2_divisions);
  const bool small_pool = IsSmallPoolSize(rounded_bytes);

  // Step 2: best fit among cached free blocks.
  int32_t index = FindBestFit(rounded_bytes, small_pool);
  if (index == kNoBlock) {
    // Step 3: a new segment.
    const int64_t segment_bytes = SegmentSizeFor(rounded_bytes);
    index = MallocSegment(segment_bytes, small_pool);
    if (index == kNoBlock) {
      // Step 4: release entirely free cached segments and retry once.
      ReleaseCachedSegments();
      ++stats_.num_alloc_retries;
      index = MallocSegment(segment_bytes, small_pool);
    }
    if (index == kNoBlock) {
      // Step 5: out of memory.
      ++stats_.num_ooms;
      return false;
    }
  }

  // Step 6: split off the tail if the rule says so.
  if (ShouldSplit(blocks_[index].size_bytes, rounded_bytes, small_pool)) SplitFront(index, rounded_bytes);

  Block& block = blocks_[index];
  block.allocated = true;
  block.id = id;
  block.requested_bytes = bytes;
  live_.Insert(id, index);
  Increase(stats_.allocated_bytes, stats_.peak_allocated_bytes, block.size_bytes);
  Increase(stats_.requested_bytes, stats_.peak_requested_bytes, bytes);
  return true;
}

void CudaCachingAllocatorModel::Free(int64_t id) {
  const int32_t* live = live_.Find(id);
  LLMEM_CHECK(live != nullptr) << "free of block " << id << ", which is not live";
  int32_t index = *live;
  live_.Erase(id);
  if (index == kNoBlock) return;  // zero-byte request

  Block& block = blocks_[index];
  stats_.allocated_bytes -= block.size_bytes;
  stats_.requested_bytes -= block.requested_bytes;
  block.allocated = false;
  block.id = -1;
  block.requested_bytes = 0;

  // Merge with the free neighbour in front: the merged block starts at the neighbour's address.
  const int32_t prev = blocks_[index].prev;
  if (prev != kNoBlock && !blocks_[prev].allocated) {
    EraseFree(prev);
    index = Absorb(prev, index);
  }
  // Merge with the free neighbour behind.
  const int32_t next = blocks_[index].next;
  if (next != kNoBlock && !blocks_[next].allocated) {
    EraseFree(next);
    Absorb(index, next);
  }
  InsertFree(index);
}

void CudaCachingAllocatorModel::ResetPeaks() {
  stats_.peak_allocated_bytes = stats_.allocated_bytes;
  stats_.peak_reserved_bytes = stats_.reserved_bytes;
  stats_.peak_requested_bytes = stats_.requested_bytes;
}

void CudaCachingAllocatorModel::EmptyCache() { ReleaseCachedSegments(); }

std::vector<SegmentInfo> CudaCachingAllocatorModel::Segments() const {
  std::vector<SegmentInfo> out;
  out.reserve(segments_.size());
  for (const auto& [address, segment] : segments_) {
    SegmentInfo info{.segment_id = segment.segment_id,
                     .address = address,
                     .size_bytes = segment.size_bytes,
                     .small_pool = segment.small_pool,
                     .blocks = {}};
    for (int32_t index = segment.first_block; index != kNoBlock; index = blocks_[index].next) {
      const Block& block = blocks_[index];
      info.blocks.push_back(BlockInfo{.address = block.address,
                                      .size_bytes = block.size_bytes,
                                      .requested_bytes = block.requested_bytes,
                                      .id = block.id,
                                      .allocated = block.allocated});
    }
    out.push_back(std::move(info));
  }
  return out;
}

int64_t CudaCachingAllocatorModel::AddressOf(int64_t id) const {
  const int32_t* index = live_.Find(id);
  return index == nullptr || *index == kNoBlock ? -1 : blocks_[static_cast<size_t>(*index)].address;
}

int64_t CudaCachingAllocatorModel::LargestFreeBlockBytes() const {
  int64_t largest_bytes = 0;
  if (!small_free_.empty()) largest_bytes = std::get<0>(*small_free_.rbegin());
  if (!large_free_.empty()) largest_bytes = std::max(largest_bytes, std::get<0>(*large_free_.rbegin()));
  return largest_bytes;
}

int32_t CudaCachingAllocatorModel::NewBlock(const Block& block) {
  if (!unused_block_slots_.empty()) {
    const int32_t index = unused_block_slots_.back();
    unused_block_slots_.pop_back();
    blocks_[index] = block;
    return index;
  }
  LLMEM_CHECK(blocks_.size() < static_cast<size_t>(std::numeric_limits<int32_t>::max())) << "too many blocks";
  blocks_.push_back(block);
  return static_cast<int32_t>(blocks_.size() - 1);
}

int32_t CudaCachingAllocatorModel::Absorb(int32_t front, int32_t back) {
  Block& merged = blocks_[front];
  merged.size_bytes += blocks_[back].size_bytes;
  merged.next = blocks_[back].next;
  if (merged.next != kNoBlock) blocks_[merged.next].prev = front;
  DeleteBlock(back);
  return front;
}

void CudaCachingAllocatorModel::DeleteBlock(int32_t index) {
  blocks_[index] = Block{};
  unused_block_slots_.push_back(index);
}

// inactive_split_bytes counts free blocks that share their segment with other blocks. A block's neighbours
// only change while it is outside the free pools, so adding on insert and subtracting on erase keeps the
// counter exact.
void CudaCachingAllocatorModel::InsertFree(int32_t index) {
  const Block& block = blocks_[index];
  const bool inserted = PoolFor(block.small_pool).emplace(block.size_bytes, block.address, index).second;
  LLMEM_CHECK(inserted) << "block at " << block.address << " is already in its pool";
  if (IsInSplitSegment(block)) stats_.inactive_split_bytes += block.size_bytes;
}

void CudaCachingAllocatorModel::EraseFree(int32_t index) {
  const Block& block = blocks_[index];
  const size_t erased = PoolFor(block.small_pool).erase(FreeKey{block.size_bytes, block.address, index});
  LLMEM_CHECK(erased == 1) << "block at " << block.address << " is not in its pool";
  if (IsInSplitSegment(block)) stats_.inactive_split_bytes -= block.size_bytes;
}

int32_t CudaCachingAllocatorModel::FindBestFit(int64_t rounded_bytes, bool small_pool) {
  FreePool& pool = PoolFor(small_pool);
  auto it = pool.lower_bound(FreeKey{rounded_bytes, std::numeric_limits<int64_t>::min(), 0});
  if (it == pool.end()) return kNoBlock;
  const int32_t index = std::get<2>(*it);
  EraseFree(index);
  return index;
}

int32_t CudaCachingAllocatorModel::MallocSegment(int64_t segment_bytes, bool small_pool) {
  if (segment_bytes > config_.capacity_bytes - stats_.reserved_bytes) return kNoBlock;
  const int64_t address = next_segment_address_;
  next_segment_address_ = CheckedAdd(next_segment_address_, segment_bytes, "the allocator's segments");
  const int32_t index = NewBlock(Block{.address = address,
                                       .size_bytes = segment_bytes,
                                       .segment_address = address,
                                       .small_pool = small_pool});
  segments_.emplace(address, Segment{.segment_id = next_segment_id_++,
                                     .size_bytes = segment_bytes,
                                     .first_block = index,
                                     .small_pool = small_pool});
  ++stats_.num_segments;
  Increase(stats_.reserved_bytes, stats_.peak_reserved_bytes, segment_bytes);
  return index;
}

void CudaCachingAllocatorModel::ReleaseCachedSegments() {
  for (FreePool* pool : {&large_free_, &small_free_}) {
    for (auto it = pool->begin(); it != pool->end();) {
      const int32_t index = std::get<2>(*it);
      const Block& block = blocks_[index];
      if (IsInSplitSegment(block)) {
        ++it;
        continue;
      }
      stats_.reserved_bytes -= block.size_bytes;
      --stats_.num_segments;
      segments_.erase(block.segment_address);
      it = pool->erase(it);
      DeleteBlock(index);
    }
  }
}

void CudaCachingAllocatorModel::SplitFront(int32_t index, int64_t front_bytes) {
  const Block& block = blocks_[index];
  const Block tail{.address = block.address + front_bytes,
                   .size_bytes = block.size_bytes - front_bytes,
                   .segment_address = block.segment_address,
                   .prev = index,
                   .next = block.next,
                   .small_pool = block.small_pool};
  const int32_t tail_index = NewBlock(tail);  // may reallocate blocks_: `block` is dead from here
  if (tail.next != kNoBlock) blocks_[tail.next].prev = tail_index;
  blocks_[index].next = tail_index;
  blocks_[index].size_bytes = front_bytes;
  InsertFree(tail_index);
}

}  // namespace llmem::sim
