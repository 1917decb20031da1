// The links collectives run over: GPU-to-GPU links inside a node (NVLink generations, PCIe) and the networks
// between nodes (InfiniBand, RoCE). Each entry gives what a ring-algorithm cost model needs: the bandwidth per
// GPU, the share of it NCCL's bus bandwidth reaches, and NCCL's latency terms.
//
// Figures and sources:
// - bandwidth_bytes_per_s: unidirectional, per GPU. NVLink: the datasheet's bidirectional figure halved (V100 SXM2
//   "300 GB/s", A100 SXM4 "600 GB/s", H100/H200 SXM "900 GB/s"). PCIe x16: Gen4 "64 GB/s" and Gen5 "128 GB/s"
//   bidirectional (A100 PCIe / H100 PCIe datasheets), halved. Networks: the NIC line rate in bits / 8 (HDR
//   200 Gb/s, NDR 400 Gb/s, 100 GbE).
// - bus_bandwidth_fraction: the busbw nccl-tests reaches on large messages, over that bandwidth. Sources, where
//   there is one: NCCL's own model caps A100 NVLink at 235 GB/s (src/graph/tuning.cc, compCap80); for H100 an
//   NCCL maintainer quotes ~370 GB/s of the 450 GB/s line rate, "protocol overhead ~20%" (NVIDIA/nccl-tests#212);
//   HDR peaks at 24 GB/s per NIC (NVIDIA/nccl#412); NDR reaches 46-48 GB/s per NIC (NVIDIA/nccl-tests#290). The
//   rest (V100 NVLink, PCIe, RoCE) are assumptions, stated as such in the table.
// - base_latency_s, step_latency_s: NCCL's tuning model for the ring algorithm with the Simple protocol (the one
//   large buffers use): 8.4 us per collective plus, per ring step, 3.4 us on NVLink, 5.7 us on PCIe and 9.6 us
//   over the network (src/graph/tuning.cc, baseLat / hwLat).
//
// Between nodes, one NIC per GPU is assumed (as in DGX/HGX systems), so the per-GPU bandwidth of a group that
// spans nodes is the NIC's.
//
// What it does not model: NVLink SHARP (NVLS) and in-network (SHARP) reductions, which can beat the ring on H100
// systems; tree algorithms; contention with other traffic.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace llmem::dist {

struct Interconnect {
  std::string name;                     // catalog key, e.g. "nvlink3"
  std::string description;              // "NVLink 3 (A100 SXM4)"
  double bandwidth_bytes_per_s = 0;     // unidirectional line rate per GPU, B/s
  double bus_bandwidth_fraction = 1.0;  // share of bandwidth_bytes_per_s that NCCL's bus bandwidth reaches
  std::string fraction_source;          // where bus_bandwidth_fraction comes from, for the printed assumptions
  double base_latency_s = 0;            // fixed cost of one collective, s
  double step_latency_s = 0;            // cost of each ring step, s
  bool between_nodes = false;           // a network NIC (one per GPU), not a link inside a node

  // What NCCL's busbw reaches on large messages: the rate the ring formulas divide by, B/s.
  double bus_bandwidth_bytes_per_s() const { return bandwidth_bytes_per_s * bus_bandwidth_fraction; }
};

const std::vector<Interconnect>& InterconnectCatalog();
std::optional<Interconnect> FindInterconnect(std::string_view name);
std::string InterconnectNames();  // "nvlink2, nvlink3, ..."

}  // namespace llmem::dist
