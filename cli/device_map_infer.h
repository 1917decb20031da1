// `llmem infer --device-map auto --gpus N`: generation with the model loaded by from_pretrained(device_map="auto")
// over N GPUs (distributed/auto_device_map.h, distributed/device_map_generation.h): the placement and each GPU's
// weights, cache and peaks.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "cli/infer_command.h"
#include "graph/decoder_model.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// 0 when every GPU fits, 3 otherwise; bad input throws ConfigError. `request_at(batch, prompt)` is the request
// at a batch and prompt (for --max-batch and --max-context), `limit` the model's positions, `loop` describes the
// generation loop.
int RunDeviceMapInfer(const InferOptions& o, const DecoderModel& model, const sim::GenerationGraphAt& graph_at,
                      const std::function<sim::GenerationRequest(int64_t, int64_t)>& request_at,
                      const sim::TrainingConfig& config, const std::optional<PositionLimit>& limit,
                      const std::string& loop);

}  // namespace llmem::cli
