#include "graph/op_registry.h"

#include <algorithm>
#include <array>
#include <unordered_map>

namespace llmem {
namespace {

using A = AutocastPolicy;
using G = GradFormula;
using C = CostFamily;

// Note [Sources of the op table]
// - Views and in-place ops: the alias annotations of native_functions.yaml (Tensor(a) self -> Tensor(a)).
// - Autocast: CUDA from aten/src/ATen/autocast_mode.h (AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
//   AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE); CPU from autocast_mode.cpp's
//   AutocastCPU registrations. einsum is lower precision on CUDA only; the CPU fp32 list has the losses and prod.
// - Gradients: tools/autograd/derivatives.yaml; an op absent from it with no composite decomposition (the
//   comparisons, floor_divide, the factories) is never differentiable.
constexpr uint32_t kViewReshape = kView | kReshape | kKeepsValues;
constexpr uint32_t kMaybeCopyReshape = kViewOrCopy | kReshape | kKeepsValues;
constexpr uint32_t kSliceView = kView | kSlicesAlongDim;

// Columns: kind, overloads, flags, autocast on CPU, autocast on CUDA, gradient formula, cost family.
constexpr std::array kOps = std::to_array<OpInfo>({
    // Shape queries and scalar conversions.
    {"aten::size", "", 0, A::kNone, A::kNone, G::kNone, C::kNoKernel},
    {"aten::dim", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kNoKernel},
    {"aten::numel", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kNoKernel},
    {"aten::Int", "", 0, A::kNone, A::kNone, G::kNone, C::kNoKernel},
    {"aten::ScalarImplicit", "", 0, A::kNone, A::kNone, G::kNone, C::kNoKernel},
    {"aten::lift_fresh", "", kView | kKeepsValues, A::kNone, A::kNone, G::kUnmodelled, C::kNoKernel},
    {"aten::detach", "", kView | kKeepsValues, A::kNone, A::kNone, G::kNone, C::kNoKernel},
    {"aten::alias", "", kView | kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kNoKernel},

    // Views and reshapes.
    {"aten::view", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::view_as", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::_unsafe_view", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::unsafe_view", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::unflatten", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::unsqueeze", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::squeeze", "", kViewReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::reshape", "", kMaybeCopyReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::reshape_as", "", kMaybeCopyReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::flatten", "", kMaybeCopyReshape, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::contiguous", "", kViewOrCopy | kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::clone", "", kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::transpose", "int", kView | kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::t", "", kView | kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    // Tensor.T: the reversed dimensions as a view (Falcon's `x @ self.weight.T`).
    {"aten::numpy_T", "", kView | kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::permute", "", kView | kKeepsValues, A::kNone, A::kNone, G::kViewOfGrad, C::kDataMovement},
    {"aten::expand", "", kView | kKeepsValues, A::kNone, A::kNone, G::kSumTo, C::kDataMovement},
    {"aten::expand_as", "", kView | kKeepsValues, A::kNone, A::kNone, G::kSumTo, C::kDataMovement},

    // Casts.
    {"aten::to", "", kCastOp | kKeepsValues, A::kNone, A::kNone, G::kCast, C::kDataMovement},
    {"aten::type_as", "", kCastOp | kKeepsValues, A::kNone, A::kNone, G::kCast, C::kDataMovement},
    {"aten::_to_copy", "", kCastOp | kKeepsValues, A::kNone, A::kNone, G::kCast, C::kDataMovement},

    // Slicing, gathering, padding, joining.
    {"aten::slice", "Tensor", kSliceView | kKeepsValues, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::select", "int", kView | kKeepsValues, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::narrow", "", kSliceView | kKeepsValues, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    // split_backward / unbind_backward: cat or stack of the piece gradients, a new input-sized tensor.
    {"aten::split", "Tensor", kSliceView, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::split_with_sizes", "", kSliceView, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::unsafe_split", "Tensor", kSliceView, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::chunk", "", kSliceView, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::unbind", "int", kView, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::index", "Tensor", 0, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::index_select", "", kKeepsValues, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::gather", "", 0, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::pad", "", 0, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::constant_pad_nd", "", 0, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    {"aten::repeat_interleave", "self_int, self_Tensor", 0, A::kNone, A::kNone, G::kScatterBack, C::kDataMovement},
    // repeat: a new tensor; repeat_backward sums the gradient's tiles into an input-sized one.
    {"aten::repeat", "", kKeepsValues, A::kNone, A::kNone, G::kFromGradOnly, C::kDataMovement},
    {"aten::roll", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::flip", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::cat", "", 0, A::kNone, A::kNone, G::kSlicesOfGrad, C::kDataMovement},
    {"aten::stack", "", 0, A::kNone, A::kNone, G::kSlicesOfGrad, C::kDataMovement},
    {"aten::copy_", "", kInPlace, A::kNone, A::kNone, G::kCopy, C::kDataMovement},
    // StaticCache's in-place update of its entries (generation only: nothing there requires grad).
    {"aten::index_copy_", "", kInPlace, A::kNone, A::kNone, G::kNone, C::kDataMovement},

    // Factories and fills: results that carry no gradient.
    {"aten::arange", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::full", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::ones", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::zeros", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::empty", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::new_ones", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::new_zeros", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::new_full", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::new_empty", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::full_like", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::zeros_like", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::ones_like", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::empty_like", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::fill_", "Scalar, Tensor", kInPlace, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},
    {"aten::zero_", "", kInPlace, A::kNone, A::kNone, G::kUnmodelled, C::kDataMovement},

    // Arithmetic.
    {"aten::add", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kAdd, C::kElementwise},
    {"aten::add_", "Tensor, Scalar", kInPlace, A::kNone, A::kNone, G::kAdd, C::kElementwise},
    {"aten::sub", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kSub, C::kElementwise},
    {"aten::sub_", "Tensor, Scalar", kInPlace, A::kNone, A::kNone, G::kSub, C::kElementwise},
    {"aten::rsub", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::mul", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kMul, C::kElementwise},
    {"aten::mul_", "Tensor, Scalar", kInPlace, A::kNone, A::kNone, G::kMul, C::kElementwise},
    {"aten::div", "Tensor, Scalar, Tensor_mode", 0, A::kNone, A::kNone, G::kDiv, C::kElementwise},
    {"aten::div_", "Tensor, Scalar", kInPlace, A::kNone, A::kNone, G::kDiv, C::kElementwise},
    {"aten::neg", "", 0, A::kNone, A::kNone, G::kFromGradOnly, C::kElementwise},
    {"aten::pow", "Tensor_Scalar, Tensor_Tensor, Scalar", 0, A::kNone, A::kFp32, G::kPow, C::kElementwise},
    {"aten::rsqrt", "", 0, A::kNone, A::kFp32, G::kRsqrt, C::kElementwise},
    // square is pow(self, 2) to autograd and to CUDA autocast (a composite op: pow's dispatch runs under it).
    {"aten::square", "", 0, A::kNone, A::kFp32, G::kPow, C::kElementwise},
    // reciprocal: -grad * (result * result), as rsqrt's: the result saved, two output-sized temporaries.
    {"aten::reciprocal", "", 0, A::kNone, A::kFp32, G::kRsqrt, C::kElementwise},
    {"aten::sqrt", "", 0, A::kNone, A::kNone, G::kFromResult, C::kElementwise},
    {"aten::exp", "", 0, A::kNone, A::kFp32, G::kFromResult, C::kElementwise},
    {"aten::log", "", 0, A::kNone, A::kFp32, G::kFromInput, C::kElementwise},
    {"aten::tanh", "", 0, A::kNone, A::kNone, G::kFromResult, C::kElementwise},
    {"aten::sigmoid", "", 0, A::kNone, A::kNone, G::kFromResult, C::kElementwise},
    {"aten::relu", "", 0, A::kNone, A::kNone, G::kFromResult, C::kElementwise},
    {"aten::gelu", "", 0, A::kNone, A::kNone, G::kFromInput, C::kElementwise},
    {"aten::silu", "", 0, A::kNone, A::kNone, G::kFromInput, C::kElementwise},
    {"aten::sin", "", 0, A::kNone, A::kNone, G::kSin, C::kElementwise},
    {"aten::cos", "", 0, A::kNone, A::kNone, G::kCos, C::kElementwise},
    {"aten::abs", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::erf", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::clamp", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::clamp_min", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::clamp_max", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::minimum", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::maximum", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::remainder", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kRemainder, C::kElementwise},
    // Mixture-of-experts routing (Mixtral's loop): each expert's rows added back into the layer's output.
    {"aten::index_add_", "", kInPlace, A::kNone, A::kNone, G::kIndexAdd, C::kDataMovement},
    {"aten::one_hot", "", 0, A::kNone, A::kNone, G::kNone, C::kDataMovement},
    {"aten::floor_divide", "", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::cumsum", "", 0, A::kNone, A::kFp32SetOptDtype, G::kFromGradOnly, C::kElementwise},
    {"aten::diff", "", 0, A::kNone, A::kNone, G::kFromGradOnly, C::kElementwise},  // composite: narrow and sub
    {"aten::triu", "", 0, A::kNone, A::kNone, G::kFromGradOnly, C::kElementwise},
    {"aten::tril", "", 0, A::kNone, A::kNone, G::kFromGradOnly, C::kElementwise},
    {"aten::masked_fill", "Scalar, Tensor", 0, A::kNone, A::kNone, G::kMaskedFill, C::kElementwise},
    {"aten::masked_fill_", "Scalar, Tensor", kInPlace, A::kNone, A::kNone, G::kMaskedFill, C::kElementwise},
    {"aten::where", "self", 0, A::kNone, A::kNone, G::kWhere, C::kElementwise},
    {"aten::dropout", "", 0, A::kNone, A::kNone, G::kDropout, C::kElementwise},

    // Comparisons and logic: boolean results.
    {"aten::eq", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::ne", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::lt", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::le", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::gt", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::ge", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::__and__", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::__or__", "Tensor, Scalar", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::bitwise_and", "", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::bitwise_or", "", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::bitwise_not", "", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::logical_and", "", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},
    {"aten::logical_or", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kElementwise},
    {"aten::logical_not", "", 0, A::kNone, A::kNone, G::kNone, C::kElementwise},

    // Reductions.
    {"aten::sum", "", 0, A::kNone, A::kFp32SetOptDtype, G::kSum, C::kReduction},
    {"aten::mean", "", 0, A::kNone, A::kNone, G::kMean, C::kReduction},
    {"aten::prod", "", 0, A::kFp32, A::kFp32SetOptDtype, G::kUnmodelled, C::kReduction},
    {"aten::max", "(none), dim", 0, A::kNone, A::kNone, G::kSelectingReduction, C::kReduction},
    {"aten::min", "(none), dim", 0, A::kNone, A::kNone, G::kSelectingReduction, C::kReduction},
    {"aten::amax", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kReduction},
    {"aten::amin", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kReduction},
    {"aten::var", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kReduction},
    {"aten::std", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kReduction},
    {"aten::norm", "Scalar, ScalarOpt_dim", 0, A::kNone, A::kFp32SetOptDtype, G::kUnmodelled, C::kReduction},
    {"aten::linalg_vector_norm", "", 0, A::kNone, A::kFp32SetOptDtype, G::kUnmodelled, C::kReduction},
    {"aten::logsumexp", "", 0, A::kNone, A::kFp32, G::kUnmodelled, C::kReduction},
    {"aten::argmax", "", 0, A::kNone, A::kNone, G::kNone, C::kReduction},
    {"aten::argmin", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kReduction},
    {"aten::any", "", 0, A::kNone, A::kNone, G::kNone, C::kReduction},
    {"aten::all", "", 0, A::kNone, A::kNone, G::kNone, C::kReduction},

    // Softmax, losses, normalization, embedding.
    {"aten::softmax", "int", 0, A::kNone, A::kFp32SetOptDtype, G::kSoftmax, C::kSoftmax},
    // topk: value_selecting_reduction_backward scatters the gradient into zeros of the input's size (indices kept).
    {"aten::topk", "", 0, A::kNone, A::kNone, G::kSelectingReduction, C::kReduction},
    {"aten::log_softmax", "int", 0, A::kNone, A::kFp32SetOptDtype, G::kSoftmax, C::kSoftmax},
    {"aten::_softmax", "", 0, A::kNone, A::kNone, G::kSoftmax, C::kSoftmax},
    {"aten::_log_softmax", "", 0, A::kNone, A::kNone, G::kSoftmax, C::kSoftmax},
    // CUDA registers no autocast kernel for cross_entropy_loss: the composite runs log_softmax (fp32_set_opt_dtype)
    // then nll_loss (fp32), so it computes in float32 from the input's dtype.
    {"aten::cross_entropy_loss", "", 0, A::kFp32, A::kFp32SetOptDtype, G::kCrossEntropy, C::kCrossEntropy},
    {"aten::nll_loss", "", 0, A::kFp32, A::kFp32, G::kUnmodelled, C::kNllLoss},
    {"aten::nll_loss_nd", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kNllLoss},
    {"aten::mse_loss", "", 0, A::kFp32, A::kFp32, G::kUnmodelled, C::kGeneric},
    {"aten::layer_norm", "", 0, A::kNone, A::kFp32, G::kLayerNorm, C::kLayerNorm},
    {"aten::native_layer_norm", "", 0, A::kNone, A::kFp32, G::kUnmodelled, C::kLayerNorm},
    {"aten::rms_norm", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kRmsNorm},
    {"aten::_fused_rms_norm", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kRmsNorm},
    {"aten::embedding", "", 0, A::kNone, A::kNone, G::kEmbedding, C::kEmbedding},

    // Contractions.
    {"aten::linear", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kMatmul, C::kContraction},
    // bitsandbytes' 4-bit linear (graph/quantize_rewrite.h): an autograd Function, so autocast leaves its inputs.
    {"bnb::matmul_4bit", "", 0, A::kNone, A::kNone, G::kQuantizedMatmul, C::kContraction},
    // bitsandbytes' LLM.int8() linear: on CPU MatMul8bitFp's F.linear (autocast casts it); on CUDA MatMul8bitLt's
    // bitsandbytes ops, which return x's dtype.
    {"bnb::matmul_int8", "", kAutocastInside, A::kLowerPrecision, A::kNone, G::kQuantizedMatmul, C::kContraction},
    // gptqmodel's trainable GPTQ linear: torch.matmul on the dequantized weight inside, which autocast casts.
    {"gptq::linear", "", kAutocastInside, A::kLowerPrecision, A::kLowerPrecision, G::kQuantizedMatmul,
     C::kContraction},
    // accelerate's device hooks (distributed/device_map_generation.h): an argument copied to the module's device,
    // and the end of the call that held the copies.
    {"accelerate::send_to_device", "", 0, A::kNone, A::kNone, G::kCast, C::kDataMovement},
    {"accelerate::call_end", "", 0, A::kNone, A::kNone, G::kCast, C::kNoKernel},
    // Hugging Face generate()'s work between two forwards (graph/generation_forward.h).
    {"hf::generate_next_token", "", 0, A::kNone, A::kNone, G::kGenerationLoop, C::kGeneric},
    // torchao's NF4 linear (LinearNF4): F.linear on the dequantized weight inside, which autocast casts.
    {"torchao::linear_nf4", "", kAutocastInside, A::kLowerPrecision, A::kLowerPrecision, G::kQuantizedMatmul,
     C::kContraction},
    {"aten::matmul", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kMatmul, C::kContraction},
    {"aten::mm", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kMatmul, C::kContraction},
    {"aten::bmm", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kMatmul, C::kContraction},
    {"aten::addmm", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kAddmm, C::kContraction},
    {"aten::baddbmm", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kAddmm, C::kContraction},
    {"aten::addbmm", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kUnmodelled, C::kContraction},
    {"aten::conv1d", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kUnmodelled, C::kContraction},
    {"aten::einsum", "", 0, A::kNone, A::kLowerPrecision, G::kUnmodelled, C::kContraction},

    // Attention.
    {"aten::scaled_dot_product_attention", "", 0, A::kLowerPrecision, A::kLowerPrecision, G::kAttention, C::kAttention},
    {"aten::_scaled_dot_product_flash_attention", "", 0, A::kNone, A::kLowerPrecision, G::kUnmodelled, C::kAttention},
    {"aten::_scaled_dot_product_efficient_attention", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kAttention},
    {"aten::_scaled_dot_product_cudnn_attention", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kAttention},
    {"aten::_scaled_dot_product_flash_attention_for_cpu", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kAttention},
    {"aten::_scaled_dot_product_attention_math", "", 0, A::kNone, A::kNone, G::kUnmodelled, C::kAttention},
});

}  // namespace

const OpInfo* FindOp(std::string_view kind) {
  // Looked up for every op of every simulated step: a hash table, built once, instead of a scan of the table.
  static const std::unordered_map<std::string_view, const OpInfo*> by_kind = [] {
    std::unordered_map<std::string_view, const OpInfo*> m;
    for (const OpInfo& op : kOps) m.emplace(op.kind, &op);  // the first entry of a kind wins, as a scan would
    return m;
  }();
  const auto it = by_kind.find(kind);
  return it == by_kind.end() ? nullptr : it->second;
}

std::span<const OpInfo> AllOps() { return kOps; }

bool OpHas(std::string_view kind, OpFlag f) {
  const OpInfo* op = FindOp(kind);
  return op != nullptr && op->Has(f);
}

bool IsInPlace(std::string_view kind) {
  if (const OpInfo* op = FindOp(kind)) return op->Has(kInPlace);
  return kind.size() >= 2 && kind.back() == '_' && kind[kind.size() - 2] != '_';
}

}  // namespace llmem
