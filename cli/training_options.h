// Turns the command line's names (precision, optimizer, GPU or "cpu", a memory size) into a training
// configuration; shared by every command that simulates a step. Unknown names throw llmem::ConfigError naming the
// known ones.
#pragma once

#include <cstdint>
#include <string>

#include "graph/decoder_model.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// `gpu_memory` (may be empty) replaces the capacity of the GPU named by `target`, for a part the catalog lacks:
// every other figure (CUDA context, cuBLAS workspaces, compute capability, throughput) stays that GPU's.
sim::TrainingConfig ParseTrainingConfig(const std::string& precision, const std::string& optimizer,
                                        const std::string& target, const std::string& gpu_memory = "");

// "24GiB", "81920 MiB", "80GB", "1.5 TiB", "512B": a positive byte count. Binary units (KiB, MiB, GiB, TiB) are
// powers of 1024, decimal ones (KB, MB, GB, TB) of 1000 (nvidia-smi prints MiB); a unit is required.
int64_t ParseByteSize(const std::string& text);

// What a --gpu-memory estimate takes from `gpu` (the catalogue part named with --gpu), in words for the output.
std::string GpuMemoryAssumption(const std::string& gpu);

// --lifetimes: eager (the user's eager Python program, default) | torchscript (what `llmem measure` runs).
sim::Lifetimes ParseLifetimesOption(const std::string& name);

// The routing a mixture-of-experts export was traced with, as an assumption line of estimate and recommend.
std::string MoeRoutingAssumption(const DecoderModel::MoeRouting& moe);

}  // namespace llmem::cli
