#include "distributed/node_layout.h"

#include "graph/error.h"

namespace llmem::dist {

int UsualGpusPerNode(const sim::GpuSpec&) {
  constexpr int kGpusPerServer = 8;  // HGX/DGX baseboards; 8-card PCIe servers (see the header)
  return kGpusPerServer;
}

NodeLayout ResolveNodeLayout(int gpus, std::optional<int> nodes, const sim::GpuSpec& gpu) {
  if (gpus < 1) throw ConfigError("the GPU count must be at least 1 (got " + std::to_string(gpus) + ")");
  NodeLayout layout;
  if (nodes) {
    if (*nodes < 1) throw ConfigError("the node count must be at least 1 (got " + std::to_string(*nodes) + ")");
    if (gpus % *nodes != 0) {
      throw ConfigError(std::to_string(gpus) + " GPUs do not split evenly over " + std::to_string(*nodes) + " nodes");
    }
    layout.nodes = *nodes;
    layout.gpus_per_node = gpus / *nodes;
    const int usual = UsualGpusPerNode(gpu);
    if (layout.gpus_per_node > usual) {  // as given, but worth a line: TP may now span more than one usual server
      layout.assumption = "--nodes " + std::to_string(*nodes) + ": " + std::to_string(layout.gpus_per_node) +
                          " GPUs per node, more than the usual " + std::to_string(usual) + " of a " + gpu.name +
                          " server; tensor parallelism up to a node is taken to run over the link inside a node";
    }
    return layout;
  }
  const int usual = UsualGpusPerNode(gpu);
  if (gpus > usual && gpus % usual != 0) {
    throw ConfigError(std::to_string(gpus) + " GPUs do not fill whole nodes of " + std::to_string(usual) + " " +
                      gpu.name + ": give --nodes");
  }
  layout.nodes = gpus > usual ? gpus / usual : 1;
  layout.gpus_per_node = gpus > usual ? usual : gpus;
  layout.assumption = "a node holds " + std::to_string(usual) + " " + gpu.name +
                      " GPUs (the usual server; --nodes overrides): " + std::to_string(gpus) + " GPUs are " +
                      std::to_string(layout.nodes) + (layout.nodes == 1 ? " node" : " nodes") +
                      ", tensor parallelism stays inside a node";
  return layout;
}

}  // namespace llmem::dist
