#include "cli/trace_file.h"

#include <algorithm>
#include <fstream>
#include <string_view>

#include "graph/dtype.h"
#include "graph/error.h"

namespace llmem::cli {
namespace {

// A field of a tab-separated line: no tab or line break inside.
std::string Field(std::string_view text) {
  std::string field(text);
  std::replace_if(field.begin(), field.end(), [](char c) { return c == '\t' || c == '\n' || c == '\r'; }, ' ');
  return field;
}

std::ofstream OpenTrace(const std::string& path) {
  std::ofstream out(path);
  if (!out) throw ConfigError("cannot write trace file " + path);
  return out;
}

void Close(std::ofstream& out, const std::string& path) {
  out.close();
  if (!out) throw ConfigError("cannot write trace file " + path);
}

}  // namespace

void WriteEstimateTrace(const std::string& path, const sim::Timeline& timeline) {
  std::ofstream out = OpenTrace(path);
  out << "event\tbytes\tlive_bytes\tcategory\tphase\tlabel\n";
  int64_t live = 0;
  for (const sim::MemoryEvent& e : timeline.events) {
    live = CheckedAdd(live, e.is_alloc ? e.bytes : -e.bytes, "the live bytes of the trace");
    out << (e.is_alloc ? "alloc" : "free") << '\t' << e.bytes << '\t' << live << '\t'
        << Field(sim::CategoryName(e.category)) << '\t' << Field(sim::PhaseName(e.phase)) << '\t'
        << Field(timeline.block_labels[static_cast<size_t>(e.block)]) << '\n';
  }
  Close(out, path);
}

void WriteMeasureTrace(const std::string& path, const std::vector<AllocationEvent>& events) {
  std::ofstream out = OpenTrace(path);
  out << "event\tbytes\tlive_bytes\tphase\top\n";
  for (const AllocationEvent& e : events) {
    out << (e.is_alloc ? "alloc" : "free") << '\t' << e.bytes << '\t' << e.current_bytes_after << '\t'
        << Field(e.phase) << '\t' << Field(e.op) << '\n';
  }
  Close(out, path);
}

}  // namespace llmem::cli
