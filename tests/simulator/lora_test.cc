// LoRA: the adapter rewrite of a base graph (graph/lora_rewrite) and what its step holds (frozen base, trainable
// adapters, the frozen linear keeping only its weight for backward).
#include "graph/lora_rewrite.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "graph/error.h"
#include "simulator/memory_estimate.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

// x [4,8] (no grad) -> layers.0.q_proj (w [16,8]) -> h [4,16] -> lm_head (w2 [32,16]) -> logits [4,32] -> CE.
Graph TwoModules() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 8}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  b.SetLayer(0);
  ValueId w = b.Param("model.layers.0.q_proj.weight", {16, 8});
  ValueId h = b.OpOut("aten::linear", {T(x), T(w), None()}, Out({4, 16}), "model.layers.0.q_proj");
  b.SetHead();
  ValueId w2 = b.Param("lm_head.weight", {32, 16});
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w2), None()}, Out({4, 32}), "lm_head");
  return b.Build(CrossEntropy(b, logits, labels));
}

LoraSettings QProj(double dropout = 0.0) {
  return LoraSettings{.rank = 2, .alpha = 4, .dropout = dropout, .targets = {"q_proj"}};
}

std::vector<std::string> Kinds(const Graph& g) {
  std::vector<std::string> k;
  for (const auto& n : g.nodes()) k.push_back(n.kind);
  return k;
}

const Parameter& ParamNamed(const Graph& g, const std::string& name) {
  auto it = std::find_if(g.params().begin(), g.params().end(), [&](const Parameter& p) { return p.name == name; });
  EXPECT_NE(it, g.params().end()) << name;
  return *it;
}

TEST(LoraRewriteTest, AddsThePeftOpsAndFreezesTheBase) {
  const Graph g = ApplyLora(TwoModules(), QProj());
  EXPECT_EQ(Kinds(g), (std::vector<std::string>{"aten::linear", "aten::to", "aten::linear", "aten::linear", "aten::mul",
                                                 "aten::add", "aten::to", "aten::linear",
                                                 "aten::cross_entropy_loss"}));
  const Parameter& a = ParamNamed(g, "model.layers.0.q_proj.lora_A.default.weight");
  const Parameter& b = ParamNamed(g, "model.layers.0.q_proj.lora_B.default.weight");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(b.shape, (std::vector<int64_t>{16, 2}));
  EXPECT_TRUE(a.trainable && b.trainable);
  EXPECT_EQ(a.dtype, DType::kF32);
  EXPECT_FALSE(ParamNamed(g, "model.layers.0.q_proj.weight").trainable);
  EXPECT_FALSE(ParamNamed(g, "lm_head.weight").trainable);
  EXPECT_EQ(g.nodes()[0].scope, "model.layers.0.q_proj.base_layer");
  EXPECT_EQ(g.nodes()[2].scope, "model.layers.0.q_proj.lora_A.default");
  // The base linear's output no longer requires grad; the adapter's path and everything after it does.
  EXPECT_FALSE(g.value(g.nodes()[0].outputs[0]).requires_grad);
  EXPECT_TRUE(g.value(g.nodes()[2].outputs[0]).requires_grad);
  EXPECT_TRUE(g.value(g.nodes()[7].outputs[0]).requires_grad);
  // lm_head reads the adapter's result, not the base output.
  EXPECT_EQ(g.tensor_inputs(g.nodes()[7].id)[0], g.nodes()[6].outputs[0]);
  EXPECT_DOUBLE_EQ(g.nodes()[4].args[1].double_value, 2.0);  // alpha / r
}

TEST(LoraRewriteTest, DropoutOnlyWhenPositive) {
  const auto kinds = Kinds(ApplyLora(TwoModules(), QProj(0.05)));
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "aten::dropout"), 1);
}

TEST(LoraRewriteTest, AllLinearLeavesTheHeadOut) {
  LoraSettings s = QProj();
  s.targets = {"all-linear"};
  const Graph g = ApplyLora(TwoModules(), s);
  int adapters = 0;
  for (const auto& p : g.params()) adapters += p.name.find(".lora_A.") != std::string::npos;
  EXPECT_EQ(adapters, 1);
}

TEST(LoraRewriteTest, ModulesToSaveTrainACopyAndKeepTheOriginal) {
  LoraSettings s = QProj();
  s.modules_to_save = {"lm_head"};
  const Graph g = ApplyLora(TwoModules(), s);
  const Parameter& copy = ParamNamed(g, "lm_head.modules_to_save.default.weight");
  EXPECT_TRUE(copy.trainable);
  const Parameter& orig = ParamNamed(g, "lm_head.weight");
  EXPECT_FALSE(orig.trainable);
  EXPECT_FALSE(orig.used_in_forward);
}

TEST(LoraRewriteTest, BadSettingsAreOneLineErrors) {
  auto error_of = [](LoraSettings s) {
    try {
      ApplyLora(TwoModules(), s);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  LoraSettings s = QProj();
  s.targets = {"proj"};  // a suffix of whole components only, as PEFT matches
  EXPECT_EQ(error_of(s), "--lora targets 'proj' matches no linear module; the linear modules are lm_head, q_proj");
  s = QProj();
  s.rank = 0;
  EXPECT_NE(error_of(s).find("r must be a positive integer"), std::string::npos);
  s = QProj();
  s.alpha = -1;
  EXPECT_NE(error_of(s).find("alpha must be positive"), std::string::npos);
  s = QProj(1.0);
  EXPECT_NE(error_of(s).find("dropout must lie in [0, 1)"), std::string::npos);
  s = QProj();
  s.modules_to_save = {"embed_tokens"};
  EXPECT_NE(error_of(s).find("modules-to-save 'embed_tokens' matches no linear module"), std::string::npos);
}

TEST(LoraStepTest, OnlyAdaptersHaveGradientsAndStates) {
  TrainingConfig c = CpuConfig();
  c.lifetimes = Lifetimes::kTorchScript;
  const MemoryEstimate est = EstimateMemory(ApplyLora(TwoModules(), QProj()), c);
  // Weights: w 512 + w2 2048 + A 64 + B 128. Gradients: A 64 + B 128. AdamW: two states each.
  EXPECT_EQ(est.weights_bytes, 512 + 2048 + 64 + 128);
  EXPECT_EQ(est.gradients_bytes, 64 + 128);
  EXPECT_EQ(est.optimizer_state_bytes, 2 * (64 + 128));
}

TEST(LoraStepTest, AFrozenLinearKeepsOnlyItsWeight) {
  // lm_head's weight is frozen: its input (the adapter's result, 256 B) is not kept for backward, so it is freed
  // in the forward, right after the head's linear (its last use).
  TrainingConfig c = CpuConfig();
  c.lifetimes = Lifetimes::kTorchScript;
  const Graph g = ApplyLora(TwoModules(), QProj());
  const MemoryEstimate est = EstimateMemory(g, c);
  const Timeline& tl = est.simulation->timeline;
  const NodeId add = g.nodes()[5].id;
  int64_t block = -1;
  for (const auto& e : tl.events) {
    if (e.is_alloc && e.node == add.index && e.bytes == 256) block = e.block;
  }
  ASSERT_GE(block, 0);
  for (const auto& e : tl.events) {
    if (!e.is_alloc && e.block == block) {
      EXPECT_EQ(e.phase, Phase::kForward);
      EXPECT_EQ(e.node, g.nodes()[7].id.index);
    }
  }
}

}  // namespace
}  // namespace llmem::sim
