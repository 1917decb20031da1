// Meta kernels missing from a pure C++ LibTorch process (torch/_meta_registrations.py adds them only when Python
// runs), registered for dispatch key Meta when EnsureMetaKernelsRegistered() is first called.
//
// Contract: every kernel returns tensors with the sizes, strides and dtypes of the CPU kernel, and allocates
// the CPU kernel's c10-allocated temporaries too (same sizes, same order), so that a counting meta allocator
// sees exactly the allocations of a real CPU run (checked by tests/measure). Memory that CPU kernels take outside
// c10's allocator (std::vector/unique_ptr scratch) is invisible to both and not modelled here.
//
// Replaced even though LibTorch has meta kernels for them: resize_ (LibTorch's only records the byte size, so
// outputs sized by resizing allocated nothing), cumsum (adds CPU's dtype-conversion temporary), mm and bmm (add
// CPU's dtype checks).
//
// Also registered: scaled_dot_product_attention for AutogradMeta. Its CompositeImplicit kernel picks the backend
// with a DispatchStub that has no meta entry, so on meta it always takes the math path while CPU takes the
// fused flash kernel. The override asks the CPU selection rule and runs the same backend.
#include "graph/meta_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/TensorUtils.h>
#include <c10/core/StorageImpl.h>
#include <ATen/native/transformers/sdp_utils_cpp.h>
#include <ATen/ops/_fused_sdp_choice_native.h>
#include <ATen/ops/bmm_meta_dispatch.h>
#include <ATen/ops/cumsum_meta_dispatch.h>
#include <ATen/ops/mm_meta_dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

namespace llmem {
namespace {

using at::Tensor;

// --- resize_ ----------------------------------------------------------------------------------------------------

// LibTorch's meta resize_ only records the new byte size of the storage, so every op that sizes its output by
// resizing an empty tensor (arange, index_select, where, TensorIterator outputs of non-structured ops) would
// allocate nothing on meta. CPU (resize_ -> resize_impl_cpu_ -> resize_bytes_cpu): set contiguous sizes, and when
// the storage is too small, allocate the new size from the storage's allocator and then free the old block.
const Tensor& ResizeMeta(const Tensor& self, c10::SymIntArrayRef sym_size,
                         std::optional<at::MemoryFormat> memory_format) {
  TORCH_CHECK(!self.has_names(), "resize_ on meta: named tensors are not supported");
  const c10::IntArrayRef size = C10_AS_INTARRAYREF_SLOW(sym_size);
  c10::TensorImpl* impl = self.unsafeGetTensorImpl();
  if (impl->sizes() != size) {
    impl->set_sizes_contiguous(size);
    if (impl->numel() > 0) {
      const size_t new_bytes =
          at::detail::computeStorageNbytesContiguous(size, impl->dtype().itemsize(), impl->storage_offset());
      const c10::Storage& storage = impl->unsafe_storage();
      TORCH_CHECK(storage, "resize_ on meta: tensor without storage");
      c10::StorageImpl* storage_impl = storage.unsafeGetStorageImpl();
      if (new_bytes > storage_impl->nbytes()) {
        TORCH_CHECK(storage_impl->resizable(), "Trying to resize storage that is not resizable");
        c10::Allocator* allocator = storage_impl->allocator();
        if (allocator == nullptr) allocator = c10::GetAllocator(c10::DeviceType::Meta);
        storage_impl->set_data_ptr_noswap(allocator->allocate(new_bytes));
        storage_impl->set_nbytes(new_bytes);
      }
    }
  }
  if (memory_format.has_value()) {
    TORCH_CHECK(*memory_format != at::MemoryFormat::Preserve, "Unsupported memory format", *memory_format);
    impl->empty_tensor_restride(*memory_format);
  }
  return self;
}

// --- Embedding -------------------------------------------------------------------------------------------------

// CPU: index_select_out_cpu_ resizes an empty output to the selected shape (contiguous).
Tensor IndexSelectMeta(const Tensor& self, int64_t dim, const Tensor& index) {
  std::vector<int64_t> sizes = self.sizes().vec();
  if (self.dim() > 0) {
    dim = c10::maybe_wrap_dim(dim, self.dim());
    sizes[dim] = index.numel();
  }
  return at::empty(sizes, self.options());
}

// CPU (embedding_dense_backward_cpu): zeros [num_weights, D] in grad's dtype; reads contiguous indices and a
// contiguous [N, D] view of grad (copies only when they are not contiguous).
Tensor EmbeddingDenseBackwardMeta(const Tensor& grad, const Tensor& indices, c10::SymInt num_weights,
                                  c10::SymInt padding_idx, bool scale_grad_by_freq) {
  Tensor grad_weight = at::zeros({num_weights.expect_int(), grad.size(-1)}, grad.options());
  Tensor indices_contig = indices.contiguous();
  Tensor grad_contig = grad.contiguous();
  return grad_weight;
}

// --- LayerNorm -------------------------------------------------------------------------------------------------

// Rows (M) and columns (N) of the normalization, as layer_norm_cpu computes them.
std::pair<int64_t, int64_t> LayerNormRowsCols(const Tensor& input, c10::SymIntArrayRef normalized_shape) {
  const int64_t axis = input.dim() - static_cast<int64_t>(normalized_shape.size());
  int64_t m = 1;
  for (int64_t i = 0; i < axis; ++i) m *= input.size(i);
  int64_t n = 1;
  for (int64_t i = axis; i < input.dim(); ++i) n *= input.size(i);
  return {m, n};
}

// CPU (is_mixed_type / check_mixed_data_type in ATen/native/mixed_data_type.h): the parameters may differ from the
// input's dtype only as float parameters of a bfloat16/half input; anything else is rejected like on CPU.
bool IsMixedType(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  bool mixed = false;
  for (const std::optional<Tensor>* param : {&weight, &bias}) {
    if (!param->has_value() || !(*param)->defined()) continue;
    if ((*param)->scalar_type() == input.scalar_type()) continue;
    mixed = true;
    TORCH_CHECK((*param)->scalar_type() == at::kFloat,
                "mixed dtype (CPU): expect parameter to have scalar type of Float");
  }
  if (mixed) {
    TORCH_CHECK(input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf,
                "mixed dtype (CPU): expect input to have scalar type of BFloat16 or Half");
  }
  return mixed;
}

// CPU (layer_norm_cpu): Y like the contiguous input; mean and rstd [M] in the parameter dtype (float when a
// reduced-precision input meets float parameters), viewed as input.shape[:axis] + [1] * len(normalized_shape).
std::tuple<Tensor, Tensor, Tensor> NativeLayerNormMeta(const Tensor& input, c10::SymIntArrayRef normalized_shape,
                                                       const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, double eps) {
  const Tensor x = input.contiguous();
  const auto [m, n] = LayerNormRowsCols(input, normalized_shape);
  const at::ScalarType stat_dtype = IsMixedType(input, weight, bias) ? at::kFloat : input.scalar_type();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mean = at::empty({m}, x.options().dtype(stat_dtype));
  Tensor rstd = at::empty({m}, x.options().dtype(stat_dtype));
  std::vector<int64_t> stat_shape;
  const int64_t axis = input.dim() - static_cast<int64_t>(normalized_shape.size());
  for (int64_t i = 0; i < axis; ++i) stat_shape.push_back(input.size(i));
  for (int64_t i = axis; i < input.dim(); ++i) stat_shape.push_back(1);
  return {y, mean.view(stat_shape), rstd.view(stat_shape)};
}

// CPU (layer_norm_backward_cpu): dX like the contiguous input, dgamma/dbeta like the parameters; the kernel
// accumulates dgamma/dbeta per thread in a zeroed [2 * threads, N] buffer (float for reduced inputs).
std::tuple<Tensor, Tensor, Tensor> NativeLayerNormBackwardMeta(
    const Tensor& grad_out, const Tensor& input, c10::SymIntArrayRef normalized_shape, const Tensor& mean,
    const Tensor& rstd, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    std::array<bool, 3> output_mask) {
  const Tensor x = input.contiguous();
  const Tensor dy = grad_out.contiguous();
  const auto [m, n] = LayerNormRowsCols(input, normalized_shape);
  Tensor dx, dgamma, dbeta;
  if (output_mask[0]) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  if (output_mask[1] && has_weight) {
    dgamma = m > 0 ? at::empty_like(*weight, at::MemoryFormat::Contiguous)
                   : at::zeros_like(*weight, at::MemoryFormat::Contiguous);
  }
  if (output_mask[2] && has_bias) {
    dbeta = m > 0 ? at::empty_like(*bias, at::MemoryFormat::Contiguous)
                  : at::zeros_like(*bias, at::MemoryFormat::Contiguous);
  }
  if (m > 0 && (dgamma.defined() || dbeta.defined())) {
    const at::ScalarType acc = at::toOpMathType(x.scalar_type());
    Tensor buffer = at::zeros({2 * static_cast<int64_t>(at::get_num_threads()), n}, x.options().dtype(acc));
  }
  return {dx, dgamma, dbeta};
}

// --- cumsum -----------------------------------------------------------------------------------------------------

// CPU (cumsum_out -> impl_func_cum_ops): after the structured meta function sizes the result, the kernel reads
// self converted to the result dtype, a temporary copy when the dtypes differ (e.g. a bool mask summed as long).
Tensor CumsumMeta(const Tensor& self, int64_t dim, std::optional<at::ScalarType> dtype) {
  Tensor result = at::meta::cumsum(self, dim, dtype);
  if (self.dim() > 0 && self.numel() > 0) {
    const Tensor converted = self.to(result.scalar_type());
  }
  return result;
}

// --- mm / bmm ---------------------------------------------------------------------------------------------------

// LibTorch's structured meta kernels of mm and bmm accept operands of different dtypes, which the CPU kernels
// reject; without the check a pure-bf16 run of an export that casts activations to float would "succeed" on
// meta. Same checks and messages as CPU (addmm_impl_cpu_, and bmm's typed data access), then the stock kernel.
Tensor MmMeta(const Tensor& self, const Tensor& mat2) {
  TORCH_CHECK(self.dtype() == mat2.dtype(), "expected m1 and m2 to have the same dtype, but got: ", self.dtype(),
              " != ", mat2.dtype());
  return at::meta::mm(self, mat2);
}

Tensor BmmMeta(const Tensor& self, const Tensor& mat2) {
  TORCH_CHECK(self.scalar_type() == mat2.scalar_type(), "expected scalar type ", self.scalar_type(),
              " but found ", mat2.scalar_type());
  return at::meta::bmm(self, mat2);
}

// Replacing a kernel makes the dispatcher warn once per op; the replacement is deliberate, so the warning is
// dropped.
class DropWarnings final : public c10::WarningHandler {
 public:
  void process(const c10::Warning&) override {}
};

// --- relu -------------------------------------------------------------------------------------------------------

// CPU (relu / relu_): clamp_min(self, 0), a structured op whose meta kernel sizes and strides the output like CPU.
Tensor ReluMeta(const Tensor& self) {
  TORCH_CHECK(self.scalar_type() != at::kBool, "Boolean inputs not supported for relu");
  return at::clamp_min(self, 0);
}

Tensor& ReluInplaceMeta(Tensor& self) {
  TORCH_CHECK(self.scalar_type() != at::kBool, "Boolean inputs not supported for relu");
  return at::clamp_min_(self, 0);
}

// --- where ------------------------------------------------------------------------------------------------------

// CPU (where -> where_self_out): promotes self/other to the result type (copies when they differ), turns a uint8
// condition into bool, and lets TensorIterator size and stride the output, so strides follow the inputs.
Tensor WhereSelfMeta(const Tensor& condition, const Tensor& self, const Tensor& other) {
  const at::ScalarType result_type = at::result_type(self, other);
  Tensor out = at::empty({0}, self.options().dtype(result_type));
  const Tensor self_t = self.scalar_type() == result_type ? self : self.to(result_type);
  const Tensor other_t = other.scalar_type() == result_type ? other : other.to(result_type);
  const Tensor cond_t = condition.scalar_type() == at::kByte ? condition.to(at::kBool) : condition;
  at::TensorIteratorConfig()
      .check_all_same_dtype(false)
      .add_output(out)
      .add_const_input(cond_t)
      .add_input(self_t)
      .add_input(other_t)
      .build();
  return out;
}

// --- Flash attention for CPU ------------------------------------------------------------------------------------

// Block sizes of the CPU flash kernels (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp: q blocks of 256/64/32
// rows for q_len >= 768 / >= 192 / shorter; kv blocks of 512).
constexpr int64_t kFlashLongQueryLen = 768;
constexpr int64_t kFlashMediumQueryLen = 192;
constexpr int64_t kFlashLongQueryBlock = 256;
constexpr int64_t kFlashMediumQueryBlock = 64;
constexpr int64_t kFlashShortQueryBlock = 32;
constexpr int64_t kFlashKvBlock = 512;

int64_t FlashQueryBlock(int64_t q_len) {
  const int64_t block = q_len >= kFlashLongQueryLen     ? kFlashLongQueryBlock
                        : q_len >= kFlashMediumQueryLen ? kFlashMediumQueryBlock
                                                        : kFlashShortQueryBlock;
  return std::min(block, q_len);
}

bool IsReduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Outputs: out [B, H, L, E] like the query (empty_like: same memory order, e.g. [B, L, H, E] when the query is a
// transposed projection); logsumexp [B, H, L] float with the memory order
// [B, L, H]. Temporaries: a per-thread accumulation buffer and (reduced dtypes) a per-thread buffer in the
// query dtype.
std::tuple<Tensor, Tensor> FlashAttentionForCpuMeta(const Tensor& query, const Tensor& key, const Tensor& value,
                                                    double dropout_p, bool is_causal,
                                                    const std::optional<Tensor>& attn_mask,
                                                    std::optional<double> scale) {
  const int64_t batch = query.size(0);
  const int64_t heads = query.size(1);
  const int64_t q_len = query.size(2);
  const int64_t head_dim = query.size(3);
  const int64_t kv_len = value.size(2);
  const at::ScalarType acc = at::toOpMathType(query.scalar_type());
  Tensor out = at::empty_like(query);
  Tensor lse = at::empty({batch, q_len, heads}, query.options().dtype(acc)).transpose(1, 2);
  const int64_t q_block = FlashQueryBlock(q_len);
  const int64_t kv_block = std::min(kFlashKvBlock, kv_len);
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = q_block * kv_block + 2 * q_block + q_block * head_dim;  // qk, max, sum, dst
  Tensor buf = at::empty({threads, per_thread}, query.options().dtype(acc));
  Tensor buf_reduced =
      at::empty({threads, q_block, IsReduced(query.scalar_type()) ? kv_block : 0}, query.options());
  return {out, lse};
}

// Outputs: grad_q/k/v [B, H, L, E] with the memory order [B, L, H, E] (zeroed). Temporaries: grad_out in
// [B, L, H, E] order made contiguous, per-thread attention/grad-attention buffers, and one row-sum vector per
// thread that works on the batch*heads loop.
std::tuple<Tensor, Tensor, Tensor> FlashAttentionForCpuBackwardMeta(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& out,
    const Tensor& logsumexp, double dropout_p, bool is_causal, const std::optional<Tensor>& attn_mask,
    std::optional<double> scale) {
  if (!grad_out.defined()) return {};
  const at::ScalarType acc = at::toOpMathType(query.scalar_type());
  Tensor grad_q = at::zeros(query.transpose(1, 2).sizes(), query.options()).transpose(1, 2);
  Tensor grad_k = at::zeros(key.transpose(1, 2).sizes(), key.options()).transpose(1, 2);
  Tensor grad_v = at::zeros(value.transpose(1, 2).sizes(), value.options()).transpose(1, 2);
  {
    const Tensor grad_out_contig = grad_out.transpose(1, 2).contiguous();
    const int64_t q_block = FlashQueryBlock(query.size(2));
    const int64_t kv_block = std::min(kFlashKvBlock, value.size(2));
    const int64_t threads = at::get_num_threads();
    const int64_t per_thread = 2 * q_block * kv_block;  // attn, grad_attn
    Tensor buf = at::empty({threads, per_thread}, query.options().dtype(acc));
    Tensor buf_reduced = at::empty({threads, IsReduced(query.scalar_type()) ? per_thread : 0}, query.options());
    const int64_t workers = std::min(threads, query.size(0) * query.size(1));
    std::vector<Tensor> row_sums;
    for (int64_t i = 0; i < workers; ++i) row_sums.push_back(at::empty({q_block}, query.options().dtype(acc)));
  }
  return {grad_q, grad_k, grad_v};
}

// where.self_out: the math attention's causal mask (Falcon's multi-query keys send SDPA down the math path) writes
// into an out tensor, sized as where.self sizes its result.
Tensor& WhereSelfOutMeta(const Tensor& condition, const Tensor& self, const Tensor& other, Tensor& out) {
  const Tensor result = WhereSelfMeta(condition, self, other);
  if (out.sizes() != result.sizes()) out.resize_(result.sizes());
  return out;
}

// index_add_ on meta: LibTorch's structured meta checks the source through its first row along `dim`, which an
// empty index has not (a Mixtral expert given no rows: a decode step's few tokens). The result is self.
Tensor& IndexAddInplaceMeta(Tensor& self, int64_t dim, const Tensor& index, const Tensor& source,
                            const at::Scalar& /*alpha*/) {
  TORCH_CHECK(index.dim() <= 1, "index_add_(): Index is supposed to be a vector");
  const int64_t rows = source.dim() == 0 ? 1 : source.size(at::maybe_wrap_dim(dim, source.dim()));
  TORCH_CHECK(index.numel() == rows, "index_add_(): Number of indices should be equal to source.size(dim)");
  return self;
}

// --- scaled_dot_product_attention on meta -----------------------------------------------------------------------

// Same steps as the CompositeImplicit kernel on CPU: a bool mask becomes an additive float mask, the CPU rule
// (_fused_sdp_choice_cpp) picks flash or math, and the chosen op runs (and records its own autograd node).
Tensor ScaledDotProductAttentionMeta(const Tensor& query, const Tensor& key, const Tensor& value,
                                     const std::optional<Tensor>& attn_mask_in, double dropout_p, bool is_causal,
                                     std::optional<double> scale, bool enable_gqa) {
  std::optional<Tensor> attn_mask = attn_mask_in;
  if (attn_mask.has_value() && attn_mask->defined() && attn_mask->scalar_type() == at::kBool) {
    const auto opts = at::TensorOptions().dtype(query.scalar_type()).device(query.device());
    attn_mask = at::where(*attn_mask, at::scalar_tensor(0.0, opts),
                          at::scalar_tensor(-std::numeric_limits<double>::infinity(), opts));
  }
  const int64_t choice =
      at::native::_fused_sdp_choice_cpp(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa);
  if (choice == static_cast<int64_t>(sdp::SDPBackend::flash_attention)) {
    return std::get<0>(
        at::_scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, attn_mask, scale));
  }
  return std::get<0>(at::_scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                            std::nullopt, scale, enable_gqa));
}

// --- Registration -----------------------------------------------------------------------------------------------

bool HasMetaKernel(const char* name, const char* overload) {
  auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
  return handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::Meta);
}

void RegisterAll() {
  // Never destroyed: the dispatcher keeps pointers into the registrations for the life of the process.
  static auto* meta = new torch::Library(torch::Library::IMPL, "aten", c10::DispatchKey::Meta, __FILE__, __LINE__);
  static auto* autograd_meta =
      new torch::Library(torch::Library::IMPL, "aten", c10::DispatchKey::AutogradMeta, __FILE__, __LINE__);
  // Register only where LibTorch has no kernel, so a newer LibTorch's own kernels win (except the replacements).
  if (!HasMetaKernel("aten::index_select", "")) meta->impl("index_select", TORCH_FN(IndexSelectMeta));
  if (!HasMetaKernel("aten::embedding_dense_backward", "")) {
    meta->impl("embedding_dense_backward", TORCH_FN(EmbeddingDenseBackwardMeta));
  }
  if (!HasMetaKernel("aten::native_layer_norm", "")) meta->impl("native_layer_norm", TORCH_FN(NativeLayerNormMeta));
  if (!HasMetaKernel("aten::native_layer_norm_backward", "")) {
    meta->impl("native_layer_norm_backward", TORCH_FN(NativeLayerNormBackwardMeta));
  }
  if (!HasMetaKernel("aten::relu", "")) meta->impl("relu", TORCH_FN(ReluMeta));
  if (!HasMetaKernel("aten::relu_", "")) meta->impl("relu_", TORCH_FN(ReluInplaceMeta));
  if (!HasMetaKernel("aten::where", "self")) meta->impl("where.self", TORCH_FN(WhereSelfMeta));
  if (!HasMetaKernel("aten::where", "self_out")) meta->impl("where.self_out", TORCH_FN(WhereSelfOutMeta));
  if (!HasMetaKernel("aten::_scaled_dot_product_flash_attention_for_cpu", "")) {
    meta->impl("_scaled_dot_product_flash_attention_for_cpu", TORCH_FN(FlashAttentionForCpuMeta));
  }
  if (!HasMetaKernel("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "")) {
    meta->impl("_scaled_dot_product_flash_attention_for_cpu_backward", TORCH_FN(FlashAttentionForCpuBackwardMeta));
  }
  {
    DropWarnings drop;
    c10::WarningUtils::WarningHandlerGuard guard(&drop);
    meta->impl("resize_", TORCH_FN(ResizeMeta));
    meta->impl("cumsum", TORCH_FN(CumsumMeta));
    meta->impl("mm", TORCH_FN(MmMeta));
    meta->impl("bmm", TORCH_FN(BmmMeta));
    meta->impl("index_add_", TORCH_FN(IndexAddInplaceMeta));
  }
  autograd_meta->impl("scaled_dot_product_attention", TORCH_FN(ScaledDotProductAttentionMeta));
}

}  // namespace

void EnsureMetaKernelsRegistered() {
  static std::once_flag once;
  std::call_once(once, RegisterAll);
}

}  // namespace llmem
