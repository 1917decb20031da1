// `llmem estimate --snapshot FILE`: the simulated step as a PyTorch memory snapshot, the pickle
// torch.cuda.memory._dump_snapshot writes, which PyTorch's viewers read (pytorch.org/memory_viz,
// `python -m torch.cuda._memory_viz trace_plot FILE`).
//
// Layout (torch/cuda/memory.py _snapshot and _memory_viz.py, torch 2.11): a dict with
//   segments:      the allocator's segments when the history ends, each with device, address, total_size,
//                  allocated_size, active_size, requested_size, stream, segment_type (small | large) and blocks
//                  (address, size, requested_size, state active_allocated | inactive, frames);
//   device_traces: one list per device, here one: alloc, free_requested, free_completed, segment_alloc,
//                  segment_free and oom actions with addr, size, stream, time_us (the event's index) and frames.
// Frames say what llmem knows of each block instead of a Python stack: its label (the value and the op that made
// it), its category and its phase, as {filename, line, name} entries.
#pragma once

#include <string>

#include "simulator/memory_snapshot.h"
#include "simulator/memory_timeline.h"

namespace llmem::cli {

// Throws ConfigError when the file cannot be written.
void WriteMemorySnapshot(const std::string& path, const sim::MemorySnapshot& snapshot, const sim::Timeline& timeline);

}  // namespace llmem::cli
