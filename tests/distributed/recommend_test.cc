// The `recommend` sweep (recommend.h) on real exports (tiny real-weight ones and the bundled weight-free
// models/*.meta.pt): every layout's largest micro-batch is the largest batch whose exact one-rank estimate fits,
// whatever batch was asked for; the node layout bounds tensor parallelism; fp32 requests that fit nowhere still
// name the smallest GPU count.
#include "distributed/recommend.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <ostream>
#include <string>

#include "distributed/interconnect.h"
#include "distributed/rank_estimate.h"
#include "distributed/tensor_parallel.h"
#include "graph/error.h"
#include "graph/torchscript_importer.h"
#include "simulator/gpu_catalog.h"

namespace llmem::dist {
namespace {

std::string TinyModel(const std::string& arch) {
  const char* dir = std::getenv("LLMEM_TINY_MODELS");
  return std::string(dir && *dir ? dir : LLMEM_TINY_MODELS_DEFAULT) + "/" + arch + "-tiny.pt";
}

std::string BundledModel(const std::string& name) { return std::string(LLMEM_SOURCE_DIR) + "/models/" + name; }

// A model's graphs per batch, built on demand as the CLI does.
class Graphs {
 public:
  Graphs(const std::string& path, int64_t seq) : model_(TorchScriptModel::Load(path)), seq_(seq) {}
  const Graph& At(int64_t batch) {
    auto it = graphs_.find(batch);
    if (it == graphs_.end()) it = graphs_.emplace(batch, std::make_unique<Graph>(model_.BuildGraph(batch, seq_))).first;
    return *it->second;
  }
  GraphAtBatch Fn() {
    return [this](int64_t b) -> const Graph& { return At(b); };
  }

 private:
  TorchScriptModel model_;
  int64_t seq_;
  std::map<int64_t, std::unique_ptr<Graph>> graphs_;
};

RecommendRequest Request(int gpus, const char* gpu, sim::Precision precision, int64_t batch) {
  RecommendRequest r;
  r.gpus = gpus;
  r.micro_batch = batch;
  r.config.precision = precision;
  r.config.target.gpu = *sim::FindGpu(gpu);
  r.intra_node = *FindInterconnect(r.config.target.gpu.intra_node_link);
  r.inter_node = *FindInterconnect("ib-ndr");
  return r;
}

// Whether one rank of `plan` fits at `batch`, estimated on its own (not through the sweep); a batch that cannot
// be built does not fit.
bool FitsAt(Graphs& graphs, const RecommendRequest& req, const ParallelPlan& plan, int64_t batch, int per_node) {
  try {
    const Graph& g = graphs.At(batch);
    DistributedOptions opts;
    opts.gpus_per_node = per_node;
    opts.tp_vocab_parallel = req.tp_vocab_parallel;
    if (plan.tp == 1) return EstimateRank(g, req.config, plan, opts).memory.fits;
    const TensorParallelRank split = ShardForTensorParallel(g, plan.tp, req.tp_vocab_parallel);
    return EstimateRank(g, req.config, plan, opts, &split).memory.fits;
  } catch (const ConfigError&) {
    return false;
  }
}

struct Case {
  std::string name;  // of the test instance
  std::string path;
  int64_t seq;
  int gpus;
  const char* gpu;
  sim::Precision precision;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class LargestBatchProperty : public ::testing::TestWithParam<Case> {};

TEST_P(LargestBatchProperty, MaxBatchFitsTheNextDoesNotWhateverTheBatchAsked) {
  const Case& c = GetParam();
  Graphs graphs(c.path, c.seq);
  std::map<std::string, int64_t> first;  // layout -> max batch at the first batch asked
  int64_t largest = 0;
  for (int64_t asked : {int64_t{1}, int64_t{0}, int64_t{-1}}) {  // 1, a mid value, far above every max
    const int64_t batch = asked == 1 ? 1 : asked == 0 ? std::max<int64_t>(2, largest / 2) : 4 * largest + 7;
    const RecommendRequest req = Request(c.gpus, c.gpu, c.precision, batch);
    const Recommendation rec = Recommend(req, graphs.Fn());
    int checked = 0;
    for (const PlanRow& row : rec.rows) {
      if (!row.skipped.empty()) continue;
      const std::string name = row.plan.Name() + " asked " + std::to_string(batch);
      const int per_node = rec.nodes.gpus_per_node;
      if (row.max_micro_batch > 0) {
        EXPECT_TRUE(FitsAt(graphs, req, row.plan, row.max_micro_batch, per_node)) << name;
      }
      EXPECT_FALSE(FitsAt(graphs, req, row.plan, row.max_micro_batch + 1, per_node)) << name;
      EXPECT_EQ(row.fits, row.micro_batch <= row.max_micro_batch) << name;
      auto [it, inserted] = first.emplace(row.plan.Name(), row.max_micro_batch);
      if (!inserted) {
        EXPECT_EQ(row.max_micro_batch, it->second) << name;
      }
      largest = std::max(largest, row.max_micro_batch);
      ++checked;
    }
    EXPECT_GT(checked, 0);
  }
  EXPECT_GT(largest, 0) << "every layout should fit at some batch in these cases";
}

INSTANTIATE_TEST_SUITE_P(
    Models, LargestBatchProperty,
    ::testing::Values(
        Case{"LlamaTiny8xA100", TinyModel("llama"), 1024, 8, "a100-80", sim::Precision::kBf16Autocast},
        Case{"Gpt2TinyFp32On4xL4", TinyModel("gpt2"), 1024, 4, "l4-24", sim::Precision::kFp32},
        Case{"Opt1p3b8xA100", BundledModel("opt-1.3b.meta.pt"), 2048, 8, "a100-80", sim::Precision::kBf16Autocast},
        Case{"Llama2_7b8xA100", BundledModel("llama-2-7b.meta.pt"), 2048, 8, "a100-80",
             sim::Precision::kBf16Autocast}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

TEST(RecommendNodesTest, UnsaidNodesKeepTensorParallelismInsideEightGpus) {
  Graphs graphs(TinyModel("llama"), 1024);
  const RecommendRequest req = Request(16, "h100-80", sim::Precision::kBf16Autocast, 1);
  const Recommendation rec = Recommend(req, graphs.Fn());
  EXPECT_EQ(rec.nodes.nodes, 2);
  EXPECT_EQ(rec.nodes.gpus_per_node, 8);
  int max_tp = 0;
  for (const PlanRow& row : rec.rows) max_tp = std::max(max_tp, row.plan.tp);
  EXPECT_EQ(max_tp, 8);  // up to a node (the degrees the heads do not divide are skipped rows); never 16
  ASSERT_FALSE(rec.assumptions.empty());
  EXPECT_NE(rec.assumptions[0].find("a node holds 8"), std::string::npos) << rec.assumptions[0];
}

TEST(RecommendNodesTest, TensorParallelDegreeAboveTheNodeIsRefused) {
  Graphs graphs(TinyModel("llama"), 1024);
  RecommendRequest req = Request(16, "h100-80", sim::Precision::kBf16Autocast, 1);
  req.tp = 16;
  EXPECT_THROW(Recommend(req, graphs.Fn()), ConfigError);
  req.nodes = 1;  // a 16-GPU node, as the user says
  req.tp = std::nullopt;
  const Recommendation rec = Recommend(req, graphs.Fn());
  EXPECT_EQ(rec.nodes.gpus_per_node, 16);
}

TEST(RecommendCheckpointingTest, EveryLayoutPaysTheRecomputeInBackward) {
  // Full checkpointing runs every decoder layer's forward again in backward, in every layout (data parallel,
  // tensor parallel, their hybrids): the backward time grows by the recompute, the forward time does not, and the
  // recompute is below the whole forward (the embedding and the LM head + loss are not recomputed).
  Graphs graphs(TinyModel("llama"), 1024);
  RecommendRequest req = Request(8, "a100-80", sim::Precision::kBf16Autocast, 1);
  const Recommendation plain = Recommend(req, graphs.Fn());
  req.config.checkpointing.mode = sim::CheckpointingMode::kFull;
  const Recommendation checkpointed = Recommend(req, graphs.Fn());
  std::map<std::string, StepTime> plain_time;
  for (const PlanRow& row : plain.rows) plain_time[row.plan.Name()] = row.time;
  int timed = 0;
  for (const PlanRow& row : checkpointed.rows) {
    if (!row.skipped.empty()) continue;
    ++timed;
    const StepTime& before = plain_time.at(row.plan.Name());
    EXPECT_EQ(before.recompute_s, 0) << row.plan.Name();
    EXPECT_GT(row.time.recompute_s, 0) << row.plan.Name();
    EXPECT_LT(row.time.recompute_s, row.time.forward_s) << row.plan.Name();
    EXPECT_DOUBLE_EQ(row.time.forward_s, before.forward_s) << row.plan.Name();
    EXPECT_NEAR(row.time.backward_s, before.backward_s + row.time.recompute_s, 1e-12) << row.plan.Name();
  }
  EXPECT_GT(timed, 1);
}

TEST(RecommendFp32Test, NothingFitsStillNamesTheSmallestGpuCount) {
  // llama-2-7b in fp32 with AdamW needs ~16 B per parameter: nothing fits on one 80 GB GPU; the chunk-based
  // engine (16-bit only) must be passed over, not end the search.
  Graphs graphs(BundledModel("llama-2-7b.meta.pt"), 512);
  const RecommendRequest req = Request(1, "a100-80", sim::Precision::kFp32, 1);
  const Recommendation rec = Recommend(req, graphs.Fn());
  EXPECT_EQ(rec.best, -1);
  EXPECT_GT(rec.smallest_gpu_count_that_fits, 1);
}

}  // namespace
}  // namespace llmem::dist
