// The trainable parameters a data-parallel engine manages, in the order the forward pass first uses them, with
// their sizes on this rank (after any tensor-parallel split) under the simulated precision.
#pragma once

#include <cstdint>
#include <vector>

#include "graph/graph.h"
#include "simulator/training_config.h"

namespace llmem::dist {

struct ManagedParam {
  bool trainable = true;    // false: a frozen parameter (sharded and gathered by FSDP2, never reduced)
  int32_t index = -1;       // into Graph::params()
  int32_t value = -1;       // the parameter's IR value (Parameter::value), how hooks recognise it
  int64_t numel = 0;
  int64_t dim0 = 1;         // size of dim 0 (FSDP shards along it)
  int64_t element_size = 4; // bytes per element of the parameter under the simulated precision
  Region region;            // where the forward first uses it
  int64_t bytes() const { return numel * element_size; }
};

// One entry per trainable parameter storage the loss reaches (tied weights once), in first-use order; with
// `with_frozen`, frozen parameters too (Parameter::frozen; buffers never), which FSDP2's fully_shard shards as well.
std::vector<ManagedParam> ManagedParams(const Graph& graph, sim::Precision precision, bool with_frozen = false);

// FSDP's dim-0 shard of `p` over `world` ranks, in elements: ceil(dim0 / world) rows, which every rank's padded
// shard holds (torch/distributed/fsdp/_fully_shard/_fsdp_param.py pads dim 0 to a multiple of the world size).
int64_t PaddedShardNumel(const ManagedParam& p, int world);

}  // namespace llmem::dist
