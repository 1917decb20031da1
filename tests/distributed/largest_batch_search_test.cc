// The largest-batch search (largest_batch_search.h) against memory curves with a known answer: the batch it
// reports fits and the next one does not, whatever batch it starts from, and it closes in few rounds.
#include "distributed/largest_batch_search.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>

namespace llmem::dist {
namespace {

constexpr int64_t kCapacity = 1000000;

// Bytes at a batch; fits when at most the capacity.
using Curve = std::function<int64_t(int64_t)>;

struct Outcome {
  int64_t largest = 0;
  int rounds = 0;
  int estimates = 0;
};

Outcome Search(const Curve& bytes, int64_t start, int64_t limit = 1 << 20, int64_t unbuildable_from = 0) {
  LargestBatchSearch s(kCapacity, limit);
  auto record = [&](int64_t b) {
    if (unbuildable_from > 0 && b >= unbuildable_from) {
      s.Record(b, std::nullopt, false);
    } else {
      s.Record(b, bytes(b), bytes(b) <= kCapacity);
    }
  };
  Outcome out;
  record(start);
  ++out.estimates;
  while (!s.Done()) {
    const auto probes = s.NextProbes();
    EXPECT_FALSE(probes.empty());
    if (probes.empty() || ++out.rounds > 64) break;
    for (int64_t b : probes) {
      EXPECT_GE(b, 1);
      record(b);
      ++out.estimates;
    }
  }
  out.largest = s.Largest();
  return out;
}

// The largest batch with bytes(b) <= capacity, by brute force.
int64_t Truth(const Curve& bytes) {
  int64_t b = 0;
  while (bytes(b + 1) <= kCapacity) ++b;
  return b;
}

TEST(LargestBatchSearchTest, LinearCurveClosesInOneRoundAfterTheLine) {
  const Curve linear = [](int64_t b) { return 100000 + 3000 * b; };  // 300 fits (1,000,000), 301 does not
  ASSERT_EQ(Truth(linear), 300);
  const Outcome o = Search(linear, 1);
  EXPECT_EQ(o.largest, 300);
  EXPECT_LE(o.rounds, 2);  // doubling gives the line, the line gives 300 and 301
}

TEST(LargestBatchSearchTest, AnswerDoesNotDependOnTheStartingBatch) {
  // Allocator-like rounding: bytes grow by whole 2 MiB-style blocks of 20,000 B over a near-linear base, plus a
  // fixed workspace that appears from batch 64 on: neighbouring batches give a misleading slope.
  const Curve stepped = [](int64_t b) {
    const int64_t raw = 50000 + 2900 * b + (b >= 64 ? 30000 : 0);
    return (raw + 19999) / 20000 * 20000;
  };
  const int64_t truth = Truth(stepped);
  ASSERT_GT(truth, 64);
  for (int64_t start : {int64_t{1}, int64_t{17}, truth, truth + 1, int64_t{4000}, int64_t{1} << 19}) {
    const Outcome o = Search(stepped, start);
    EXPECT_EQ(o.largest, truth) << "start " << start;
    EXPECT_LE(o.rounds, 12) << "start " << start;
  }
}

TEST(LargestBatchSearchTest, CurvesTheLineDoesNotFollowStillCloseInLogRounds) {
  const Curve convex = [](int64_t b) { return 1000 + b * b; };                    // truth 999
  const Curve concave = [](int64_t b) { return static_cast<int64_t>(20000 * std::sqrt(double(b))); };  // 2500
  for (const Curve& c : {convex, concave}) {
    const int64_t truth = Truth(c);
    for (int64_t start : {int64_t{1}, int64_t{100000}}) {
      const Outcome o = Search(c, start);
      EXPECT_EQ(o.largest, truth);
      EXPECT_LE(o.rounds, 2 * 20 + 4);  // bisection every other round over a 2^20 range
    }
  }
}

TEST(LargestBatchSearchTest, NothingFitsAtOneEndsAtOnce) {
  const Curve huge = [](int64_t b) { return kCapacity + b; };
  const Outcome o = Search(huge, 1);
  EXPECT_EQ(o.largest, 0);
  EXPECT_EQ(o.estimates, 1);
  EXPECT_EQ(Search(huge, 50).largest, 0);  // searched down to 1
}

TEST(LargestBatchSearchTest, UnbuildableBatchesCountAsNotFitting) {
  // Memory never reaches the capacity, but batches from 1000 on cannot be built (their byte counts overflow).
  const Curve flat = [](int64_t) { return int64_t{10}; };
  EXPECT_EQ(Search(flat, 3, 1 << 20, 1000).largest, 999);
}

TEST(LargestBatchSearchTest, TheBatchLimitBoundsTheSearch) {
  const Curve flat = [](int64_t) { return int64_t{10}; };
  EXPECT_EQ(Search(flat, 3, 700).largest, 700);
}

}  // namespace
}  // namespace llmem::dist
