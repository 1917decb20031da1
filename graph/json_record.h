// The JSON records of an export (a .pt2's program, module tree and tensor configs; the records models/export_hf.py
// adds to an export), parsed with their nesting bounded first. No record llmem reads nests past 30 levels (the
// bundled programs: 24), but a crafted program nested 200,000 levels deep fed llmem's recursive readers, and its
// 40 MB took 17 s to parse under ASan; a text nested deeper than kMaxJsonNesting is refused before it is parsed.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <string_view>

namespace llmem {

inline constexpr size_t kMaxJsonNesting = 1000;

// The parsed value, or a discarded one when `text` is not JSON (the caller says what it expected). Throws
// ModelLoadError "<what> nests deeper than 1000 levels" for a text nested deeper.
nlohmann::json ParseJsonRecord(std::string_view text, const std::string& what);

}  // namespace llmem
