// `llmem validate RUNS.jsonl`: compares measured per-rank peaks of real distributed runs (JSON lines written by
// scripts/distributed_runs.py) with llmem's estimate of the same model, layout, batch and precision.
#pragma once

#include <CLI/CLI.hpp>
#include <cstddef>
#include <istream>
#include <string>

namespace llmem::cli {

struct ValidateOptions {
  std::string runs;               // JSON lines, one per rank
  std::string gpu;                // catalog GPU for runs with "device": "cuda" (default: from the device name)
  double max_mean_error = 3.0;    // percent, mean |error| over every rank
  double max_case_error = 6.0;    // percent, any single case (its highest rank)
  std::string markdown;           // also write the comparison as a markdown table here
  bool json_out = false;
};

void AddValidateOptions(CLI::App* cmd, ValidateOptions& o);

// The limits and --gpu, checked before the runs file is read. Throws ConfigError.
void CheckValidateOptions(const ValidateOptions& o);

// Reads a runs file's lines and checks each (types, ranges, methods, recipes, every rank of a run once) without
// loading a model; returns the number of runs. Throws ConfigError naming the line.
size_t CheckRunsLines(std::istream& in);

// 0 when both limits hold, 4 when one does not; bad input throws llmem::ConfigError.
int RunValidate(const ValidateOptions& o);

}  // namespace llmem::cli
