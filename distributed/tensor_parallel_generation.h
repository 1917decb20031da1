// Hugging Face generate() on one rank of a tensor-parallel group, as transformers' tp_plan for the Llama family sets
// it up: in every decoder layer q/k/v and gate/up are ColwiseParallel and o and down RowwiseParallel
// (torch.distributed.tensor.parallel), the token embedding and the LM head are replicated, and every rank runs the
// whole loop on its own heads. Each rank's key/value cache holds its share of the key/value heads: transformers splits
// the key/value projections as it splits the query ones, so the degree must divide the key/value heads (it does not
// replicate them, as vLLM does when the degree exceeds them).
//
// The rank's forwards are distributed/tensor_parallel.h's split of each generation forward, with its all-reduces
// (a row-parallel output is made twice: the partial sum, then the reduced copy) and the tensor-parallel group's NCCL
// buffers outside the allocator.
#pragma once

#include <string>
#include <vector>

#include "distributed/collective.h"
#include "graph/graph.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::dist {

// "" when `tp` can split the model's generation (distributed/model_dims.h's check, the vocabulary left whole), else
// why not, in one line.
std::string CheckTensorParallelGeneration(const Graph& graph, int tp);

// Simulates each forward on rank 0 of `tp` ranks (they are alike); tp = 1 is one GPU. With `collectives`, each forward
// simulated appends its all-reduces there (in the weights' dtype a generation forward computes in), in call order.
// `vocab_parallel`: the token embedding and the LM head split by vocabulary too (vLLM's VocabParallelEmbedding and
// ParallelLMHead; transformers' tp_plan leaves them whole).
sim::GenerationForwardSimulator TensorParallelGenerationForward(int tp, std::vector<CollectiveList>* collectives = nullptr,
                                                                bool vocab_parallel = false);

}  // namespace llmem::dist
