// Frozen base linears stored in bitsandbytes 4-bit, as transformers' bitsandbytes quantizer (BitsAndBytesConfig
// load_in_4bit) and bitsandbytes 0.50 build and run them for QLoRA.
//
// Note [4-bit linears]
// Storage (bitsandbytes functional.quantize_4bit, nn.Params4bit; per quantized weight of n = out x in elements,
// nb = ceil(n / blocksize) blocks of 64):
//     weight        uint8 [(n + 1) / 2, 1]    two 4-bit codes per byte
//     absmax        fp32 [nb]; with double quantization uint8 [nb] (quantize_blockwise in blocks of 256)
//     quant_map     fp32 [16]                 the NF4 / FP4 code, one copy per layer
//     nested_absmax fp32 [ceil(nb / 256)]     double quantization only, with
//     nested_code   fp32 [256]                the dynamic 8-bit map (copied per layer) and
//     offset        fp32 []                   the mean absmax subtracted before quantizing
// Every nn.Linear is quantized except the output head (transformers' get_keys_to_not_convert) and a weight that is
// shared with another module. A frozen bias is cast to the compute dtype by the first forward (Linear4bit.forward
// assigns bias.data), so it is stored in that dtype from then on.
// Forward of one layer (Linear4bit.forward -> matmul_4bit -> MatMul4Bit):
//     xc = x.to(compute_dtype)                   a copy only when the dtypes differ
//     yc = bnb::matmul_4bit(xc, weight, bias)    saves no activation: only the packed weight (ctx.tensors)
//     y  = yc.type_as(x)                         .to(inp_dtype): a copy only when the dtypes differ
// What matmul_4bit allocates inside (the dequantized weight, absmax temporaries; again in backward, where the
// input gradient needs the weight) depends on the backend and the token count: simulator/op_memory_rules.cc.
#pragma once

#include <cstdint>
#include <string>

#include "graph/dtype.h"
#include "graph/graph.h"

namespace llmem {

enum class QuantFormat : uint8_t { kNf4, kFp4, kInt8 };
enum class QuantLibrary : uint8_t {
  kBitsandbytes,  // transformers + PEFT: Linear4bit (Note [4-bit linears]), Linear8bitLt (Note [8-bit linears])
  kTorchao,       // torchtune: torchao's NF4Tensor weights run by linear_nf4 (Note [torchao NF4 linears])
  kGptq,          // a GPTQ checkpoint loaded by transformers through optimum and gptqmodel (Note [GPTQ linears])
};

struct QuantSettings {
  QuantLibrary library = QuantLibrary::kBitsandbytes;
  QuantFormat format = QuantFormat::kNf4;
  bool double_quant = false;       // bnb_4bit_use_double_quant (the QLoRA paper's setting)
  int64_t blocksize = 64;          // bitsandbytes' default; transformers does not expose it
  DType compute_dtype = DType::kF32;  // bnb_4bit_compute_dtype
  DType load_dtype = DType::kF32;     // the weights' dtype when quantized (from_pretrained's dtype): what the
                                      // dequantization in backward produces (quant_state.dtype)
  int bits = 4;                       // GPTQ: 4 or 8
  int64_t group_size = 128;           // GPTQ: input features per scale and zero point; -1: one group per column
  bool for_generation = false;        // loaded to generate (no peft.prepare_model_for_kbit_training: the unquantized
                                      // parameters keep the load dtype, every linear is frozen)
};

// The storage of one GPTQ linear of in_features K, out_features N, by tensor, in bytes (Note [GPTQ linears]).
struct GptqLayout {
  int64_t qweight = 0, qzeros = 0, scales = 0, g_idx = 0, shift_tables = 0;
};
GptqLayout LayoutGptq(int64_t in_features, int64_t out_features, int bits, int64_t group_size);

// The storage of one quantized weight of `numel` elements, by part, in bytes.
struct Quantized4bitLayout {
  int64_t packed = 0, absmax = 0, quant_map = 0, nested_absmax = 0, nested_code = 0, offset = 0;
  int64_t total() const { return packed + absmax + quant_map + nested_absmax + nested_code + offset; }
};
Quantized4bitLayout Layout4bit(int64_t numel, const QuantSettings& settings);

// Note [8-bit linears]
// BitsAndBytesConfig(load_in_8bit=True) makes every nn.Linear outside the head a Linear8bitLt whose Int8Params hold
// the LLM.int8() row-wise quantization (int8_vectorwise_quant of the fp16 weight):
//     weight   int8 [out, in]
//     SCB      fp32 [out]      the per-row absmax (state.SCB once the first forward ran init_8bit_state)
// The bias stays in x's dtype (Linear8bitLt.forward casts it to x.dtype: fp32 after prepare_model_for_kbit_training).
// The forward is one op, y = bnb::matmul_int8(x, weight, bias): no casts around it (the simulator's rule follows
// MatMul8bitFp on CPU, MatMul8bitLt on CUDA).

// Note [GPTQ linears]
// transformers' GPTQ quantizer (optimum) makes every nn.Linear of the decoder blocks a gptqmodel QuantLinear
// (gptqmodel 5.0 nn_modules/qlinear BaseQuantLinear; auto-gptq's layout is the same), for b bits, group size G
// (G' = K when G is -1), pack factor 32 / b:
//     qweight  int32 [K * b / 32, N]
//     qzeros   int32 [K / G', N * b / 32]
//     scales   fp16  [K / G', N]
//     g_idx    int32 [K]
//     wf_unsqueeze_zero, wf_unsqueeze_neg_one   int32, 32 / b values each (the shift tables of post_init)
//     bias     fp16  [N]
// K and N must be multiples of 32 (pack_block) and G must divide K. The embeddings, norms and head stay in the
// load dtype, which prepare_model_for_kbit_training does not upcast for GPTQ. Training runs the trainable kernels
// (GPTQConfig(use_exllama=False): TritonV2 on CUDA, the torch kernel on CPU), whose forward is
// `torch.matmul(x, dequantize_weight().to(x.dtype))` + bias: the whole weight dequantized, and kept by autograd for
// the input gradient (x requires grad), so backward does not dequantize again. The op is y = gptq::linear(x, qweight,
// bias); what it allocates per backend is simulator/op_memory_rules.cc's.
// PEFT adapts these layers up to 0.18 (0.19 on asks for gptqmodel 7, which needs transformers 5): this is the stack
// of transformers 4.57 + gptqmodel 5 + PEFT <= 0.18.

// Note [torchao NF4 linears]
// torchtune's QLoRA (FrozenNF4Linear, LoRALinear(quantize_base=True)) stores every decoder linear's weight as
// torchao's NF4Tensor (to_nf4, block 64, scaler block 256; torchao 0.18 nf4_tensor.py), in the model's dtype D:
//     quantized_data       uint8 [n / 2]
//     quantized_scalers    int8 [n / 64]          the per-block absmax, double-quantized
//     quantization_factor  D [n / 64 / 256]
//     scaler_mean          D []
//     nf4                  D [16]                 the code, one copy per weight
// to_nf4 needs n to be a multiple of 64 x 256. Forward: y = torchao::linear_nf4(x, weight) (LinearNF4: saves only
// the NF4 weight; F.linear(x, weight.to(x.dtype)) dequantizes it through get_original_weight, whose int64 index
// tensors and intermediate planes come to about 14 bytes per weight in bf16), then `+ bias` when there is one; no
// casts around it. Backward dequantizes again. The embeddings, norms and the output head stay in D.
//
// "nf4", "fp4", "nf4-dq", "fp4-dq", "int8"; "torchao-nf4"; "gptq-4", "gptq-8".
std::string QuantName(const QuantSettings& settings);

// The graph with every frozen linear outside the head quantized (trainable ones, such as LoRA adapters, stay as
// they are). Throws ConfigError for a graph traced with 16-bit weights under bitsandbytes (QLoRA's unquantized
// parameters are fp32), for GPTQ shapes the packing or the group size cannot take,
// when nothing is quantizable, for a 4-bit blocksize bitsandbytes refuses, and for GPT-2-style
// Conv1D layers (traced as addmm), which are not modelled.
Graph QuantizeLinears(const Graph& graph, const QuantSettings& settings);

}  // namespace llmem
