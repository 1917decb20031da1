// `llmem recommend --plot FILE.svg|FILE.html`: every layout of the sweep as a row, its memory per GPU (what
// nvidia-smi shows) against the GPU's capacity on the left, its throughput on the right; the recommended layout
// marked, layouts that do not fit drawn in grey, skipped ones with the reason.
#pragma once

#include <cstdint>
#include <string>

#include "distributed/recommend.h"

namespace llmem::cli {

std::string LayoutPlotSvg(const dist::Recommendation& rec, int64_t capacity_bytes, const std::string& title);

// Throws ConfigError for an extension other than .svg / .html and for a file that cannot be written.
void WriteLayoutPlot(const std::string& path, const dist::Recommendation& rec, int64_t capacity_bytes,
                     const std::string& title);

}  // namespace llmem::cli
