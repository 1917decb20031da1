#include "cli/layout_plot.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "cli/svg_file.h"
#include "graph/dtype.h"

namespace llmem::cli {
namespace {

constexpr int kWidth = 1000, kRowHeight = 24, kTop = 70, kBottom = 40;
constexpr int kLabelWidth = 270;                        // layout names
constexpr int kMemoryLeft = kLabelWidth, kMemoryWidth = 380;
constexpr int kSpeedLeft = kMemoryLeft + kMemoryWidth + 40, kSpeedWidth = kWidth - kSpeedLeft - 30;

std::string Rate(double tokens_per_second) {
  char buf[32];
  if (tokens_per_second >= 1e6) {
    std::snprintf(buf, sizeof buf, "%.2f M tokens/s", tokens_per_second / 1e6);
  } else if (tokens_per_second >= 1e3) {
    std::snprintf(buf, sizeof buf, "%.1f k tokens/s", tokens_per_second / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f tokens/s", tokens_per_second);
  }
  return buf;
}

}  // namespace

std::string LayoutPlotSvg(const dist::Recommendation& rec, int64_t capacity_bytes, const std::string& title) {
  const int rows = static_cast<int>(rec.rows.size());
  const int height = kTop + rows * kRowHeight + kBottom;
  int64_t memory_top = capacity_bytes;
  double speed_top = 0;
  for (const dist::PlanRow& r : rec.rows) {
    if (!r.skipped.empty()) continue;
    memory_top = std::max(memory_top, r.nvidia_smi_bytes);
    if (r.fits) speed_top = std::max(speed_top, r.tokens_per_second);
  }
  memory_top = std::max<int64_t>(1, memory_top * 21 / 20);
  const auto mx = [&](int64_t bytes) {
    return kMemoryLeft + static_cast<double>(bytes) / static_cast<double>(memory_top) * kMemoryWidth;
  };
  std::ostringstream svg;
  svg << SvgOpen(kWidth, height, title, 10, 22)
      << "<text x=\"" << kMemoryLeft << "\" y=\"" << kTop - 14 << "\" font-weight=\"bold\">memory per GPU "
      << "(nvidia-smi)</text>\n"
      << "<text x=\"" << kSpeedLeft << "\" y=\"" << kTop - 14 << "\" font-weight=\"bold\">throughput, all GPUs "
      << "(layouts that fit)</text>\n";
  for (int i = 0; i < rows; ++i) {
    const dist::PlanRow& r = rec.rows[static_cast<size_t>(i)];
    const int y = kTop + i * kRowHeight;
    const bool best = i == rec.best;
    // The layout's name says the degrees and the ZeRO stage; the engine's parenthesis says which implementation.
    const std::string engine = r.plan.dp > 1 ? std::string(dist::EngineName(r.plan.engine)) : "";
    const size_t paren = engine.find(" (");
    const std::string name = r.plan.Name() + (paren == std::string::npos ? "" : engine.substr(paren));
    if (best) {
      svg << "<rect x=\"4\" y=\"" << y - 2 << "\" width=\"" << kWidth - 8 << "\" height=\"" << kRowHeight
          << "\" fill=\"#fff3c4\"/>\n";
    }
    svg << "<text x=\"10\" y=\"" << y + 14 << "\"" << (best ? " font-weight=\"bold\"" : "") << ">" << SvgEscape(name)
        << (best ? " (recommended)" : "") << "</text>\n";
    if (!r.skipped.empty()) {
      svg << "<text x=\"" << kMemoryLeft << "\" y=\"" << y + 14 << "\" fill=\"#777\">n/a: " << SvgEscape(r.skipped)
          << "</text>\n";
      continue;
    }
    const char* fill = r.fits ? "#4e79a7" : "#bbbbbb";
    svg << "<rect x=\"" << kMemoryLeft << "\" y=\"" << y + 2 << "\" width=\"" << mx(r.nvidia_smi_bytes) - kMemoryLeft
        << "\" height=\"" << kRowHeight - 8 << "\" fill=\"" << fill << "\"><title>" << SvgEscape(name) << ": "
        << SvgEscape(FormatBytes(r.nvidia_smi_bytes)) << "</title></rect>"
        << "<text x=\"" << std::min(mx(r.nvidia_smi_bytes) + 4, static_cast<double>(kMemoryLeft + kMemoryWidth - 70))
        << "\" y=\"" << y + 14 << "\">" << SvgEscape(FormatBytes(r.nvidia_smi_bytes)) << (r.fits ? "" : " OOM")
        << "</text>\n";
    if (r.fits && speed_top > 0) {
      const double w = r.tokens_per_second / speed_top * (kSpeedWidth - 110);
      svg << "<rect x=\"" << kSpeedLeft << "\" y=\"" << y + 2 << "\" width=\"" << w << "\" height=\""
          << kRowHeight - 8 << "\" fill=\"#59a14f\"/><text x=\"" << kSpeedLeft + w + 4 << "\" y=\"" << y + 14
          << "\">" << Rate(r.tokens_per_second) << "</text>\n";
    } else {
      svg << "<text x=\"" << kSpeedLeft << "\" y=\"" << y + 14 << "\" fill=\"#777\">does not fit</text>\n";
    }
  }
  // Capacity line over the memory panel.
  const int bottom = kTop + rows * kRowHeight;
  if (capacity_bytes > 0) {
    svg << "<line x1=\"" << mx(capacity_bytes) << "\" y1=\"" << kTop - 8 << "\" x2=\"" << mx(capacity_bytes)
        << "\" y2=\"" << bottom << "\" stroke=\"#c00\" stroke-width=\"1.5\" stroke-dasharray=\"6,4\"/>"
        << "<text x=\"" << mx(capacity_bytes) << "\" y=\"" << bottom + 16 << "\" text-anchor=\"middle\" fill=\"#c00\">"
        << "capacity " << SvgEscape(FormatBytes(capacity_bytes)) << "</text>\n";
  }
  svg << "<line x1=\"" << kMemoryLeft << "\" y1=\"" << kTop - 8 << "\" x2=\"" << kMemoryLeft << "\" y2=\"" << bottom
      << "\" stroke=\"#333\"/><line x1=\"" << kSpeedLeft << "\" y1=\"" << kTop - 8 << "\" x2=\"" << kSpeedLeft
      << "\" y2=\"" << bottom << "\" stroke=\"#333\"/>\n</svg>\n";
  return svg.str();
}

void WriteLayoutPlot(const std::string& path, const dist::Recommendation& rec, int64_t capacity_bytes,
                     const std::string& title) {
  WriteSvgOrHtml(path, LayoutPlotSvg(rec, capacity_bytes, title), title, "--plot");
}

}  // namespace llmem::cli
