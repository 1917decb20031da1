#include "graph/dtype.h"

#include <array>
#include <cstdio>
#include <limits>

#include "graph/error.h"

namespace llmem {
namespace {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  int64_t size;
  bool floating;
};
constexpr std::array<DTypeInfo, 11> kDTypes{{
    {DType::kF32, "f32", 4, true},
    {DType::kF16, "f16", 2, true},
    {DType::kBF16, "bf16", 2, true},
    {DType::kF64, "f64", 8, true},
    {DType::kI64, "i64", 8, false},
    {DType::kI32, "i32", 4, false},
    {DType::kI16, "i16", 2, false},
    {DType::kI8, "i8", 1, false},
    {DType::kU8, "u8", 1, false},
    {DType::kBool, "bool", 1, false},
    {DType::kComplex64, "c64", 8, false},
}};
const DTypeInfo& Info(DType d) { return kDTypes[static_cast<size_t>(d)]; }
}  // namespace

int64_t ElementSize(DType dtype) { return Info(dtype).size; }
bool IsFloating(DType dtype) { return Info(dtype).floating; }
std::string_view DTypeName(DType dtype) { return Info(dtype).name; }

std::optional<DType> ParseDType(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

int64_t CheckedMul(int64_t a, int64_t b, std::string_view what) {
  int64_t out = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &out)) {
    throw ConfigError("byte count of " + std::string(what) + " overflows a 64-bit integer");
  }
  return out;
}

int64_t CheckedAdd(int64_t a, int64_t b, std::string_view what) {
  int64_t out = 0;
  if (__builtin_add_overflow(a, b, &out)) {
    throw ConfigError("byte count of " + std::string(what) + " overflows a 64-bit integer");
  }
  return out;
}

DType Promote(DType a, DType b) {
  if (a == b) return a;
  if (!IsFloating(a)) return b;
  if (!IsFloating(b)) return a;
  if (a == DType::kF64 || b == DType::kF64) return DType::kF64;
  return DType::kF32;
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n = CheckedMul(n, d, "a tensor shape");
  return n;
}

int64_t ShapeBytes(const std::vector<int64_t>& shape, DType dtype) {
  return CheckedMul(NumElements(shape), ElementSize(dtype), "a tensor");
}

std::string FormatBytes(int64_t bytes) {
  char buf[64];
  const double b = static_cast<double>(bytes);
  if (bytes >= kGiB) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", b / kGiB);
  } else if (bytes >= kMiB) {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", b / kMiB);
  } else if (bytes >= kKiB) {
    std::snprintf(buf, sizeof(buf), "%.1f KiB", b / kKiB);
  } else {
    std::snprintf(buf, sizeof(buf), "%lld B", static_cast<long long>(bytes));
  }
  return buf;
}

std::optional<DType> DTypeOfScalarType(int64_t scalar_type) {
  switch (scalar_type) {
    case 0: return DType::kU8;
    case 1: return DType::kI8;
    case 2: return DType::kI16;
    case 3: return DType::kI32;
    case 4: return DType::kI64;
    case 5: return DType::kF16;
    case 6: return DType::kF32;
    case 7: return DType::kF64;
    case 11: return DType::kBool;
    case 15: return DType::kBF16;
    default: return std::nullopt;
  }
}

int64_t ScalarTypeOf(DType dtype) {
  for (int64_t t : {0, 1, 2, 3, 4, 5, 6, 7, 11, 15}) {
    if (DTypeOfScalarType(t) == dtype) return t;
  }
  return 6;  // float32 for a dtype aten::to is never given here (complex)
}

}  // namespace llmem
