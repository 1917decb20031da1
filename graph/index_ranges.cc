#include "graph/index_ranges.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "graph/op_registry.h"

namespace llmem {
namespace {

std::optional<int64_t> IntegralScalar(const c10::IValue& v) {
  if (v.isInt()) return v.toInt();
  if (v.isBool()) return v.toBool() ? 1 : 0;
  if (v.isDouble()) {
    const double d = v.toDouble();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

std::optional<int64_t> Mul(int64_t a, int64_t b) {
  int64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) return std::nullopt;
  return out;
}

std::optional<int64_t> Add(int64_t a, int64_t b) {
  int64_t out = 0;
  if (__builtin_add_overflow(a, b, &out)) return std::nullopt;
  return out;
}

// The bounds of {x * y : x in a, y in b}.
std::optional<IndexRange> Product(IndexRange a, IndexRange b) {
  int64_t lo = 0, hi = 0;
  bool first = true;
  for (int64_t x : {a.lo, a.hi}) {
    for (int64_t y : {b.lo, b.hi}) {
      auto p = Mul(x, y);
      if (!p) return std::nullopt;
      lo = first ? *p : std::min(lo, *p);
      hi = first ? *p : std::max(hi, *p);
      first = false;
    }
  }
  return IndexRange{lo, hi};
}

std::optional<IndexRange> Sum(IndexRange a, IndexRange b) {
  auto lo = Add(a.lo, b.lo);
  auto hi = Add(a.hi, b.hi);
  if (!lo || !hi) return std::nullopt;
  return IndexRange{*lo, *hi};
}

}  // namespace

std::optional<IndexRange> IndexRanges::Of(const at::Tensor& t) const {
  if (!t.defined()) return std::nullopt;
  auto it = ranges_.find(t.unsafeGetTensorImpl());
  if (it != ranges_.end()) return it->second;
  // Traces bake scalars as 0-dim CPU tensor constants, whose one value can be read.
  const bool real = at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), /*includeBool=*/true);
  if (t.device().is_cpu() && t.dim() == 0 && real) {
    auto v = IntegralScalar(t.item().isIntegral(true) ? c10::IValue(t.item().toLong())
                                                      : c10::IValue(t.item().toDouble()));
    if (v) return IndexRange{*v, *v};
  }
  return std::nullopt;
}

std::optional<IndexRange> IndexRanges::OfValue(const c10::IValue& v) const {
  if (v.isTensor()) return Of(v.toTensor());
  if (auto s = IntegralScalar(v)) return IndexRange{*s, *s};
  return std::nullopt;
}

void IndexRanges::Observe(const torch::jit::Node* node, const std::vector<c10::IValue>& inputs,
                          const std::vector<c10::IValue>& outputs) {
  const std::string kind = node->kind().toQualString();
  // Only arange's rule reads the overload.
  Observe(kind, kind == "aten::arange" ? node->schema().overload_name() : "", inputs, outputs);
}

void IndexRanges::Observe(const std::string& kind, const std::string& overload,
                          const std::vector<c10::IValue>& inputs, const std::vector<c10::IValue>& outputs) {
  // An in-place op changes its input's values (and returns the same tensor): what was known about them is gone.
  if (!kind.empty() && kind.back() == '_') {
    for (const c10::IValue& v : inputs) {
      if (v.isTensor() && v.toTensor().defined()) ranges_.erase(v.toTensor().unsafeGetTensorImpl());
    }
  }
  if (outputs.empty() || !outputs[0].isTensor() || !outputs[0].toTensor().defined()) return;
  const at::Tensor& out = outputs[0].toTensor();
  if (out.numel() == 0) {
    ranges_.erase(out.unsafeGetTensorImpl());
    return;
  }
  std::optional<IndexRange> range;
  auto in = [&](size_t i) { return i < inputs.size() ? OfValue(inputs[i]) : std::nullopt; };
  if (kind == "aten::arange") {
    // arange(end, ...), arange.start(start, end, ...), arange.start_step(start, end, step, ...)
    const std::optional<int64_t> start = overload.empty() ? std::optional<int64_t>(0) : IntegralScalar(inputs[0]);
    const std::optional<int64_t> step =
        overload == "start_step" ? IntegralScalar(inputs[2]) : std::optional<int64_t>(1);
    if (start && step) {
      auto span = Mul(*step, out.numel() - 1);
      auto last = span ? Add(*start, *span) : std::nullopt;
      if (last) range = IndexRange{std::min(*start, *last), std::max(*start, *last)};
    }
  } else if (kind == "aten::ones" || kind == "aten::ones_like" || kind == "aten::new_ones") {
    range = IndexRange{1, 1};
  } else if (kind == "aten::zeros" || kind == "aten::zeros_like" || kind == "aten::new_zeros") {
    range = IndexRange{0, 0};
  } else if (kind == "aten::full" || kind == "aten::full_like" || kind == "aten::new_full") {
    // full(size, fill, ...), full_like(self, fill, ...), new_full(self, size, fill, ...)
    const size_t fill = kind == "aten::new_full" ? 2 : 1;
    if (auto v = fill < inputs.size() ? IntegralScalar(inputs[fill]) : std::nullopt) range = IndexRange{*v, *v};
  } else if (kind == "prim::NumToTensor") {
    range = in(0);
  } else if (kind == "aten::cumsum") {
    // A prefix sum of n elements in [lo, hi] lies in [min(lo, n lo), max(hi, n hi)].
    auto x = in(0);
    if (x && inputs[0].isTensor() && inputs[1].isInt()) {
      const at::Tensor& self = inputs[0].toTensor();
      const int64_t n = self.dim() == 0 ? 1 : self.size(c10::maybe_wrap_dim(inputs[1].toInt(), self.dim()));
      auto lo = Mul(x->lo, n);
      auto hi = Mul(x->hi, n);
      if (lo && hi) range = IndexRange{std::min(x->lo, *lo), std::max(x->hi, *hi)};
    }
  } else if (kind == "aten::add" || kind == "aten::sub") {
    // add/sub(self, other, alpha): self +/- alpha * other
    auto a = in(0);
    auto b = in(1);
    auto alpha = inputs.size() > 2 ? IntegralScalar(inputs[2]) : std::optional<int64_t>(1);
    if (a && b && alpha) {
      auto scaled = Product(*b, IndexRange{*alpha, *alpha});
      if (scaled && kind == "aten::sub") scaled = Product(*scaled, IndexRange{-1, -1});
      if (scaled) range = Sum(*a, *scaled);
    }
  } else if (kind == "aten::mul") {
    auto a = in(0);
    auto b = in(1);
    if (a && b) range = Product(*a, *b);
  } else if (kind == "aten::masked_fill") {
    // masked_fill(self, mask, value): a mask that is all false fills nothing.
    auto a = in(0);
    auto mask = in(1);
    auto v = in(2);
    if (a && mask && mask->lo == 0 && mask->hi == 0) {
      range = a;
    } else if (a && v) {
      range = IndexRange{std::min(a->lo, v->lo), std::max(a->hi, v->hi)};
    }
  } else if (OpHas(kind, kKeepsValues)) {  // views, copies, casts that keep integer values
    range = in(0);
  }
  // The output may be an input returned as is (aten::to to its own dtype), so it is replaced only now.
  if (range) {
    ranges_[out.unsafeGetTensorImpl()] = *range;
  } else {
    ranges_.erase(out.unsafeGetTensorImpl());
  }
}

}  // namespace llmem
