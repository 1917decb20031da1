// One line of progress on stderr for work that can run for more than a couple of seconds (graph builds of a sweep,
// the probes of a search, the records of a validation): rewritten in place as the work goes on, shown only on a
// terminal, never under --json, and only once the work has run for a second (a quick command prints nothing).
// Cleared when the work is done, so the command's own output follows on a clean line.
//
// Usage:
//   ProgressLine progress("recommend", o.json_out);
//   for (...) progress.Update("graph at batch " + std::to_string(b));
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace llmem::cli {

class ProgressLine {
 public:
  ProgressLine(std::string what, bool quiet);
  ~ProgressLine();
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;

  // Shows "llmem: <what>: <detail>" (when shown at all: a terminal, not quiet, a second in).
  void Update(const std::string& detail);

 private:
  std::string what_;
  bool enabled_ = false;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_;
};

// `f` that first shows "<what>: trying <value>" for the value a search asks it for.
template <typename F>
auto ReportingTries(ProgressLine& progress, const char* what, F f) {
  return [&progress, what, f](int64_t value) {
    progress.Update(std::string(what) + ": trying " + std::to_string(value));
    return f(value);
  };
}

}  // namespace llmem::cli
