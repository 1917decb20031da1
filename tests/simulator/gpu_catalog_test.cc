// The GPU catalog: the names it knows, their capacities, and the fixed costs (cuBLAS workspaces, CUDA context).
#include "simulator/gpu_catalog.h"

#include <gtest/gtest.h>

#include <set>

#include "graph/dtype.h"

namespace llmem::sim {
namespace {

TEST(GpuCatalogTest, HasTheDocumentedGpus) {
  std::set<std::string> names;
  for (const auto& g : GpuCatalog()) names.insert(g.name);
  EXPECT_EQ(names, (std::set<std::string>{"v100-16", "v100-32", "a100-40", "a100-80", "h100-80", "h200-141", "l4-24",
                                          "rtx4090-24"}));
  EXPECT_EQ(GpuCatalog().size(), 8u);  // no duplicate keys
  EXPECT_EQ(GpuNames(), "v100-16, v100-32, a100-40, a100-80, h100-80, h200-141, l4-24, rtx4090-24");
}

TEST(GpuCatalogTest, HopperCublasWorkspaceIs32MiB) {
  // sm90: 32 MiB = 33,554,432 B.
  for (const char* name : {"h100-80", "h200-141"}) {
    auto g = FindGpu(name);
    ASSERT_TRUE(g.has_value()) << name;
    EXPECT_EQ(g->compute_capability, 90) << name;
    EXPECT_EQ(g->cublas_workspace_bytes, 33'554'432) << name;
  }
}

TEST(GpuCatalogTest, PreHopperCublasWorkspace) {
  // 4096 KiB * 2 + 16 KiB * 8 = 8,388,608 + 131,072 = 8,519,680 B.
  for (const char* name : {"v100-16", "v100-32", "a100-40", "a100-80", "l4-24", "rtx4090-24"}) {
    auto g = FindGpu(name);
    ASSERT_TRUE(g.has_value()) << name;
    EXPECT_LT(g->compute_capability, 90) << name;
    EXPECT_EQ(g->cublas_workspace_bytes, 8'519'680) << name;
  }
}

TEST(GpuCatalogTest, FixedCosts) {
  for (const auto& g : GpuCatalog()) {
    EXPECT_EQ(g.cublaslt_workspace_bytes, 1024 * kKiB) << g.name;  // CUBLASLT_WORKSPACE_SIZE default
    EXPECT_EQ(g.cuda_context_bytes, 400 * kMiB) << g.name;          // the printed lazy-loading assumption
    EXPECT_GT(g.capacity_bytes, g.cuda_context_bytes) << g.name;
  }
}

TEST(GpuCatalogTest, Capacities) {
  EXPECT_EQ(FindGpu("a100-80")->capacity_bytes, 80 * kGiB - 512 * kMiB);
  EXPECT_EQ(FindGpu("a100-40")->capacity_bytes, 40 * kGiB - 448 * kMiB);
  EXPECT_EQ(FindGpu("v100-16")->capacity_bytes, 16 * kGiB - 512 * kMiB);
  EXPECT_EQ(FindGpu("h200-141")->capacity_bytes, 139 * kGiB);
  // Larger parts of the same family hold more.
  EXPECT_GT(FindGpu("v100-32")->capacity_bytes, FindGpu("v100-16")->capacity_bytes);
  EXPECT_GT(FindGpu("a100-80")->capacity_bytes, FindGpu("a100-40")->capacity_bytes);
}

TEST(GpuCatalogTest, UnknownNameIsNullopt) {
  EXPECT_FALSE(FindGpu("nope").has_value());
  EXPECT_FALSE(FindGpu("").has_value());
  EXPECT_FALSE(FindGpu("NVIDIA").has_value());
  // PCIe parts have other bandwidth and clocks than the SXM figures of the catalog.
  EXPECT_FALSE(FindGpu("NVIDIA A100 80GB PCIe").has_value());
  EXPECT_FALSE(FindGpu("NVIDIA H100 PCIe").has_value());
}

TEST(GpuCatalogTest, KeysIgnoreCase) {
  ASSERT_TRUE(FindGpu("A100-80").has_value());
  EXPECT_EQ(FindGpu("A100-80")->name, "a100-80");
  EXPECT_EQ(FindGpu("H200-141")->name, "h200-141");
}

TEST(GpuCatalogTest, FindsTheNamesNvidiaSmiPrints) {
  const std::pair<const char*, const char*> names[] = {
      {"Tesla V100-SXM2-16GB", "v100-16"},   {"Tesla V100-SXM2-32GB", "v100-32"},
      {"NVIDIA A100-SXM4-40GB", "a100-40"},  {"NVIDIA A100-SXM4-80GB", "a100-80"},
      {"NVIDIA H100 80GB HBM3", "h100-80"},  {"H100 80GB HBM3", "h100-80"},
      {"NVIDIA H200", "h200-141"},           {"NVIDIA L4", "l4-24"},
      {"NVIDIA GeForce RTX 4090", "rtx4090-24"}, {"nvidia a100-sxm4-80gb", "a100-80"},
  };
  for (const auto& [device_name, key] : names) {
    auto g = FindGpu(device_name);
    ASSERT_TRUE(g.has_value()) << device_name;
    EXPECT_EQ(g->name, key) << device_name;
  }
}

}  // namespace
}  // namespace llmem::sim
