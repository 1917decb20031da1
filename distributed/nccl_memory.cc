#include "distributed/nccl_memory.h"

namespace llmem::dist {

int CommunicatorsPerRank(const ParallelPlan& plan) { return (plan.dp > 1 ? 1 : 0) + (plan.tp > 1 ? 1 : 0); }

// NVLink parts (V100 SXM2, A100, H100, H200 in the catalog) vs PCIe-only parts (L4, RTX 4090).
int NcclChannels(const sim::GpuSpec& gpu) { return gpu.compute_capability == 89 ? 4 : 32; }

int64_t NcclBytesPerRank(const ParallelPlan& plan, const sim::GpuSpec& gpu) {
  return static_cast<int64_t>(CommunicatorsPerRank(plan)) * NcclChannels(gpu) * 2 * kNcclBytesPerConnection;
}

std::string NcclAssumption(const sim::GpuSpec& gpu) {
  return "NCCL buffers outside the allocator: " + std::to_string(NcclChannels(gpu)) +
         " channels x 2 ring connections x 9.19 MiB per communicator (assumed channel count)";
}

}  // namespace llmem::dist
