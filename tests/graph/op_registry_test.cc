// The op table: one row per kind, lookups of kinds with and without a row, and the autocast classes of ops checked
// against PyTorch's lists (aten/src/ATen/autocast_mode.h for CUDA, autocast_mode.cpp's AutocastCPU block for CPU).
#include "graph/op_registry.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace llmem {
namespace {

TEST(OpRegistryTest, EveryKindHasOneRow) {
  std::set<std::string_view> seen;
  for (const OpInfo& op : AllOps()) {
    EXPECT_TRUE(seen.insert(op.kind).second) << op.kind << " has two rows";
    // ATen ops, and the library ops llmem's own rewrites emit (bitsandbytes' 4-bit linear, accelerate's hooks)
    EXPECT_TRUE(op.kind.starts_with("aten::") || op.kind.starts_with("bnb::") || op.kind.starts_with("torchao::") ||
                op.kind.starts_with("gptq::") || op.kind.starts_with("hf::") || op.kind.starts_with("accelerate::"))
        << op.kind;
    EXPECT_EQ(FindOp(op.kind), &op) << op.kind;
  }
}

TEST(OpRegistryTest, AnUnknownKindHasNoRow) {
  EXPECT_EQ(FindOp("aten::frobnicate"), nullptr);
  EXPECT_EQ(FindOp("add"), nullptr);  // kinds are namespaced
  EXPECT_EQ(FindOp(""), nullptr);
  EXPECT_FALSE(OpHas("aten::frobnicate", kView));
}

TEST(OpRegistryTest, AutocastClassesFollowPyTorchsLists) {
  struct Case {
    const char* kind;
    AutocastPolicy cpu, cuda;
  };
  using enum AutocastPolicy;
  for (const Case& c : {
           Case{"aten::linear", kLowerPrecision, kLowerPrecision},
           Case{"aten::scaled_dot_product_attention", kLowerPrecision, kLowerPrecision},
           Case{"aten::einsum", kNone, kLowerPrecision},  // CUDA's lower_precision_fp list only
           Case{"aten::cross_entropy_loss", kFp32, kFp32SetOptDtype},
           Case{"aten::nll_loss", kFp32, kFp32},
           Case{"aten::layer_norm", kNone, kFp32},
           Case{"aten::pow", kNone, kFp32},
           Case{"aten::softmax", kNone, kFp32SetOptDtype},
           Case{"aten::sum", kNone, kFp32SetOptDtype},
           Case{"aten::prod", kFp32, kFp32SetOptDtype},
           Case{"aten::add", kNone, kNone},
           Case{"aten::gelu", kNone, kNone},
       }) {
    const OpInfo* op = FindOp(c.kind);
    ASSERT_NE(op, nullptr) << c.kind;
    EXPECT_EQ(op->autocast_cpu, c.cpu) << c.kind;
    EXPECT_EQ(op->autocast_cuda, c.cuda) << c.kind;
  }
}

TEST(OpRegistryTest, OnlyFloatingContractionsAndAttentionRunInLowerPrecision) {
  for (const OpInfo& op : AllOps()) {
    const bool lower = op.autocast_cpu == AutocastPolicy::kLowerPrecision ||
                       op.autocast_cuda == AutocastPolicy::kLowerPrecision;
    if (lower) {
      EXPECT_TRUE(op.cost == CostFamily::kContraction || op.cost == CostFamily::kAttention) << op.kind;
    }
  }
}

TEST(OpRegistryTest, InPlaceFromTheRowOrAtensNamingConvention) {
  EXPECT_TRUE(IsInPlace("aten::add_"));
  EXPECT_TRUE(IsInPlace("aten::copy_"));
  EXPECT_FALSE(IsInPlace("aten::add"));
  EXPECT_FALSE(IsInPlace("aten::__and__"));  // a row, not in place
  EXPECT_TRUE(IsInPlace("aten::tanh_"));     // no row: the trailing underscore
  EXPECT_FALSE(IsInPlace("aten::__xor__"));  // no row: a dunder is not in place
  for (const OpInfo& op : AllOps()) {
    const bool underscore = op.kind.ends_with("_") && !op.kind.ends_with("__");
    EXPECT_EQ(op.Has(kInPlace), underscore) << op.kind;
  }
}

TEST(OpRegistryTest, FactsThatGoTogether) {
  for (const OpInfo& op : AllOps()) {
    // A reshape keeps the element order, so it is a view or a view-or-copy, and its gradient is a view.
    if (op.Has(kReshape)) {
      EXPECT_TRUE(op.Has(kView) || op.Has(kViewOrCopy)) << op.kind;
      EXPECT_EQ(op.grad, GradFormula::kViewOfGrad) << op.kind;
    }
    EXPECT_FALSE(op.Has(kView) && op.Has(kViewOrCopy)) << op.kind;
    if (op.Has(kCastOp)) {
      EXPECT_EQ(op.grad, GradFormula::kCast) << op.kind;
    }
  }
}

TEST(OpRegistryTest, DifferentiableOpsAreNotMarkedNeverDifferentiable) {
  // derivatives.yaml has formulas for these: a mask-building use does not make them non-differentiable.
  for (const char* kind : {"aten::cumsum", "aten::triu", "aten::tril", "aten::diff", "aten::max", "aten::min",
                           "aten::remainder", "aten::copy_"}) {
    ASSERT_NE(FindOp(kind), nullptr) << kind;
    EXPECT_FALSE(FindOp(kind)->never_differentiable()) << kind;
  }
  for (const char* kind : {"aten::eq", "aten::arange", "aten::argmax", "aten::floor_divide", "aten::detach"}) {
    ASSERT_NE(FindOp(kind), nullptr) << kind;
    EXPECT_TRUE(FindOp(kind)->never_differentiable()) << kind;
  }
}

}  // namespace
}  // namespace llmem
