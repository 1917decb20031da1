#include "cli/generation_time.h"

#include "distributed/interconnect.h"
#include "distributed/step_time_model.h"
#include "graph/op_flops.h"

namespace llmem::cli {

GenerationTime TimeGeneration(const sim::GenerationEstimate& est, const sim::TrainingConfig& config,
                              int64_t new_tokens, const std::vector<dist::CollectiveList>& collectives) {
  GenerationTime t;
  const auto link = dist::FindInterconnect(config.target.gpu.intra_node_link);
  auto forward_s = [&](const Graph& g, size_t which) {
    dist::StepTimeInputs in;
    in.per_rank_cost = SumCosts(g, dist::CostOptionsFor(config.precision));
    in.precision = config.precision;
    in.gpu = config.target.gpu;
    in.forward_only = true;
    if (which < collectives.size() && link) {
      in.collectives = collectives[which];
      in.intra_node = *link;
    }
    dist::StepTime st = dist::EstimateStepTime(in);
    if (which == 0) t.assumptions = std::move(st.assumptions);
    return st.forward_s + st.comm_s;
  };
  t.prefill_s = forward_s(est.prefill_graph, 0);
  if (est.decode_graph) t.decode_step_s = forward_s(*est.decode_graph, 1);
  t.generate_s = t.prefill_s + static_cast<double>(new_tokens - 1) * t.decode_step_s;
  t.assumptions.push_back("decode tokens/s: the batch over the last step, whose cache is longest (earlier steps read "
                          "less); eager generate() at small batches is often bound by CPU dispatch (hundreds of "
                          "kernel launches per token), which can make it several times slower than this");
  return t;
}

}  // namespace llmem::cli
