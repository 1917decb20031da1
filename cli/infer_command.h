// `llmem infer`: the memory of Hugging Face generation (prefill and decode with a DynamicCache or StaticCache) on
// one GPU or on each rank of a tensor-parallel group, and its time as a roofline.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <optional>
#include <string>

#include "cli/hf_config_export.h"
#include "simulator/training_config.h"

namespace llmem::cli {

struct InferOptions {
  ModelSource source;
  std::string model;  // the export read: source.file, or the export of source.hf_config
  std::string gpu = "a100-80";
  std::string gpu_memory;
  int64_t batch = 1;
  int64_t prompt = 0;
  int64_t new_tokens = 0;
  std::string precision = "bf16";
  std::string cache = "dynamic";
  std::optional<int64_t> max_positions;
  int tp = 1;                // tensor-parallel ranks (transformers' tp_plan; vLLM's with --cache paged)
  int gpus = 0;              // > 0: compare the tensor-parallel layouts over this many GPUs
  std::string device_map;    // "auto": from_pretrained(device_map="auto") over --gpus GPUs
  std::string kv_dtype = "auto";  // the cache's element type: auto = the weights'
  std::string quant;              // the linears' storage (bitsandbytes / GPTQ formats of --quant); "" = none
  std::optional<int64_t> quant_group;
  // --cache paged: vLLM's engine arguments
  int64_t block_size = 16;
  double gpu_memory_utilization = 0.9;
  std::optional<int64_t> max_model_len;
  int64_t max_num_batched_tokens = 8192;
  int64_t max_num_seqs = 256;
  bool max_batch = false;    // also search the largest batch that fits at this prompt and new tokens
  bool max_prompt = false;   // also search the longest prompt that fits at this batch and new tokens
  bool json_out = false;
};

void AddInferOptions(CLI::App* cmd, InferOptions& o);

// 0 when it fits, 3 when it does not; bad input throws llmem::ConfigError.
// The options' checks that need no model (names, ranges, combinations), and the target they name. Throws
// ConfigError.
sim::TrainingConfig CheckInferOptions(const InferOptions& o);

int RunInfer(const InferOptions& o);

}  // namespace llmem::cli
