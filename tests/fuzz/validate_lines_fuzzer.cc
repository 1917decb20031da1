// `llmem validate`'s runs file (JSON lines of measured ranks) on arbitrary bytes: every line's types, ranges,
// methods and recipes, and the ranks of each run. A count of runs or an llmem::Error are the only outcomes.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "cli/validate_command.h"
#include "graph/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    (void)llmem::cli::CheckRunsLines(in);
  } catch (const llmem::Error&) {
  }
  return 0;
}
