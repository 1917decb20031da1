#include "distributed/tensor_parallel_generation.h"

#include "distributed/model_dims.h"
#include "distributed/nccl_memory.h"
#include "distributed/parallel_plan.h"
#include "distributed/tensor_parallel.h"

namespace llmem::dist {

std::string CheckTensorParallelGeneration(const Graph& graph, int tp) {
  std::string why = CheckTensorParallelDegree(ReadModelDims(graph), tp, /*vocab_parallel=*/false);
  if (!why.empty() && why.find("key/value heads") != std::string::npos) {
    why += " (transformers' tp_plan splits them as it splits the query heads; replicating them is vLLM's)";
  }
  return why;
}

sim::GenerationForwardSimulator TensorParallelGenerationForward(int tp, std::vector<CollectiveList>* collectives,
                                                                bool vocab_parallel) {
  return [tp, collectives, vocab_parallel](GenerationForward& fw, const sim::TrainingConfig& config) {
    if (tp == 1) return sim::SimulateGenerationForward(fw, config);
    TensorParallelRank rank = ShardForTensorParallel(fw.graph, tp, vocab_parallel);
    fw.graph = rank.graph;
    TensorParallelHooks hooks(&rank);
    const int64_t nccl = config.target.is_cpu ? 0 : NcclBytesPerRank(ParallelPlan{.tp = tp}, config.target.gpu);
    sim::MemoryEstimate e = sim::SimulateGenerationForward(fw, config, &hooks, nccl);
    if (collectives) collectives->push_back(TensorParallelCollectives(rank, e.simulation->value_dtypes));
    return e;
  };
}

}  // namespace llmem::dist
