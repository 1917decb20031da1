// Element types, checked byte arithmetic and byte formatting.
#include "graph/dtype.h"

#include <gtest/gtest.h>

#include <limits>

#include "graph/error.h"

namespace llmem {
namespace {

TEST(DTypeTest, ElementSizes) {
  EXPECT_EQ(ElementSize(DType::kF32), 4);
  EXPECT_EQ(ElementSize(DType::kF16), 2);
  EXPECT_EQ(ElementSize(DType::kBF16), 2);
  EXPECT_EQ(ElementSize(DType::kF64), 8);
  EXPECT_EQ(ElementSize(DType::kI64), 8);
  EXPECT_EQ(ElementSize(DType::kI32), 4);
  EXPECT_EQ(ElementSize(DType::kI16), 2);
  EXPECT_EQ(ElementSize(DType::kI8), 1);
  EXPECT_EQ(ElementSize(DType::kU8), 1);
  EXPECT_EQ(ElementSize(DType::kBool), 1);
  EXPECT_EQ(ElementSize(DType::kComplex64), 8);
}

TEST(DTypeTest, FloatingTypes) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64}) EXPECT_TRUE(IsFloating(d)) << DTypeName(d);
  for (DType d : {DType::kI64, DType::kI32, DType::kI16, DType::kI8, DType::kU8, DType::kBool, DType::kComplex64}) {
    EXPECT_FALSE(IsFloating(d)) << DTypeName(d);
  }
}

TEST(DTypeTest, NamesRoundTrip) {
  EXPECT_EQ(DTypeName(DType::kF32), "f32");
  EXPECT_EQ(DTypeName(DType::kBF16), "bf16");
  EXPECT_EQ(DTypeName(DType::kBool), "bool");
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64, DType::kI64, DType::kI32, DType::kI16,
                  DType::kI8, DType::kU8, DType::kBool, DType::kComplex64}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.has_value()) << DTypeName(d);
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_FALSE(ParseDType("float32").has_value());
  EXPECT_FALSE(ParseDType("").has_value());
}

TEST(DTypeTest, ShapeBytesAndElements) {
  EXPECT_EQ(NumElements({}), 1);  // a scalar
  EXPECT_EQ(NumElements({4, 0, 3}), 0);
  EXPECT_EQ(NumElements({2, 3, 4}), 24);
  EXPECT_EQ(ShapeBytes({2, 3, 4}, DType::kBF16), 48);
  EXPECT_EQ(ShapeBytes({}, DType::kF32), 4);
  // 32000 x 4096 f32 embedding = 131,072,000 elements * 4 = 524,288,000 B.
  EXPECT_EQ(ShapeBytes({32000, 4096}, DType::kF32), 524'288'000);
}

TEST(DTypeTest, CheckedArithmeticThrowsConfigErrorOnOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(CheckedMul(int64_t{1} << 31, int64_t{1} << 31, "x"), int64_t{1} << 62);
  EXPECT_THROW(CheckedMul(int64_t{1} << 32, int64_t{1} << 32, "x"), ConfigError);
  EXPECT_THROW(CheckedMul(-1, 4, "x"), ConfigError);
  EXPECT_EQ(CheckedAdd(kMax - 1, 1, "x"), kMax);
  EXPECT_THROW(CheckedAdd(kMax, 1, "x"), ConfigError);
  // 2^62 elements of 4 bytes: 2^64 B.
  EXPECT_THROW(ShapeBytes({int64_t{1} << 31, int64_t{1} << 31}, DType::kF32), ConfigError);
  try {
    CheckedMul(kMax, 2, "the logits");
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("the logits"), std::string::npos) << e.what();
  }
}

TEST(DTypeTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(1024), "1.0 KiB");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(12 * kMiB), "12.0 MiB");
  EXPECT_EQ(FormatBytes(kGiB + kGiB / 2), "1.50 GiB");
  EXPECT_EQ(FormatBytes(80 * kGiB), "80.00 GiB");
}

}  // namespace
}  // namespace llmem
