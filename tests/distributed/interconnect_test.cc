// The link catalog: its names, the bandwidths and NCCL efficiencies it states, and that every GPU's default
// intra-node link is in it.
#include "distributed/interconnect.h"

#include <gtest/gtest.h>

#include "simulator/gpu_catalog.h"

namespace llmem::dist {
namespace {

TEST(InterconnectTest, HasTheDocumentedLinks) {
  EXPECT_EQ(InterconnectNames(), "nvlink2, nvlink3, nvlink4, pcie4, pcie5, ib-hdr, ib-ndr, roce-100g");
  EXPECT_EQ(InterconnectCatalog().size(), 8u);
}

TEST(InterconnectTest, UnknownNameIsNullopt) {
  EXPECT_FALSE(FindInterconnect("nvlink5").has_value());
  EXPECT_FALSE(FindInterconnect("").has_value());
  EXPECT_FALSE(FindInterconnect("NVLINK3").has_value());  // keys are lower-case
}

TEST(InterconnectTest, NvlinkIsHalfTheDatasheetsBidirectionalFigure) {
  EXPECT_DOUBLE_EQ(FindInterconnect("nvlink2")->bandwidth_bytes_per_s, 150e9);  // V100: "300 GB/s"
  EXPECT_DOUBLE_EQ(FindInterconnect("nvlink3")->bandwidth_bytes_per_s, 300e9);  // A100: "600 GB/s"
  EXPECT_DOUBLE_EQ(FindInterconnect("nvlink4")->bandwidth_bytes_per_s, 450e9);  // H100: "900 GB/s"
  EXPECT_DOUBLE_EQ(FindInterconnect("pcie4")->bandwidth_bytes_per_s, 32e9);
  EXPECT_DOUBLE_EQ(FindInterconnect("pcie5")->bandwidth_bytes_per_s, 64e9);
}

TEST(InterconnectTest, BusBandwidthMatchesTheQuotedNcclFigures) {
  EXPECT_NEAR(FindInterconnect("nvlink3")->bus_bandwidth_bytes_per_s(), 235e9, 1e3);  // tuning.cc cap
  EXPECT_NEAR(FindInterconnect("nvlink4")->bus_bandwidth_bytes_per_s(), 370e9, 1e3);  // nccl-tests#212
  EXPECT_NEAR(FindInterconnect("ib-hdr")->bus_bandwidth_bytes_per_s(), 24e9, 1e3);    // nccl#412
  EXPECT_NEAR(FindInterconnect("ib-ndr")->bus_bandwidth_bytes_per_s(), 47e9, 1e3);    // nccl-tests#290
}

TEST(InterconnectTest, NetworksAreOneNicPerGpu) {
  EXPECT_DOUBLE_EQ(FindInterconnect("ib-hdr")->bandwidth_bytes_per_s, 25e9);  // 200 Gb/s
  EXPECT_DOUBLE_EQ(FindInterconnect("ib-ndr")->bandwidth_bytes_per_s, 50e9);  // 400 Gb/s
  EXPECT_DOUBLE_EQ(FindInterconnect("roce-100g")->bandwidth_bytes_per_s, 12.5e9);
  for (const auto& l : InterconnectCatalog()) {
    const bool network = l.name.starts_with("ib-") || l.name.starts_with("roce");
    EXPECT_EQ(l.between_nodes, network) << l.name;
  }
}

TEST(InterconnectTest, EveryLinkStatesItsEfficiencyAndNcclLatency) {
  for (const auto& l : InterconnectCatalog()) {
    EXPECT_GT(l.bus_bandwidth_fraction, 0.5) << l.name;
    EXPECT_LE(l.bus_bandwidth_fraction, 1.0) << l.name;
    EXPECT_FALSE(l.fraction_source.empty()) << l.name;
    EXPECT_DOUBLE_EQ(l.base_latency_s, 8.4e-6) << l.name;  // ring/Simple baseLat
  }
  EXPECT_DOUBLE_EQ(FindInterconnect("nvlink3")->step_latency_s, 3.4e-6);
  EXPECT_DOUBLE_EQ(FindInterconnect("pcie4")->step_latency_s, 5.7e-6);
  EXPECT_DOUBLE_EQ(FindInterconnect("ib-ndr")->step_latency_s, 9.6e-6);
}

TEST(InterconnectTest, EveryGpuNamesAnIntraNodeLinkOfTheCatalog) {
  for (const auto& g : sim::GpuCatalog()) {
    auto link = FindInterconnect(g.intra_node_link);
    ASSERT_TRUE(link.has_value()) << g.name << " names '" << g.intra_node_link << "'";
    EXPECT_FALSE(link->between_nodes) << g.name;
  }
  EXPECT_EQ(sim::FindGpu("v100-32")->intra_node_link, "nvlink2");
  EXPECT_EQ(sim::FindGpu("a100-40")->intra_node_link, "nvlink3");
  EXPECT_EQ(sim::FindGpu("h100-80")->intra_node_link, "nvlink4");
  EXPECT_EQ(sim::FindGpu("h200-141")->intra_node_link, "nvlink4");
  EXPECT_EQ(sim::FindGpu("l4-24")->intra_node_link, "pcie4");
  EXPECT_EQ(sim::FindGpu("rtx4090-24")->intra_node_link, "pcie4");
}

}  // namespace
}  // namespace llmem::dist
