// What every simulated timeline must satisfy, checked after every simulation: each block is allocated once and
// freed at most once, only after its allocation; live bytes never go negative; what the step makes for itself
// (activations, their gradients, workspaces, autocast copies) is gone when the step ends.
#pragma once

#include "simulator/memory_timeline.h"

namespace llmem::sim {

// Aborts with an internal-error check naming the first broken rule and block.
void CheckTimelineInvariants(const Timeline& timeline);

}  // namespace llmem::sim
