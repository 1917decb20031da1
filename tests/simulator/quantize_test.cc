// QLoRA's 4-bit base: the quantization rewrite (graph/quantize_rewrite), the bitsandbytes-layer variant of the
// LoRA rewrite, and what bnb::matmul_4bit allocates on each backend.
#include "graph/quantize_rewrite.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "graph/error.h"
#include "graph/lora_rewrite.h"
#include "simulator/backend_rules.h"
#include "simulator/gpu_catalog.h"
#include "simulator/memory_estimate.h"
#include "simulator/op_memory_rules.h"
#include "tests/simulator/tiny_graphs.h"

namespace llmem::sim {
namespace {

using namespace llmem::sim::testing;  // NOLINT

// x [rows,in] -> layers.0.mlp.up_proj (w0 [in,in]) -> layers.0.q_proj (w [16,in]) -> lm_head (w2 [32,16]) -> CE.
Graph ThreeModules(int64_t rows = 4, int64_t in = 8) {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {rows, in}, DType::kF32);
  ValueId labels = b.Input("labels", {rows});
  b.SetLayer(0);
  ValueId w0 = b.Param("model.layers.0.mlp.up_proj.weight", {in, in});
  ValueId u = b.OpOut("aten::linear", {T(x), T(w0), None()}, Out({rows, in}), "model.layers.0.mlp.up_proj");
  ValueId w = b.Param("model.layers.0.q_proj.weight", {16, in});
  ValueId h = b.OpOut("aten::linear", {T(u), T(w), None()}, Out({rows, 16}), "model.layers.0.q_proj");
  b.SetHead();
  ValueId w2 = b.Param("lm_head.weight", {32, 16});
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w2), None()}, Out({rows, 32}), "lm_head");
  return b.Build(CrossEntropy(b, logits, labels));
}

LoraSettings UpProjOnQuantized() {
  LoraSettings s{.rank = 2, .alpha = 4, .dropout = 0.0, .targets = {"up_proj"}, .modules_to_save = {}};
  s.base_layer = LoraBaseLayer::kBnb4bit;
  return s;
}

QuantSettings Nf4(bool double_quant = false) {
  QuantSettings q;
  q.double_quant = double_quant;
  return q;
}

Graph Qlora(bool double_quant = false, int64_t rows = 4, int64_t in = 8) {
  return QuantizeLinears(ApplyLora(ThreeModules(rows, in), UpProjOnQuantized()), Nf4(double_quant));
}

const Parameter& ParamNamed(const Graph& g, const std::string& name) {
  auto it = std::find_if(g.params().begin(), g.params().end(), [&](const Parameter& p) { return p.name == name; });
  EXPECT_NE(it, g.params().end()) << name;
  return *it;
}

std::vector<const OpNode*> NodesOfKind(const Graph& g, const std::string& kind) {
  std::vector<const OpNode*> out;
  for (const auto& n : g.nodes()) {
    if (n.kind == kind) out.push_back(&n);
  }
  return out;
}

TEST(Quantized4bitLayoutTest, FollowsBitsandbytesQuantize4bit) {
  // A 4096 x 4096 weight: 2^24 codes in 2^23 bytes, 2^18 blocks of 64.
  const int64_t n = int64_t{4096} * 4096;
  const Quantized4bitLayout plain = Layout4bit(n, Nf4());
  EXPECT_EQ(plain.packed, n / 2);
  EXPECT_EQ(plain.absmax, (n / 64) * 4);  // fp32 per block
  EXPECT_EQ(plain.quant_map, 64);         // the 16-entry code
  EXPECT_EQ(plain.nested_absmax + plain.nested_code + plain.offset, 0);
  const Quantized4bitLayout dq = Layout4bit(n, Nf4(true));
  EXPECT_EQ(dq.absmax, n / 64);                 // uint8 per block
  EXPECT_EQ(dq.nested_absmax, (n / 64 / 256) * 4);  // fp32 per 256 blocks
  EXPECT_EQ(dq.nested_code, 1024);
  EXPECT_EQ(dq.offset, 4);
  // The QLoRA paper's figure: double quantization brings the constants from 32/64 = 0.5 to ~0.127 bits per weight.
  EXPECT_NEAR(8.0 * static_cast<double>(dq.absmax + dq.nested_absmax) / static_cast<double>(n), 0.127, 0.001);
  // An odd element count rounds the packed bytes and the blocks up.
  EXPECT_EQ(Layout4bit(65, Nf4()).packed, 33);
  EXPECT_EQ(Layout4bit(65, Nf4()).absmax, 8);
}

TEST(QuantizeRewriteTest, QuantizesFrozenLinearsOutsideTheHead) {
  const Graph g = Qlora(/*double_quant=*/true);
  // up_proj and q_proj run 4-bit; the adapters and the head stay aten::linear.
  const auto four_bit = NodesOfKind(g, "bnb::matmul_4bit");
  ASSERT_EQ(four_bit.size(), 2u);
  EXPECT_EQ(four_bit[0]->scope, "model.layers.0.mlp.up_proj.base_layer");
  EXPECT_EQ(four_bit[1]->scope, "model.layers.0.q_proj");
  for (const auto* n : NodesOfKind(g, "aten::linear")) EXPECT_NE(n->scope.find("lora_"), n->scope.find("lm_head"));
  const Parameter& w = ParamNamed(g, "model.layers.0.q_proj.weight");
  EXPECT_EQ(w.dtype, DType::kU8);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{64, 1}));
  EXPECT_FALSE(w.trainable);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.absmax").bytes, 2);  // 128 / 64 blocks, uint8
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.nested_absmax").bytes, 4);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.nested_quant_map").bytes, 1024);
  EXPECT_EQ(ParamNamed(g, "lm_head.weight").dtype, DType::kF32);
  // Each 4-bit linear is wrapped in the casts of Linear4bit.forward: to the compute dtype, back with type_as.
  const OpNode& mm = *four_bit[1];
  EXPECT_EQ(g.nodes()[static_cast<size_t>(mm.id.index - 1)].kind, "aten::to");
  EXPECT_EQ(g.nodes()[static_cast<size_t>(mm.id.index + 1)].kind, "aten::type_as");
}

TEST(QuantizeRewriteTest, LoraOnABitsandbytesLayerClonesTheBaseResultAndDoesNotCastBack) {
  const Graph plain = ApplyLora(ThreeModules(), LoraSettings{.rank = 2, .alpha = 4, .dropout = 0.0,
                                                             .targets = {"up_proj"}, .modules_to_save = {}});
  const Graph bnb = ApplyLora(ThreeModules(), UpProjOnQuantized());
  EXPECT_EQ(NodesOfKind(plain, "aten::clone").size(), 0u);
  EXPECT_EQ(NodesOfKind(bnb, "aten::clone").size(), 1u);
  // Plain LoRA casts its input and its result; the bnb layer only its input.
  EXPECT_EQ(NodesOfKind(plain, "aten::to").size(), 2u);
  EXPECT_EQ(NodesOfKind(bnb, "aten::to").size(), 1u);
}

TEST(QuantizeRewriteTest, BadSettingsAreOneLineErrors) {
  const Graph lora = ApplyLora(ThreeModules(), UpProjOnQuantized());
  QuantSettings odd = Nf4();
  odd.blocksize = 48;
  EXPECT_THROW(QuantizeLinears(lora, odd), ConfigError);
  // Nothing frozen outside the head: a graph whose only linear is the head.
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 16}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  b.SetHead();
  ValueId w2 = b.Param("lm_head.weight", {32, 16}, DType::kF32, false);
  ValueId logits = b.OpOut("aten::linear", {T(x), T(w2), None()}, Out({4, 32}), "lm_head");
  const Graph head_only = b.Build(CrossEntropy(b, logits, labels));
  // A graph traced with bf16 weights: prepare_model_for_kbit_training would have cast them to fp32.
  TestGraphBuilder b16;
  ValueId x16 = b16.Input("x", {4, 8}, DType::kBF16);
  ValueId labels16 = b16.Input("labels", {4});
  b16.SetLayer(0);
  ValueId w16 = b16.Param("model.layers.0.q_proj.weight", {16, 8}, DType::kBF16, false);
  ValueId h16 = b16.OpOut("aten::linear", {T(x16), T(w16), None()}, Out({4, 16}, DType::kBF16), "model.layers.0.q_proj");
  b16.SetHead();
  ValueId wh = b16.Param("lm_head.weight", {32, 16}, DType::kF32, false);
  ValueId l16 = b16.OpOut("aten::linear", {T(h16), T(wh), None()}, Out({4, 32}), "lm_head");
  EXPECT_THROW(QuantizeLinears(b16.Build(CrossEntropy(b16, l16, labels16)), Nf4()), ConfigError);
  try {
    QuantizeLinears(head_only, Nf4());
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("no frozen linear"), std::string::npos);
  }
}

std::optional<OpMemoryRule> RuleOf(const Graph& g, const OpNode& node, const BackendRules& backend) {
  RuleContext ctx{g, backend, [&g](ValueId v) { return g.value(v).dtype; },
                  [&g](ValueId v) { return ShapeBytes(g.value(v).shape, g.value(v).dtype); }};
  return RuleFor(node, ctx);
}

BackendRules Backend(bool cpu) {
  Target t;
  t.is_cpu = cpu;
  if (!cpu) t.gpu = *FindGpu("a100-80");
  return RulesFor(t);
}

// The bytes a sequence of temporaries leaves allocated, and its highest point.
std::pair<int64_t, int64_t> LeftAndPeak(const std::vector<TransientStep>& steps) {
  int64_t live = 0, peak = 0;
  for (const auto& s : steps) {
    live += s.free_of >= 0 ? -steps[static_cast<size_t>(s.free_of)].bytes : s.bytes;
    peak = std::max(peak, live);
  }
  return {live, peak};
}

int64_t ForwardExtraBytes(const OpMemoryRule& r) {
  EXPECT_TRUE(r.forward_extra.empty());  // MatMul4Bit saves only the packed weight
  return LeftAndPeak(r.forward_prelude).first;
}

TEST(QuantizedMatmulRuleTest, DequantizesTheWeightInForwardAndAgainInBackward) {
  // q_proj: 16 x 8 fp32 weight (512 B dequantized), 2 blocks (8 B of fp32 absmax).
  for (bool dq : {false, true}) {
    const Graph g = Qlora(dq);
    const OpNode& q = *NodesOfKind(g, "bnb::matmul_4bit")[1];
    const auto cpu = RuleOf(g, q, Backend(true));
    ASSERT_TRUE(cpu.has_value());
    EXPECT_TRUE(cpu->saved_inputs.empty());
    EXPECT_EQ(cpu->input_grads[0], GradKind::kNew);
    // The default kernel: the dequantized weight, and with double quantization one fp32 absmax alive beside it.
    EXPECT_EQ(ForwardExtraBytes(*cpu), 512 + (dq ? 8 : 0));
    EXPECT_EQ(LeftAndPeak(cpu->forward_prelude).second, 512 + (dq ? 8 : 0));  // the first absmax died before B_dq
    // Backward: the absmax (8 B) and the weight (512 B) together, then the weight alone beside the gradient.
    EXPECT_EQ(LeftAndPeak(cpu->backward_prelude), std::make_pair(int64_t{512}, int64_t{512 + (dq ? 8 : 0)}));
    // CUDA: 8 input features are no multiple of the blocksize, so even 4 tokens take the dequantize + F.linear
    // fallback, both absmax copies alive there (locals of _dequant_linear_fallback).
    const auto cuda = RuleOf(g, q, Backend(false));
    EXPECT_EQ(ForwardExtraBytes(*cuda), 512 + (dq ? 2 * 8 : 0));
    EXPECT_EQ(LeftAndPeak(cuda->backward_prelude).first, 512);
  }
  // 64 input features: the fused kernel for 4 tokens allocates only its output; past 1536 tokens the fallback.
  const Graph aligned = Qlora(true, 4, 64);
  const auto fused = RuleOf(aligned, *NodesOfKind(aligned, "bnb::matmul_4bit")[1], Backend(false));
  EXPECT_EQ(ForwardExtraBytes(*fused), 0);
  EXPECT_EQ(LeftAndPeak(fused->backward_prelude).first, 16 * 64 * 4);
  const Graph big = Qlora(true, 2048, 64);
  const auto fallback = RuleOf(big, *NodesOfKind(big, "bnb::matmul_4bit")[1], Backend(false));
  EXPECT_EQ(ForwardExtraBytes(*fallback), 16 * 64 * 4 + 2 * 4 * (16 * 64 / 64));
}

TEST(QuantizedStepTest, OnlyAdaptersTrainAndTheDequantizedWeightIsTransient) {
  TrainingConfig c = CpuConfig();
  c.lifetimes = Lifetimes::kTorchScript;
  const Graph g = Qlora();
  const MemoryEstimate est = EstimateMemory(g, c);
  // Weights: up_proj and q_proj packed (32 + 64 B) and their absmax (4 + 8 B) and codes (64 B each), the head
  // 2048 B, the adapters A [2,8] 64 B and B [8,2] 64 B. Gradients and AdamW states: the adapters only.
  EXPECT_EQ(est.weights_bytes, 32 + 64 + 4 + 8 + 2 * 64 + 2048 + 64 + 64);
  EXPECT_EQ(est.gradients_bytes, 64 + 64);
  EXPECT_EQ(est.optimizer_state_bytes, 2 * (64 + 64));
  // q_proj's dequantized weight (512 B) is allocated and freed by its op, in forward and again in backward.
  const OpNode& q = *NodesOfKind(g, "bnb::matmul_4bit")[1];
  int forward = 0, backward = 0;
  for (const auto& e : est.simulation->timeline.events) {
    if (!e.is_alloc || e.node != q.id.index || e.bytes != 512) continue;
    (e.phase == Phase::kForward ? forward : backward) += 1;
  }
  EXPECT_EQ(forward, 1);
  EXPECT_EQ(backward, 1);
}

QuantSettings TorchaoNf4() {
  QuantSettings q;
  q.library = QuantLibrary::kTorchao;
  return q;
}

// x [4,1024] -> layers.0.q_proj (w [16,1024]: 16384 elements, one scaler block) -> lm_head -> CE.
Graph Nf4Sized() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 1024}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  b.SetLayer(0);
  ValueId w0 = b.Param("model.layers.0.mlp.up_proj.weight", {1024, 1024});
  ValueId u = b.OpOut("aten::linear", {T(x), T(w0), None()}, Out({4, 1024}), "model.layers.0.mlp.up_proj");
  ValueId w = b.Param("model.layers.0.q_proj.weight", {16, 1024});
  ValueId h = b.OpOut("aten::linear", {T(u), T(w), None()}, Out({4, 16}), "model.layers.0.q_proj");
  b.SetHead();
  ValueId w2 = b.Param("lm_head.weight", {32, 16});
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w2), None()}, Out({4, 32}), "lm_head");
  return b.Build(CrossEntropy(b, logits, labels));
}

LoraSettings TorchtuneUpProj() {
  LoraSettings s{.rank = 2, .alpha = 4, .dropout = 0.0, .targets = {"up_proj"}, .modules_to_save = {}};
  s.torchtune = true;
  return s;
}

TEST(TorchaoNf4Test, StoresNf4TensorsPartsAndRunsLinearNf4) {
  const Graph g = QuantizeLinears(ApplyLora(Nf4Sized(), TorchtuneUpProj()), TorchaoNf4());
  // q_proj, 16384 weights: codes 8192 B, int8 scalers per 64 (256 B), one fp32 factor per 256 scalers, the mean and
  // the 16-entry table in the weight's dtype.
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight").bytes, 8192);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.quantized_scalers").bytes, 256);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.quantization_factor").bytes, 4);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.scaler_mean").bytes, 4);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.nf4").bytes, 64);
  EXPECT_EQ(NodesOfKind(g, "torchao::linear_nf4").size(), 2u);
  EXPECT_TRUE(NodesOfKind(g, "bnb::matmul_4bit").empty());
  // torchtune's LoRALinear: adapters in the weight's dtype, no clone, no casts.
  EXPECT_TRUE(NodesOfKind(g, "aten::clone").empty());
  EXPECT_TRUE(NodesOfKind(g, "aten::to").empty());
  EXPECT_TRUE(ParamNamed(g, "model.layers.0.mlp.up_proj.lora_a.weight").trainable);
}

TEST(TorchaoNf4Test, RefusesWeightsToNf4CannotQuantize) {
  try {
    QuantizeLinears(ApplyLora(ThreeModules(), TorchtuneUpProj()), TorchaoNf4());  // 8 x 8 weights
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of 64 x 256"), std::string::npos) << e.what();
  }
}

TEST(TorchaoNf4Test, GetOriginalWeightTemporariesPeakAtTheStack) {
  const Graph g = QuantizeLinears(ApplyLora(Nf4Sized(), TorchtuneUpProj()), TorchaoNf4());
  const OpNode& q = *NodesOfKind(g, "torchao::linear_nf4")[1];
  const auto r = RuleOf(g, q, Backend(true));
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->saved_inputs.empty());  // LinearNF4 saves the NF4 weight, a parameter
  // n = 16384 fp32: two int64 index planes (2 x 8 x 8192), two looked-up planes and two scaled planes (4 x 4 x
  // 8192), the dequantized scalers (4 x 256) and the stacked weight (4 x 16384) alive together.
  const int64_t peak = 2 * 8 * 8192 + 4 * 4 * 8192 + 4 * 256 + 4 * 16384;
  EXPECT_EQ(LeftAndPeak(r->forward_prelude), std::make_pair(int64_t{4 * 16384}, peak));
  EXPECT_EQ(LeftAndPeak(r->backward_prelude), std::make_pair(int64_t{4 * 16384}, peak));
}

QuantSettings Int8() {
  QuantSettings q;
  q.format = QuantFormat::kInt8;
  return q;
}

Graph Int8Lora() {
  LoraSettings s = UpProjOnQuantized();
  s.base_layer = LoraBaseLayer::kBnb8bit;
  return QuantizeLinears(ApplyLora(ThreeModules(), s), Int8());
}

TEST(Int8Test, StoresInt8RowsWithTheirScalesAndRunsOneOp) {
  const Graph g = Int8Lora();
  ASSERT_EQ(NodesOfKind(g, "bnb::matmul_int8").size(), 2u);
  const Parameter& w = ParamNamed(g, "model.layers.0.q_proj.weight");
  EXPECT_EQ(w.dtype, DType::kI8);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{16, 8}));
  EXPECT_EQ(w.bytes, 16 * 8);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.weight.SCB").bytes, 16 * 4);  // fp32 per output row
  EXPECT_EQ(ParamNamed(g, "lm_head.weight").dtype, DType::kF32);
  // Linear8bitLt runs no casts around its op; PEFT's 8-bit LoRA layer neither clones the base result nor casts the
  // sum back: only the adapter input's x.to(fp32) remains.
  EXPECT_TRUE(NodesOfKind(g, "aten::clone").empty());
  EXPECT_EQ(NodesOfKind(g, "aten::to").size(), 1u);
  EXPECT_EQ(QuantName(Int8()), "int8");
}

TEST(Int8MatmulRuleTest, KeepsTheInputAsACtxAttributeAndDequantizesPerBackend) {
  const Graph g = Int8Lora();
  const OpNode& q = *NodesOfKind(g, "bnb::matmul_int8")[1];  // x [4, 8] fp32, CB [16, 8]
  const auto cpu = RuleOf(g, q, Backend(true));
  ASSERT_TRUE(cpu.has_value());
  EXPECT_TRUE(cpu->saved_inputs.empty());
  EXPECT_EQ(cpu->graph_held_inputs, std::vector<int>{0});
  EXPECT_EQ(cpu->input_grads[0], GradKind::kNew);
  // MatMul8bitFp: CB in fp32 (512 B) beside the [16, 1] scale (64 B), which dies in mul_.
  EXPECT_EQ(LeftAndPeak(cpu->forward_prelude), std::make_pair(int64_t{512}, int64_t{512 + 64}));
  EXPECT_EQ(LeftAndPeak(cpu->backward_prelude), std::make_pair(int64_t{512}, int64_t{512 + 64}));
  // MatMul8bitLt: x in fp16 (64 B), |x| (64 B), the outlier test (32 B), row stats (16 B), CA (32 B); the int32
  // product (256 B) and its fp16 dequant (128 B) before the fp32 output. Backward as on CPU.
  const auto cuda = RuleOf(g, q, Backend(false));
  ASSERT_TRUE(cuda.has_value());
  EXPECT_EQ(cuda->graph_held_inputs, std::vector<int>{0});
  EXPECT_EQ(LeftAndPeak(cuda->forward_prelude), std::make_pair(int64_t{16 + 32 + 256 + 128},
                                                               int64_t{16 + 32 + 256 + 128}));
  EXPECT_EQ(LeftAndPeak(cuda->backward_prelude).first, 512);
}

TEST(Int8StepTest, TheLayerInputLivesUntilTheGraphIsFreed) {
  TrainingConfig c = CpuConfig();
  const Graph g = Int8Lora();
  const MemoryEstimate est = EstimateMemory(g, c);
  EXPECT_EQ(est.gradients_bytes, 64 + 64);  // the adapters only
  // q_proj's input (the up_proj LoRA sum, 4 x 8 fp32) is freed with the graph (node -1), after every op's backward.
  const OpNode& q = *NodesOfKind(g, "bnb::matmul_int8")[1];
  const ValueId in = q.args[0].tensors[0];
  int32_t producer = -1;
  for (const auto& n : g.nodes()) {
    for (ValueId o : n.outputs) producer = o == in ? n.id.index : producer;
  }
  ASSERT_GE(producer, 0);
  std::set<int64_t> made;
  bool freed_with_graph = false, freed_earlier = false;
  for (const auto& e : est.simulation->timeline.events) {
    if (e.is_alloc && e.node == producer && e.phase == Phase::kForward && e.bytes == 4 * 8 * 4) made.insert(e.block);
    if (!e.is_alloc && made.count(e.block)) (e.node == -1 && e.phase == Phase::kBackward ? freed_with_graph
                                                                                        : freed_earlier) = true;
  }
  EXPECT_TRUE(freed_with_graph);
  EXPECT_FALSE(freed_earlier);
}

TEST(GptqLayoutTest, MatchesTheTensorsGptqmodelCreates) {
  // gptqmodel 5.0 TorchQuantLinear, in_features 256, out_features 128 (qweight, qzeros, scales, g_idx bytes).
  struct Case { int bits; int64_t group, qweight, qzeros, scales; };
  for (const Case c : {Case{4, 128, 16384, 128, 512}, Case{4, 64, 16384, 256, 1024}, Case{4, -1, 16384, 64, 256},
                       Case{8, 128, 32768, 256, 512}, Case{8, 64, 32768, 512, 1024}, Case{8, -1, 32768, 128, 256}}) {
    const GptqLayout l = LayoutGptq(256, 128, c.bits, c.group);
    EXPECT_EQ(l.qweight, c.qweight) << c.bits << "/" << c.group;
    EXPECT_EQ(l.qzeros, c.qzeros) << c.bits << "/" << c.group;
    EXPECT_EQ(l.scales, c.scales) << c.bits << "/" << c.group;
    EXPECT_EQ(l.g_idx, 1024);
    EXPECT_EQ(l.shift_tables, c.bits == 4 ? 64 : 32);  // two int32 tables of 32 / bits values
  }
}

// x [4,64] -> layers.0.mlp.up_proj (w0 [64,64]) -> layers.0.q_proj (w [32,64]) -> lm_head (w2 [32,32]) -> CE: shapes
// GPTQ can pack.
Graph GptqSized() {
  TestGraphBuilder b;
  ValueId x = b.Input("x", {4, 64}, DType::kF32);
  ValueId labels = b.Input("labels", {4});
  b.SetLayer(0);
  ValueId w0 = b.Param("model.layers.0.mlp.up_proj.weight", {64, 64});
  ValueId u = b.OpOut("aten::linear", {T(x), T(w0), None()}, Out({4, 64}), "model.layers.0.mlp.up_proj");
  ValueId w = b.Param("model.layers.0.q_proj.weight", {32, 64});
  ValueId h = b.OpOut("aten::linear", {T(u), T(w), None()}, Out({4, 32}), "model.layers.0.q_proj");
  b.SetHead();
  ValueId w2 = b.Param("lm_head.weight", {32, 32});
  ValueId logits = b.OpOut("aten::linear", {T(h), T(w2), None()}, Out({4, 32}), "lm_head");
  return b.Build(CrossEntropy(b, logits, labels));
}

Graph GptqLora(int bits = 4, int64_t group = 32) {
  QuantSettings q;
  q.library = QuantLibrary::kGptq;
  q.bits = bits;
  q.group_size = group;
  LoraSettings s{.rank = 2, .alpha = 4, .dropout = 0.0, .targets = {"up_proj"}, .modules_to_save = {}};
  return QuantizeLinears(ApplyLora(GptqSized(), s), q);
}

TEST(GptqTest, StoresQuantLinearBuffersAndRefusesWhatItCannotPack) {
  const Graph g = GptqLora();
  ASSERT_EQ(NodesOfKind(g, "gptq::linear").size(), 2u);
  const LoraSettings lora{.rank = 2, .alpha = 4, .dropout = 0.0, .targets = {"up_proj"}, .modules_to_save = {}};
  const GptqLayout l = LayoutGptq(64, 32, 4, 32);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.qweight").bytes, l.qweight);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.qweight").dtype, DType::kI32);
  EXPECT_FALSE(ParamNamed(g, "model.layers.0.q_proj.qweight").frozen);  // a buffer: no engine shards it
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.qzeros").bytes, l.qzeros);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.scales").bytes, l.scales);
  EXPECT_EQ(ParamNamed(g, "model.layers.0.q_proj.g_idx").bytes, l.g_idx);
  EXPECT_EQ(ParamNamed(g, "lm_head.weight").dtype, DType::kF32);  // the head stays
  QuantSettings q;
  q.library = QuantLibrary::kGptq;
  q.group_size = 48;  // does not divide 64
  try {
    QuantizeLinears(ApplyLora(GptqSized(), lora), q);
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("does not divide its 64 input features"), std::string::npos) << e.what();
  }
  q.group_size = 32;
  try {
    QuantizeLinears(ApplyLora(ThreeModules(), lora), q);  // q_proj has 16 outputs
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("multiples of 32"), std::string::npos) << e.what();
  }
  q.bits = 3;
  EXPECT_THROW(QuantizeLinears(ApplyLora(GptqSized(), lora), q), ConfigError);
}

TEST(GptqTest, TheDequantizedWeightIsKeptForBackward) {
  const Graph g = GptqLora();
  const OpNode& q = *NodesOfKind(g, "gptq::linear")[1];  // x [4, 64] fp32 (requires grad: up_proj's adapter)
  const auto cpu = RuleOf(g, q, Backend(true));
  ASSERT_TRUE(cpu.has_value());
  ASSERT_FALSE(cpu->forward_prelude.empty());
  // The fp32 weight [64, 32] is the last block and the one kept; the int32 unpacking (8 KiB) is the highest point.
  const int64_t weight = 64 * 32;
  std::vector<int64_t> kept;
  for (const auto& step : cpu->forward_prelude) {
    if (step.saved) kept.push_back(step.bytes);
  }
  EXPECT_EQ(kept, std::vector<int64_t>{weight * 4});
  EXPECT_EQ(LeftAndPeak(cpu->forward_prelude).first, weight * 4);  // all else died before the matmul
  EXPECT_GE(LeftAndPeak(cpu->forward_prelude).second, weight * 4 + weight * 1);
  EXPECT_TRUE(cpu->backward_prelude.empty());  // backward multiplies by the kept weight
  // CUDA: the Triton dequantizer writes the fp16 weight, then .to(fp32).
  const auto cuda = RuleOf(g, q, Backend(false));
  EXPECT_EQ(LeftAndPeak(cuda->forward_prelude), std::make_pair(weight * 4, weight * 2 + weight * 4));
  // The step: the kept weight is allocated in q_proj's forward and freed in its backward.
  const MemoryEstimate est = EstimateMemory(g, CpuConfig());
  std::set<int64_t> made;
  int freed_in_backward = 0;
  for (const auto& e : est.simulation->timeline.events) {
    if (e.is_alloc && e.node == q.id.index && e.phase == Phase::kForward && e.bytes == weight * 4 &&
        e.category != MemoryCategory::kTransient) {
      made.insert(e.block);
    }
    if (!e.is_alloc && made.count(e.block) && e.phase == Phase::kBackward && e.node == q.id.index) ++freed_in_backward;
  }
  EXPECT_EQ(made.size(), 1u);
  EXPECT_EQ(freed_in_backward, 1);
}

}  // namespace
}  // namespace llmem::sim
