// Device memory NCCL takes outside PyTorch's caching allocator, per rank: buffers per communicator, channel and
// ring connection. Figures (../shared/reference/gpu-memory-facts.md §2.4, from NVIDIA/nccl src/init.cc): per
// connection SIMPLE 4 MiB (NCCL_BUFFSIZE) + LL 512 KiB + LL128 4,915,200 B ≈ 9.19 MiB; a ring uses 2 connections
// per channel. Channel counts are an assumption (NCCL tunes them per topology): 32 on NVLink/NVSwitch parts,
// 4 on PCIe parts; with 32 channels this gives ~588 MiB per communicator, in the 544–688 MB per group measured on
// 4×A100 NVLink (NVIDIA/nccl issue #964).
#pragma once

#include <cstdint>
#include <string>

#include "distributed/parallel_plan.h"
#include "simulator/gpu_catalog.h"

namespace llmem::dist {

constexpr int64_t kNcclBytesPerConnection = 4 * 1024 * 1024 + 512 * 1024 + 4'915'200;

// One communicator per process group that runs collectives: the data-parallel group when dp > 1, the
// tensor-parallel group when tp > 1 (and for dp > 1 × tp > 1 both).
int CommunicatorsPerRank(const ParallelPlan& plan);
int NcclChannels(const sim::GpuSpec& gpu);
int64_t NcclBytesPerRank(const ParallelPlan& plan, const sim::GpuSpec& gpu);
std::string NcclAssumption(const sim::GpuSpec& gpu);

}  // namespace llmem::dist
