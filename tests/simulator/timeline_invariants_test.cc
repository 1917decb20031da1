// Each rule of CheckTimelineInvariants stops a timeline that breaks it, and a real step's timeline passes.
#include <gtest/gtest.h>

#include "simulator/timeline_invariants.h"
#include "simulator/training_step_simulator.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

Timeline Blocks(std::initializer_list<MemoryCategory> categories) {
  Timeline tl;
  for (MemoryCategory c : categories) tl.block_labels.push_back(std::string(CategoryName(c)));
  return tl;
}
MemoryEvent Alloc(int64_t block, int64_t bytes, MemoryCategory c) { return {true, block, bytes, c, Phase::kForward, -1}; }
MemoryEvent Free(int64_t block, int64_t bytes) { return {false, block, bytes, MemoryCategory::kTransient, Phase::kForward, -1}; }

TEST(TimelineInvariantsTest, ARealStepPasses) {
  const StepSimulation sim = SimulateTrainingStep(testing::TwoLinears(), testing::CpuConfig());
  CheckTimelineInvariants(sim.timeline);  // would abort
  SUCCEED();
}

TEST(TimelineInvariantsDeathTest, DoubleFree) {
  Timeline tl = Blocks({MemoryCategory::kActivations});
  tl.events = {Alloc(0, 8, MemoryCategory::kActivations), Free(0, 8), Free(0, 8)};
  EXPECT_DEATH(CheckTimelineInvariants(tl), "freed twice");
}

TEST(TimelineInvariantsDeathTest, FreeBeforeAlloc) {
  Timeline tl = Blocks({MemoryCategory::kActivations});
  tl.events = {Free(0, 8)};
  EXPECT_DEATH(CheckTimelineInvariants(tl), "freed before it exists");
}

TEST(TimelineInvariantsDeathTest, AllocatedTwice) {
  Timeline tl = Blocks({MemoryCategory::kWeights});
  tl.events = {Alloc(0, 8, MemoryCategory::kWeights), Alloc(0, 8, MemoryCategory::kWeights)};
  EXPECT_DEATH(CheckTimelineInvariants(tl), "allocated twice");
}

TEST(TimelineInvariantsDeathTest, NegativeLiveBytes) {
  Timeline tl = Blocks({MemoryCategory::kActivations});
  tl.events = {Alloc(0, 8, MemoryCategory::kActivations), Free(0, 16)};
  EXPECT_DEATH(CheckTimelineInvariants(tl), "below zero");
}

TEST(TimelineInvariantsDeathTest, ActivationOutlivesTheStep) {
  Timeline tl = Blocks({MemoryCategory::kWeights, MemoryCategory::kActivations});
  tl.events = {Alloc(0, 8, MemoryCategory::kWeights), Alloc(1, 8, MemoryCategory::kActivations)};
  EXPECT_DEATH(CheckTimelineInvariants(tl), "still live when it ends");
}

TEST(TimelineInvariantsTest, PersistentBlocksMayStayLive) {
  Timeline tl = Blocks({MemoryCategory::kWeights, MemoryCategory::kGradients, MemoryCategory::kOptimizerState});
  tl.events = {Alloc(0, 8, MemoryCategory::kWeights), Alloc(1, 8, MemoryCategory::kGradients),
               Alloc(2, 8, MemoryCategory::kOptimizerState)};
  CheckTimelineInvariants(tl);
  SUCCEED();
}

}  // namespace
}  // namespace llmem::sim
