// How GPUs are spread over nodes (node_layout.h): whole nodes of the GPU kind's usual size unless --nodes says.
#include "distributed/node_layout.h"

#include <gtest/gtest.h>

#include "graph/error.h"

namespace llmem::dist {
namespace {

sim::GpuSpec Gpu(const char* name) { return *sim::FindGpu(name); }

TEST(NodeLayoutTest, UnsaidNodesAreWholeNodesOfEight) {
  const NodeLayout l = ResolveNodeLayout(64, std::nullopt, Gpu("h100-80"));
  EXPECT_EQ(l.nodes, 8);
  EXPECT_EQ(l.gpus_per_node, 8);
  EXPECT_NE(l.assumption.find("a node holds 8 h100-80 GPUs"), std::string::npos) << l.assumption;
}

TEST(NodeLayoutTest, UpToOneNodeIsOneNodeOfThatMany) {
  const NodeLayout l = ResolveNodeLayout(4, std::nullopt, Gpu("l4-24"));
  EXPECT_EQ(l.nodes, 1);
  EXPECT_EQ(l.gpus_per_node, 4);
  EXPECT_FALSE(l.assumption.empty());
}

TEST(NodeLayoutTest, ExplicitNodesWin) {
  const NodeLayout l = ResolveNodeLayout(64, 2, Gpu("a100-80"));
  EXPECT_EQ(l.nodes, 2);
  EXPECT_EQ(l.gpus_per_node, 32);
  // Larger nodes than usual are taken as given, with a note.
  EXPECT_NE(l.assumption.find("32 GPUs per node, more than the usual 8"), std::string::npos) << l.assumption;
  EXPECT_TRUE(ResolveNodeLayout(64, 8, Gpu("a100-80")).assumption.empty());
}

TEST(NodeLayoutTest, PartialNodesNeedTheNodeCount) {
  EXPECT_THROW(ResolveNodeLayout(12, std::nullopt, Gpu("a100-80")), ConfigError);
  EXPECT_EQ(ResolveNodeLayout(12, 3, Gpu("a100-80")).gpus_per_node, 4);
  EXPECT_THROW(ResolveNodeLayout(12, 5, Gpu("a100-80")), ConfigError);
  EXPECT_THROW(ResolveNodeLayout(8, 0, Gpu("a100-80")), ConfigError);
  EXPECT_THROW(ResolveNodeLayout(0, std::nullopt, Gpu("a100-80")), ConfigError);
}

}  // namespace
}  // namespace llmem::dist
