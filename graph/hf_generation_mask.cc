#include "graph/hf_generation_mask.h"

#include <limits>

namespace llmem {

at::Tensor MakeHfGenerationMask(const RecordOp& record, int64_t batch, int64_t tokens, int64_t past_tokens,
                                at::ScalarType dtype, const at::Tensor& attention_mask) {
  const int64_t target = past_tokens + tokens;  // attention_mask.shape[-1]
  const auto meta = at::TensorOptions().device(at::kMeta);
  const double min = std::numeric_limits<float>::lowest();  // torch.finfo(dtype).min; meta never reads it
  const std::vector<int64_t> square = {tokens, target};
  at::Tensor mask = at::full(square, min, meta.dtype(dtype));
  record("aten::full", {c10::IValue(square), c10::IValue(min)}, mask);
  if (tokens != 1) {
    const at::Tensor full = mask;
    mask = at::triu(full, 1);
    record("aten::triu", {c10::IValue(full), c10::IValue(int64_t{1})}, mask);
  }
  // causal_mask *= torch.arange(target_length) > cache_position.reshape(-1, 1)
  const at::Tensor columns = at::arange(target, meta.dtype(at::kLong));
  record("aten::arange", {c10::IValue(target)}, columns);
  const at::Tensor positions = at::arange(past_tokens, target, meta.dtype(at::kLong));
  record("aten::arange", {c10::IValue(past_tokens), c10::IValue(target)}, positions);
  const std::vector<int64_t> column = {-1, 1};
  const at::Tensor rows = positions.reshape(column);
  record("aten::reshape", {c10::IValue(positions), c10::IValue(column)}, rows);
  const at::Tensor later = at::gt(columns, rows);
  record("aten::gt", {c10::IValue(columns), c10::IValue(rows)}, later);
  const at::Tensor scaled = mask.mul_(later);
  record("aten::mul_", {c10::IValue(mask), c10::IValue(later)}, scaled);
  // causal_mask[None, None, :, :].expand(batch_size, 1, -1, -1).clone()
  const at::Tensor one = scaled.unsqueeze(0);
  record("aten::unsqueeze", {c10::IValue(scaled), c10::IValue(int64_t{0})}, one);
  const at::Tensor two = one.unsqueeze(1);
  record("aten::unsqueeze", {c10::IValue(one), c10::IValue(int64_t{1})}, two);
  const std::vector<int64_t> expanded_shape = {batch, 1, -1, -1};
  const at::Tensor expanded = two.expand(expanded_shape);
  record("aten::expand", {c10::IValue(two), c10::IValue(expanded_shape), c10::IValue(false)}, expanded);
  const at::Tensor causal = expanded.clone();
  record("aten::clone", {c10::IValue(expanded)}, causal);
  // padding_mask = causal_mask[:, :, :, :mask_length] + attention_mask[:, None, None, :]; padding_mask == 0
  const auto prefix = [&](const at::Tensor& t) {
    const at::Tensor s = t.slice(3, 0, target);
    record("aten::slice", {c10::IValue(t), c10::IValue(int64_t{3}), c10::IValue(int64_t{0}), c10::IValue(target),
                           c10::IValue(int64_t{1})},
           s);
    return s;
  };
  const at::Tensor mask_rows = attention_mask.unsqueeze(1);
  record("aten::unsqueeze", {c10::IValue(attention_mask), c10::IValue(int64_t{1})}, mask_rows);
  const at::Tensor mask_4d = mask_rows.unsqueeze(2);
  record("aten::unsqueeze", {c10::IValue(mask_rows), c10::IValue(int64_t{2})}, mask_4d);
  const at::Tensor visible = prefix(causal);
  const at::Tensor padding = at::add(visible, mask_4d);
  record("aten::add", {c10::IValue(visible), c10::IValue(mask_4d), c10::IValue(int64_t{1})}, padding);
  const at::Tensor padded = at::eq(padding, 0);
  record("aten::eq", {c10::IValue(padding), c10::IValue(int64_t{0})}, padded);
  // causal_mask[:, :, :, :mask_length] = causal_mask[:, :, :, :mask_length].masked_fill(padding_mask, min_dtype)
  const at::Tensor source = prefix(causal);
  const at::Tensor filled = source.masked_fill(padded, min);
  record("aten::masked_fill", {c10::IValue(source), c10::IValue(padded), c10::IValue(min)}, filled);
  const at::Tensor target_view = prefix(causal);
  const at::Tensor copied = target_view.copy_(filled);
  record("aten::copy_", {c10::IValue(target_view), c10::IValue(filled), c10::IValue(false)}, copied);
  return causal;
}

}  // namespace llmem
