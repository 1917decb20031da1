// CudaCachingAllocatorModel: a block-exact simulation of PyTorch's CUDA caching allocator on one device and
// one stream (c10/cuda/CUDACachingAllocator.cpp, DeviceCachingAllocator::malloc / free / emptyCache).
//
// Input: Alloc(id, bytes) / Free(id) calls. Output: Stats() with c10's definitions (allocated counts block
// sizes after rounding and unsplit slack; reserved counts segment sizes), and Segments() listing every segment
// with its blocks, for reports and invariant checks. Segments get fresh, increasing base addresses (the first
// at 0, each next one right after the previous), so results are deterministic and addresses are never reused.
//
// Deliberately not modelled: multiple streams, record_stream and event-deferred frees, CUDA-graph pools,
// max_split_size and its release_available_cached_blocks path, garbage_collection_threshold,
// set_per_process_memory_fraction, expandable segments, memory outside the allocator (CUDA context, NCCL),
// and the device's own allocation granularity (segments are already multiples of 2 MiB).
//
// Note [Caching allocator malloc order]
// For a request of `bytes` (c10 DeviceCachingAllocator::malloc, single stream, default config):
//   1. rounded = RoundSize(bytes); pool = small iff rounded <= 1 MiB.
//   2. Best fit: the free block of that pool with the smallest size >= rounded, lowest address on ties.
//   3. If none: "cudaMalloc" a segment of SegmentSizeFor(rounded); it fails when reserved + segment size
//      would exceed capacity_bytes.
//   4. If that fails: release every cached segment that is entirely free (both pools), count one retry
//      (num_alloc_retries, counted even when nothing was released), and cudaMalloc once more.
//   5. If that fails too: out of memory (num_ooms), nothing changes except the released cache.
//   6. ShouldSplit(block, rounded): the front `rounded` bytes are handed out, the tail returns to the pool.
// Free returns the block to its pool at once, merged with free neighbours in the same segment. Segments go
// back to the device only in step 4 and EmptyCache(), and only when entirely free.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <string_view>
#include <tuple>
#include <vector>

#include "simulator/allocator_model.h"
#include "simulator/live_id_table.h"

namespace llmem::sim {

struct CachingAllocatorConfig {
  int64_t capacity_bytes = kUnlimitedBytes;  // bytes the allocator may reserve; a segment beyond it fails
  int roundup_power2_divisions = 0;          // PYTORCH_CUDA_ALLOC_CONF roundup_power2_divisions, one value (0 = off)
};

// One block of a segment, as reported by Segments().
struct BlockInfo {
  int64_t address = 0;          // device address of the block's first byte (model addresses, bytes)
  int64_t size_bytes = 0;       // block size, a multiple of kMinBlockSize
  int64_t requested_bytes = 0;  // original request of the live block; 0 when free
  int64_t id = -1;              // id of the live block; -1 when free
  bool allocated = false;       // live (true) or cached free (false)
};

// One segment (one "cudaMalloc"), as reported by Segments().
struct SegmentInfo {
  int64_t segment_id = 0;          // 0, 1, 2... in creation order; never reused
  int64_t address = 0;             // base address (bytes)
  int64_t size_bytes = 0;          // segment size = sum of its blocks' sizes
  bool small_pool = false;         // segment belongs to the small (<= 1 MiB blocks) pool
  std::vector<BlockInfo> blocks;   // blocks in address order, covering the segment contiguously
};

class CudaCachingAllocatorModel final : public AllocatorModel {
 public:
  explicit CudaCachingAllocatorModel(CachingAllocatorConfig config = {});

  std::string_view Name() const override { return "cuda_caching"; }
  // See Note [Caching allocator malloc order]. A zero-byte request succeeds without a block (as c10's
  // allocate(0) returns a null pointer) and changes no statistic.
  bool Alloc(int64_t id, int64_t bytes) override;
  void Free(int64_t id) override;
  AllocatorStats Stats() const override { return stats_; }
  void ResetPeaks() override;

  // torch.cuda.empty_cache: returns every entirely free segment of both pools to the device.
  void EmptyCache();

  // Every segment in address order, with its blocks. O(blocks); meant for reports and tests.
  std::vector<SegmentInfo> Segments() const;
  // Address of live block `id`'s first byte; -1 when `id` is not live or was a zero-byte request.
  int64_t AddressOf(int64_t id) const;
  // Size of the largest cached free block in either pool (0 if none), for out-of-memory messages.
  int64_t LargestFreeBlockBytes() const;
  const CachingAllocatorConfig& config() const { return config_; }

 private:
  static constexpr int32_t kNoBlock = -1;

  struct Block {
    int64_t address = 0;
    int64_t size_bytes = 0;
    int64_t requested_bytes = 0;   // original request while allocated
    int64_t id = -1;               // live id while allocated
    int64_t segment_address = 0;   // key of the owning segment in segments_
    int32_t prev = kNoBlock;       // neighbour at lower address in the same segment
    int32_t next = kNoBlock;       // neighbour at higher address in the same segment
    bool allocated = false;
    bool small_pool = false;
  };
  struct Segment {
    int64_t segment_id = 0;
    int64_t size_bytes = 0;
    int32_t first_block = kNoBlock;
    bool small_pool = false;
  };
  // Free blocks of one pool ordered by (size, address): c10's BlockComparatorSize on one stream.
  using FreeKey = std::tuple<int64_t, int64_t, int32_t>;  // (size_bytes, address, block index)
  using FreePool = std::set<FreeKey>;

  FreePool& PoolFor(bool small_pool) { return small_pool ? small_free_ : large_free_; }
  int32_t NewBlock(const Block& block);
  // Folds block `back` into its front neighbour `front` (both out of the free set); returns `front`.
  int32_t Absorb(int32_t front, int32_t back);
  void DeleteBlock(int32_t index);
  void InsertFree(int32_t index);
  void EraseFree(int32_t index);
  int32_t FindBestFit(int64_t rounded_bytes, bool small_pool);
  int32_t MallocSegment(int64_t segment_bytes, bool small_pool);
  void ReleaseCachedSegments();
  void SplitFront(int32_t index, int64_t front_bytes);
  bool IsInSplitSegment(const Block& block) const { return block.prev != kNoBlock || block.next != kNoBlock; }

  CachingAllocatorConfig config_;
  std::vector<Block> blocks_;                // block storage indexed by block index
  std::vector<int32_t> unused_block_slots_;  // indices in blocks_ free for reuse (LIFO)
  FreePool small_free_;
  FreePool large_free_;
  LiveIdTable<int32_t> live_;             // live id -> block index (kNoBlock for zero-byte requests)
  std::map<int64_t, Segment> segments_;   // base address -> segment
  int64_t next_segment_address_ = 0;      // base address of the next segment
  int64_t next_segment_id_ = 0;
  AllocatorStats stats_;
};

}  // namespace llmem::sim
