// The torch.export program (.pt2) importer on arbitrary bytes: the archive, the serialized program's JSON, the
// export's records and the meta run of the program's nodes at a small shape. A model or an llmem::Error are the
// only outcomes; anything else is a finding.
#include <cstddef>
#include <cstdint>

#include "graph/error.h"
#include "graph/exported_program_importer.h"
#include "tests/fuzz/fuzz_input_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const llmem::ExportedProgramModel model = llmem::ExportedProgramModel::Load(llmem::fuzz::AsFile(data, size));
    (void)model.BuildGraph(/*batch=*/2, /*seq=*/5);
  } catch (const llmem::Error&) {
  }
  return 0;
}
