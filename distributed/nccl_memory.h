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

// Per-connection buffer of each protocol at NCCL's defaults (NCCL_BUFFSIZE, NCCL_LL_BUFFSIZE, NCCL_LL128_BUFFSIZE
// unset; x86 hosts: some releases default SIMPLE to 1 MiB on ARM).
constexpr int64_t kNcclSimpleBufferBytes = 4 * 1024 * 1024;  // DEFAULT_BUFFSIZE (1 << 22)
constexpr int64_t kNcclLlBufferBytes = 512 * 1024;           // DEFAULT_LL_BUFFSIZE
constexpr int64_t kNcclLl128BufferBytes = 4'915'200;         // DEFAULT_LL128_BUFFSIZE
constexpr int64_t kNcclBytesPerConnection = kNcclSimpleBufferBytes + kNcclLlBufferBytes + kNcclLl128BufferBytes;
constexpr int kNcclRingConnectionsPerChannel = 2;  // a ring channel connects to the previous and the next rank

// One communicator per process group that runs collectives: the data-parallel group when dp > 1, the
// tensor-parallel group when tp > 1 (and for dp > 1 × tp > 1 both).
int CommunicatorsPerRank(const ParallelPlan& plan);
int NcclChannels(const sim::GpuSpec& gpu);
int64_t NcclBytesPerRank(const ParallelPlan& plan, const sim::GpuSpec& gpu);
int64_t NcclBytesPerCommunicator(const sim::GpuSpec& gpu);

// What the figures above assume, in words with the numbers, for the assumptions printed with a table of parallel
// layouts: buffer sizes per protocol and the NCCL variables left at their defaults, the channel count, and what
// is not counted.
std::string NcclAssumption(const sim::GpuSpec& gpu);
// The same for one rank of `plan`: its communicators and their total first.
std::string NcclRankAssumption(const ParallelPlan& plan, const sim::GpuSpec& gpu);

}  // namespace llmem::dist
