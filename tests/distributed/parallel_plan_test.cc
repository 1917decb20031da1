#include "distributed/parallel_plan.h"

#include <gtest/gtest.h>

namespace llmem::dist {
namespace {

TEST(ParallelPlanTest, NamesSayDegreesAndEngine) {
  EXPECT_EQ((ParallelPlan{.dp = 8, .tp = 1, .engine = DataParallelEngine::kDdp}).Name(), "DP8");
  EXPECT_EQ((ParallelPlan{.dp = 4, .tp = 2, .engine = DataParallelEngine::kFsdp2Zero3}).Name(), "ZeRO-3×4×TP2");
  EXPECT_EQ((ParallelPlan{.dp = 1, .tp = 8, .engine = DataParallelEngine::kDdp}).Name(), "TP8");
  EXPECT_EQ((ParallelPlan{.dp = 2, .tp = 4, .engine = DataParallelEngine::kGemini}).Name(), "Gemini×2×TP4");
  EXPECT_EQ((ParallelPlan{.dp = 1, .tp = 1, .engine = DataParallelEngine::kDdp}).Name(), "DP1");
  EXPECT_EQ((ParallelPlan{.dp = 4, .tp = 2}).gpus(), 8);
}

}  // namespace
}  // namespace llmem::dist
