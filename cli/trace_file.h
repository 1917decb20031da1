// The allocation timeline files that `llmem estimate --trace FILE` and `llmem measure --trace FILE` write.
//
// Format: tab-separated values, one header line, then one line per allocation or free in order:
//   estimate: event  bytes  live_bytes  category  phase  label
//   measure:  event  bytes  live_bytes  phase  op
// event is "alloc" or "free"; bytes the block's size; live_bytes the bytes live after the event. estimate: its
// maximum is the reported peak_allocated_bytes with --gpu cpu (for a GPU target the peak adds the allocator's
// rounding). measure: live_bytes also counts what the TorchScript loader keeps (loader_bytes of --json), so over the
// lines whose phase is not "load", max(live_bytes) - loader_bytes is the reported peak_allocated_bytes. category and phase are the names the JSON output uses; label says what the block is; op the ops running
// on the thread, outermost first, joined by " > " (may be empty). Tabs and newlines inside a field become spaces,
// so every line splits on tabs into exactly the header's fields.
#pragma once

#include <string>
#include <vector>

#include "measure/allocation_event.h"
#include "simulator/memory_timeline.h"

namespace llmem::cli {

// Both throw ConfigError when the file cannot be written.
void WriteEstimateTrace(const std::string& path, const sim::Timeline& timeline);
void WriteMeasureTrace(const std::string& path, const std::vector<AllocationEvent>& events);

}  // namespace llmem::cli
