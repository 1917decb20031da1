// torch.export ExportedProgram (.pt2) -> IR. Reads the archive torch.export.save writes (the serialized program in
// models/<name>.json: graph nodes with ATen targets, tensor metadata, the signature naming parameters, buffers and
// user inputs, nn_module_stack and stack traces per node; schema: torch/_export/serde/schema.py), and executes the
// program op by op on the meta device at the requested batch and sequence length through the ATen dispatcher, as
// the TorchScript importer executes a trace: the same observations (graph/meta_run.h), so both formats of one
// model give the same IR. Weights are never read; parameters are meta tensors of the program's shapes and dtypes.
//
// What the program cannot say about the eager step, models/export_hf.py stores beside it in the archive's extra/
// (the same records as a TorchScript export, and the module tree).
//
// Usage:
//   auto model = llmem::ExportedProgramModel::Load("llama.pt2");  // throws ModelLoadError
//   llmem::Graph g = model.BuildGraph(/*batch=*/4, /*seq=*/512);
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "graph/decoder_model.h"

namespace llmem {

// Whether `path` is a zip archive in torch.export's format (an archive_format record saying "pt2"). False for
// anything else, including unreadable files (the loader that gets them says why).
bool IsExportedProgramArchive(const std::string& path);

class ExportedProgramModel final : public DecoderModel {
 public:
  // Loads the archive. Throws ModelLoadError (one line) for a damaged archive, one without a serialized program, a
  // schema version this build does not read, or a program that is not forward(input_ids, labels) -> loss.
  static ExportedProgramModel Load(const std::string& path);

  ExportedProgramModel(ExportedProgramModel&&) noexcept;
  ExportedProgramModel& operator=(ExportedProgramModel&&) noexcept;
  ~ExportedProgramModel() override;

  Graph BuildGraph(int64_t batch, int64_t seq) const override;
  // Models with scaled_dot_product_attention: BuildGraph(batch, tokens) (graph/generation_forward.h adds the
  // cache). An eager-attention model's cache is traced from TorchScript exports only: ConfigError here.
  Graph BuildGenerationGraph(int64_t batch, int64_t tokens, int64_t past_tokens) const override;
  const std::string& path() const override;
  const ModuleTree& module_tree() const override;

 protected:
  const ExportRecords& records() const override;
  ExportRecords& mutable_records() override;

 private:
  struct Impl;
  explicit ExportedProgramModel(std::unique_ptr<Impl> impl);
  static ExportedProgramModel LoadChecked(const std::string& path);
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmem
