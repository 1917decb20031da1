// The TorchScript importer on arbitrary bytes: our checks of the file, LibTorch's zip and pickle reading and
// TorchScript compilation, the export's records, and the meta run of the loaded forward at a small shape. A model
// or an llmem::Error (the CLI's one-line message) are the only outcomes; anything else (another exception, a
// crash, a sanitizer report, a hang) is a finding.
#include <cstddef>
#include <cstdint>

#include "graph/error.h"
#include "graph/torchscript_importer.h"
#include "tests/fuzz/fuzz_input_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const llmem::TorchScriptModel model = llmem::TorchScriptModel::Load(llmem::fuzz::AsFile(data, size));
    (void)model.BuildGraph(/*batch=*/2, /*seq=*/5);
  } catch (const llmem::Error&) {
  }
  return 0;
}
