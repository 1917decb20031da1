// TorchScript file -> IR. Loads an exported decoder LM whose forward(input_ids, labels) returns the training loss,
// inlines its forward graph and executes it op by op on the meta device at the requested batch and sequence
// length, recording every tensor's shape, dtype, storage sharing and requires_grad, and every op's module scope
// and region. Weights are never materialized: parameters are moved to (or already live on) the meta device.
// Traced and scripted files both work: scripted control flow (prim::If, prim::Loop) is followed where its
// conditions are values the meta run knows (None checks, flags, sizes), and refused where they need tensor data.
//
// It does not decide anything about memory; it only observes what PyTorch does.
//
// Usage:
//   auto model = llmem::TorchScriptModel::Load("llama.pt");     // throws ModelLoadError
//   llmem::Graph g = model.BuildGraph(/*batch=*/4, /*seq=*/512); // throws ModelLoadError / ConfigError
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "graph/decoder_model.h"

namespace llmem {

class TorchScriptModel final : public DecoderModel {
 public:
  // Loads the file. Throws ModelLoadError (one line) for a missing, unreadable or non-TorchScript file, or a
  // module without forward(input_ids, labels).
  static TorchScriptModel Load(const std::string& path);

  TorchScriptModel(TorchScriptModel&&) noexcept;
  TorchScriptModel& operator=(TorchScriptModel&&) noexcept;
  ~TorchScriptModel() override;

  Graph BuildGraph(int64_t batch, int64_t seq) const override;
  Graph BuildGenerationGraph(int64_t batch, int64_t tokens, int64_t past_tokens) const override;
  const std::string& path() const override;
  const ModuleTree& module_tree() const override;

 protected:
  const ExportRecords& records() const override;
  ExportRecords& mutable_records() override;

 private:
  struct Impl;
  explicit TorchScriptModel(std::unique_ptr<Impl> impl);
  static TorchScriptModel LoadUnguarded(const std::string& path);
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmem
