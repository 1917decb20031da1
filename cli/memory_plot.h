// `llmem estimate --plot FILE.svg|FILE.html`: a picture of the simulated step, self-contained (no script, no
// fetch): the tensors' live bytes stacked by category over the step's events, the phases marked, the peak marked,
// and the GPU's capacity as a line when it is on the chart's scale. The .html form is the same SVG in a page.
#pragma once

#include <cstdint>
#include <string>

#include "simulator/memory_timeline.h"

namespace llmem::cli {

struct PlotLabels {
  std::string title;           // what was estimated ("llama-2-7b, 1 x 2048, bf16-autocast, AdamW on h100-80")
  int64_t peak_allocated = 0;  // the estimate's peak (max_memory_allocated), named beside the chart's own peak
  int64_t capacity = 0;        // what the GPU holds for the allocator; 0: no GPU (cpu target)
  std::string capacity_name;   // "h100-80"
};

std::string MemoryPlotSvg(const sim::Timeline& timeline, const PlotLabels& labels);

// Writes the SVG, or the SVG in an HTML page, by the file's extension; throws ConfigError for another extension or
// a file that cannot be written.
void WriteMemoryPlot(const std::string& path, const sim::Timeline& timeline, const PlotLabels& labels);

}  // namespace llmem::cli
