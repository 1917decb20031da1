#include "distributed/nccl_memory.h"

#include "graph/dtype.h"

namespace llmem::dist {

int CommunicatorsPerRank(const ParallelPlan& plan) { return (plan.dp > 1 ? 1 : 0) + (plan.tp > 1 ? 1 : 0); }

// NVLink parts (V100 SXM2, A100, H100, H200 in the catalog) vs PCIe-only parts (L4, RTX 4090).
int NcclChannels(const sim::GpuSpec& gpu) { return gpu.compute_capability == 89 ? 4 : 32; }

int64_t NcclBytesPerCommunicator(const sim::GpuSpec& gpu) {
  return static_cast<int64_t>(NcclChannels(gpu)) * kNcclRingConnectionsPerChannel * kNcclBytesPerConnection;
}

int64_t NcclBytesPerRank(const ParallelPlan& plan, const sim::GpuSpec& gpu) {
  return CommunicatorsPerRank(plan) * NcclBytesPerCommunicator(gpu);
}

std::string NcclAssumption(const sim::GpuSpec& gpu) {
  return "NCCL buffers outside PyTorch's allocator: " + FormatBytes(NcclBytesPerCommunicator(gpu)) +
         " per communicator (one per process group that communicates: data-parallel, tensor-parallel) = " +
         std::to_string(NcclChannels(gpu)) + " channels x " + std::to_string(kNcclRingConnectionsPerChannel) +
         " ring connections x " + FormatBytes(kNcclBytesPerConnection) + " (SIMPLE " +
         FormatBytes(kNcclSimpleBufferBytes) + " + LL " + FormatBytes(kNcclLlBufferBytes) + " + LL128 " +
         FormatBytes(kNcclLl128BufferBytes) +
         ", NCCL's defaults: NCCL_BUFFSIZE, NCCL_LL_BUFFSIZE, NCCL_LL128_BUFFSIZE unset, x86 host); the channel "
         "count is assumed (32 on NVLink parts, 4 on PCIe parts; NCCL tunes it per topology, NCCL_MIN_NCHANNELS "
         "and NCCL_MAX_NCHANNELS unset); NVLS (NVLink SHARP) buffers and pinned host memory are not counted";
}

std::string NcclRankAssumption(const ParallelPlan& plan, const sim::GpuSpec& gpu) {
  const int n = CommunicatorsPerRank(plan);
  return std::to_string(n) + (n == 1 ? " NCCL communicator" : " NCCL communicators") + " on this rank, " +
         FormatBytes(NcclBytesPerRank(plan, gpu)) + "; " + NcclAssumption(gpu);
}

}  // namespace llmem::dist
