// The fuzz input as a file for loaders that take a path (LibTorch's zip reader, the importers): an anonymous
// in-memory file (memfd), rewritten for each input and named through /proc/self/fd.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace llmem::fuzz {

// The path of a regular file holding exactly `data`; valid until the next call.
const std::string& AsFile(const uint8_t* data, size_t size);

}  // namespace llmem::fuzz
