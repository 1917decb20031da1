#include "cli/memory_plot.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <sstream>
#include <vector>

#include "graph/dtype.h"
#include "cli/svg_file.h"

namespace llmem::cli {
namespace {

using Bytes = std::array<int64_t, sim::kNumCategories>;

constexpr int kWidth = 1000, kHeight = 560;
constexpr int kLeft = 90, kRight = 230, kTop = 50, kBottom = 60;  // margins: axis labels, legend, title
constexpr int kPlotWidth = kWidth - kLeft - kRight, kPlotHeight = kHeight - kTop - kBottom;

// One colour per category, in MemoryCategory order (distinct hues; grey for workspaces).
constexpr std::array<const char*, sim::kNumCategories> kColours = {
    "#4e79a7", "#f28e2b", "#e15759", "#bab0ac", "#59a14f", "#9c755f", "#76b7b2", "#edc948",
    "#b07aa1", "#ff9da7", "#8c8c8c", "#d4a6c8", "#86bcb6", "#f1ce63", "#499894"};

int64_t Total(const Bytes& b) {
  int64_t sum = 0;
  for (int64_t v : b) sum += v;
  return sum;
}

}  // namespace

std::string MemoryPlotSvg(const sim::Timeline& timeline, const PlotLabels& labels) {
  const size_t n = timeline.events.size();
  // Per pixel column, the live bytes by category where the column's total is highest, so no peak is lost.
  std::vector<Bytes> columns(static_cast<size_t>(kPlotWidth), Bytes{});
  std::vector<bool> filled(columns.size(), false);
  std::array<int64_t, 4> phase_start{-1, -1, -1, -1};
  Bytes live{};
  int64_t peak_total = 0;
  size_t peak_event = 0;
  Bytes at_peak{};
  // A free counts against its block's category at allocation, as the estimate's replay counts it.
  std::vector<uint8_t> category_of(timeline.block_labels.size(), 0);
  for (size_t i = 0; i < n; ++i) {
    const sim::MemoryEvent& e = timeline.events[i];
    const auto block = static_cast<size_t>(e.block);
    if (e.is_alloc && block < category_of.size()) category_of[block] = static_cast<uint8_t>(e.category);
    const size_t category = block < category_of.size() ? category_of[block] : static_cast<size_t>(e.category);
    live[category] += e.is_alloc ? e.bytes : -e.bytes;
    auto& start = phase_start[static_cast<size_t>(e.phase)];
    if (start < 0) start = static_cast<int64_t>(i);
    const size_t column = n == 0 ? 0 : std::min(columns.size() - 1, i * columns.size() / n);
    if (!filled[column] || Total(live) > Total(columns[column])) {
      columns[column] = live;
      filled[column] = true;
    }
    if (Total(live) > peak_total) {
      peak_total = Total(live);
      peak_event = i;
      at_peak = live;
    }
  }
  for (size_t c = 1; c < columns.size(); ++c) {  // fewer events than pixels: hold the last value
    if (!filled[c]) columns[c] = columns[c - 1];
  }
  const bool capacity_on_chart = labels.capacity > 0 && labels.capacity <= 4 * std::max<int64_t>(peak_total, 1);
  const int64_t top = std::max<int64_t>(1, std::max(peak_total, capacity_on_chart ? labels.capacity : 0)) * 21 / 20;
  auto y = [&](int64_t bytes) {
    return kTop + kPlotHeight - static_cast<double>(bytes) / static_cast<double>(top) * kPlotHeight;
  };
  auto x_of_event = [&](size_t i) { return kLeft + (n == 0 ? 0.0 : static_cast<double>(i) * kPlotWidth / n); };

  std::ostringstream svg;
  svg << SvgOpen(kWidth, kHeight, labels.title, kLeft, 24);
  // Stacked areas, bottom category first.
  std::array<std::vector<double>, sim::kNumCategories + 1> levels;
  levels[0].assign(columns.size(), 0.0);
  for (size_t c = 0; c < sim::kNumCategories; ++c) {
    levels[c + 1].resize(columns.size());
    for (size_t col = 0; col < columns.size(); ++col) {
      levels[c + 1][col] = levels[c][col] + static_cast<double>(columns[col][c]);
    }
  }
  std::array<bool, sim::kNumCategories> used{};
  for (const Bytes& b : columns) {
    for (size_t c = 0; c < sim::kNumCategories; ++c) used[c] = used[c] || b[c] > 0;
  }
  for (size_t c = 0; c < sim::kNumCategories; ++c) {
    if (!used[c]) continue;
    svg << "<path fill=\"" << kColours[c] << "\" d=\"";
    char buf[64];
    for (size_t col = 0; col < columns.size(); ++col) {
      std::snprintf(buf, sizeof(buf), "%c%d %.1f", col == 0 ? 'M' : 'L', kLeft + static_cast<int>(col),
                    y(static_cast<int64_t>(levels[c + 1][col])));
      svg << buf;
    }
    for (size_t col = columns.size(); col-- > 0;) {
      std::snprintf(buf, sizeof(buf), "L%d %.1f", kLeft + static_cast<int>(col) + 1,
                    y(static_cast<int64_t>(levels[c][col])));
      svg << buf;
    }
    svg << "Z\"><title>" << SvgEscape(std::string(sim::CategoryName(static_cast<sim::MemoryCategory>(c))))
        << "</title></path>\n";
  }
  // Axes and ticks.
  svg << "<line x1=\"" << kLeft << "\" y1=\"" << kTop + kPlotHeight << "\" x2=\"" << kLeft + kPlotWidth << "\" y2=\""
      << kTop + kPlotHeight << "\" stroke=\"#333\"/>\n";
  svg << "<line x1=\"" << kLeft << "\" y1=\"" << kTop << "\" x2=\"" << kLeft << "\" y2=\"" << kTop + kPlotHeight
      << "\" stroke=\"#333\"/>\n";
  const int64_t step = ByteTickStep(top);
  for (int64_t v = 0; v <= top; v += step) {
    svg << "<line x1=\"" << kLeft - 4 << "\" y1=\"" << y(v) << "\" x2=\"" << kLeft << "\" y2=\"" << y(v)
        << "\" stroke=\"#333\"/><text x=\"" << kLeft - 8 << "\" y=\"" << y(v) + 4 << "\" text-anchor=\"end\">"
        << SvgEscape(FormatBytes(v)) << "</text>\n";
  }
  svg << "<text x=\"" << kLeft + kPlotWidth / 2 << "\" y=\"" << kHeight - 14
      << "\" text-anchor=\"middle\">the step's allocations and frees, in order (" << n << " events)</text>\n";
  // Phases.
  for (size_t p = 0; p < phase_start.size(); ++p) {
    if (phase_start[p] < 0) continue;
    const double x = x_of_event(static_cast<size_t>(phase_start[p]));
    svg << "<line x1=\"" << x << "\" y1=\"" << kTop << "\" x2=\"" << x << "\" y2=\"" << kTop + kPlotHeight
        << "\" stroke=\"#999\" stroke-dasharray=\"2,3\"/><text x=\"" << x + 3 << "\" y=\"" << kTop + kPlotHeight + 16
        << "\" fill=\"#555\">" << sim::PhaseName(static_cast<sim::Phase>(p)) << "</text>\n";
  }
  // Capacity.
  if (labels.capacity > 0) {
    if (capacity_on_chart) {
      svg << "<line x1=\"" << kLeft << "\" y1=\"" << y(labels.capacity) << "\" x2=\"" << kLeft + kPlotWidth
          << "\" y2=\"" << y(labels.capacity) << "\" stroke=\"#c00\" stroke-width=\"1.5\" stroke-dasharray=\"6,4\"/>"
          << "<text x=\"" << kLeft + kPlotWidth - 4 << "\" y=\"" << y(labels.capacity) - 5
          << "\" text-anchor=\"end\" fill=\"#c00\">" << SvgEscape(labels.capacity_name) << ": "
          << SvgEscape(FormatBytes(labels.capacity)) << " for the allocator</text>\n";
    } else {
      svg << "<text x=\"" << kLeft + kPlotWidth - 4 << "\" y=\"" << kTop + 12 << "\" text-anchor=\"end\" fill=\"#c00\">"
          << SvgEscape(labels.capacity_name) << ": " << SvgEscape(FormatBytes(labels.capacity))
          << " for the allocator (above the chart)</text>\n";
    }
  }
  // Peak.
  const double px = x_of_event(peak_event), py = y(peak_total);
  svg << "<circle cx=\"" << px << "\" cy=\"" << py << "\" r=\"4\" fill=\"none\" stroke=\"#000\" stroke-width=\"1.5\"/>"
      << "<text x=\"" << std::min(px + 8, static_cast<double>(kLeft + kPlotWidth - 160)) << "\" y=\""
      << std::max(py - 8, static_cast<double>(kTop + 26)) << "\">peak " << SvgEscape(FormatBytes(peak_total)) << " in "
      << sim::PhaseName(timeline.events.empty() ? sim::Phase::kSetup : timeline.events[peak_event].phase)
      << "</text>\n";
  // Legend: the categories at the peak, top of the stack first.
  int row = 0;
  const int lx = kLeft + kPlotWidth + 20;
  svg << "<text x=\"" << lx << "\" y=\"" << kTop << "\" font-weight=\"bold\">at the peak</text>\n";
  for (size_t c = sim::kNumCategories; c-- > 0;) {
    if (!used[c]) continue;
    const int ly = kTop + 16 + 18 * row++;
    svg << "<rect x=\"" << lx << "\" y=\"" << ly << "\" width=\"12\" height=\"12\" fill=\"" << kColours[c]
        << "\"/><text x=\"" << lx + 18 << "\" y=\"" << ly + 10 << "\">"
        << SvgEscape(std::string(sim::CategoryName(static_cast<sim::MemoryCategory>(c)))) << " "
        << SvgEscape(FormatBytes(at_peak[c])) << "</text>\n";
  }
  svg << "<text x=\"" << lx << "\" y=\"" << kTop + 26 + 18 * row << "\">max_memory_allocated</text><text x=\"" << lx
      << "\" y=\"" << kTop + 42 + 18 * row << "\">" << SvgEscape(FormatBytes(labels.peak_allocated))
      << " (allocator rounding incl.)</text>\n";
  svg << "</svg>\n";
  return svg.str();
}

void WriteMemoryPlot(const std::string& path, const sim::Timeline& timeline, const PlotLabels& labels) {
  WriteSvgOrHtml(path, MemoryPlotSvg(timeline, labels), labels.title, "--plot");
}

}  // namespace llmem::cli
