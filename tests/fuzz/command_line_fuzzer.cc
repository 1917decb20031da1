// The command line on arbitrary arguments (the input split at NUL and newline bytes, after "llmem"): CLI11's
// parse of every subcommand's options, then the checks that need no model. An exit status or an llmem::Error are
// the only outcomes. Run with -close_fd_mask=3: help and parse errors print.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cli/command_line.h"
#include "graph/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args{"llmem"};
  std::string arg;
  for (size_t i = 0; i <= size; ++i) {
    if (i == size || data[i] == '\0' || data[i] == '\n') {
      args.push_back(arg);
      arg.clear();
    } else {
      arg.push_back(static_cast<char>(data[i]));
    }
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  llmem::cli::CommandLine line;
  if (llmem::cli::ParseCommandLine(line, static_cast<int>(args.size()), argv.data())) return 0;
  try {
    llmem::cli::CheckCommandOptions(line);
  } catch (const llmem::Error&) {
  }
  return 0;
}
