// Python's pickle format (protocol 2, which every Python 3 reads) for JSON-shaped data: a dict, list, str, int,
// float, bool or None tree, as PyTorch's memory snapshot files hold.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace llmem::cli {

// The pickle of `value`: objects become dicts (keys in the object's order), arrays lists.
std::string Pickle(const nlohmann::json& value);

}  // namespace llmem::cli
