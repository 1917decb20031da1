// The largest micro-batch that fits one layout, found by exact estimates only: a bracket [largest batch known to
// fit, smallest batch known not to fit] that every estimate narrows, until the two are adjacent.
//
//   LargestBatchSearch s(capacity_bytes, batch_limit);
//   s.Record(8, estimate_at_8.nvidia_smi_bytes, estimate_at_8.fits);
//   while (!s.Done()) for (int64_t b : s.NextProbes()) s.Record(b, ..., ...);
//   s.Largest();  // fits; Largest() + 1 was estimated and does not (or is past the batch limit)
//
// Memory is close to linear in the batch (activations) but not exactly (allocator rounding and segments,
// workspaces, buckets), so a line through known points only proposes where to look next (the crossing of the
// capacity, and the batch above it, so that a right guess ends the search in one round); the answer is always a
// batch whose exact estimate fits next to one whose exact estimate does not. Bisection (or, without an upper end,
// a doubling step) takes over every other round from the third, so a search takes O(log batch) rounds whatever
// the curve.
//
// Assumes fitting is monotone in the batch (a batch that does not fit is not followed by one that does); the
// caller's batch limit bounds the search (batches above it do not fit).
//
// Does not estimate anything itself: the caller simulates the batches it is asked for, several searches at once.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <vector>

namespace llmem::dist {

class LargestBatchSearch {
 public:
  // batch_limit: no batch above it fits (at least 1).
  LargestBatchSearch(int64_t capacity_bytes, int64_t batch_limit);

  // The exact estimate at `batch`: its memory (what is compared with the capacity) and whether it fits.
  // `bytes` nullopt: the batch cannot be built (e.g. its byte counts overflow), which counts as not fitting.
  void Record(int64_t batch, std::optional<int64_t> bytes, bool fits);

  bool Done() const;                 // the bracket is closed: Largest() + 1 does not fit
  int64_t Largest() const;           // largest batch known to fit (0: not even 1)
  std::optional<int64_t> SmallestMiss() const;  // smallest batch known not to fit

  // Bytes per extra sample through the two known points nearest the bracket (nullopt: fewer than two points).
  std::optional<double> Slope() const;

  // The batches to estimate next, one round's worth (one or two, inside the bracket; empty when Done()). With a
  // single known point there is no line yet: the batch is doubled (or halved below a miss), which different
  // searches started at the same batch share.
  std::vector<int64_t> NextProbes();

 private:
  int64_t capacity_bytes_;
  int64_t batch_limit_;
  int64_t lo_ = 0;                   // largest batch known to fit; batch 0 trivially does
  std::optional<int64_t> hi_;        // smallest batch above lo_ known not to fit
  std::set<int64_t> misses_;         // every batch estimated not to fit (or not buildable)
  std::map<int64_t, int64_t> bytes_;  // batch -> memory of every estimate that could be built
  int rounds_ = 0;                   // NextProbes calls that proposed something
  int64_t gallop_ = 1;               // least step past lo_ while no upper end is known; doubles per round
};

}  // namespace llmem::dist
