#include "graph/quantize_rewrite.h"

#include <map>

#include "graph/error.h"
#include "graph/graph_rewriter.h"

namespace llmem {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The weight's value and parameter become its packed codes (uint8, int8), in place.
void PackWeight(const TensorValue& w, std::vector<int64_t> shape, GraphRewriter& rw, DType codes = DType::kU8) {
  TensorValue& wv = rw.value(w.id);
  wv.storage_numel = NumElements(shape);
  wv.shape = std::move(shape);
  wv.strides.clear();
  wv.dtype = wv.dtype_bf16_weights = codes;
  Parameter& p = rw.params()[static_cast<size_t>(w.param)];
  p.shape = wv.shape;
  p.dtype = codes;
  p.bytes = ShapeBytes(p.shape, codes);
}

// Note [8-bit linears]: the weight becomes its int8 rows with their fp32 scales, and the linear bnb::matmul_int8.
void EmitLinear8bit(const Graph& g, const OpNode& old, const TensorValue& w, GraphRewriter& rw) {
  const int64_t out_f = w.shape[0], in_f = w.shape[1];
  const std::string& name = g.params()[static_cast<size_t>(w.param)].name;
  PackWeight(w, {out_f, in_f}, rw, DType::kI8);
  rw.NewParam(name + ".SCB", {out_f}, DType::kF32, DType::kF32, old.region, false);
  const OpArg bias = old.args.size() > 2 ? old.args[2] : OpArg{};
  rw.Emit(GraphRewriter::NewNode(old, "bnb::matmul_int8", old.scope,
                                 {old.args[0], TensorArg(w.id), bias, IntArg(out_f), IntArg(in_f)}, old.outputs[0]));
}

// The linear's bias argument (none: an empty arg), its parameter now stored in `dtype`.
OpArg BiasStoredAs(const Graph& g, const OpNode& linear, DType dtype, GraphRewriter& rw) {
  if (linear.args.size() <= 2 || linear.args[2].kind != OpArg::Kind::kTensor) return OpArg{};
  const ValueId b = linear.args[2].tensors[0];
  if (g.value(b).role == ValueRole::kParameter && !g.value(b).alias_of.valid()) {
    TensorValue& bv = rw.value(b);
    bv.dtype = bv.dtype_bf16_weights = dtype;
    Parameter& p = rw.params()[static_cast<size_t>(bv.param)];
    p.dtype = dtype;
    p.bytes = ShapeBytes(p.shape, p.dtype);
  }
  return linear.args[2];
}

// Note [torchao NF4 linears]: the weight becomes NF4Tensor's codes with its scalers beside it, and the linear
// torchao::linear_nf4 (+ bias).
void EmitNf4Linear(const Graph& g, const OpNode& old, const TensorValue& w, GraphRewriter& rw) {
  const int64_t out_f = w.shape[0], in_f = w.shape[1], n = out_f * in_f;
  constexpr int64_t kBlock = 64, kScalerBlock = 256;
  if (n % (kBlock * kScalerBlock) != 0) {
    throw ConfigError("--quant torchao-nf4: " + old.scope + " has " + std::to_string(out_f) + " x " +
                      std::to_string(in_f) + " weights, which torchao's to_nf4 cannot quantize (the count must be a "
                      "multiple of 64 x 256)");
  }
  const Parameter& param = g.params()[static_cast<size_t>(w.param)];
  const DType d = w.dtype, d16 = w.dtype_bf16_weights;
  PackWeight(w, {n / 2}, rw);
  rw.NewParam(param.name + ".quantized_scalers", {n / kBlock}, DType::kI8, DType::kI8, old.region, false);
  rw.NewParam(param.name + ".quantization_factor", {n / kBlock / kScalerBlock}, d, d16, old.region, false);
  rw.NewParam(param.name + ".scaler_mean", {}, d, d16, old.region, false);
  const ValueId table = rw.NewParam(param.name + ".nf4", {16}, d, d16, old.region, false);
  const ValueId x = old.args[0].tensors[0];
  const ValueId y = old.outputs[0];
  const TensorValue yv = g.value(y);
  const bool bias = old.args.size() > 2 && old.args[2].kind == OpArg::Kind::kTensor;
  ValueId lin = y;
  if (bias) {
    lin = rw.NewValue(old.scope + " nf4 output", yv.shape, yv.dtype, yv.dtype_bf16_weights);
    rw.value(lin).requires_grad = yv.requires_grad;
  }
  rw.Emit(GraphRewriter::NewNode(old, "torchao::linear_nf4", old.scope,
                                 {TensorArg(x), TensorArg(w.id), TensorArg(table), IntArg(out_f), IntArg(in_f)}, lin));
  if (bias) {
    rw.Emit(GraphRewriter::NewNode(old, "aten::add", old.scope, {TensorArg(lin), old.args[2], IntArg(1)}, y));
  }
}

// Note [4-bit linears]: the weight becomes packed codes with Params4bit's quantization state beside it, and the
// linear Linear4bit.forward's cast, bnb::matmul_4bit and the cast back.
void EmitLinear4bit(const Graph& g, const OpNode& old, const TensorValue& w, const QuantSettings& s,
                    GraphRewriter& rw) {
  const int64_t out_f = w.shape[0], in_f = w.shape[1];
  const int64_t numel = out_f * in_f;
  const Quantized4bitLayout layout = Layout4bit(numel, s);
  PackWeight(w, {layout.packed, 1}, rw);
  const std::string& name = g.params()[static_cast<size_t>(w.param)].name;
  // The quantization state hangs off the weight (Params4bit.quant_state), not a parameter of its own.
  auto state = [&](const std::string& part, std::vector<int64_t> shape, DType d) {
    rw.NewParam(name + "." + part, std::move(shape), d, d, old.region, false);
  };
  const int64_t blocks = CeilDiv(numel, s.blocksize);
  state("absmax", {blocks}, s.double_quant ? DType::kU8 : DType::kF32);
  state("quant_map", {16}, DType::kF32);
  if (s.double_quant) {
    state("nested_absmax", {CeilDiv(blocks, 256)}, DType::kF32);
    state("nested_quant_map", {256}, DType::kF32);
    state("quant_state.offset", {}, DType::kF32);
  }
  // A frozen bias ends up in the compute dtype.
  const OpArg bias = BiasStoredAs(g, old, s.compute_dtype, rw);
  const ValueId x = old.args[0].tensors[0];
  const TensorValue& xv = g.value(x);
  const ValueId y = old.outputs[0];
  const TensorValue yv = g.value(y);
  const ValueId xc = rw.NewValue(old.scope + " 4-bit input", xv.shape, s.compute_dtype, s.compute_dtype, x);
  rw.value(xc).requires_grad = xv.requires_grad;
  rw.Emit(GraphRewriter::NewNode(old, "aten::to", old.scope,
                                 {TensorArg(x), IntArg(ScalarTypeOf(s.compute_dtype)),
                                  IntArg(0, OpArg::Kind::kBool), IntArg(0, OpArg::Kind::kBool)},
                                 xc));
  const ValueId yc = rw.NewValue(old.scope + " 4-bit output", yv.shape, s.compute_dtype, s.compute_dtype);
  rw.value(yc).requires_grad = yv.requires_grad;
  rw.Emit(GraphRewriter::NewNode(old, "bnb::matmul_4bit", old.scope,
                                 {TensorArg(xc), TensorArg(w.id), bias, IntArg(out_f), IntArg(in_f),
                                  IntArg(s.blocksize), IntArg(s.double_quant ? 1 : 0, OpArg::Kind::kBool),
                                  IntArg(ScalarTypeOf(s.load_dtype))},
                                 yc));
  // The layer's output keeps its value: now `.to(inp_dtype)`, x's dtype as the step runs it (under autocast an
  // attention output is already 16-bit), a view of yc when nothing changes.
  TensorValue& out = rw.value(y);
  out.alias_of = yc;
  out.storage_numel = 0;
  out.strides.clear();
  rw.Emit(GraphRewriter::NewNode(old, "aten::type_as", old.scope, {TensorArg(yc), TensorArg(x)}, y));
}

// Note [GPTQ linears]: the weight becomes qweight with the zero points, scales, group index and shift tables
// beside it, the bias fp16, and the linear gptq::linear.
void EmitGptqLinear(const Graph& g, const OpNode& old, const TensorValue& w, const QuantSettings& s,
                    GraphRewriter& rw) {
  const int64_t out_f = w.shape[0], in_f = w.shape[1];
  const std::string what = "--quant " + QuantName(s) + ": " + old.scope + " (" + std::to_string(out_f) + " x " +
                           std::to_string(in_f) + ")";
  if (in_f % 32 != 0 || out_f % 32 != 0) {
    throw ConfigError(what + " cannot be packed: GPTQ packs in_features and out_features in multiples of 32");
  }
  if (s.group_size != -1 && in_f % s.group_size != 0) {
    throw ConfigError(what + ": the group size " + std::to_string(s.group_size) + " does not divide its " +
                      std::to_string(in_f) + " input features (--quant-group)");
  }
  const int64_t groups = s.group_size == -1 ? 1 : in_f / s.group_size;
  const int64_t pack = 32 / s.bits;
  const std::string name = g.params()[static_cast<size_t>(w.param)].name;
  const std::string module = name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name;
  PackWeight(w, {in_f / pack, out_f}, rw, DType::kI32);
  Parameter& qweight = rw.params()[static_cast<size_t>(w.param)];
  qweight.name = module + ".qweight";
  qweight.frozen = false;  // a buffer, as the rest: no engine shards it
  auto buffer = [&](const std::string& part, std::vector<int64_t> shape, DType d) {
    rw.NewParam(module + "." + part, std::move(shape), d, d, old.region, false);
  };
  buffer("qzeros", {groups, out_f / pack}, DType::kI32);
  buffer("scales", {groups, out_f}, DType::kF16);
  buffer("g_idx", {in_f}, DType::kI32);
  buffer("wf_unsqueeze_zero", {1, 1, pack}, DType::kI32);
  buffer("wf_unsqueeze_neg_one", {1, pack, 1}, DType::kI32);
  const OpArg bias = BiasStoredAs(g, old, DType::kF16, rw);  // a QuantLinear buffer
  rw.Emit(GraphRewriter::NewNode(old, "gptq::linear", old.scope,
                                 {old.args[0], TensorArg(w.id), bias, IntArg(out_f), IntArg(in_f), IntArg(s.bits),
                                  IntArg(s.group_size)},
                                 old.outputs[0]));
}

bool IsParamLinear(const Graph& g, const OpNode& node) {
  return node.kind == "aten::linear" && node.args.size() >= 2 && node.args[1].kind == OpArg::Kind::kTensor &&
         g.value(node.args[1].tensors[0]).role == ValueRole::kParameter;
}

}  // namespace

Quantized4bitLayout Layout4bit(int64_t numel, const QuantSettings& s) {
  Quantized4bitLayout l;
  const int64_t blocks = CeilDiv(numel, s.blocksize);
  l.packed = (numel + 1) / 2;
  l.quant_map = 16 * 4;
  if (s.double_quant) {
    l.absmax = blocks;  // uint8
    l.nested_absmax = CeilDiv(blocks, 256) * 4;
    l.nested_code = 256 * 4;
    l.offset = 4;
  } else {
    l.absmax = blocks * 4;
  }
  return l;
}

GptqLayout LayoutGptq(int64_t in_features, int64_t out_features, int bits, int64_t group_size) {
  GptqLayout l;
  const int64_t groups = group_size == -1 ? 1 : CeilDiv(in_features, group_size);
  const int64_t pack = 32 / bits;
  l.qweight = in_features / pack * out_features * 4;
  l.qzeros = groups * (out_features / pack) * 4;
  l.scales = groups * out_features * 2;
  l.g_idx = in_features * 4;
  l.shift_tables = 2 * pack * 4;
  return l;
}

std::string QuantName(const QuantSettings& s) {
  if (s.library == QuantLibrary::kGptq) return "gptq-" + std::to_string(s.bits);
  if (s.library == QuantLibrary::kTorchao) return "torchao-nf4";
  if (s.format == QuantFormat::kInt8) return "int8";
  return std::string(s.format == QuantFormat::kNf4 ? "nf4" : "fp4") + (s.double_quant ? "-dq" : "");
}

Graph QuantizeLinears(const Graph& g, const QuantSettings& s) {
  static constexpr int64_t kBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
  bool valid_block = false;
  for (int64_t b : kBlocksizes) valid_block |= b == s.blocksize;
  if (s.library == QuantLibrary::kGptq) {
    if (s.bits != 4 && s.bits != 8) throw ConfigError("--quant gptq: 4 or 8 bits, not " + std::to_string(s.bits));
    if (s.group_size != -1 && s.group_size <= 0) {
      throw ConfigError("--quant-group must be positive, or -1 for one group per column, not " +
                        std::to_string(s.group_size));
    }
  } else if (!valid_block && s.format != QuantFormat::kInt8) {
    throw ConfigError("--quant: bitsandbytes takes 4-bit blocksizes 32 to 4096 (powers of two), not " +
                      std::to_string(s.blocksize));
  }
  if (!IsFloating(s.compute_dtype) || !IsFloating(s.load_dtype)) {
    throw ConfigError("--quant: the compute and load dtypes must be floating");
  }
  // peft.prepare_model_for_kbit_training casts every unquantized 16-bit parameter to fp32: a graph traced in 16 bits
  // has those dtypes baked in. (torchtune keeps them in the model's dtype.)
  for (const Parameter& p : g.params()) {
    if (s.library == QuantLibrary::kBitsandbytes && !s.for_generation &&
        (p.dtype == DType::kBF16 || p.dtype == DType::kF16)) {
      throw ConfigError("--quant: this export was traced with 16-bit weights (" + p.name + " is " +
                        std::string(DTypeName(p.dtype)) + "), but prepare_model_for_kbit_training keeps every "
                        "unquantized parameter in fp32; use an fp32 export (the default of models/export_hf.py)");
    }
  }
  // Consumers per weight: a weight another op also reads (tied) stays unquantized, as transformers leaves it.
  std::map<int32_t, int> readers;
  for (const OpNode& node : g.nodes()) {
    for (ValueId t : g.tensor_inputs(node.id)) {
      if (g.value(t).role == ValueRole::kParameter) ++readers[g.StorageRoot(t).index];
    }
    if ((node.kind == "aten::addmm") && node.region.kind == RegionKind::kDecoderLayer && node.args.size() > 2 &&
        node.args[2].kind == OpArg::Kind::kTensor && g.value(node.args[2].tensors[0]).role == ValueRole::kParameter) {
      throw ConfigError("--quant: " + node.scope + " is a GPT-2-style Conv1D layer (traced as addmm); quantized Conv1D "
                        "layers are not modelled");
    }
  }
  GraphRewriter rw(g);
  int quantized = 0;
  for (const OpNode& old : g.nodes()) {
    const TensorValue* w = IsParamLinear(g, old) ? &g.value(old.args[1].tensors[0]) : nullptr;
    // bitsandbytes replaces every linear but the head; optimum's GPTQ quantizer those of the decoder blocks.
    const bool in_scope = s.library == QuantLibrary::kGptq ? old.region.kind == RegionKind::kDecoderLayer
                                                           : old.region.kind != RegionKind::kHead;
    const bool quantize = w && in_scope &&
                          (s.for_generation || !g.params()[static_cast<size_t>(w->param)].trainable) &&
                          w->shape.size() == 2 &&
                          readers[g.StorageRoot(w->id).index] == 1 && !w->alias_of.valid() && !old.outputs.empty();
    if (!quantize) {
      rw.Emit(old);
      continue;
    }
    ++quantized;
    if (s.library == QuantLibrary::kTorchao) {
      EmitNf4Linear(g, old, *w, rw);
    } else if (s.library == QuantLibrary::kGptq) {
      EmitGptqLinear(g, old, *w, s, rw);
    } else if (s.format == QuantFormat::kInt8) {
      EmitLinear8bit(g, old, *w, rw);
    } else {
      EmitLinear4bit(g, old, *w, s, rw);
    }
  }
  if (quantized == 0) throw ConfigError("--quant: this export has no frozen linear layer outside the head to quantize");
  return rw.Build(g.inputs(), g.loss());
}

}  // namespace llmem
