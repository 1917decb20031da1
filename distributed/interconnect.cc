#include "distributed/interconnect.h"

namespace llmem::dist {
namespace {

constexpr double kGBps = 1e9;              // bytes per second in one GB/s
constexpr double kGbps = 1e9 / 8;          // bytes per second in one Gb/s (network line rates)
constexpr double kMicrosecond = 1e-6;

// NCCL src/graph/tuning.cc, ring algorithm, Simple protocol: baseLat and hwLat per hardware class.
constexpr double kNcclRingBaseLatency = 8.4 * kMicrosecond;
constexpr double kNcclNvlinkStepLatency = 3.4 * kMicrosecond;
constexpr double kNcclPcieStepLatency = 5.7 * kMicrosecond;
constexpr double kNcclNetStepLatency = 9.6 * kMicrosecond;

// NCCL's protocol overhead on NVLink, "~20%" (NVIDIA/nccl-tests#212); applied where nothing more specific exists.
constexpr double kNvlinkProtocolEfficiency = 0.8;

Interconnect Link(std::string name, std::string description, double bandwidth, double fraction, std::string source,
                  double step_latency, bool between_nodes) {
  Interconnect l;
  l.name = std::move(name);
  l.description = std::move(description);
  l.bandwidth_bytes_per_s = bandwidth;
  l.bus_bandwidth_fraction = fraction;
  l.fraction_source = std::move(source);
  l.base_latency_s = kNcclRingBaseLatency;
  l.step_latency_s = step_latency;
  l.between_nodes = between_nodes;
  return l;
}

}  // namespace

const std::vector<Interconnect>& InterconnectCatalog() {
  static const std::vector<Interconnect> catalog = {
      // Inside a node.
      Link("nvlink2", "NVLink 2 (V100 SXM2), 6 links", 150 * kGBps, kNvlinkProtocolEfficiency,
           "assumption: NCCL's ~20% NVLink protocol overhead (NVIDIA/nccl-tests#212)", kNcclNvlinkStepLatency,
           false),
      Link("nvlink3", "NVLink 3 (A100 SXM4), 12 links", 300 * kGBps, 235.0 / 300.0,
           "NCCL's model caps A100 NVLink bus bandwidth at 235 GB/s (src/graph/tuning.cc)", kNcclNvlinkStepLatency,
           false),
      Link("nvlink4", "NVLink 4 (H100/H200 SXM), 18 links", 450 * kGBps, 370.0 / 450.0,
           "~370 GB/s of the 450 GB/s line rate, per an NCCL maintainer (NVIDIA/nccl-tests#212)",
           kNcclNvlinkStepLatency, false),
      Link("pcie4", "PCIe Gen4 x16", 32 * kGBps, 0.7,
           "assumption: PCIe packet and NCCL protocol overheads; shared switches and host bridges often do worse "
           "(NVIDIA/nccl#1530)",
           kNcclPcieStepLatency, false),
      Link("pcie5", "PCIe Gen5 x16", 64 * kGBps, 0.7, "assumption, as pcie4", kNcclPcieStepLatency, false),
      // Between nodes: one NIC per GPU.
      Link("ib-hdr", "InfiniBand HDR, 200 Gb/s per GPU", 200 * kGbps, 24.0 / 25.0,
           "24 GB/s peak bus bandwidth per HDR NIC, per an NCCL maintainer (NVIDIA/nccl#412)", kNcclNetStepLatency,
           true),
      Link("ib-ndr", "InfiniBand NDR, 400 Gb/s per GPU", 400 * kGbps, 47.0 / 50.0,
           "46-48 GB/s per NDR NIC, per NVIDIA (NVIDIA/nccl-tests#290)", kNcclNetStepLatency, true),
      Link("roce-100g", "RoCE v2 over 100 GbE, 100 Gb/s per GPU", 100 * kGbps, 0.9,
           "assumption: below InfiniBand's ~95% for Ethernet framing and congestion control", kNcclNetStepLatency,
           true),
  };
  return catalog;
}

std::optional<Interconnect> FindInterconnect(std::string_view name) {
  for (const auto& l : InterconnectCatalog()) {
    if (l.name == name) return l;
  }
  return std::nullopt;
}

std::string InterconnectNames() {
  std::string s;
  for (const auto& l : InterconnectCatalog()) s += (s.empty() ? "" : ", ") + l.name;
  return s;
}

}  // namespace llmem::dist
