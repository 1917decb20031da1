// Element types the IR knows, their sizes, and checked byte arithmetic.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace llmem {

constexpr int64_t kKiB = int64_t{1} << 10;
constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool, kComplex64 };

int64_t ElementSize(DType dtype);
// c10::ScalarType numbering (c10/core/ScalarType.h), as aten::to's dtype argument carries it.
std::optional<DType> DTypeOfScalarType(int64_t scalar_type);  // nullopt for a type the IR has no DType for
int64_t ScalarTypeOf(DType dtype);
bool IsFloating(DType dtype);
// c10's result type of two dimensioned tensors: a non-floating operand yields to the floating one; two different
// floating dtypes meet at fp32 (fp64 if either is).
DType Promote(DType a, DType b);
std::string_view DTypeName(DType dtype);  // "f32", "bf16", ...
std::optional<DType> ParseDType(std::string_view name);

// a * b, throwing ConfigError naming `what` on int64 overflow.
int64_t CheckedMul(int64_t a, int64_t b, std::string_view what);
int64_t CheckedAdd(int64_t a, int64_t b, std::string_view what);
// Product of dims times element size, overflow-checked.
int64_t ShapeBytes(const std::vector<int64_t>& shape, DType dtype);
int64_t NumElements(const std::vector<int64_t>& shape);

std::string FormatBytes(int64_t bytes);  // "1.50 GiB", "12.0 MiB", "512 B"

}  // namespace llmem
