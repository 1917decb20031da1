// How N GPUs are spread over nodes: as the user says (--nodes), or, when unsaid, whole nodes of the GPU kind's
// usual node size. Tensor-parallel groups never span nodes, so the node size bounds the TP degree.
//
// The usual node size is an assumption, printed with the result: 8 GPUs for every catalog part. The SXM parts
// (V100, A100, H100, H200) come on HGX/DGX baseboards of 8 GPUs joined by NVLink; the PCIe parts (L4, RTX 4090)
// are taken at 8 cards per server, as in the largest L4 cloud instances (AWS g6.48xlarge, GCP g2-standard-96)
// and the common 8-slot GPU servers.
#pragma once

#include <optional>
#include <string>

#include "simulator/gpu_catalog.h"

namespace llmem::dist {

struct NodeLayout {
  int nodes = 1;
  int gpus_per_node = 1;
  std::string assumption;  // the node size assumed, in words; with a given node count, only a note when a node
                           // holds more than the usual size
};

// GPUs per node of this GPU kind when the user does not say (see above).
int UsualGpusPerNode(const sim::GpuSpec& gpu);

// Throws ConfigError for counts below 1, GPUs that do not split evenly over the given nodes, and, without a node
// count, GPUs beyond one node that do not fill whole nodes (the user must say how they are spread).
NodeLayout ResolveNodeLayout(int gpus, std::optional<int> nodes, const sim::GpuSpec& gpu);

}  // namespace llmem::dist
