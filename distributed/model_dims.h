// The transformer dimensions a parallel method must divide (heads, key/value heads, hidden, vocabulary, MLP
// width), read from the IR: the token embedding, the first layer's attention and linears.
#pragma once

#include <cstdint>
#include <string>

#include "graph/graph.h"

namespace llmem::dist {

struct ModelDims {
  int64_t vocab = 0;         // rows of the token embedding
  int64_t hidden = 0;        // columns of the token embedding
  int64_t heads = 0;         // query heads of layer 0's attention
  int64_t kv_heads = 0;      // key/value heads (== heads without GQA/MQA)
  int64_t intermediate = 0;  // widest linear output of layer 0 (the MLP width)
  int32_t layers = 0;
};

// True for a graph input (the token ids or labels) or a view of one (OPT flattens the ids with view(-1, S)).
bool IsGraphInputOrView(const Graph& graph, ValueId v);

// Throws ModelLoadError when the graph has no token embedding or no attention in layer 0.
ModelDims ReadModelDims(const Graph& graph);

// "" when `tp` divides every dimension tensor parallelism shards, else the reason in one line
// ("tensor-parallel degree 3 does not divide the 32 attention heads").
std::string CheckTensorParallelDegree(const ModelDims& dims, int tp, bool vocab_parallel);

}  // namespace llmem::dist
