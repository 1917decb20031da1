#include "cli/category_report.h"

#include <cstdio>
#include <string>

#include "graph/dtype.h"

namespace llmem::cli {
namespace {

std::string Name(size_t c) { return std::string(sim::CategoryName(static_cast<sim::MemoryCategory>(c))); }

}  // namespace

void PrintCategories(const CategoryBytes& bytes) {
  for (size_t c = 0; c < sim::kNumCategories; ++c) {
    if (bytes[c] == 0) continue;
    std::printf("  %-22s %12s\n", Name(c).c_str(), FormatBytes(bytes[c]).c_str());
  }
}

nlohmann::json CategoriesJson(const CategoryBytes& bytes) {
  nlohmann::json cats = nlohmann::json::object();
  for (size_t c = 0; c < sim::kNumCategories; ++c) {
    if (bytes[c] == 0 && sim::RecipeOnlyCategory(static_cast<sim::MemoryCategory>(c))) continue;
    cats[Name(c)] = bytes[c];
  }
  return cats;
}

nlohmann::json NonZeroCategoriesJson(const CategoryBytes& bytes) {
  nlohmann::json cats = nlohmann::json::object();
  for (size_t c = 0; c < sim::kNumCategories; ++c) {
    if (bytes[c] != 0) cats[Name(c)] = bytes[c];
  }
  return cats;
}

}  // namespace llmem::cli
