#include "distributed/largest_batch_search.h"

#include <algorithm>
#include <cmath>

#include "graph/error.h"

namespace llmem::dist {

LargestBatchSearch::LargestBatchSearch(int64_t capacity_bytes, int64_t batch_limit)
    : capacity_bytes_(capacity_bytes), batch_limit_(std::max<int64_t>(1, batch_limit)) {}

void LargestBatchSearch::Record(int64_t batch, std::optional<int64_t> bytes, bool fits) {
  LLMEM_CHECK(batch >= 1) << "batch " << batch;
  if (bytes) bytes_[batch] = *bytes;
  if (fits && bytes.has_value()) {
    lo_ = std::max(lo_, batch);
  } else {
    misses_.insert(batch);
  }
  // Fitting is assumed monotone; should an estimate contradict that, the bracket keeps to estimated ends anyway
  // (the reported batch fits and the one above it was estimated not to), so the answer is one the estimates show.
  const auto above = misses_.upper_bound(lo_);
  hi_ = above == misses_.end() ? std::nullopt : std::optional<int64_t>(*above);
}

bool LargestBatchSearch::Done() const { return lo_ >= batch_limit_ || (hi_ && *hi_ == lo_ + 1); }

int64_t LargestBatchSearch::Largest() const { return lo_; }

std::optional<int64_t> LargestBatchSearch::SmallestMiss() const { return hi_; }

std::optional<double> LargestBatchSearch::Slope() const {
  // Across the bracket when both ends were estimated; else from the point nearest the bracket to the one farthest
  // from it: over neighbouring batches the allocator's rounding (blocks, segments) outweighs the activations.
  if (hi_ && bytes_.count(lo_) && bytes_.count(*hi_)) {
    return static_cast<double>(bytes_.at(*hi_) - bytes_.at(lo_)) / static_cast<double>(*hi_ - lo_);
  }
  if (bytes_.size() < 2) return std::nullopt;
  const int64_t top = hi_ ? *hi_ : lo_;
  auto distance = [&](int64_t b) { return b < lo_ ? lo_ - b : (b > top ? b - top : 0); };
  auto nearest = bytes_.begin(), farthest = bytes_.begin();
  for (auto it = bytes_.begin(); it != bytes_.end(); ++it) {
    if (distance(it->first) < distance(nearest->first)) nearest = it;
    if (distance(it->first) > distance(farthest->first)) farthest = it;
  }
  if (nearest->first == farthest->first) farthest = nearest == bytes_.begin() ? std::next(nearest) : bytes_.begin();
  return static_cast<double>(farthest->second - nearest->second) /
         static_cast<double>(farthest->first - nearest->first);
}

std::vector<int64_t> LargestBatchSearch::NextProbes() {
  if (Done()) return {};
  ++rounds_;
  const int64_t top = hi_ ? *hi_ - 1 : batch_limit_;  // largest batch that may still fit
  // Without a line: halve the bracket, or, without an upper end, double the batch.
  int64_t guess = hi_ ? lo_ + (top - lo_ + 1) / 2 : std::max<int64_t>(lo_ + 1, 2 * lo_);
  // From the third round on, every other round halves the bracket whatever the line says, and without an upper
  // end each round steps at least twice as far as the last: a curve the line does not follow still closes in
  // O(log batch) rounds.
  const bool bisect = hi_ && rounds_ > 2 && rounds_ % 2 == 1;
  const std::optional<double> slope = Slope();
  if (!bisect && slope && *slope > 0 && !bytes_.empty()) {
    // Where the line through the nearest known point crosses the capacity.
    int64_t anchor = bytes_.begin()->first;
    if (bytes_.count(lo_)) {
      anchor = lo_;
    } else if (hi_ && bytes_.count(*hi_)) {
      anchor = *hi_;
    }
    const double crossing = static_cast<double>(anchor) +
                            static_cast<double>(capacity_bytes_ - bytes_.at(anchor)) / *slope;
    guess = crossing <= static_cast<double>(lo_) ? lo_
            : crossing >= static_cast<double>(top) ? top
                                                   : static_cast<int64_t>(std::floor(crossing));
    if (!hi_ && rounds_ > 2) {
      gallop_ = gallop_ > (top - lo_) / 2 ? top - lo_ : 2 * gallop_;
      guess = std::max(guess, lo_ + gallop_);
    }
  }
  guess = std::clamp(guess, lo_, top);
  // The proposed largest batch and the one above it: when the proposal is right, one round closes the bracket.
  std::vector<int64_t> probes;
  if (guess > lo_) probes.push_back(guess);
  if (guess + 1 <= top) probes.push_back(guess + 1);
  return probes;
}

}  // namespace llmem::dist
