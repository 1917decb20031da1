#include "cli/memory_snapshot_file.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/pickle_writer.h"
#include "graph/error.h"

namespace llmem::cli {
namespace {

using nlohmann::json;

json Frames(const sim::Timeline& timeline, const sim::MemoryEvent& e) {
  const auto block = static_cast<size_t>(e.block);
  const std::string label = block < timeline.block_labels.size() ? timeline.block_labels[block] : "";
  return json::array({json{{"filename", std::string(sim::PhaseName(e.phase))}, {"line", 0}, {"name", label}},
                      json{{"filename", "category"}, {"line", 0}, {"name", std::string(sim::CategoryName(e.category))}}});
}

std::string_view ActionName(sim::SnapshotEvent::Action action) {
  using A = sim::SnapshotEvent::Action;
  switch (action) {
    case A::kAlloc: return "alloc";
    case A::kFreeRequested: return "free_requested";
    case A::kFreeCompleted: return "free_completed";
    case A::kSegmentAlloc: return "segment_alloc";
    case A::kSegmentFree: return "segment_free";
    case A::kOom: return "oom";
  }
  return "alloc";
}

}  // namespace

void WriteMemorySnapshot(const std::string& path, const sim::MemorySnapshot& snapshot, const sim::Timeline& timeline) {
  // The first event of each block, for the frames of the segments' live blocks.
  std::vector<const sim::MemoryEvent*> allocation(timeline.block_labels.size(), nullptr);
  for (const sim::MemoryEvent& e : timeline.events) {
    if (e.is_alloc && allocation[static_cast<size_t>(e.block)] == nullptr) allocation[static_cast<size_t>(e.block)] = &e;
  }
  json segments = json::array();
  for (const sim::SegmentInfo& segment : snapshot.segments) {
    json blocks = json::array();
    int64_t allocated = 0, requested = 0;
    for (const sim::BlockInfo& b : segment.blocks) {
      json block{{"address", b.address}, {"size", b.size_bytes}, {"requested_size", b.allocated ? b.requested_bytes : 0},
                 {"state", b.allocated ? "active_allocated" : "inactive"}, {"frames", json::array()}};
      if (b.allocated) {
        allocated += b.size_bytes;
        requested += b.requested_bytes;
        if (b.id >= 0 && static_cast<size_t>(b.id) < allocation.size() && allocation[static_cast<size_t>(b.id)]) {
          block["frames"] = Frames(timeline, *allocation[static_cast<size_t>(b.id)]);
        }
      }
      blocks.push_back(std::move(block));
    }
    segments.push_back({{"device", 0}, {"address", segment.address}, {"total_size", segment.size_bytes},
                        {"allocated_size", allocated}, {"active_size", allocated}, {"requested_size", requested},
                        {"stream", 0}, {"segment_type", segment.small_pool ? "small" : "large"},
                        {"is_expandable", false}, {"frames", json::array()}, {"blocks", std::move(blocks)}});
  }
  json trace = json::array();
  int64_t time = 0;
  for (const sim::SnapshotEvent& e : snapshot.trace) {
    json entry{{"action", std::string(ActionName(e.action))}, {"addr", e.address}, {"size", e.bytes},
               {"stream", 0}, {"time_us", time++}, {"frames", json::array()}};
    if (e.event >= 0) {
      const sim::MemoryEvent& event = timeline.events[static_cast<size_t>(e.event)];
      entry["frames"] = Frames(timeline, event);
      entry["category"] = std::string(sim::CategoryName(event.category));
    }
    if (e.action == sim::SnapshotEvent::Action::kOom) entry["device_free"] = e.device_free;
    trace.push_back(std::move(entry));
  }
  const json root{{"segments", std::move(segments)}, {"device_traces", json::array({std::move(trace)})}};
  std::ofstream out(path, std::ios::binary);
  if (!out) throw ConfigError("cannot write the snapshot file " + path);
  const std::string bytes = Pickle(root);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw ConfigError("cannot write the snapshot file " + path);
}

}  // namespace llmem::cli
