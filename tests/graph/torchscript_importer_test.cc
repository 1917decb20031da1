// TorchScript import on the tiny exports of every architecture (models/export_hf.py --all DIR --size tiny, run by
// the tiny_exports CMake fixture; DIR comes from LLMEM_TINY_MODELS). Checks shapes at two (batch, seq) points,
// regions, parameter bookkeeping (tied weights, unused buffers), and the one-line errors for bad input.
#include "graph/torchscript_importer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>

#include "graph/error.h"

namespace llmem {
namespace {

namespace fs = std::filesystem;

// Tiny preset of models/export_hf.py: vocabulary 8192, hidden size 256.
constexpr int64_t kVocab = 8192;
constexpr int64_t kHidden = 256;

std::string ExportDir() {
  const char* dir = std::getenv("LLMEM_TINY_MODELS");
  return dir && *dir ? dir : LLMEM_TINY_MODELS_DEFAULT;
}

std::string ModelPath(const std::string& arch) { return ExportDir() + "/" + arch + "-tiny.pt"; }

// Layer index in a parameter name: "model.layers.3.mlp..." or "transformer.h.3.attn..." -> 3, else -1.
int LayerOfName(const std::string& name) {
  static const std::regex kLayer(R"(\.(?:layers|h)\.(\d+)\.)");
  std::smatch m;
  return std::regex_search(name, m, kLayer) ? std::stoi(m[1].str()) : -1;
}

class ImportEveryArch : public ::testing::TestWithParam<std::string> {};

TEST_P(ImportEveryArch, ShapesFollowBatchAndSeq) {
  for (auto [batch, seq] : {std::pair<int64_t, int64_t>{1, 8}, {3, 5}}) {
    SCOPED_TRACE("batch " + std::to_string(batch) + " seq " + std::to_string(seq));
        auto model = TorchScriptModel::Load(ModelPath(GetParam()));
    Graph g = model.BuildGraph(batch, seq);
    EXPECT_EQ(g.batch(), batch);
    EXPECT_EQ(g.seq(), seq);
    ASSERT_EQ(g.inputs().size(), 2u);
    const TensorValue& ids = g.value(g.inputs()[0]);
    EXPECT_EQ(ids.name, "input_ids");
    EXPECT_EQ(ids.shape, (std::vector<int64_t>{batch, seq}));
    EXPECT_EQ(ids.dtype, DType::kI64);
    EXPECT_EQ(ids.role, ValueRole::kInput);
    EXPECT_EQ(g.value(g.inputs()[1]).shape, (std::vector<int64_t>{batch, seq}));
    // The largest value of the head is the logits (or their fp32 copy): B * S * V elements.
    int64_t largest_head = 0;
    for (const auto& node : g.nodes()) {
      if (node.region.kind != RegionKind::kHead) continue;
      for (ValueId out : node.outputs) largest_head = std::max(largest_head, NumElements(g.value(out).shape));
    }
    EXPECT_EQ(largest_head, batch * seq * kVocab);
    // The loss is a scalar float named "loss".
    const TensorValue& loss = g.value(g.loss());
    EXPECT_TRUE(loss.shape.empty());
    EXPECT_EQ(loss.dtype, DType::kF32);
    EXPECT_EQ(loss.name, "loss");
    EXPECT_TRUE(loss.requires_grad);
    EXPECT_NO_THROW(VerifyGraph(g));
  }
}

TEST_P(ImportEveryArch, RegionsAndParameters) {
  auto model = TorchScriptModel::Load(ModelPath(GetParam()));
  EXPECT_EQ(model.path(), ModelPath(GetParam()));
  Graph g = model.BuildGraph(2, 8);
  ASSERT_FALSE(g.nodes().empty());

  // Embedding ops come first, then decoder layers 0..L-1 in order, then the head.
  EXPECT_EQ(g.nodes().front().region.kind, RegionKind::kEmbedding);
  EXPECT_EQ(g.nodes().back().region.kind, RegionKind::kHead);
  int stage = 0;  // 0 embedding, 1 layers, 2 head
  int32_t last_layer = -1;
  std::set<int32_t> layers;
  for (const auto& node : g.nodes()) {
    const int s = node.region.kind == RegionKind::kEmbedding ? 0 : node.region.kind == RegionKind::kDecoderLayer ? 1 : 2;
    ASSERT_GE(s, stage) << "op " << node.id.index << " " << node.kind << " in " << RegionName(node.region)
                        << " after a later region";
    stage = s;
    if (node.region.kind == RegionKind::kDecoderLayer) {
      ASSERT_GE(node.region.layer, last_layer) << "op " << node.id.index << " " << node.kind;
      last_layer = node.region.layer;
      layers.insert(node.region.layer);
    } else {
      EXPECT_EQ(node.region.layer, -1);
    }
    if (node.kind == "aten::embedding") {
      EXPECT_EQ(node.region.kind, RegionKind::kEmbedding) << node.scope;
    }
  }
  const int32_t L = g.num_layers();
  EXPECT_GE(L, 2);
  EXPECT_EQ(static_cast<int32_t>(layers.size()), L);  // every index 0..L-1 has ops
  EXPECT_EQ(*layers.begin(), 0);
  EXPECT_EQ(*layers.rbegin(), L - 1);

  int cross_entropy = 0;
  for (const auto& node : g.nodes()) {
    if (node.kind == "aten::cross_entropy_loss") {
      ++cross_entropy;
      EXPECT_EQ(node.region.kind, RegionKind::kHead);
    }
  }
  EXPECT_EQ(cross_entropy, 1);

  // Every parameter of a numbered layer belongs to that layer; the highest number is L - 1.
  int max_named_layer = -1;
  int64_t trainable = 0;
  for (const auto& p : g.params()) {
    const int layer = LayerOfName(p.name);
    max_named_layer = std::max(max_named_layer, layer);
    if (layer >= 0) {
      EXPECT_EQ(p.region, (Region{RegionKind::kDecoderLayer, layer})) << p.name << " is in " << RegionName(p.region);
    }
    const TensorValue& v = g.value(p.value);
    EXPECT_EQ(v.role, ValueRole::kParameter) << p.name;
    EXPECT_EQ(v.name, p.name);
    EXPECT_EQ(p.bytes, ShapeBytes(p.shape, p.dtype)) << p.name;
    EXPECT_EQ(p.trainable, v.requires_grad) << p.name;
    if (p.trainable) ++trainable;
  }
  EXPECT_EQ(max_named_layer, L - 1);
  EXPECT_GT(trainable, 0);
  // Parameter names and storages are distinct.
  std::set<std::string> names;
  std::set<int32_t> roots;
  for (const auto& p : g.params()) {
    EXPECT_TRUE(names.insert(p.name).second) << p.name;
    EXPECT_TRUE(roots.insert(g.StorageRoot(p.value).index).second) << p.name << " shares storage with another";
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, ImportEveryArch,
                         ::testing::Values("gpt2", "opt", "bloom", "llama", "gpt_neo", "codegen", "gpt_bigcode",
                                           "mistral", "qwen2"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

// Tied input/output embeddings: one [V, H] storage, not two.
void ExpectTiedEmbedding(const std::string& arch) {
  auto model = TorchScriptModel::Load(ModelPath(arch));
  Graph g = model.BuildGraph(2, 8);
  std::set<int32_t> roots;
  std::vector<std::string> names;
  for (const auto& p : g.params()) {
    if (p.shape == std::vector<int64_t>{kVocab, kHidden}) {
      roots.insert(g.StorageRoot(p.value).index);
      names.push_back(p.name);
    }
  }
  EXPECT_EQ(roots.size(), 1u) << arch;
  ASSERT_EQ(names.size(), 1u) << arch;
  // The one storage is read twice: by the embedding and by the LM head.
  int uses = 0;
  for (const auto& node : g.nodes()) {
    for (const auto& arg : node.args) {
      for (ValueId t : arg.tensors) {
        if (g.StorageRoot(t).index == *roots.begin()) ++uses;
      }
    }
  }
  EXPECT_GE(uses, 2) << arch << ": " << names[0];
}

TEST(TorchScriptImporterTest, Gpt2TiedWeightsAreOneStorage) { ExpectTiedEmbedding("gpt2"); }
TEST(TorchScriptImporterTest, Qwen2TiedWeightsAreOneStorage) { ExpectTiedEmbedding("qwen2"); }

TEST(TorchScriptImporterTest, UntiedLlamaHasTwoVocabMatrices) {
  auto model = TorchScriptModel::Load(ModelPath("llama"));
  Graph g = model.BuildGraph(2, 8);
  std::set<int32_t> roots;
  for (const auto& p : g.params()) {
    if (p.shape == std::vector<int64_t>{kVocab, kHidden}) roots.insert(g.StorageRoot(p.value).index);
  }
  EXPECT_EQ(roots.size(), 2u);  // embed_tokens and lm_head
}

TEST(TorchScriptImporterTest, CodegenAttentionCastFollowsAutocastTheLossUpcastDoesNot) {
  // CodeGen's attention casts its weights with `attn_weights.to(value.dtype)` (modeling_codegen.py), once per
  // layer; under autocast value is bf16. HF's loss upcasts the logits with a literal `.float()`.
  auto model = TorchScriptModel::Load(ModelPath("codegen"));
  Graph g = model.BuildGraph(2, 8);
  std::set<int> flagged_layers;
  int flagged = 0, head_casts = 0;
  for (const auto& node : g.nodes()) {
    if (node.to_autocast_dtype) {
      EXPECT_EQ(node.kind, "aten::to");
      EXPECT_EQ(node.region.kind, RegionKind::kDecoderLayer) << node.scope;
      EXPECT_NE(node.scope.find(".attn"), std::string::npos) << node.scope;
      flagged_layers.insert(node.region.layer);
      ++flagged;
    }
    if (node.kind == "aten::to" && node.region.kind == RegionKind::kHead) {
      ++head_casts;
      EXPECT_FALSE(node.to_autocast_dtype) << node.scope;
    }
  }
  int layers = 0;
  for (const auto& p : g.params()) layers = std::max(layers, LayerOfName(p.name) + 1);
  ASSERT_GT(layers, 1);
  EXPECT_EQ(flagged, layers);
  EXPECT_EQ(static_cast<int>(flagged_layers.size()), layers);
  EXPECT_GE(head_casts, 1);
}

TEST(TorchScriptImporterTest, Gpt2UnusedCausalMaskBuffersAreListed) {
  // GPT-2 modules hold attn.bias (a [1,1,P,P] bool causal mask) that the sdpa forward never reads.
  auto model = TorchScriptModel::Load(ModelPath("gpt2"));
  Graph g = model.BuildGraph(2, 8);
  std::set<int> layers_with_mask;
  for (const auto& p : g.params()) {
    const bool is_mask = p.name.size() > 10 && p.name.compare(p.name.size() - 10, 10, ".attn.bias") == 0;
    if (!is_mask) continue;
    EXPECT_FALSE(p.used_in_forward) << p.name;
    EXPECT_FALSE(p.trainable) << p.name;
    EXPECT_EQ(p.dtype, DType::kBool) << p.name;
    ASSERT_EQ(p.shape.size(), 4u) << p.name;
    EXPECT_EQ(p.bytes, p.shape[2] * p.shape[3]) << p.name;  // one byte per element
    const int layer = LayerOfName(p.name);
    EXPECT_EQ(p.region, (Region{RegionKind::kDecoderLayer, layer})) << p.name;
    layers_with_mask.insert(layer);
    // No op reads it.
    for (const auto& node : g.nodes()) {
      for (const auto& arg : node.args) {
        for (ValueId t : arg.tensors) EXPECT_NE(t, p.value) << p.name << " read by " << node.kind;
      }
    }
  }
  EXPECT_EQ(static_cast<int32_t>(layers_with_mask.size()), g.num_layers());
  // Every used parameter is read by some op.
  for (const auto& p : g.params()) {
    if (!p.used_in_forward) continue;
    bool read = false;
    for (const auto& node : g.nodes()) {
      for (const auto& arg : node.args) read |= std::count(arg.tensors.begin(), arg.tensors.end(), p.value) > 0;
    }
    EXPECT_TRUE(read) << p.name;
  }
}

// The bf16 pass converts the weights in place; the next build must start again from the dtypes in the file.
TEST(TorchScriptImporterTest, SecondBuildGivesTheSameGraph) {
  auto model = TorchScriptModel::Load(ModelPath("llama"));
  Graph a = model.BuildGraph(2, 8);
  Graph b = model.BuildGraph(2, 8);
  ASSERT_EQ(a.values().size(), b.values().size());
  ASSERT_EQ(a.nodes().size(), b.nodes().size());
  ASSERT_EQ(a.params().size(), b.params().size());
  for (size_t i = 0; i < a.values().size(); ++i) {
    EXPECT_EQ(a.values()[i].shape, b.values()[i].shape) << i;
    EXPECT_EQ(a.values()[i].dtype, b.values()[i].dtype) << i;
    EXPECT_EQ(a.values()[i].dtype_bf16_weights, b.values()[i].dtype_bf16_weights) << i;
  }
  // A trace made with fp32 weights bakes fp32 casts in (RMSNorm's `.to(input_dtype)`), so with bf16 weights a
  // linear sees an fp32 input and a bf16 weight, which the CPU kernels reject too: both builds say so.
  EXPECT_FALSE(a.runs_with_bf16_weights());
  EXPECT_FALSE(b.runs_with_bf16_weights());
}

// ---- bad input ----

void ExpectOneLineLoadError(const std::string& path) {
  try {
    TorchScriptModel::Load(path);
    FAIL() << "expected ModelLoadError for " << path;
  } catch (const ModelLoadError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

std::string ScratchDir() {
  const fs::path dir = fs::path(::testing::TempDir()) /
                       ("llmem_import_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
  fs::create_directories(dir);
  return dir.string();
}

TEST(TorchScriptImporterTest, MissingFile) { ExpectOneLineLoadError(ScratchDir() + "/does_not_exist.pt"); }

TEST(TorchScriptImporterTest, Directory) { ExpectOneLineLoadError(ScratchDir()); }

TEST(TorchScriptImporterTest, EmptyFile) {
  const std::string path = ScratchDir() + "/empty.pt";
  std::ofstream(path).close();
  ExpectOneLineLoadError(path);
}

TEST(TorchScriptImporterTest, TextFileNamedPt) {
  const std::string path = ScratchDir() + "/notes.pt";
  std::ofstream(path) << "this is not a TorchScript archive\nsecond line\n";
  ExpectOneLineLoadError(path);
}

TEST(TorchScriptImporterTest, NonPositiveBatchOrSeqIsAConfigError) {
  auto model = TorchScriptModel::Load(ModelPath("gpt2"));
  EXPECT_THROW(model.BuildGraph(0, 8), ConfigError);
  EXPECT_THROW(model.BuildGraph(-1, 8), ConfigError);
  EXPECT_THROW(model.BuildGraph(2, 0), ConfigError);
  EXPECT_THROW(model.BuildGraph(2, -5), ConfigError);
}

TEST(TorchScriptImporterTest, BatchTimesSeqOverflowIsAConfigError) {
  auto model = TorchScriptModel::Load(ModelPath("gpt2"));
  // 2^32 * 2^32 = 2^64 tokens: batch x seq itself overflows.
  EXPECT_THROW(model.BuildGraph(int64_t{1} << 32, int64_t{1} << 32), ConfigError);
}

TEST(TorchScriptImporterTest, HugeBatchTimesSeqIsAConfigErrorNotACrash) {
  auto model = TorchScriptModel::Load(ModelPath("llama"));
  // 2^26 * 2^26 = 2^52 tokens: input_ids take 2^55 B (fits), but the logits need 2^52 * 8192 * 4 = 2^67 B.
  EXPECT_THROW(model.BuildGraph(int64_t{1} << 26, int64_t{1} << 26), ConfigError);
}

// When the graph inputs themselves overflow: 2^30 * 2^30 = 2^60 tokens fit an int64 count, but the int64
// input_ids need 2^63 B, which does not.
TEST(TorchScriptImporterTest, InputIdsOverflowIsAConfigError) {
  auto model = TorchScriptModel::Load(ModelPath("llama"));
  EXPECT_THROW(model.BuildGraph(int64_t{1} << 30, int64_t{1} << 30), ConfigError);
}

// ---- position limits ----

// The tiny presets have 1024 positions. GPT-2 and OPT learn a table (OPT's has 2 more rows: its ids start at 2);
// CodeGen indexes a fixed sin/cos table; GPT-Neo's mask buffer fails first past 1024 tokens, and the table is
// named as the reason.
TEST(TorchScriptImporterTest, PositionTablesBoundTheSequence) {
  for (const char* arch : {"gpt2", "opt", "gpt_neo", "codegen"}) {
    auto model = TorchScriptModel::Load(ModelPath(arch));
    const Graph g = model.BuildGraph(1, 16);
    ASSERT_TRUE(g.position_limit().has_value()) << arch;
    EXPECT_EQ(g.position_limit()->max_seq, 1024) << arch;
    EXPECT_NO_THROW(model.BuildGraph(1, 1024)) << arch;
    EXPECT_THROW(model.BuildGraph(1, 1025), ConfigError) << arch;
    model.set_max_positions(4096);  // an override does not lift a table
    EXPECT_THROW(model.BuildGraph(1, 1025), ConfigError) << arch;
  }
}

// RoPE has no table: the limit is the max_position_embeddings of the config the export carries (4096 for the
// tiny RoPE presets), and --max-positions replaces it.
TEST(TorchScriptImporterTest, RopeLimitIsTheExportedConfigOrTheOverride) {
  auto model = TorchScriptModel::Load(ModelPath("llama"));
  const Graph g = model.BuildGraph(1, 16);
  ASSERT_TRUE(g.position_limit().has_value());
  EXPECT_EQ(g.position_limit()->max_seq, 4096);
  EXPECT_NE(g.position_limit()->source.find("max_position_embeddings"), std::string::npos);
  model.set_max_positions(16);
  EXPECT_EQ(model.BuildGraph(1, 16).position_limit()->max_seq, 16);
  EXPECT_THROW(model.BuildGraph(1, 17), ConfigError);
  EXPECT_THROW(model.set_max_positions(0), ConfigError);
}

// Eager attention (q @ k^T, softmax, probs @ v): the generation forward is the export run with each layer's
// DynamicCache update (the cached entry, an input, concatenated with the new tokens' keys or values) and
// generate()'s attention mask of the whole context. Every layer's entries are named; shapes follow the cached tokens.
class GenerationGraphEagerArch : public ::testing::TestWithParam<std::string> {};

TEST_P(GenerationGraphEagerArch, RunsWithItsCache) {
  const auto model = TorchScriptModel::Load(ModelPath(GetParam()));
  for (auto [tokens, past] : {std::pair<int64_t, int64_t>{5, 0}, {1, 9}}) {
    SCOPED_TRACE("tokens " + std::to_string(tokens) + " past " + std::to_string(past));
    const Graph g = model.BuildGenerationGraph(3, tokens, past);
    ASSERT_TRUE(g.kv_cache().has_value());
    const KvCacheNames& names = *g.kv_cache();
    ASSERT_FALSE(names.present.empty());
    EXPECT_EQ(names.present.size() % 2, 0u);  // keys, then values, of every layer
    EXPECT_EQ(names.past.size(), past > 0 ? names.present.size() : 0u);
    std::map<std::string, const TensorValue*> by_name;
    for (const auto& v : g.values()) by_name.emplace(v.name, &v);
    std::set<std::string> inputs;
    for (ValueId in : g.inputs()) inputs.insert(g.value(in).name);
    ASSERT_TRUE(inputs.count("attention_mask"));
    EXPECT_EQ(by_name.at("attention_mask")->shape, (std::vector<int64_t>{3, past + tokens}));
    for (size_t i = 0; i < names.present.size(); ++i) {
      ASSERT_TRUE(by_name.count(names.present[i])) << names.present[i];
      const std::vector<int64_t>& shape = by_name.at(names.present[i])->shape;
      ASSERT_EQ(shape.size(), 4u);
      EXPECT_EQ(shape[0], 3);
      EXPECT_EQ(shape[2], past + tokens);
      EXPECT_EQ(shape[1] * shape[3], kHidden);
      if (past == 0) continue;
      EXPECT_TRUE(inputs.count(names.past[i])) << names.past[i];
      std::vector<int64_t> cached = shape;
      cached[2] = past;
      EXPECT_EQ(by_name.at(names.past[i])->shape, cached);
    }
  }
  EXPECT_THROW(model.BuildGenerationGraph(1, 1, -1), ConfigError);
}

INSTANTIATE_TEST_SUITE_P(Tiny, GenerationGraphEagerArch, ::testing::Values("bloom", "gpt_neo", "codegen"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

// scaled_dot_product_attention: the training forward itself; graph/generation_forward.h adds the cache.
TEST(TorchScriptImporterTest, SdpaGenerationGraphIsTheForward) {
  const auto model = TorchScriptModel::Load(ModelPath("llama"));
  const Graph g = model.BuildGenerationGraph(2, 1, 7);
  EXPECT_FALSE(g.kv_cache().has_value());
  EXPECT_EQ(g.nodes().size(), model.BuildGraph(2, 1).nodes().size());
}

}  // namespace
}  // namespace llmem
