// One allocation or free seen by a counting allocator (measure/counting_allocator.h). Plain data, no LibTorch.
#pragma once

#include <cstdint>
#include <string>

namespace llmem {

struct AllocationEvent {
  bool is_alloc = true;             // false: a free
  int64_t bytes = 0;                // requested size
  int64_t current_bytes_after = 0;  // live bytes after the event
  std::string phase;                // label set by the caller, e.g. "forward"
  std::string op;                   // ops running on the thread, outermost first, joined by " > " (may be empty)
};

}  // namespace llmem
