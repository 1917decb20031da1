// Turns the command line's names (precision, optimizer, GPU or "cpu") into a training configuration; shared by
// every command that simulates a step. Unknown names throw llmem::ConfigError naming the known ones.
#pragma once

#include <string>

#include "simulator/training_config.h"

namespace llmem::cli {

sim::TrainingConfig ParseTrainingConfig(const std::string& precision, const std::string& optimizer,
                                        const std::string& target);

// --lifetimes: eager (the user's eager Python program, default) | torchscript (what `llmem measure` runs).
sim::Lifetimes ParseLifetimesOption(const std::string& name);

}  // namespace llmem::cli
