#include "graph/error.h"

#include <cstdio>
#include <cstdlib>

namespace llmem::detail {

void CheckFailed(const char* file, int line, const char* cond, const std::string& msg) {
  std::fprintf(stderr, "llmem internal error: %s:%d: check failed: %s %s\n", file, line, cond, msg.c_str());
  std::abort();
}

}  // namespace llmem::detail
