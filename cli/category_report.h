// Live bytes per memory category (simulator/memory_timeline.h), as the commands print them: text lines and JSON.
#pragma once

#include <array>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "simulator/memory_timeline.h"

namespace llmem::cli {

using CategoryBytes = std::array<int64_t, sim::kNumCategories>;

// "  activations (body)       1.20 GiB", one line per category that holds bytes.
void PrintCategories(const CategoryBytes& bytes);

// {category name: bytes}: every category, the recipe-only ones only when they hold bytes (estimate's --json).
nlohmann::json CategoriesJson(const CategoryBytes& bytes);

// {category name: bytes} of the categories that hold bytes (recommend's and infer's --json).
nlohmann::json NonZeroCategoriesJson(const CategoryBytes& bytes);

}  // namespace llmem::cli
