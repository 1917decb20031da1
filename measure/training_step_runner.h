// Ground truth: runs real training steps of a TorchScript decoder LM with LibTorch and records memory.
//
// Input: a TorchScript file whose forward(input_ids, labels) returns the scalar loss (models/export_hf.py writes
// these). Each step is zero_grad(set_to_none) -> forward (under autocast for the autocast precisions) ->
// backward -> optimizer step, run by the TorchScript interpreter with graph optimization off (the
// eager-equivalent execution). Output: bytes after load and, per step and phase, the peak and the bytes at the
// end of the phase.
//
// Devices: "cpu" and "meta" count through measure/counting_allocator.h (meta allocates nothing, so any model
// size runs in seconds, and its numbers equal the CPU run's byte for byte); "cuda" reads the CUDA caching
// allocator's own statistics (allocated and reserved).
//
// It does not model anything (no rounding, fragmentation or workspaces beyond what the device really does);
// CPU kernels' scratch memory that bypasses c10's allocator is not counted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "measure/allocation_event.h"

namespace llmem {

enum class MeasureDevice { kCpu, kCuda, kMeta };
enum class MeasurePrecision { kFp32, kBf16Autocast, kFp16Autocast, kBf16 };
enum class MeasureOptimizer { kAdamW, kSgd };

MeasureDevice ParseMeasureDevice(const std::string& text);        // "cpu" | "cuda" | "meta"; ConfigError otherwise
MeasurePrecision ParseMeasurePrecision(const std::string& text);  // "fp32" | "bf16-autocast" | "fp16-autocast" | "bf16"
MeasureOptimizer ParseMeasureOptimizer(const std::string& text);  // "adamw" | "sgd"
std::string ToString(MeasureDevice device);
std::string ToString(MeasurePrecision precision);
std::string ToString(MeasureOptimizer optimizer);

struct MeasureOptions {
  std::string model_path;  // TorchScript file
  MeasureDevice device = MeasureDevice::kCpu;
  int64_t batch = 1;   // rows of input_ids
  int64_t seq = 128;   // tokens per row
  MeasurePrecision precision = MeasurePrecision::kFp32;
  MeasureOptimizer optimizer = MeasureOptimizer::kAdamW;  // AdamW: lr 1e-4, weight decay 0.01; SGD: momentum 0.9
  int64_t steps = 2;  // the steady-state peak (optimizer states already allocated) shows from step 2 on
  int cuda_device_index = 0;
  bool record_events = false;  // cpu/meta: keep every allocation and free in MeasureResult::events
};

// Memory of one phase of one step. On CUDA these are the caching allocator's "allocated" numbers.
struct PhaseMemory {
  int64_t peak_bytes = 0;  // highest live bytes during the phase
  int64_t end_bytes = 0;   // live bytes when the phase ends
  int64_t peak_reserved_bytes = 0;  // CUDA only: highest reserved (segment) bytes during the phase; else 0
  int64_t end_reserved_bytes = 0;   // CUDA only: reserved bytes when the phase ends; else 0
};

struct StepMemory {
  PhaseMemory forward;    // ends when forward returns the loss (activations saved for backward live)
  PhaseMemory backward;   // ends after loss.backward() (gradients live)
  PhaseMemory optimizer;  // ends after optimizer.step() (optimizer states live)
};

struct MeasureResult {
  MeasureOptions options;
  std::string device_name;     // e.g. "cpu", "meta", "cuda:0"
  int64_t num_parameters = 0;  // elements over all distinct parameters (tied weights once)
  int64_t weights_bytes = 0;   // live bytes after load (and dtype conversion): parameters + buffers
  int64_t inputs_bytes = 0;    // input_ids and labels (a separate copy of the ids)
  int64_t loader_bytes = 0;    // cpu/meta: bytes torch::jit::load keeps besides the module's tensors (code and
                               // debug records, scalar constants); host memory that a GPU run never holds on the
                               // device. Excluded from every other byte count here.
  std::vector<StepMemory> steps;
  int64_t peak_bytes = 0;           // max over load and all phases
  int64_t peak_reserved_bytes = 0;  // CUDA only; else 0
  double seconds = 0;               // wall time of the steps (not of the load)
  std::vector<AllocationEvent> events;  // cpu/meta with record_events; phase is "load", "forward", ...
};

// Runs options.steps training steps. Throws ModelLoadError for a missing/corrupt/non-LM model and ConfigError
// for bad options (autocast on meta, cuda without a GPU, batch or seq < 1).
MeasureResult MeasureTrainingStep(const MeasureOptions& options);

}  // namespace llmem
