// `llmem infer --device-map auto --gpus N`: generation with the model loaded by from_pretrained(device_map="auto")
// over N GPUs (distributed/auto_device_map.h, distributed/device_map_generation.h): the placement and each GPU's
// weights, cache and peaks.
#pragma once

#include <string>

#include "cli/infer_command.h"
#include "graph/torchscript_importer.h"
#include "simulator/generation_simulator.h"
#include "simulator/training_config.h"

namespace llmem::cli {

// 0 when every GPU fits, 3 otherwise; bad input throws ConfigError. `loop` describes the generation loop.
int RunDeviceMapInfer(const InferOptions& o, const TorchScriptModel& model, const sim::GenerationGraphAt& graph_at,
                      const sim::GenerationRequest& request, const sim::TrainingConfig& config,
                      const std::string& loop);

}  // namespace llmem::cli
