// Meta-device kernels that PyTorch registers only from Python (torch/_meta_registrations.py) and that a pure C++
// process therefore lacks. Shape inference (graph/) and the meta oracle (measure/) run models on the meta
// device and need them.
#pragma once

namespace llmem {

// Registers the kernels once; safe to call many times. Calling it also keeps the registrations from being
// dropped by the static linker.
void EnsureMetaKernelsRegistered();

}  // namespace llmem
