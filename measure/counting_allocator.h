// Counting allocators for the ground-truth measurement: a CPU allocator that hands out real memory and a meta
// allocator that hands out none, both recording current and peak bytes (and optionally every event).
//
// Usage:
//   llmem::ScopedCountingAllocator counting(c10::DeviceType::CPU);   // installs; restores the old one at exit
//   at::Tensor t = at::empty({1000});                                // counting.counters().current_bytes == 4000
//   counting.ResetPeak();                                            // peak_bytes = current_bytes
//
// What it does not do: round sizes, cache blocks or model fragmentation (the CUDA caching allocator does; see
// measure/training_step_runner.cc for how CUDA is measured), or count memory that bypasses c10's allocator
// (oneDNN scratch pads, BLAS workspaces, std::vector buffers inside kernels).
#pragma once

#include <c10/core/Allocator.h>

#include <cstdint>
#include <string>
#include <vector>

#include "measure/allocation_event.h"

namespace llmem {

// Byte counters of one device since installation.
struct AllocationCounters {
  int64_t current_bytes = 0;  // live bytes now (those allocated while counting and not yet freed)
  int64_t peak_bytes = 0;     // max of current_bytes since the last ResetPeak()
  int64_t num_allocs = 0;     // allocations since installation
  bool overflowed = false;    // live bytes passed INT64_MAX at some allocation (that allocation was not added)
};

// Installs counting allocators for `devices` (CPU and/or Meta) for its lifetime and restores the previous ones.
// With record_events, every allocation and free is kept with the phase label and the ops running at the time.
// All installed devices add into one set of counters (a meta run keeps a few CPU tensors, e.g. TorchScript
// tensor constants, that a CPU run counts too). Only one may be active at a time. Blocks allocated while it was
// active may be freed after it is gone; their frees are then ignored by the (process-lifetime) counters.
class ScopedCountingAllocator {
 public:
  explicit ScopedCountingAllocator(c10::DeviceType device, bool record_events = false)
      : ScopedCountingAllocator(std::vector<c10::DeviceType>{device}, record_events) {}
  explicit ScopedCountingAllocator(const std::vector<c10::DeviceType>& devices, bool record_events = false);
  ~ScopedCountingAllocator();
  ScopedCountingAllocator(const ScopedCountingAllocator&) = delete;
  ScopedCountingAllocator& operator=(const ScopedCountingAllocator&) = delete;

  AllocationCounters counters() const;
  void ResetPeak();
  void SetPhase(const std::string& phase);
  std::vector<AllocationEvent> events() const;

 private:
  std::vector<c10::DeviceType> devices_;
  std::vector<c10::Allocator*> previous_;
  uint64_t op_callback_ = 0;  // RecordFunction callback naming the running op in events (0: none)
};

}  // namespace llmem
