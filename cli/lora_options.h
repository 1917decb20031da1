// --lora r=R,alpha=A,dropout=P,targets=LIST and --lora-modules-to-save LIST: parsed into LoraSettings.
#pragma once

#include <optional>
#include <string>

#include "graph/lora_rewrite.h"

namespace llmem::cli {

// "r=8,alpha=16,dropout=0.05,targets=q_proj,v_proj" (targets last or not: a comma-separated entry without '='
// continues the list before it; `+` also separates targets). r defaults to 8, alpha to 16, dropout to 0 (PEFT's
// LoraConfig defaults). Throws ConfigError naming an entry that does not parse; ApplyLora checks the values.
LoraSettings ParseLoraOption(const std::string& text, const std::string& modules_to_save);

}  // namespace llmem::cli
