// The documented cpu/gpu differences: autocast op classes per target, and the fields RulesFor sets.
#include "simulator/backend_rules.h"

#include <gtest/gtest.h>

#include "simulator/gpu_catalog.h"

namespace llmem::sim {
namespace {

Target CpuTarget() {
  Target t;
  t.is_cpu = true;
  return t;
}

Target GpuTarget(const char* name) {
  Target t;
  t.is_cpu = false;
  t.gpu = *FindGpu(name);
  return t;
}

TEST(BackendRulesTest, LinearAndMatmulsRunInLowerPrecisionOnBothTargets) {
  for (const BackendRules& rules : {RulesFor(CpuTarget()), RulesFor(GpuTarget("a100-80"))}) {
    for (const char* op : {"aten::linear", "aten::matmul", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
                           "aten::scaled_dot_product_attention"}) {
      EXPECT_EQ(rules.Autocast(op), AutocastClass::kLowerPrecision) << op << " cuda=" << rules.cuda;
    }
  }
}

TEST(BackendRulesTest, CrossEntropyRunsInFp32OnBothTargets) {
  EXPECT_EQ(RulesFor(CpuTarget()).Autocast("aten::cross_entropy_loss"), AutocastClass::kFp32);
  EXPECT_EQ(RulesFor(GpuTarget("a100-80")).Autocast("aten::cross_entropy_loss"), AutocastClass::kFp32);
  EXPECT_EQ(RulesFor(CpuTarget()).Autocast("aten::nll_loss"), AutocastClass::kFp32);
}

TEST(BackendRulesTest, NormsAndPointwiseFp32OpsAreFp32OnCudaOnly) {
  const BackendRules cpu = RulesFor(CpuTarget());
  const BackendRules cuda = RulesFor(GpuTarget("h100-80"));
  for (const char* op : {"aten::layer_norm", "aten::softmax", "aten::log_softmax", "aten::pow", "aten::rsqrt",
                         "aten::exp"}) {
    EXPECT_EQ(cuda.Autocast(op), AutocastClass::kFp32) << op;
    EXPECT_EQ(cpu.Autocast(op), AutocastClass::kNone) << op;
  }
}

// autocast_mode.h: einsum is on CUDA's lower_precision_fp list; AutocastCPU does not register it. The FLOP count
// already computed it in the autocast dtype.
TEST(BackendRulesTest, EinsumRunsInLowerPrecisionOnCudaOnly) {
  EXPECT_EQ(RulesFor(GpuTarget("a100-80")).Autocast("aten::einsum"), AutocastClass::kLowerPrecision);
  EXPECT_EQ(RulesFor(CpuTarget()).Autocast("aten::einsum"), AutocastClass::kNone);
}

// fp32_set_opt_dtype (CUDA): simulated as fp32 ops.
TEST(BackendRulesTest, SumAndProdComputeInFp32OnCuda) {
  EXPECT_EQ(RulesFor(GpuTarget("a100-80")).Autocast("aten::sum"), AutocastClass::kFp32);
  EXPECT_EQ(RulesFor(GpuTarget("a100-80")).Autocast("aten::prod"), AutocastClass::kFp32);
  EXPECT_EQ(RulesFor(CpuTarget()).Autocast("aten::prod"), AutocastClass::kFp32);  // CPU's fp32 list
  EXPECT_EQ(RulesFor(CpuTarget()).Autocast("aten::sum"), AutocastClass::kNone);
}

TEST(BackendRulesTest, OpsOutsideTheListsAreUntouched) {
  for (const BackendRules& rules : {RulesFor(CpuTarget()), RulesFor(GpuTarget("a100-80"))}) {
    for (const char* op : {"aten::add", "aten::mul", "aten::gelu", "aten::silu", "aten::embedding", "aten::dropout",
                           "aten::view", "aten::frobnicate"}) {
      EXPECT_EQ(rules.Autocast(op), AutocastClass::kNone) << op << " cuda=" << rules.cuda;
    }
  }
}

TEST(BackendRulesTest, CpuTargetFields) {
  const BackendRules r = RulesFor(CpuTarget());
  EXPECT_FALSE(r.cuda);
  EXPECT_EQ(r.dropout, DropoutImpl::kNoiseTensor);
  EXPECT_EQ(r.optimizer, OptimizerImpl::kPerParameter);
  EXPECT_FALSE(r.library_workspaces);
  EXPECT_FALSE(r.caching_allocator);
}

TEST(BackendRulesTest, GpuTargetFields) {
  for (const char* gpu : {"v100-16", "a100-80", "h100-80"}) {
    const BackendRules r = RulesFor(GpuTarget(gpu));
    EXPECT_TRUE(r.cuda) << gpu;
    EXPECT_EQ(r.dropout, DropoutImpl::kBoolMask) << gpu;
    EXPECT_EQ(r.optimizer, OptimizerImpl::kForeach) << gpu;
    EXPECT_TRUE(r.library_workspaces) << gpu;
    EXPECT_TRUE(r.caching_allocator) << gpu;
  }
}

TEST(BackendRulesTest, AttentionKernelChoice) {
  const BackendRules cpu = RulesFor(CpuTarget());
  EXPECT_EQ(cpu.Attention(/*sixteen_bit=*/true, /*has_mask=*/false), AttentionKernel::kCpuFlash);
  EXPECT_EQ(cpu.Attention(/*sixteen_bit=*/false, /*has_mask=*/true), AttentionKernel::kCpuFlash);
  const BackendRules cuda = RulesFor(GpuTarget("a100-80"));
  EXPECT_EQ(cuda.Attention(/*sixteen_bit=*/true, /*has_mask=*/false), AttentionKernel::kCudaFlash);
  EXPECT_EQ(cuda.Attention(/*sixteen_bit=*/true, /*has_mask=*/true), AttentionKernel::kCudaEfficient);
  EXPECT_EQ(cuda.Attention(/*sixteen_bit=*/false, /*has_mask=*/false), AttentionKernel::kCudaEfficient);
}

}  // namespace
}  // namespace llmem::sim
