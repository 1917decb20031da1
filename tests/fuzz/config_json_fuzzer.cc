// A model's config.json as llmem's C++ side reads it on arbitrary bytes: the cache entry --hf-config names for it,
// and the config record an export carries (positions, sliding window, layer types, MoE routing, ...). A result or
// an llmem::Error are the only outcomes. (The exporter's own reading of a config.json is fuzzed from Python:
// tests/fuzz/config_json_fuzzer.py.)
#include <cstddef>
#include <cstdint>
#include <string>

#include "cli/hf_config_export.h"
#include "graph/error.h"
#include "graph/export_records.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)llmem::cli::ConfigModelType(text);
  try {
    llmem::ExportRecords records;
    records.ReadConfig(text, "fuzz.pt");
  } catch (const llmem::Error&) {
  }
  return 0;
}
