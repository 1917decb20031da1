#include "cli/progress_line.h"

#include <unistd.h>

#include <cstdio>
#include <utility>

namespace llmem::cli {

ProgressLine::ProgressLine(std::string what, bool quiet)
    : what_(std::move(what)),
      enabled_(!quiet && isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()) {}

ProgressLine::~ProgressLine() {
  if (shown_) std::fprintf(stderr, "\r\033[K");
}

void ProgressLine::Update(const std::string& detail) {
  if (!enabled_) return;
  if (!shown_ && std::chrono::steady_clock::now() - start_ < std::chrono::seconds(1)) return;
  std::fprintf(stderr, "\r\033[Kllmem: %s: %s", what_.c_str(), detail.c_str());
  std::fflush(stderr);
  shown_ = true;
}

}  // namespace llmem::cli
