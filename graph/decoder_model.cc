#include "graph/decoder_model.h"

#include "graph/error.h"
#include "graph/exported_program_importer.h"
#include "graph/model_file_check.h"
#include "graph/torchscript_importer.h"

namespace llmem {

void DecoderModel::set_max_positions(int64_t n) {
  if (n < 1) throw ConfigError("--max-positions must be at least 1, got " + std::to_string(n));
  mutable_records().max_positions_override = n;
}

std::unique_ptr<DecoderModel> LoadDecoderModel(const std::string& path) {
  // By content; a file named .pt2 that is neither gets the program reader's reason, any other the TorchScript one.
  const bool named_pt2 = path.size() > 4 && path.compare(path.size() - 4, 4, ".pt2") == 0;
  if (IsExportedProgramArchive(path) || (named_pt2 && !IsTorchScriptArchive(path))) {
    return std::make_unique<ExportedProgramModel>(ExportedProgramModel::Load(path));
  }
  return std::make_unique<TorchScriptModel>(TorchScriptModel::Load(path));
}

}  // namespace llmem
