// A user's Hugging Face config.json as the model llmem reads: models/export_hf.py traces it on the meta device (no
// weights) once, and later commands reuse the export from a cache keyed by the config, the weights' dtype and the
// exporter itself.
#pragma once

#include <optional>
#include <string>

#include "graph/decoder_model.h"

namespace CLI {
class App;
}

namespace llmem::cli {

// The model a command reads: a TorchScript export, or a config.json (or the model directory holding it).
struct ModelSource {
  std::string file;
  std::string hf_config;
  // --moe-imbalance: the busiest expert's rows over the balanced rows a mixture-of-experts model is traced with.
  std::optional<double> moe_imbalance;
};

// Adds the optional positional `model`, `--hf-config PATH` and `--moe-imbalance F`; exactly one of the first two is
// checked by ModelFile.
void AddModelSource(CLI::App* cmd, ModelSource& source, const char* file_help);

// The export to read. For --hf-config: the cached export, made first when there is none (with a progress line on a
// terminal unless `quiet`). `dtype` is the weights' dtype: float32, bfloat16 or float16. Throws llmem::Error with
// one line on bad input (both or neither given, a config the exporter refuses, no Python to run it).
std::string ModelFile(const ModelSource& source, const std::string& dtype, bool quiet);

// The model_type of a config.json's text as a file-name part of its cache entry ("model" when it names none that
// is safe: letters, digits, '_' and '-', at most 64); the exporter checks the config itself.
std::string ConfigModelType(const std::string& text);

// The weights' dtype an export for `precision` is traced in: a pure-bf16 step or generation needs bf16 weights (the
// trace bakes its dtype casts in); autocast and fp32 keep fp32 master weights.
std::string ExportDtypeFor(const std::string& precision);

// Throws ConfigError when --moe-imbalance was given and `model` was not traced with it (a dense model, or an export
// traced with another routing, which --hf-config would re-trace).
void CheckMoeImbalance(const ModelSource& source, const DecoderModel& model);

}  // namespace llmem::cli
