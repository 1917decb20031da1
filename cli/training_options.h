// Turns the command line's names (precision, optimizer, GPU or "cpu") into a training configuration; shared by
// every command that simulates a step. Unknown names throw llmem::ConfigError naming the known ones.
#pragma once

#include <string>

#include "simulator/training_config.h"

namespace llmem::cli {

sim::TrainingConfig ParseTrainingConfig(const std::string& precision, const std::string& optimizer,
                                        const std::string& target);

}  // namespace llmem::cli
