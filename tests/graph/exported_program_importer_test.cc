// The .pt2 importer against the TorchScript importer on the tiny exports of every architecture, both formats of
// one model made by models/export_hf.py (the tiny_exports CMake fixture; DIR from LLMEM_TINY_MODELS): the IR of a
// step must be the same value for value and op for op, whichever file was read. Then the one-line errors for
// archives that are not programs llmem reads.
#include "graph/exported_program_importer.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "graph/error.h"
#include "graph/torchscript_importer.h"

namespace llmem {
namespace {

namespace fs = std::filesystem;

std::string ExportDir() {
  const char* dir = std::getenv("LLMEM_TINY_MODELS");
  return dir && *dir ? dir : LLMEM_TINY_MODELS_DEFAULT;
}

// Value names other than parameters', the inputs' and the loss's are numbers of the importer's own order.
bool NamedValue(const TensorValue& v) { return v.role != ValueRole::kActivation || v.name == "loss"; }

void ExpectSameArgs(const OpArg& a, const OpArg& b, const std::string& where) {
  EXPECT_EQ(a.kind, b.kind) << where;
  EXPECT_EQ(a.tensors, b.tensors) << where;
  EXPECT_EQ(a.int_value, b.int_value) << where;
  EXPECT_EQ(a.ints, b.ints) << where;
  if (a.kind == OpArg::Kind::kDouble) EXPECT_DOUBLE_EQ(a.double_value, b.double_value) << where;
  if (a.kind == OpArg::Kind::kString) EXPECT_EQ(a.text, b.text) << where;
}

void ExpectSameRebindings(const OpNode& a, const OpNode& b, const std::string& where) {
  ASSERT_EQ(a.rebindings.size(), b.rebindings.size()) << where;
  for (size_t i = 0; i < a.rebindings.size(); ++i) {
    ASSERT_EQ(a.rebindings[i] == nullptr, b.rebindings[i] == nullptr) << where << " depth " << i;
    if (!a.rebindings[i]) continue;
    EXPECT_EQ(a.rebindings[i]->between, b.rebindings[i]->between) << where;
    EXPECT_EQ(a.rebindings[i]->rebinders, b.rebindings[i]->rebinders) << where;
    EXPECT_EQ(a.rebindings[i]->one_of_several, b.rebindings[i]->one_of_several) << where;
    EXPECT_EQ(a.rebindings[i]->own_rebindings, b.rebindings[i]->own_rebindings) << where;
  }
}

// Every field of the IR, values by position.
void ExpectSameGraph(const Graph& a, const Graph& b) {
  ASSERT_EQ(a.values().size(), b.values().size());
  ASSERT_EQ(a.nodes().size(), b.nodes().size());
  ASSERT_EQ(a.params().size(), b.params().size());
  EXPECT_EQ(a.inputs(), b.inputs());
  EXPECT_EQ(a.loss(), b.loss());
  EXPECT_EQ(a.runs_with_bf16_weights(), b.runs_with_bf16_weights());
  ASSERT_EQ(a.position_limit().has_value(), b.position_limit().has_value());
  if (a.position_limit()) EXPECT_EQ(a.position_limit()->max_seq, b.position_limit()->max_seq);
  for (size_t i = 0; i < a.values().size(); ++i) {
    const TensorValue& x = a.values()[i];
    const TensorValue& y = b.values()[i];
    const std::string where = "value " + std::to_string(i) + " (" + x.name + ")";
    EXPECT_EQ(x.role, y.role) << where;
    if (NamedValue(x)) EXPECT_EQ(x.name, y.name) << where;
    EXPECT_EQ(x.shape, y.shape) << where;
    EXPECT_EQ(x.strides, y.strides) << where;
    EXPECT_EQ(x.dtype, y.dtype) << where;
    EXPECT_EQ(x.dtype_bf16_weights, y.dtype_bf16_weights) << where;
    EXPECT_EQ(x.storage_numel, y.storage_numel) << where;
    EXPECT_EQ(x.alias_of, y.alias_of) << where;
    EXPECT_EQ(x.requires_grad, y.requires_grad) << where;
    EXPECT_EQ(x.producer, y.producer) << where;
    EXPECT_EQ(x.param, y.param) << where;
  }
  for (size_t i = 0; i < a.params().size(); ++i) {
    const Parameter& x = a.params()[i];
    const Parameter& y = b.params()[i];
    EXPECT_EQ(x.name, y.name);
    EXPECT_EQ(x.shape, y.shape) << x.name;
    EXPECT_EQ(x.dtype, y.dtype) << x.name;
    EXPECT_EQ(x.trainable, y.trainable) << x.name;
    EXPECT_EQ(x.used_in_forward, y.used_in_forward) << x.name;
    EXPECT_EQ(x.value, y.value) << x.name;
    EXPECT_EQ(x.region, y.region) << x.name;
  }
  for (size_t i = 0; i < a.nodes().size(); ++i) {
    const OpNode& x = a.nodes()[i];
    const OpNode& y = b.nodes()[i];
    const std::string where = "node " + std::to_string(i) + " " + x.kind + " in " + x.scope;
    EXPECT_EQ(x.kind, y.kind) << where;
    EXPECT_EQ(x.scope, y.scope) << where;
    EXPECT_EQ(x.region, y.region) << where;
    EXPECT_EQ(x.in_module_code, y.in_module_code) << where;
    EXPECT_EQ(x.to_autocast_dtype, y.to_autocast_dtype) << where;
    EXPECT_EQ(x.temporary_calls, y.temporary_calls) << where;
    EXPECT_EQ(x.outputs, y.outputs) << where;
    ASSERT_EQ(x.args.size(), y.args.size()) << where;
    for (size_t j = 0; j < x.args.size(); ++j) {
      ExpectSameArgs(x.args[j], y.args[j], where + " arg " + std::to_string(j));
    }
    ExpectSameRebindings(x, y, where);
  }
}

class BothFormats : public ::testing::TestWithParam<std::string> {};

TEST_P(BothFormats, SameIrAsTheTorchScriptExport) {
  const std::string base = ExportDir() + "/" + GetParam() + "-tiny";
  ASSERT_TRUE(IsExportedProgramArchive(base + ".pt2"));
  ASSERT_FALSE(IsExportedProgramArchive(base + ".pt"));
  const auto program = LoadDecoderModel(base + ".pt2");
  const auto script = LoadDecoderModel(base + ".pt");
  ASSERT_NE(dynamic_cast<const ExportedProgramModel*>(program.get()), nullptr);
  for (auto [batch, seq] : {std::pair<int64_t, int64_t>{2, 64}, {1, 37}, {3, 5}}) {
    SCOPED_TRACE("batch " + std::to_string(batch) + " seq " + std::to_string(seq));
    ExpectSameGraph(script->BuildGraph(batch, seq), program->BuildGraph(batch, seq));
  }
  // What the export's records say, and the module tree a device map places.
  EXPECT_EQ(script->sliding_window(), program->sliding_window());
  EXPECT_EQ(script->logits_to_keep(), program->logits_to_keep());
  EXPECT_EQ(script->float32_logits(), program->float32_logits());
  EXPECT_EQ(script->no_split_modules(), program->no_split_modules());
  EXPECT_EQ(script->moe_routing().has_value(), program->moe_routing().has_value());
  const ModuleTree& a = script->module_tree();
  const ModuleTree& b = program->module_tree();
  ASSERT_EQ(a.modules.size(), b.modules.size());
  for (size_t i = 0; i < a.modules.size(); ++i) {
    EXPECT_EQ(a.modules[i].name, b.modules[i].name);
    EXPECT_EQ(a.modules[i].class_name, b.modules[i].class_name) << a.modules[i].name;
    EXPECT_EQ(a.modules[i].children, b.modules[i].children) << a.modules[i].name;
    ASSERT_EQ(a.modules[i].tensors.size(), b.modules[i].tensors.size()) << a.modules[i].name;
    for (size_t j = 0; j < a.modules[i].tensors.size(); ++j) {
      const ModuleTensor& x = a.modules[i].tensors[j];
      const ModuleTensor& y = b.modules[i].tensors[j];
      EXPECT_EQ(x.name, y.name);
      EXPECT_EQ(x.numel, y.numel) << x.name;
      EXPECT_EQ(x.dtype, y.dtype) << x.name;
      EXPECT_EQ(x.is_parameter, y.is_parameter) << x.name;
      EXPECT_EQ(x.tied_to, y.tied_to) << x.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, BothFormats,
                         ::testing::Values("gpt2", "opt", "bloom", "llama", "gpt_neo", "codegen", "gpt_bigcode",
                                           "mistral", "qwen2", "phi", "phi3", "qwen3", "olmo", "olmo2", "stablelm",
                                           "starcoder2", "gpt_neox", "granite", "gemma", "gemma2", "gemma3_text",
                                           "cohere", "gptj", "mpt", "persimmon", "mixtral", "qwen2_moe"));

TEST(ExportedProgram, EagerAttentionGenerationIsRefused) {
  const auto model = ExportedProgramModel::Load(ExportDir() + "/gpt_neo-tiny.pt2");
  try {
    model.BuildGenerationGraph(1, 4, 8);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("TorchScript export"), std::string::npos) << e.what();
  }
}

// A damaged copy of a tiny archive, in the temporary directory (removed after the test). std::filesystem's
// remove_all is not used: libtorch exports its own copy, which crashes when called from here.
class DamagedArchive : public ::testing::Test {
 protected:
  std::string out_ = (fs::temp_directory_path() / ("llmem_damaged_" + std::to_string(::getpid()) + ".pt2")).string();
  void TearDown() override { std::remove(out_.c_str()); }
};

TEST_F(DamagedArchive, TruncatedArchiveIsOneLine) {
  const std::string src = ExportDir() + "/llama-tiny.pt2";
  const std::string& out = out_;
  std::ifstream in(src, std::ios::binary);
  std::string head(4096, '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  std::ofstream(out, std::ios::binary).write(head.data(), static_cast<std::streamsize>(head.size()));
  // A cut archive has no central directory: not recognized as a program, and the TorchScript loader says why.
  EXPECT_FALSE(IsExportedProgramArchive(out));
  EXPECT_THROW(LoadDecoderModel(out), ModelLoadError);
}

}  // namespace
}  // namespace llmem
