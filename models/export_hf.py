#!/usr/bin/env python3
"""Export a Hugging Face decoder architecture to TorchScript for llmem.

The model is built from a config with random weights (nothing is downloaded) and wrapped so that the
traced module's forward(input_ids, labels) takes int64 token ids [B, S] and labels [B, S] and returns
the scalar training loss exactly as Hugging Face computes it (model(...).loss: logits upcast to fp32,
labels shifted inside HF's loss). The model is in train mode with use_cache disabled, i.e. what one
fine-tuning step runs.

Examples:
  export_hf.py llama --size tiny --out models/cache/llama-tiny.pt
  export_hf.py llama-2-7b --device meta --out models/llama-2-7b.meta.pt
  export_hf.py --all models/cache --size tiny
  export_hf.py --config path/to/model/config.json --device meta --out my-model.meta.pt
  export_hf.py gpt2 --size tiny --out gpt2-tiny.pt --list-ops
"""

import argparse
import collections
import contextlib
import inspect
import json
import os
import sys
import time
import types
import warnings

# Keep transformers quiet and offline: every model is built from a config, nothing is fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import program_export  # noqa: E402

FORMATS = ("torchscript", "pt2")

# ---------------------------------------------------------------------------------------------
# Presets. Every architecture has `tiny` (fast CPU tests, ~2-10M params) and `small` (<= 60M
# params, realistic proportions). Real sizes are separate keys (e.g. `llama-2-7b`) that carry their
# own size; their values are copied from the published config.json named in the comment.
# ---------------------------------------------------------------------------------------------

ARCH_TYPES = {
    "gpt2": "gpt2",
    "opt": "opt",
    "bloom": "bloom",
    "llama": "llama",
    "gpt_neo": "gpt_neo",
    "codegen": "codegen",
    "gpt_bigcode": "gpt_bigcode",
    "mistral": "mistral",
    "qwen2": "qwen2",
    # decoder types beyond the first nine, tiny presets only
    "phi": "phi",
    "phi3": "phi3",
    "qwen3": "qwen3",
    "olmo": "olmo",
    "olmo2": "olmo2",
    "stablelm": "stablelm",
    "starcoder2": "starcoder2",
    "gpt_neox": "gpt_neox",
    "granite": "granite",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "cohere": "cohere",
    "gptj": "gptj",
    "mpt": "mpt",
    "persimmon": "persimmon",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
}


ROPE_TINY_POSITIONS = 4096


def _gpt2_like(hidden, layers, heads, vocab, positions):
    return dict(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=positions)


def _llama_like(hidden, inter, layers, heads, kv_heads, vocab, positions, **extra):
    d = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
             max_position_embeddings=positions)
    d.update(extra)
    return d


# tiny: hidden 256, 4 layers, 4 heads (2 key/value heads for GQA), vocab 8192, 1024 positions (4096 for
# the RoPE presets llama/mistral/qwen2: their limit is only the config's, which the export carries, and
# costs no parameters; long-sequence tests run them past 1024).
# small: hidden 512 (384 for codegen), 6-8 layers, 8 heads, real tokenizer vocabularies (32000 for
# llama/mistral, ~50k for the GPT-2 style ones) with each architecture's MLP ratio, <= 60M params.
# The tiny local/sliding attention windows (24) are shorter than the verification lengths (37, 64)
# and longer than the default trace length (16), so --verify catches a window decision baked in
# at trace time.
PRESETS = {
    "gpt2": {
        "tiny": _gpt2_like(256, 4, 4, 8192, 1024),
        "small": dict(_gpt2_like(512, 6, 8, 50257, 1024), n_inner=2048),
    },
    "opt": {
        "tiny": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
                     vocab_size=8192, max_position_embeddings=1024, word_embed_proj_dim=256),
        "small": dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8,
                      vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512),
    },
    "bloom": {
        "tiny": dict(hidden_size=256, n_layer=4, n_head=4, vocab_size=8192),
        # bloom's real vocabulary (250880) alone would exceed 60M parameters at hidden 512
        "small": dict(hidden_size=512, n_layer=6, n_head=8, vocab_size=50257),
    },
    "llama": {  # grouped-query attention: fewer key/value heads than query heads
        "tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS),
        "small": _llama_like(512, 1376, 8, 8, 2, 32000, 4096),
    },
    "gpt_neo": {  # alternating global / local attention layers
        "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, vocab_size=8192,
                     max_position_embeddings=1024, window_size=24,
                     attention_types=[[["global", "local"], 2]]),
        "small": dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048,
                      vocab_size=50257, max_position_embeddings=2048, window_size=256,
                      attention_types=[[["global", "local"], 3]]),
    },
    "codegen": {  # untied lm_head: the 51200-token vocabulary counts twice, hence hidden 384
        "tiny": dict(n_embd=256, n_layer=4, n_head=4, rotary_dim=32, vocab_size=8192,
                     n_positions=1024, n_ctx=1024),
        "small": dict(n_embd=384, n_layer=6, n_head=8, n_inner=1536, rotary_dim=48,
                      vocab_size=51200, n_positions=2048, n_ctx=2048),
    },
    "gpt_bigcode": {  # multi-query attention (one shared key/value head)
        "tiny": dict(_gpt2_like(256, 4, 4, 8192, 1024), multi_query=True),
        "small": dict(_gpt2_like(512, 6, 8, 49152, 2048), n_inner=2048, multi_query=True),
    },
    "mistral": {  # grouped-query attention + sliding window
        "tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, sliding_window=24),
        "small": _llama_like(512, 1536, 8, 8, 2, 32000, 4096, sliding_window=512),
    },
    # Tiny presets of further decoder types (hidden 256, 4 layers, 4 heads, vocab 8192), each with what sets it apart.
    "phi": {"tiny": _llama_like(256, 1024, 4, 4, 4, 8192, ROPE_TINY_POSITIONS, partial_rotary_factor=0.5)},
    "phi3": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, pad_token_id=0)},  # fused qkv, gate_up
    "qwen3": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, head_dim=64)},  # q/k RMSNorm
    "olmo": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS)},  # non-parametric LayerNorm
    "olmo2": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS)},  # post-norms, q/k RMSNorm
    "stablelm": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, partial_rotary_factor=0.25)},
    "starcoder2": {"tiny": _llama_like(256, 1024, 4, 4, 2, 8192, ROPE_TINY_POSITIONS)},  # biased GELU MLP
    "gpt_neox": {"tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              vocab_size=8192, max_position_embeddings=ROPE_TINY_POSITIONS, rotary_pct=0.25)},
    "granite": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS)},  # scaled residuals and logits
    "gemma": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, head_dim=64)},  # scaled embedding
    "gemma2": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, head_dim=64, sliding_window=24,
                                   query_pre_attn_scalar=64)},  # local/global layers, soft-capping
    "gemma3_text": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, head_dim=64,
                                        sliding_window=24, query_pre_attn_scalar=64,
                                        layer_types=["sliding_attention", "full_attention"] * 2)},
    "cohere": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS)},  # parallel attention + MLP
    "gptj": {"tiny": dict(n_embd=256, n_layer=4, n_head=4, rotary_dim=32, vocab_size=8192, n_positions=1024)},
    "mpt": {"tiny": dict(d_model=256, n_layers=4, n_heads=4, vocab_size=8192, max_seq_len=1024,
                         expansion_ratio=4)},  # ALiBi
    "persimmon": {"tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                               vocab_size=8192, max_position_embeddings=ROPE_TINY_POSITIONS,
                               partial_rotary_factor=0.5)},
    # 8 experts, top-2 routing (Mixtral-8x7B's), traced with balanced routing (_balanced_sparse_moe_forward)
    "mixtral": {"tiny": _llama_like(256, 344, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, num_local_experts=8,
                                    num_experts_per_tok=2)},
    # 8 routed experts, top-2, and a shared expert behind a sigmoid gate (Qwen1.5-MoE's block), every layer sparse
    "qwen2_moe": {"tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, num_experts=8,
                                      num_experts_per_tok=2, moe_intermediate_size=172,
                                      shared_expert_intermediate_size=344, decoder_sparse_step=1,
                                      norm_topk_prob=False)},
    "qwen2": {  # grouped-query attention, q/k/v biases, tied embeddings
        "tiny": _llama_like(256, 688, 4, 4, 2, 8192, ROPE_TINY_POSITIONS, tie_word_embeddings=True),
        "small": _llama_like(512, 1792, 8, 8, 2, 50000, 4096, tie_word_embeddings=True,
                             use_sliding_window=False),
    },
}

# Real sizes: key -> (architecture, config values from the published config.json).
REAL = {
    # openai-community/gpt2 config.json (124M)
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                          activation_function="gelu_new", layer_norm_epsilon=1e-5)),
    # facebook/opt-1.3b config.json
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                             num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                             word_embed_proj_dim=2048, do_layer_norm_before=True,
                             activation_function="relu", enable_bias=True, dropout=0.1,
                             attention_dropout=0.0, pad_token_id=1, bos_token_id=2,
                             eos_token_id=2)),
    # bigscience/bloom-560m config.json
    "bloom-560m": ("bloom", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880,
                                 layer_norm_epsilon=1e-5)),
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": ("llama", _llama_like(4096, 11008, 32, 32, 32, 32000, 4096, rms_norm_eps=1e-5,
                                        rope_theta=10000.0, tie_word_embeddings=False)),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": ("llama", _llama_like(4096, 14336, 32, 32, 8, 128256, 8192, rms_norm_eps=1e-5,
                                        rope_theta=500000.0, tie_word_embeddings=False,
                                        bos_token_id=128000, eos_token_id=128001)),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama-3-70b": ("llama", _llama_like(8192, 28672, 80, 64, 8, 128256, 8192, rms_norm_eps=1e-5,
                                         rope_theta=500000.0, tie_word_embeddings=False,
                                         bos_token_id=128000, eos_token_id=128001)),
    # EleutherAI/gpt-neo-125m config.json
    "gpt-neo-125m": ("gpt_neo", dict(hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257,
                                     max_position_embeddings=2048, window_size=256,
                                     attention_types=[[["global", "local"], 6]],
                                     activation_function="gelu_new")),
    # Salesforce/codegen-350M-mono config.json
    "codegen-350m": ("codegen", dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32,
                                     vocab_size=51200, n_positions=2048, n_ctx=2048,
                                     activation_function="gelu_new")),
    # bigcode/gpt_bigcode-santacoder config.json (1.1B, multi-query)
    "santacoder": ("gpt_bigcode", dict(n_embd=2048, n_layer=24, n_head=16, n_inner=8192,
                                       vocab_size=49280, n_positions=2048, multi_query=True,
                                       activation_function="gelu_pytorch_tanh")),
    # mistralai/Mistral-7B-v0.1 config.json
    "mistral-7b": ("mistral", _llama_like(4096, 14336, 32, 32, 8, 32000, 32768, rms_norm_eps=1e-5,
                                          rope_theta=10000.0, sliding_window=4096,
                                          tie_word_embeddings=False)),
    # Qwen/Qwen2-0.5B config.json
    "qwen2-0.5b": ("qwen2", _llama_like(896, 4864, 24, 14, 2, 151936, 131072, rms_norm_eps=1e-6,
                                        rope_theta=1000000.0, tie_word_embeddings=True,
                                        use_sliding_window=False, sliding_window=131072,
                                        max_window_layers=24)),
}

# Architectures exported with eager attention instead of SDPA, with the reason. Every architecture
# that has an SDPA implementation in transformers 4.57 traces and verifies with it; these have none
# (no _supports_sdpa on the model class), so HF's own default for them is eager too.
EAGER_FALLBACK = {
    "bloom": "no sdpa implementation in transformers 4.57 (ALiBi attention via baddbmm + softmax)",
    "gpt_neo": "no sdpa implementation in transformers 4.57 (eager or flash_attention_2 only)",
    "codegen": "no sdpa implementation in transformers 4.57 (eager only)",
    "gptj": "no sdpa implementation in transformers 4.57 (eager or flash_attention_2 only)",
    "mpt": "no sdpa implementation in transformers 4.57 (eager only)",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VERIFY_SHAPES = [(1, 37), (3, 64)]


class ExportError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class LossWrapper(torch.nn.Module):
    """forward(input_ids, labels) -> HF's scalar training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        out = self.model(input_ids=input_ids, labels=labels, use_cache=False, return_dict=True)
        return out.loss


def resolve(name, size):
    """Return (arch, model_type, config kwargs, label).

    `name` is an architecture key or a real-size name; `size` is tiny, small, a real-size name of
    that architecture (`llama --size llama-2-7b`), "real", or None (allowed only for a real-size
    name that is not also an architecture key: `gpt2` alone is ambiguous).
    """
    if size in REAL:
        arch, kwargs = REAL[size]
        if name not in (arch, size):
            raise ExportError(f"'{size}' is a real-size preset of {arch}, not {name}")
        return arch, ARCH_TYPES[arch], dict(kwargs), size
    if name in ARCH_TYPES and size is not None and size != "real":
        if size not in PRESETS[name]:
            reals = [k for k, (a, _) in REAL.items() if a == name]
            raise ExportError(f"unknown size '{size}' for {name} (choose from: "
                              f"{', '.join(list(PRESETS[name]) + reals)})")
        return name, ARCH_TYPES[name], dict(PRESETS[name][size]), f"{name}-{size}"
    if name in REAL and (size == "real" or (size is None and name not in ARCH_TYPES)):
        arch, kwargs = REAL[name]
        return arch, ARCH_TYPES[arch], dict(kwargs), name
    if name in REAL and size is not None:
        raise ExportError(f"'{name}' is a real-size preset; it takes no --size '{size}'")
    if name in ARCH_TYPES:
        reals = [k for k, (a, _) in REAL.items() if a == name]
        raise ExportError(f"--size is required for {name} (tiny, small or {', '.join(reals)})")
    choices = ", ".join(list(ARCH_TYPES) + [k for k in REAL if k not in ARCH_TYPES])
    raise ExportError(f"unknown architecture '{name}' (choose from: {choices})")


# Config keys that give a mixture-of-experts model's expert count (Mixtral, Qwen-MoE / OLMoE, DeepSeek, DBRX's ffn).
MOE_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# Keys of a config.json that describe the checkpoint rather than the model: dropped before building it.
CHECKPOINT_ONLY_KEYS = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


def resolve_config(path):
    """Return (arch, model_type, config kwargs, label) for a user's Hugging Face config.json (the file, or the model
    directory that holds it), refusing what cannot be a decoder language model of transformers' own classes."""
    from transformers import __version__ as hf_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ExportError(f"no config file at {file}" + (" (a model directory holds config.json)"
                                                          if os.path.isdir(path) else ""))
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ExportError(f"{file} is not a JSON config: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{file} is not a Hugging Face config (a JSON object with a model_type)")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ExportError(f"{file} has no model_type (every Hugging Face config.json names one)")
    if raw.get("auto_map"):
        raise ExportError(f"model_type '{model_type}' comes with its own modelling code (auto_map, "
                          "trust_remote_code): llmem builds transformers' own classes only")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ExportError(f"unknown model_type '{model_type}' (transformers {hf_version} has no such model)")
    if raw.get("is_encoder_decoder") or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"'{model_type}' is an encoder-decoder (seq2seq) model: llmem estimates decoder-only "
                          "language models")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ExportError(f"'{model_type}' is an encoder-only (masked LM) model: llmem estimates decoder-only "
                          "language models")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"'{model_type}' has no causal language model class in transformers {hf_version}: "
                          "llmem estimates decoder-only language models")
    experts = max((v for k, v in raw.items() if k in MOE_EXPERT_KEYS and isinstance(v, int)), default=0)
    if experts > 1 and model_type not in BALANCED_MOE_TYPES:
        raise ExportError(f"'{model_type}' is a mixture-of-experts model ({experts} experts) whose routing block "
                          f"is not modelled yet (modelled: {', '.join(BALANCED_MOE_TYPES)})")
    kwargs = {k: v for k, v in raw.items() if k not in CHECKPOINT_ONLY_KEYS and k != "model_type"}
    quant = kwargs.pop("quantization_config", None)
    if isinstance(quant, dict):
        # from_config builds the unquantized model; the quantized layout is llmem's --quant.
        print(f"export_hf.py: note: the config's quantization_config ({quant.get('quant_method', '?')}) is not "
              "part of the export: pass llmem's --quant for quantized weights", file=sys.stderr)
    arch = next((a for a, t in ARCH_TYPES.items() if t == model_type), model_type)
    label = os.path.basename(os.path.dirname(os.path.abspath(file))) or model_type
    return arch, model_type, kwargs, label


def zero_dropout(config):
    """Set every dropout-like probability of the config to 0.0 (modern LLM configs use 0)."""
    for key, value in list(config.to_dict().items()):
        low = key.lower()
        if ("dropout" in low or "pdrop" in low or low == "layerdrop") and isinstance(value, float):
            setattr(config, key, 0.0)


# The most layers and experts a config may ask the exporter to build: every module is a Python object and every
# traced op a graph node, so a config asking for millions would run for hours before failing. The largest
# published decoders have 126 layers (Llama 3.1 405B's config.json) and 256 routed experts (DeepSeek-V3's).
MAX_LAYERS = 1024
MAX_EXPERTS = 4096


def make_config(model_type, kwargs):
    """transformers' config of `model_type` from a config.json's keys, refusing one larger than the exporter builds
    (MAX_LAYERS, MAX_EXPERTS) or with a layer count that is not a positive integer."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = AutoConfig.for_model(model_type, **kwargs)
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise ExportError(f"the config's layer count (num_hidden_layers) is {layers!r}, not a positive integer")
    if layers is not None and layers > MAX_LAYERS:
        raise ExportError(f"the config asks for {layers} layers; the exporter builds at most {MAX_LAYERS} (the "
                          "largest published decoders have 126)")
    experts = [v for k in MOE_EXPERT_KEYS if isinstance(v := getattr(config, k, None), int)]
    if experts and max(experts) > MAX_EXPERTS:
        raise ExportError(f"the config asks for {max(experts)} experts; the exporter builds at most {MAX_EXPERTS}")
    return config


def build_model(arch, model_type, kwargs, device, dtype, keep_dropout, seed):
    from transformers import AutoModelForCausalLM

    config = make_config(model_type, kwargs)
    # SDPA where the model class has it, as from_pretrained's default; eager otherwise (EAGER_FALLBACK lists presets).
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    attn = "eager" if arch in EAGER_FALLBACK or not getattr(model_class, "_supports_sdpa", False) else "sdpa"
    config.use_cache = False
    if not keep_dropout:
        zero_dropout(config)
    torch.manual_seed(seed)
    ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.to(dtype)
    model.train()
    _codegen_positions_as_buffers(model)
    return model, attn


def _codegen_positions_as_buffers(model):
    """CodeGen and GPT-J keep their sin/cos table (`embed_positions`, [n_positions, rotary_dim]) as a plain tensor
    attribute of every attention layer (memory on the GPU once the first forward has moved it there), so the trace bakes one tensor constant per layer. On meta the
    tracer's constant pooling compares those with aten::equal (no meta kernel) and fails; on CPU they
    are constants the C++ side would have to move by hand. Registering the same tensor as a
    non-persistent buffer makes it module state (prim::GetAttr), which moves with the parameters.
    Values and computation are unchanged. Likewise its per-layer 0-dim `scale_attn` tensor, built in
    __init__, is a meta tensor when the model is built on meta: it is rebuilt on the CPU (what a CPU
    build holds), a scalar constant that combines with meta tensors.
    """
    from transformers.models.codegen.modeling_codegen import CodeGenAttention
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    for module in model.modules():
        if not isinstance(module, (CodeGenAttention, GPTJAttention)):
            continue
        if "embed_positions" in module.__dict__:
            table = module.__dict__.pop("embed_positions")
            module.register_buffer("embed_positions", table, persistent=False)
        if isinstance(module.scale_attn, torch.Tensor) and module.scale_attn.device.type == "meta":
            module.scale_attn = torch.sqrt(torch.tensor(module.head_dim, dtype=torch.float32,
                                                        device="cpu")).to(torch.get_default_dtype())


@contextlib.contextmanager
def traceable_bloom_gelu():
    """While tracing, BLOOM's GELU is recorded as aten::gelu(approximate="tanh").

    In train mode BloomGelu calls a torch.autograd.Function (GeLUFunction: tanh-approximate GELU
    that saves only its input and recomputes in backward), which torch.jit.trace cannot record.
    aten::gelu(approximate="tanh") is the same function (constant 0.79788456 vs sqrt(2/pi), |diff|
    ~1e-8) and its backward also saves only the input, so activation memory matches. The swap lasts
    only while tracing: verification compares against HF's own autograd Function.
    """
    from transformers.models.bloom.modeling_bloom import BloomGelu

    saved = BloomGelu.forward
    BloomGelu.forward = lambda self, x: torch.nn.functional.gelu(x, approximate="tanh")
    try:
        yield
    finally:
        BloomGelu.forward = saved


def _expert_slots(expert_idx, slots, num_experts, busiest_percent, device):
    """The (token, choice) slots expert `expert_idx` gets out of `slots`, as an arange (sizes stay symbolic).

    Balanced (busiest_percent 100): the slots s with s % num_experts == expert_idx, i.e. ceil or floor of
    slots / num_experts each. Otherwise expert 0 is the busiest: the first ceil(slots x busiest_percent / 100 /
    num_experts) slots (at most all of them: busiest_percent <= 100 x num_experts), and the other experts share the
    rest round robin."""
    if busiest_percent == 100:
        # range(expert_idx, slots, E) spelled so that arange's end is never below its start (fewer slots than
        # experts, a decode step: the expert gets none, as the model skips an expert no token chose)
        end = expert_idx + (slots - expert_idx + num_experts - 1) // num_experts * num_experts
        return torch.arange(expert_idx, end, num_experts, device=device)
    busy = (slots * busiest_percent + 100 * num_experts - 1) // (100 * num_experts)
    if expert_idx == 0:
        return torch.arange(0, busy, device=device)
    others = num_experts - 1
    start = busy + expert_idx - 1
    end = start + (slots - start + others - 1) // others * others
    return torch.arange(start, end, others, device=device)


def _routed_sparse_moe_forward(busiest_percent):
    """MixtralSparseMoeBlock.forward with a stated routing (_expert_slots) in place of the router's choice."""
    def forward(self, hidden_states):
        return _balanced_sparse_moe_forward(self, hidden_states, busiest_percent)
    return forward


def _balanced_sparse_moe_forward(self, hidden_states, busiest_percent=100):
    """MixtralSparseMoeBlock.forward with the routing taken as balanced: the same ops on the same shapes as
    transformers' loop, except that expert e gets the (token, choice) slots s with s % num_experts == e instead of
    those the router picked (`torch.where(expert_mask[e])`, data-dependent, which a trace cannot keep).

    Every expert then runs ceil or floor of tokens x top_k / num_experts rows, whatever the router says; what
    autograd saves over the layer (every expert's rows, tokens x top_k in all) does not depend on the routing, only
    which expert's transient peak is highest does. The router, its softmax, top-k, one-hot mask and the
    index_add_ of each expert's rows are as in the model. With busiest_percent above 100, expert 0 gets that
    share of the balanced rows (--moe-imbalance), a pessimistic bound for a router that favours one expert.

    Qwen2-MoE's block (Qwen2MoeSparseMoeBlock) is the same loop with its top-k weights normalized only when
    norm_topk_prob says so, and a shared expert every token goes through, scaled by sigmoid(shared_expert_gate(x))
    and added to the routed experts' sum. Both models' count of the experts hit (`expert_mask.sum(...) > 0`,
    nonzero) is left out: a few bytes."""
    import torch.nn.functional as F

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always normalizes
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = torch.zeros((batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
                                      device=hidden_states.device)
    expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    slots = hidden_states.shape[0] * self.top_k
    for expert_idx in range(self.num_experts):
        slot = _expert_slots(expert_idx, slots, self.num_experts, busiest_percent, hidden_states.device)
        idx, top_x = slot % self.top_k, slot.div(self.top_k, rounding_mode="floor")  # torch.where's (choice, token)
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    del expert_mask
    if hasattr(self, "shared_expert"):  # Qwen2-MoE
        shared_expert_output = self.shared_expert(hidden_states)
        shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
        final_hidden_states = final_hidden_states + shared_expert_output
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def moe_routing_record(model, busiest_percent=100):
    """{"experts": E, "top_k": k, "routing": "balanced", "busiest": F} for a model whose MoE blocks the trace routes
    as _expert_slots says (F: the busiest expert's rows over the balanced rows)."""
    blocks = [m for m in model.modules() if isinstance(m, _moe_blocks())]
    if not blocks:
        return None
    return {"experts": blocks[0].num_experts, "top_k": blocks[0].top_k,
            "routing": "balanced" if busiest_percent == 100 else "busiest", "busiest": busiest_percent / 100}


def moe_busiest_percent(model, imbalance):
    """--moe-imbalance F as the integer percent the traced routing uses; ExportError outside [1, experts]."""
    if imbalance is None:
        return 100
    blocks = [m for m in model.modules() if isinstance(m, _moe_blocks())]
    if not blocks:
        raise ExportError("--moe-imbalance applies to a mixture-of-experts model; this one has no MoE block")
    experts = blocks[0].num_experts
    if not 1.0 <= imbalance <= experts:
        raise ExportError(f"--moe-imbalance must be between 1 (balanced) and {experts} (every row on one expert), "
                          f"got {imbalance:g}")
    return int(round(imbalance * 100))


def _moe_blocks():
    """The sparse MoE block classes the balanced stand-in replaces (transformers 4.57: Mixtral, Qwen2-MoE)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    return (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock)


# Model types whose mixture-of-experts block the exporter traces with balanced routing.
BALANCED_MOE_TYPES = ("mixtral", "qwen2_moe")


# The busiest expert's share of the balanced rows the exporter traces, in percent (--moe-imbalance; 100: balanced).
MOE_BUSIEST_PERCENT = [100]


@contextlib.contextmanager
def balanced_moe_routing(busiest_percent=None):
    """While tracing (and while checking the trace), MoE blocks route as _expert_slots says (by default with the
    exporter's --moe-imbalance)."""
    percent = MOE_BUSIEST_PERCENT[0] if busiest_percent is None else busiest_percent
    classes = _moe_blocks()
    saved = [c.forward for c in classes]
    for c in classes:
        c.forward = _routed_sparse_moe_forward(percent)
    try:
        yield
    finally:
        for c, f in zip(classes, saved):
            c.forward = f


@contextlib.contextmanager
def traceable_sdpa_is_causal():
    """While tracing, SDPA's `is_causal` is a bool even where the model computes it from a shape.

    Falcon, Nemotron, OLMoE and DBRX pass `is_causal=q_len > 1` (`causal_mask is None and ...`); under
    torch.jit.trace a size is a traced 0-dim tensor, so that is a Tensor, which the SDPA binding rejects. Its value
    at the trace's shape (every training step has q_len > 1) is what eager takes; transformers' own SDPA
    integration does the same (`is_causal.item()` when tracing). The op and what autograd saves are unchanged.
    """
    functional = torch.nn.functional
    saved = functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        if isinstance(kwargs.get("is_causal"), torch.Tensor):
            kwargs["is_causal"] = bool(kwargs["is_causal"].item())
        return saved(*args, **kwargs)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = saved


def make_inputs(batch, seq, vocab, device, gen=None):
    if device == "meta":
        ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
    else:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.long)
    return ids, ids.clone()


# ---------------------------------------------------------------------------------------------
# Masks. Under torch.jit.trace HF's mask builders do not take the path an untraced training step
# takes, and one of them cannot be traced at all; the two stand-ins below fix that while tracing.
# ---------------------------------------------------------------------------------------------

def _traceable_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None,
                         attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """Stand-in for transformers.masking_utils.sdpa_mask (llama, mistral, qwen2, gpt2, gpt_bigcode).

    HF's version (a) always materialises the [B, 1, S, S] mask under torch.jit.trace, while an
    untraced training step without padding passes mask=None and is_causal=True to SDPA, and (b) builds
    the mask with torch.vmap, which torch.jit.trace cannot record ("unordered_map::at"). This version
    returns None in exactly the case an untraced step does for full causal attention (no padding
    mask, no cache, so query length == key length), and otherwise builds the same boolean mask by
    broadcasting the same mask function over index tensors, so every size stays symbolic. A sliding
    window always gets its mask here: an untraced step skips it while S < window, but deciding that
    at trace time would bake the trace length in (wrong results beyond the window).
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if allow_is_causal_skip and attention_mask is None and local_size is None:
        return None
    device = cache_position.device
    kv_idx = torch.arange(kv_length, device=device) + kv_offset
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    mask = mask_function(b, h, cache_position[None, None, :, None], kv_idx[None, None, None, :])
    # HF's vmap builder returns a materialised, contiguous [B, 1, S, S] bool tensor: do the same, so
    # the trace allocates what the untraced step allocates.
    return mask.expand(batch_size, -1, -1, -1).contiguous()


def _ignore_causal_mask_sdpa_untraced(attention_mask, inputs_embeds, past_key_values_length,
                                      sliding_window=None, is_training=False):
    """Stand-in for AttentionMaskConverter._ignore_causal_mask_sdpa (OPT's mask path).

    Untraced, a training step without padding skips the mask (OPT builds an all-ones 2D mask itself,
    which HF checks with torch.all) and uses SDPA's is_causal; under tracing HF materialises a float
    [B, 1, S, S] mask instead. The exporter never passes a padding mask, so the all-ones mask is the
    only 2D mask seen here.
    """
    if past_key_values_length or sliding_window is not None:
        return False
    return attention_mask is None or attention_mask.dim() == 2


@contextlib.contextmanager
def untraced_masking():
    """Make HF's mask code take, under torch.jit.trace, the path an untraced training step takes."""
    from transformers import masking_utils as mu
    from transformers.modeling_attn_mask_utils import AttentionMaskConverter

    saved = (mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"], mu.sdpa_mask,
             AttentionMaskConverter.__dict__["_ignore_causal_mask_sdpa"])
    mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = _traceable_sdpa_mask
    mu.sdpa_mask = _traceable_sdpa_mask  # eager_mask calls it by its module-level name
    AttentionMaskConverter._ignore_causal_mask_sdpa = staticmethod(_ignore_causal_mask_sdpa_untraced)
    try:
        yield
    finally:
        mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = saved[0]
        mu.sdpa_mask = saved[1]
        AttentionMaskConverter._ignore_causal_mask_sdpa = saved[2]


class _MetaSafeAutocast(torch.autocast):
    """torch.autocast that accepts device_type="meta" (as "cpu").

    HF's rotary embeddings open `torch.autocast(device_type=x.device.type, enabled=False)` to force
    fp32; autocast has no "meta" device. The context is disabled, so it changes nothing but lets a
    meta model run; the trace records no op for it either way.
    """

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@contextlib.contextmanager
def meta_safe_autocast():
    saved = torch.autocast
    torch.autocast = _MetaSafeAutocast
    try:
        yield
    finally:
        torch.autocast = saved


@contextlib.contextmanager
def cpu_scalar_constants():
    """While tracing on meta, build 0-dim torch.tensor(python_number, device=meta) on the CPU.

    gpt_neo creates `torch.tensor(finfo.min, device=attn_weights.device)` in every layer and bloom
    builds its ALiBi slope bases with `torch.tensor(..., device=attention_mask.device)`; on meta these
    become meta tensor constants of the trace, and the tracer's constant pooling
    compares them with aten::equal, which has no meta kernel. A 0-dim CPU tensor is what the CPU
    trace holds anyway, and it combines with meta tensors like any CPU scalar does.
    Likewise an index list (Falcon's multi-query `fused_qkv[..., [-2], :]`), which indexing turns into an index
    tensor on the indexed tensor's device: it is given as a CPU index tensor, which the trace keeps with its values.
    """
    saved = torch.tensor
    saved_getitem = torch.Tensor.__getitem__

    def tensor(data, *args, device=None, **kwargs):
        if isinstance(data, (int, float, bool)) and device is not None and torch.device(device).type == "meta":
            device = "cpu"
        return saved(data, *args, device=device, **kwargs)

    def int_list(index):
        return isinstance(index, list) and index and all(isinstance(i, int) for i in index)

    def getitem(self, index):
        if self.device.type == "meta":
            if int_list(index):
                index = saved(index)
            elif isinstance(index, tuple) and any(int_list(i) for i in index):
                index = tuple(saved(i) if int_list(i) else i for i in index)
        return saved_getitem(self, index)

    torch.tensor = tensor
    torch.Tensor.__getitem__ = getitem
    try:
        yield
    finally:
        torch.tensor = saved
        torch.Tensor.__getitem__ = saved_getitem


def trace(model, batch, seq, vocab, device):
    wrapper = LossWrapper(model)
    wrapper.train()
    ids, labels = make_inputs(batch, seq, vocab, device)
    traced = trace_wrapper(wrapper, ids, labels, device)
    return wrapper, traced, (ids, labels)


@contextlib.contextmanager
def untraced_gptj_positions():
    """GPT-J's attention takes, under torch.jit.trace, a branch of its own (`get_embed_positions`) that copies its
    sinusoid table with `.to(position_ids.device)` always; eager (`_get_embed_positions`) moves it only when the
    devices differ. While tracing, the traced branch does what eager does."""
    from transformers.models.gptj import modeling_gptj

    saved = modeling_gptj.get_embed_positions

    def get_embed_positions(embed_positions, position_ids):
        # eager's own method, so that its ops keep their source line in the model's file (the table is the
        # attention's; a move to another device would rebind it there, which no trace on one device makes)
        holder = types.SimpleNamespace(embed_positions=embed_positions)
        return modeling_gptj.GPTJAttention._get_embed_positions(holder, position_ids)

    modeling_gptj.get_embed_positions = get_embed_positions
    try:
        yield
    finally:
        modeling_gptj.get_embed_positions = saved


@contextlib.contextmanager
def tracing_shims(device):
    """The stand-ins a trace of the forward runs under (either format), so that it records the eager step."""
    meta_ctx = cpu_scalar_constants() if device == "meta" else contextlib.nullcontext()
    with untraced_masking(), meta_safe_autocast(), traceable_bloom_gelu(), traceable_sdpa_is_causal(), \
            balanced_moe_routing(), untraced_gptj_positions(), meta_ctx:
        yield


def trace_wrapper(wrapper, ids, labels, device, autocast_dtype=None):
    """torch.jit.trace of the loss wrapper, under CPU autocast to `autocast_dtype` when given."""
    autocast_ctx = (torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
    with warnings.catch_warnings(), tracing_shims(device), autocast_ctx:
        warnings.simplefilter("ignore")  # TracerWarnings: --verify checks other shapes instead
        return torch.jit.trace(wrapper, (ids, labels), check_trace=False, strict=False)


# ---------------------------------------------------------------------------------------------
# Graph inspection and verification.
# ---------------------------------------------------------------------------------------------

def inlined_graph(module):
    graph = module.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    return graph


def _nodes(block):
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def op_counts(graph):
    return collections.Counter(n.kind() for n in _nodes(graph))


def baked_constants(graph):
    """Device constants and tensor constants in the trace (the C++ side must handle them)."""
    devices, tensors = collections.Counter(), []
    for node in _nodes(graph):
        if node.kind() != "prim::Constant" or not node.hasAttribute("value"):
            continue
        out_type = node.output().type()
        if isinstance(out_type, torch._C.DeviceObjType):
            devices[str(node.output().toIValue())] += 1
        elif node.kindOf("value") == "t":
            t = node.t("value")
            tensors.append(f"{list(t.shape)}:{str(t.dtype).replace('torch.', '')}:{t.device}")
    return devices, tensors


def verify_cpu(model, path, vocab, trace_shape, seed):
    """Loaded TorchScript loss == eager loss at shapes other than the trace shape."""
    loaded = torch.jit.load(path, map_location="cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    wrapper = LossWrapper(model)
    results = []
    for batch, seq in VERIFY_SHAPES:
        if (batch, seq) == trace_shape:
            continue
        ids, labels = make_inputs(batch, seq, vocab, "cpu", gen)
        with torch.no_grad(), balanced_moe_routing():  # the routing the trace takes (MoE models)
            want = wrapper(ids, labels).float()
            got = loaded(ids, labels).float()
        diff = (want - got).abs().item()
        tol = (1e-4 if model.dtype == torch.float32 else 2e-2) * max(1.0, abs(want.item()))
        if got.dim() != 0 or not torch.isfinite(got) or diff > tol:
            raise RuntimeError(f"verification FAILED at B={batch} S={seq}: eager loss {want.item():.6f}, "
                               f"TorchScript loss {got.item():.6f} (|diff| {diff:.3g} > {tol:.3g})")
        results.append((batch, seq, want.item(), got.item(), diff))
    return results


def verify_meta(path, trace_shape):
    """The file loads on meta and runs forward and backward at shapes other than the trace shape.

    Returns ([(B, S), ...], note). Runs with graph-executor optimization off, as the C++ side does
    (torch::jit::setGraphExecutorOptimize(false)): the optimizing executor pools constants with
    aten::equal, which has no meta kernel; with gradients on it fails from the second call on for
    some architectures (bloom). The note says whether the default executor also works.
    """
    # Load as saved: the parameters are meta already. map_location="meta" fails in the loader with
    # "aten::equal ... Meta tensors": the loader pools equal tensor constants, and the trace's 0-dim
    # CPU scalar constants would be moved to meta too.
    loaded = torch.jit.load(path)
    out = []
    with torch.jit.optimized_execution(False):
        for batch, seq in VERIFY_SHAPES + [trace_shape]:
            ids, labels = make_inputs(batch, seq, 0, "meta")
            loss = loaded(ids, labels)
            if loss.device.type != "meta" or loss.dim() != 0 or not loss.requires_grad:
                raise RuntimeError(f"meta verification FAILED at B={batch} S={seq}: got shape "
                                   f"{list(loss.shape)} on {loss.device}")
            loss.backward()
            out.append((batch, seq))
    fresh = torch.jit.load(path)
    try:
        for batch, seq in VERIFY_SHAPES:
            ids, labels = make_inputs(batch, seq, 0, "meta")
            fresh(ids, labels).backward()
        note = "default (optimizing) executor also runs"
    except Exception as exc:  # noqa: BLE001 - a property of the file worth knowing, not an error
        note = f"default (optimizing) executor fails from the 2nd call ({_first_line(exc)[:40]})"
    return out, note


def _first_line(exc):
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def meta_checks(path, shape=(1, 37)):
    """How a CPU-traced file can run on meta (what the C++ side has to do). Returns report lines."""
    ids = torch.empty(*shape, dtype=torch.long, device="meta")
    report = []
    try:
        torch.jit.load(path, map_location="meta")(ids, ids)
        report.append("map_location=meta: runs")
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        report.append(f"map_location=meta: fails ({_first_line(exc)})")
    module = torch.jit.load(path, map_location="cpu")
    for _, sub in module.named_modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            sub._c.setattr(name, torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                    requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub._c.setattr(name, torch.empty_like(b, device="meta"))
    graph = inlined_graph(module)
    try:
        torch._C._create_function_from_graph("forward_meta", graph.copy())(module._c, ids, ids)
        report.append("params moved to meta: runs as is")
        return report
    except Exception as exc:  # noqa: BLE001
        report.append(f"params moved to meta: fails ({_first_line(exc)})")
    rewritten = 0
    for node in list(graph.nodes()):
        if (node.kind() == "prim::Constant" and isinstance(node.output().type(), torch._C.DeviceObjType)
                and str(node.output().toIValue()) != "meta"):
            with graph.insert_point_guard(node):
                new = graph.insertConstant(torch.device("meta"))
            node.output().replaceAllUsesWith(new)
            node.destroy()
            rewritten += 1
    fn = torch._C._create_function_from_graph("forward_meta", graph)
    try:
        out = fn(module._c, ids, ids)
        report.append(f"params moved to meta + {rewritten} Device constant(s) rewritten to meta: "
                      f"runs (loss on {out.device}, shape {list(out.shape)})")
        return report
    except Exception as exc:  # noqa: BLE001
        report.append(f"params moved to meta + device constants rewritten: fails ({_first_line(exc)})")
    # The optimizing graph executor pools constants with aten::equal, which has no meta kernel
    # (gpt_neo: its per-layer meta buffers become constants there); unoptimized it runs.
    try:
        with torch.jit.optimized_execution(False):
            out = fn(module._c, ids, ids)
        report.append(f"... with graph-executor optimization off: runs (loss on {out.device})")
    except Exception as exc:  # noqa: BLE001
        report.append(f"... with graph-executor optimization off: fails ({_first_line(exc)})")
    return report


# Committed weight-free files must stay below 2 MiB. A meta export above this size is rewritten
# without its TorchScript debug info (the code/**.debug_pkl source-range records, ~40% of the file;
# only error messages use them), then verified like any other file.
STRIP_DEBUG_ABOVE = int(1.75 * 1024 * 1024)


def strip_debug_info(path):
    """Rewrite the TorchScript archive at `path` without its *.debug_pkl records (atomically)."""
    import zipfile

    tmp = path + ".strip.tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            if not item.filename.endswith(".debug_pkl"):
                dst.writestr(item, src.read(item.filename))
    torch.jit.load(tmp)  # must still load; verification runs it afterwards
    os.replace(tmp, path)


# The export carries what its graph cannot tell: a RoPE model's position limit lives only in the config.
# llmem reads this extra file (torch::jit::load(path, device, extra_files)).
CONFIG_FILE = "hf_config.json"


def causal_mask_kind(model):
    """Which causal mask the model's modeling file builds, from its source (see config_record): transformers'
    masking_utils (create_causal_mask, create_sliding_window_causal_mask) or its own."""
    source = inspect.getsource(sys.modules[type(model).__module__])
    return "create_causal_mask" if "masking_utils import" in source else "legacy"


def logits_dtype_kind(model, device):
    """What the forward without labels (generate()'s) returns as logits: "lm_head" (the LM head's output, in the
    weights' dtype) or "float32" (GPT-J and CodeGen cast it: `self.lm_head(h).to(torch.float32)`); None when a
    forward cannot run here. Found with a hook that hands back the head's output
    in another dtype: logits in that dtype are the head's output itself."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    other = torch.float16 if head.weight.dtype != torch.float16 else torch.bfloat16
    hook = head.register_forward_hook(lambda module, args, out: out.to(other))
    training = model.training
    model.eval()
    try:
        # On meta, on fake CPU tensors: a meta forward fails in some models' CPU-only code.
        # (its mask code then as untraced: fake tensors cannot answer `torch.all(mask == 1)`)
        with torch.no_grad(), (fake_cpu_tensors(model) if device == "meta" else contextlib.nullcontext()) as fake, \
                (untraced_masking() if fake else contextlib.nullcontext()):
            ids = fake(1, 2) if fake else torch.zeros((1, 2), dtype=torch.long, device=device)
            out = model(input_ids=ids, use_cache=False)
    except Exception:  # noqa: BLE001 (any failure of the probe leaves the record unknown)
        return None
    finally:
        hook.remove()
        model.train(training)
    if out.logits.dtype == other:
        return "lm_head"
    return "float32" if out.logits.dtype == torch.float32 else None


def config_record(config, dtype, logits_to_keep, eos_token_id, causal_mask, logits_dtype=None,
                  no_split_modules=None, moe_routing=None):
    """The config fields llmem reads, as JSON: model_type, max_position_embeddings (None when the architecture has
    none, e.g. BLOOM's ALiBi), rope_scaling, sliding_window, use_sliding_window and layer_types (a generation cache
    keeps only the window, in the layers that have one), the dtype the export was traced in, whether the model's
    forward takes logits_to_keep (generate() then computes the prompt's logits at its last position only; a forward
    without it computes them at every position), the generation config's eos_token_id (without one, generate() adds
    no min-length logits processors), which causal mask the model builds: "create_causal_mask" (transformers'
    masking_utils: a bool mask, sliding-window ones included) or "legacy" (the model's own _update_causal_mask: a
    mask in the model's dtype), what the forward without labels returns as logits (logits_dtype_kind), whether the
    config has a base_model_tp_plan (what from_pretrained(tp_plan="auto") splits), the module classes
    from_pretrained(device_map="auto") never splits over devices (model._get_no_split_modules), and a
    mixture-of-experts model's experts and top-k, traced with balanced routing (moe_routing_record)."""
    return json.dumps({
        "causal_mask": causal_mask,
        "logits_dtype": logits_dtype,
        "tp_plan": bool(getattr(config, "base_model_tp_plan", None)),
        "no_split_modules": no_split_modules,
        "logits_to_keep": logits_to_keep,
        "eos_token_id": eos_token_id,
        "model_type": config.model_type,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rope_scaling": getattr(config, "rope_scaling", None),
        "sliding_window": getattr(config, "sliding_window", None),
        "layer_types": getattr(config, "layer_types", None),
        "use_sliding_window": getattr(config, "use_sliding_window", None),
        "torch_dtype": dtype,
        "moe_routing": moe_routing,
    }, sort_keys=True)


# Which child-module calls of each module's forward hand their result to an enclosing expression
# (`self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`) rather than binding it to a name: CPython
# frees such a temporary as soon as the expression has used it, which the graph cannot tell from a bound local.
EXPRESSION_CALLS_FILE = "expression_calls.json"


def _module_forwards(model):
    """(module, the parsed source of its class's forward, its child attribute names) once per module class that has
    children and whose forward's source can be read."""
    import ast
    import inspect
    import textwrap

    seen = set()
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in seen or not list(module.named_children()):
            continue
        seen.add(cls.__name__)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
        except (OSError, TypeError, SyntaxError):
            continue
        yield module, tree, {name for name, _ in module.named_children()}


def expression_call_record(model):
    """JSON {module class name: [child attribute, ...]} of the children every one of whose calls in the class's
    forward is nested in a larger expression (an argument, an operand, the object of a method call) or discarded;
    a call whose result is assigned, returned or subscripted counts as bound."""
    import ast

    record = {}
    for module, tree, children in _module_forwards(model):
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        nested, bound = set(), set()
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
                    and node.func.attr in children):
                continue
            parent = parents.get(node)
            binds = isinstance(parent, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Return, ast.Subscript,
                                        ast.Tuple, ast.List, ast.Starred, ast.NamedExpr, ast.Yield))
            (bound if binds else nested).add(node.func.attr)
        record[type(module).__name__] = sorted(nested - bound)
    return json.dumps(record, sort_keys=True)


# When a frame drops a child call's result that it bound to a name (`hidden_states = self.input_layernorm(x)`):
# the graph shows only that the value leaves the call, so without this record llmem holds it until the frame
# returns. The name is rebound by a later statement of the same forward (`hidden_states, _ = self.self_attn(...)`),
# and CPython frees the old tensor then.
REBOUND_NAMES_FILE = "rebound_names.json"

_REBINDING_BLOCKS = ("body", "orelse")  # statement lists of `if`/`with` run straight through, `for`/`while` do not


def _statement_blocks(function):
    """(statement, chain of enclosing statement lists from the function body in) for every statement of the
    function outside loops, try blocks and nested definitions, in source order."""
    import ast

    out = []

    def visit(block, chain):
        for stmt in block:
            out.append((stmt, chain))
            if isinstance(stmt, (ast.If, ast.With)):
                for field in _REBINDING_BLOCKS:
                    inner = getattr(stmt, field, None)
                    if inner:
                        visit(inner, chain + (id(inner),))

    visit(function.body, (id(function.body),))
    return out


def _child_call(node, children):
    """The child attribute that `node` calls as `self.child(...)` or `self.child(...)[k]`, else None."""
    import ast

    if isinstance(node, ast.Subscript):
        node = node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self" and node.func.attr in children):
        return node.func.attr
    return None


def _assigned_names(stmt):
    """Names an assignment statement binds, in target order (None for a target that is not a plain name)."""
    import ast

    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    else:
        return []
    names = []
    for target in targets:
        for t in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
            names.append(t.id if isinstance(t, ast.Name) else None)
    return names


def _holds_another_reference(stmt, name):
    """Whether `stmt` may keep the tensor bound to `name` alive beyond the name: it copies the name
    (`residual = x`), packs it (`(x,)`, `[x]`, `{k: x}`), hands it to a call other than a child module or a torch
    function, captures it (lambda), updates it in place (`x += y`) or returns or yields it."""
    import ast

    parents = {child: node for node in ast.walk(stmt) for child in ast.iter_child_nodes(node)}
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
        return True
    for node in ast.walk(stmt):
        if not (isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)):
            continue
        parent = parents.get(node, stmt)
        if isinstance(parent, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.Attribute, ast.Subscript, ast.If,
                               ast.IfExp, ast.BoolOp)):
            continue
        if isinstance(parent, ast.keyword):
            parent = parents.get(parent)
        if isinstance(parent, ast.Call):
            func = parent.func
            owner = func.value if isinstance(func, ast.Attribute) else None
            while isinstance(owner, ast.Attribute):
                owner = owner.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "torch", "F", "nn"):
                continue
            if isinstance(func, ast.Name) and func.id in ("len", "isinstance", "getattr", "hasattr"):
                continue
        return True
    return False


def _self_attributes(stmt):
    import ast

    return {n.attr for n in ast.walk(stmt)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}


def _rebinding_of(sites, index, children):
    """For the call site sites[index] = `X = self.c(...)` (or `X, ... = ...`): (the children its frame may call
    before X is rebound, the child whose call rebinds X or None when the rebinding statement calls none, the count
    of statements that rebind X in turn from X in the frame's own code: 0 for a child rebinder), or None when the
    forward does not plainly rebind X while no other reference holds the tensor. An own-code rebinding may lie in a
    block the call's does not (Gemma-2's `if self.config.final_logit_softcapping is not None:`): whether it ran is
    the trace's to say."""
    import ast

    stmt, chain = sites[index]
    names = _assigned_names(stmt)
    if not names or names[0] is None:
        return None
    name = names[0]
    between = set()
    for later, later_chain in sites[index + 1:]:
        if name in _assigned_names(later):
            value = getattr(later, "value", None)
            rebinder = _child_call(value, children) if value is not None else None
            # A child rebinder runs whenever the binding did: it lies in the same statement list or an enclosing one.
            nested = later_chain != chain[:len(later_chain)] and later_chain[:len(chain)] != chain
            if nested or (rebinder is not None and later_chain != chain[:len(later_chain)]) \
                    or _holds_another_reference(later, name):
                return None
            # Children the rebinding statement calls before its rebinder returns (its arguments) run while X is bound.
            between |= (_self_attributes(later) & children) - {rebinder}
            own = 0
            if rebinder is None:
                # `X = X / c; X = torch.tanh(X); X = X * c`: consecutive statements of the block, each from X alone.
                position = next(i for i, (s, _) in enumerate(sites) if s is later)
                for follow, follow_chain in sites[position:]:
                    follow_value = getattr(follow, "value", None)
                    reads = follow_value is not None and any(
                        isinstance(n, ast.Name) and n.id == name for n in ast.walk(follow_value))
                    if (follow_chain != later_chain or _assigned_names(follow) != [name] or not reads
                            or _self_attributes(follow) & children or _holds_another_reference(follow, name)):
                        break
                    own += 1
            return sorted(between), rebinder, own
        if _holds_another_reference(later, name):
            return None
        if isinstance(later, (ast.If, ast.With)):
            # Only the statement's own expressions: the statements of its blocks come as sites of their own.
            for part in [getattr(later, "test", None)] + list(getattr(later, "items", [])):
                if part is not None:
                    between |= _self_attributes(part) & children
        else:
            between |= _self_attributes(later) & children  # a loop's body may call any child it names
    return None


def rebound_name_record(model):
    """JSON {module class name: {child attribute: {"between": [...], "rebinder": [...], "one_of_several": bool,
    "own_rebindings": N}}}
    for the children whose every call in the class's forward binds its result to a name X that a later statement
    rebinds, with no other reference to the tensor taken meanwhile. "between": children the frame may call after
    the call and before the rebinding; "rebinder": children whose call is the rebinding statement (its result is
    assigned to X once that call returns), empty when the rebinding statement calls no child, so X is dropped
    before the next child call outside "between". "one_of_several": X is one element of the call's result
    (`hidden_states, weights = self.self_attn(...)`, `x = self.block(...)[0]`), so the rule holds for the call's
    result only when it returns a single tensor. "own_rebindings": with no rebinder, how many statements of the
    frame's own code rebind X in turn, each from the value before (`logits = logits / c`, then `torch.tanh`)."""
    import ast

    record = {}
    for module, tree, children in _module_forwards(model):
        function = tree.body[0]
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        sites = _statement_blocks(function)
        reachable = {id(s) for s, _ in sites}
        calls = {}  # child -> every call site, or None when one cannot be analysed
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and _child_call(node, children):
                calls.setdefault(node.func.attr, [])
        for child in calls:
            rules = []
            for stmt in ast.walk(function):
                if not isinstance(stmt, ast.stmt) or stmt is function:
                    continue
                inside = [n for n in ast.walk(stmt) if isinstance(n, ast.Call) and _child_call(n, children) == child]
                own = [n for n in inside if not any(n in ast.walk(s) for s in ast.iter_child_nodes(stmt)
                                                    if isinstance(s, ast.stmt))]
                if not own:
                    continue
                value = getattr(stmt, "value", None)
                if (len(own) != 1 or id(stmt) not in reachable or not isinstance(stmt, ast.Assign)
                        or _child_call(value, children) != child):
                    rules = None
                    break
                rule = _rebinding_of(sites, next(i for i, (s, _) in enumerate(sites) if s is stmt), children)
                if rule is None:
                    rules = None
                    break
                rules.append((rule, len(_assigned_names(stmt)) > 1 or isinstance(value, ast.Subscript)))
            if rules:
                record.setdefault(type(module).__name__, {})[child] = {
                    "between": sorted(set().union(*(set(r[0][0]) for r in rules))),
                    "rebinder": sorted({r[0][1] for r in rules if r[0][1] is not None}),
                    "one_of_several": any(r[1] for r in rules),
                    # the fewest, so that no call site's chain is walked past its end
                    "own_rebindings": min(r[0][2] for r in rules),
                }
    return json.dumps(record, sort_keys=True)


# The graph bakes every `x.to(y.dtype)` as a cast to the dtype y had at trace time (fp32), which cannot be told
# from a literal `.float()`. Under autocast y may be 16-bit: this extra file says, per aten::to of the saved
# graph (graph order), whether a trace under autocast casts to autocast's 16-bit dtype there (true), not
# (false) or unknown (null). llmem reads it when it models the eager program under an autocast precision.
AUTOCAST_CASTS_FILE = "autocast_casts.json"


def _cast_sites(graph):
    """The aten::to nodes of an inlined graph in graph order, as (traced source line, ScalarType argument)."""
    sites = []
    for node in _nodes(graph):
        if node.kind() != "aten::to":
            continue
        inputs = list(node.inputs())
        target = None
        for i in (1, 2):  # to.dtype / to.dtype_layout: argument 1; to.device: argument 2
            if i < len(inputs) and inputs[i].node().kind() == "prim::Constant" \
                    and isinstance(inputs[i].type(), torch._C.IntType):
                target = inputs[i].toIValue()
                break
        sites.append((_model_frame(str(node.sourceRange())), target))
    return sites


def _model_frame(source_range):
    """The innermost frame of a traced op's source range outside this exporter (its tracing shims, e.g.
    cpu_scalar_constants, call the op for the model's line)."""
    lines = [ln.strip() for ln in source_range.split("\n") if ln.strip()]
    here = os.path.abspath(__file__)
    for line in lines:
        if not line.startswith(here):
            return line
    return lines[0] if lines else ""


def autocast_targets(plain_sites, autocast_sites, low_dtype):
    """Per cast of the plain trace: does the autocast trace's cast at the same place target `low_dtype`?

    Casts are paired in order within one source line, only where both traces have as many casts at that
    line: autocast adds its own casts (at the line of the op it casts for, e.g. inside F.linear), which
    makes pairing at such a line ambiguous (None)."""
    by_line = collections.defaultdict(list)
    for line, target in autocast_sites:
        by_line[line].append(target)
    plain_count = collections.Counter(line for line, _ in plain_sites)
    seen = collections.Counter()
    result = []
    for line, _ in plain_sites:
        paired = by_line.get(line, [])
        if not line or len(paired) != plain_count[line]:
            result.append(None)
        else:
            target = paired[seen[line]]
            result.append(None if target is None else target == low_dtype)
        seen[line] += 1
    return result


def autocast_takes_effect(device):
    """CPU autocast acts on CPU tensors only: on meta a matmul stays fp32 and a trace would show no cast."""
    x = torch.empty(2, 2, device=device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.mm(x, x).dtype == torch.bfloat16


# c10::ScalarType codes of the dtypes a cast names (the int constant of a traced aten::to).
SCALAR_TYPE_CODES = {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}
# Tensor methods a trace records as aten::to, and the dtype each names (None: an argument names it).
CAST_METHODS = {"to": None, "float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                "double": torch.float64}


def _named_dtype(name, args, kwargs):
    if CAST_METHODS[name] is not None:
        return CAST_METHODS[name]
    for a in list(args[1:]) + [kwargs.get("dtype")]:
        if isinstance(a, torch.dtype):
            return a
    return None


@contextlib.contextmanager
def fake_cpu_tensors(module):
    """Within: FakeTensorMode, with the module's meta parameters and buffers swapped for fake CPU tensors (restored
    on exit); yields fake_ids(batch, seq), which makes fake CPU token ids.

    FakeTensorMode's tensors say they are on the CPU while holding no data, so a meta model's forward runs there as
    on the CPU (CPU autocast, CPU-only code paths) at no memory cost. A draw the forward branches on (OPT's
    layerdrop, `torch.rand([]) < p`) is made real, as eager makes it; other data-dependent code raises."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    class RealDraws(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.rand and not any(isinstance(a, int) or a for a in args):
                with unset_fake_temporarily():
                    return torch.rand(())
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
                with unset_fake_temporarily():  # real inputs only (such a draw): a real result to branch on
                    return func(*args, **kwargs)
            return func(*args, **kwargs)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    converter = mode.fake_tensor_converter
    cpu = torch.device("cpu")
    saved = []
    try:
        with mode:
            for sub in module.modules():
                for store in (sub._parameters, sub._buffers):
                    for key, t in store.items():
                        if t is not None and t.device.type == "meta":
                            saved.append((store, key, t))
                            fake = converter.from_meta_and_device(mode, t.data, cpu)
                            store[key] = torch.nn.Parameter(fake, t.requires_grad) if isinstance(
                                t, torch.nn.Parameter) else fake
            with RealDraws():
                yield lambda batch, seq: converter.from_meta_and_device(
                    mode, torch.empty(batch, seq, dtype=torch.long, device="meta"), cpu)
    finally:
        for store, key, t in saved:
            store[key] = t


def fake_cpu_cast_sites(wrapper, batch, seq):
    """The casts of one forward of a meta-device wrapper run under CPU autocast on fake CPU tensors
    (fake_cpu_tensors), as (source line, ScalarType code) in the order they ran; None when that forward cannot run.

    CPU autocast acts on CPU tensors only, so a meta model shows no autocast dtype; on fake CPU tensors autocast
    dispatches as on the CPU (its own casts, the 16-bit results a model's `x.to(input_dtype)` then follows).
    torch.jit.trace cannot run on fake tensors, so the forward runs eagerly and a TorchFunctionMode records each
    cast at its caller's line, in the form a trace's source range gives (`file(line): function`)."""
    import sys as _sys
    from torch.overrides import TorchFunctionMode

    sites = []

    def caller():
        frame = _sys._getframe(2)
        return f"{frame.f_code.co_filename}({frame.f_lineno}): {frame.f_code.co_name}"

    class CastRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in CAST_METHODS and getattr(func, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase):
                sites.append((caller(), SCALAR_TYPE_CODES.get(_named_dtype(name, args, kwargs))))
            elif func is torch.tensor and isinstance(kwargs.get("dtype"), torch.dtype):
                # a trace records torch.tensor(x, dtype=d) as a constant cast to d (GPT-Neo's mask value)
                sites.append((caller(), SCALAR_TYPE_CODES.get(kwargs["dtype"])))
            return func(*args, **kwargs)

    try:
        with fake_cpu_tensors(wrapper) as fake_ids:
            ids = fake_ids(batch, seq)
            with warnings.catch_warnings(), untraced_masking(), traceable_bloom_gelu(), balanced_moe_routing(), \
                    torch.autocast("cpu", dtype=torch.bfloat16), CastRecorder():
                warnings.simplefilter("ignore")
                wrapper(ids, ids)
    except Exception:  # noqa: BLE001 - a forward fake tensors cannot run (data-dependent code): no record
        return None
    return sites


def autocast_cast_record(wrapper, traced, ids, labels, device):
    """AUTOCAST_CASTS_FILE's JSON for the saved trace; on meta from a forward on fake CPU tensors (None when that
    cannot run)."""
    plain = _cast_sites(inlined_graph(traced))
    if autocast_takes_effect(device):
        under_autocast = _cast_sites(inlined_graph(
            trace_wrapper(wrapper, ids, labels, device, autocast_dtype=torch.bfloat16)))
    else:
        under_autocast = fake_cpu_cast_sites(wrapper, ids.shape[0], ids.shape[1])
        if under_autocast is None:
            return None
    targets = autocast_targets(plain, under_autocast, 15)  # c10 BFloat16
    return json.dumps({"aten_to_count": len(plain), "to_autocast_dtype": targets})


def check_trace_shape(trace_batch, trace_seq):
    # Batch 1 and length 1 are special cases HF branches on in Python, which the trace would bake in:
    # at batch 1 the position ids are not expanded to the batch (the packed-sequence mask then has
    # batch 1 and indexing it fails at B > 1); at length 1 SDPA's is_causal is dropped.
    if trace_batch < 2 or trace_seq < 2:
        raise ExportError("--trace-batch and --trace-seq must be >= 2 (HF special-cases 1, which "
                          "would be baked into the trace)")


def export_one(name, size, out, device="cpu", dtype="float32", trace_batch=2, trace_seq=16,
               keep_dropout=False, verify=True, list_ops=False, seed=0, quiet=False, config=None,
               fmt="torchscript", moe_imbalance=None):
    try:
        return _export_one(name, size, out, device, dtype, trace_batch, trace_seq, keep_dropout, verify, list_ops,
                           seed, quiet, config, fmt, moe_imbalance)
    finally:
        MOE_BUSIEST_PERCENT[0] = 100


def _export_one(name, size, out, device, dtype, trace_batch, trace_seq, keep_dropout, verify, list_ops, seed, quiet,
                config, fmt, moe_imbalance):
    arch, model_type, kwargs, label = resolve_config(config) if config else resolve(name, size)
    if device not in ("cpu", "meta"):
        raise ExportError(f"unknown device '{device}' (choose cpu or meta)")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype '{dtype}' (choose from: {', '.join(DTYPES)})")
    check_trace_shape(trace_batch, trace_seq)
    start = time.time()
    if fmt not in FORMATS:
        raise ExportError(f"unknown format '{fmt}' (choose from: {', '.join(FORMATS)})")
    model, attn = build_model(arch, model_type, kwargs, device, DTYPES[dtype], keep_dropout, seed)
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters())
    MOE_BUSIEST_PERCENT[0] = moe_busiest_percent(model, moe_imbalance)
    if fmt == "pt2":
        traced = None
        wrapper = LossWrapper(model)
        wrapper.train()
        ids, labels = make_inputs(trace_batch, trace_seq, vocab, device)
    else:
        wrapper, traced, (ids, labels) = trace(model, trace_batch, trace_seq, vocab, device)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters  # as generate() tests it
    extra = {CONFIG_FILE: config_record(model.config, dtype, keeps_logits,
                                           getattr(model.generation_config, "eos_token_id", None),
                                           causal_mask_kind(model), logits_dtype_kind(model, device),
                                           sorted(model._get_no_split_modules("auto")),
                                           moe_routing_record(model, MOE_BUSIEST_PERCENT[0])),
             EXPRESSION_CALLS_FILE: expression_call_record(model),
             REBOUND_NAMES_FILE: rebound_name_record(model)}
    if fmt == "pt2":
        return export_program_one(model, wrapper, ids, labels, out, extra, dict(
            arch=arch, label=label, attn=attn, params=params, path=out, dtype=dtype, device=device,
            format=fmt), start, verify, keep_dropout, seed, quiet, list_ops)
    casts = autocast_cast_record(wrapper, traced, ids, labels, device)
    if casts is not None:
        extra[AUTOCAST_CASTS_FILE] = casts
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    traced.save(out, _extra_files=extra)
    stripped = device == "meta" and os.path.getsize(out) > STRIP_DEBUG_ABOVE
    if stripped:
        strip_debug_info(out)
    trace_seconds = time.time() - start
    info = dict(arch=arch, label=label, attn=attn, params=params, path=out,
                bytes=os.path.getsize(out), dtype=dtype, device=device, stripped=stripped)
    if verify:
        if device == "meta":
            info["verified"], info["meta_note"] = verify_meta(out, (trace_batch, trace_seq))
        elif keep_dropout and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)):
            info["verified"] = "skipped (dropout kept, losses are random)"
        else:
            info["verified"] = verify_cpu(model, out, vocab, (trace_batch, trace_seq), seed)
    info["seconds"] = time.time() - start
    info["trace_seconds"] = trace_seconds
    graph = inlined_graph(traced)
    info["ops"] = op_counts(graph)
    info["devices"], info["tensor_constants"] = baked_constants(graph)
    if device == "cpu" and verify and not quiet:  # informational; --all skips it for speed
        info["meta_checks"] = meta_checks(out)
    if not quiet:
        print_info(info, list_ops)
    return info


def export_program_one(model, wrapper, ids, labels, out, extra, info, start, verify, keep_dropout, seed, quiet,
                       list_ops):
    """The .pt2 half of export_one: torch.export of the wrapper, its autocast record, save, verify."""
    device = info["device"]
    program = program_export.export_program(wrapper, ids, labels, lambda: tracing_shims(device))
    program_export.trim_machinery_frames(program)
    program_export.restore_cudnn_flag(program)
    sites, names = program_export.cast_sites(program, os.path.abspath(__file__), SCALAR_TYPE_CODES)
    under_autocast = fake_cpu_cast_sites(wrapper, ids.shape[0], ids.shape[1])
    if under_autocast is not None:
        extra[AUTOCAST_CASTS_FILE] = program_export.autocast_cast_record(
            names, autocast_targets(sites, under_autocast, 15))  # c10 BFloat16
    extra[program_export.MODULE_TREE_FILE] = program_export.module_tree_record(wrapper)
    program_export.save_program(program, out, extra)
    info.update(bytes=os.path.getsize(out), stripped=False, trace_seconds=time.time() - start)
    if verify:
        if keep_dropout and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)):
            info["verified"] = "skipped (dropout kept, losses are random)"
        else:
            info["verified"] = program_export.verify_program(
                out, wrapper, model.config.vocab_size, VERIFY_SHAPES, tuple(ids.shape), device, seed, make_inputs,
                balanced_moe_routing)
    info["seconds"] = time.time() - start
    info["ops"] = collections.Counter(str(n.target) for n in program_export.program_nodes(program))
    info["devices"], info["tensor_constants"] = {}, []
    if not quiet:
        print_info(info, list_ops)
    return info


def human(n):
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n}"
        n /= 1000
    return f"{n:.1f}T"


def print_info(info, list_ops):
    print(f"{info['label']}: arch={info['arch']} attn={info['attn']} dtype={info['dtype']} "
          f"device={info['device']} params={info['params']} ({human(info['params'])}) "
          f"file={info['path']} size={info['bytes']} bytes ({info['bytes'] / 1024:.0f} KiB) "
          f"time={info['seconds']:.1f}s (trace+save {info['trace_seconds']:.1f}s)"
          + (" [debug info stripped]" if info.get("stripped") else ""))
    v = info.get("verified")
    if isinstance(v, list) and v and len(v[0]) == 5:
        for b, s, want, got, diff in v:
            print(f"  verified B={b} S={s}: eager {want:.6f} {info.get('format', 'torchscript')} {got:.6f} "
                  f"|diff| {diff:.2e}")
    elif isinstance(v, list):
        print("  verified on meta at " + ", ".join(f"B={b} S={s}" for b, s in v)
              + (f"; {info['meta_note']}" if info.get("meta_note") else ""))
    elif v is not None:
        print(f"  verification {v}")
    if info["devices"]:
        print("  baked device constants: " + ", ".join(f"{d} x{n}" for d, n in info["devices"].items()))
    if info["tensor_constants"]:
        c = collections.Counter(info["tensor_constants"])
        print(f"  tensor constants: {len(info['tensor_constants'])}: "
              + ", ".join(f"{k} x{n}" for k, n in sorted(c.items())))
    for line in info.get("meta_checks", []):
        print("  on meta: " + line)
    if list_ops:
        print("  ops of the inlined forward graph:")
        for kind, n in sorted(info["ops"].items()):
            print(f"    {kind} {n}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse prints usage + message), exit 2
        raise ExportError(message)


def parse_args(argv):
    p = _Parser(
        prog="export_hf.py",
        description="Export a Hugging Face decoder (random weights, built from a config) to a "
                    "TorchScript file whose forward(input_ids, labels) returns the training loss.",
        epilog="Architectures: " + ", ".join(ARCH_TYPES) + " (sizes: tiny, small). Real sizes: "
               + ", ".join(REAL) + " (as ARCH, or as --size of their architecture). Dropout: every dropout probability is set to 0.0 "
               "unless --keep-dropout (modern LLM fine-tuning configs use 0).",
    )
    p.add_argument("arch", nargs="?", help="architecture key or real-size preset")
    p.add_argument("--size", help="tiny, small, or a real-size name of the architecture (e.g. "
                   "llama --size llama-2-7b); not needed when ARCH is a real-size name")
    p.add_argument("--out", help="output .pt file")
    p.add_argument("--config", metavar="PATH", help="a Hugging Face config.json (or the model directory holding "
                   "it) of any decoder model_type transformers builds, instead of ARCH")
    p.add_argument("--all", metavar="OUTDIR", help="export every architecture at --size into OUTDIR "
                   "as <arch>-<size>.pt")
    p.add_argument("--device", default="cpu", help="cpu (random weights) or meta (structure only, "
                   "no weights: a small file even for 70B)")
    p.add_argument("--dtype", default="float32", help="parameter dtype: float32 (default), "
                   "bfloat16, float16")
    p.add_argument("--trace-batch", type=int, default=2, help="batch size traced at (>= 2)")
    p.add_argument("--trace-seq", type=int, default=16, help="sequence length traced at (>= 2)")
    p.add_argument("--keep-dropout", action="store_true", help="keep the config's dropout "
                   "probabilities (default: all set to 0.0)")
    p.add_argument("--list-ops", action="store_true", help="print op kinds of the inlined graph "
                   "with counts")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip checking the "
                   "loaded file against eager at other shapes (B=1,S=37 and B=3,S=64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moe-imbalance", type=float, metavar="F", help="a mixture-of-experts model traced with its "
                   "busiest expert getting F times the balanced rows (1: balanced, the default; at most the expert "
                   "count), a pessimistic bound for a router that favours one expert")
    p.add_argument("--format", dest="fmt", default="torchscript", help="torchscript (default: a .pt file of "
                   "torch.jit.trace) or pt2 (torch.export's ExportedProgram, batch and sequence dynamic)")
    return p.parse_args(argv)


def error_line(exc):
    """The one line the user sees for an unexpected exception: its message's first line, else its type's name."""
    msg = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return msg[0] if msg else type(exc).__name__


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common = dict(device=args.device, dtype=args.dtype, trace_batch=args.trace_batch,
                  trace_seq=args.trace_seq, keep_dropout=args.keep_dropout, verify=args.verify,
                  list_ops=args.list_ops, seed=args.seed, fmt=args.fmt, moe_imbalance=args.moe_imbalance)
    check_trace_shape(args.trace_batch, args.trace_seq)
    if args.device not in ("cpu", "meta"):
        raise ExportError(f"unknown device '{args.device}' (choose cpu or meta)")
    if args.dtype not in DTYPES:
        raise ExportError(f"unknown dtype '{args.dtype}' (choose from: {', '.join(DTYPES)})")
    if args.config and (args.arch or args.size or args.all):
        raise ExportError("--config takes no architecture, --size or --all")
    if args.all:
        if args.moe_imbalance is not None:
            raise ExportError("--moe-imbalance applies to one mixture-of-experts model, not to --all")
        if args.arch:
            raise ExportError("--all takes no architecture argument")
        size = args.size or "tiny"
        if size not in ("tiny", "small"):
            raise ExportError(f"unknown size '{size}' for --all (choose tiny or small)")
        union = collections.Counter()
        total = time.time()
        failed = []
        suffix = (".meta" if args.device == "meta" else "") + (".pt2" if args.fmt == "pt2" else ".pt")
        for arch in ARCH_TYPES:
            path = os.path.join(args.all, f"{arch}-{size}{suffix}")
            try:
                info = export_one(arch, size, path, quiet=True, **common)
            except Exception as exc:  # noqa: BLE001 - one line, then the other architectures
                print(f"{arch:12s} FAILED: {type(exc).__name__}: {_first_line(exc)}", flush=True)
                failed.append(arch)
                continue
            union.update(info["ops"])
            v = info.get("verified")
            ok = "verified" if isinstance(v, list) else f"not verified ({v or '--no-verify'})"
            if "fails" in info.get("meta_note", ""):
                ok += " (meta: run with graph-executor optimization off)"
            print(f"{arch:12s} params={info['params']:>11d} size={info['bytes']:>10d} B "
                  f"time={info['seconds']:5.1f}s attn={info['attn']} {ok} -> {path}", flush=True)
            if args.list_ops:
                print("  " + " ".join(f"{k}:{v}" for k, v in sorted(info["ops"].items())))
        print(f"total {time.time() - total:.1f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        if args.list_ops:
            print("union of op kinds: " + " ".join(sorted(union)))
        return 1 if failed else 0
    if not args.arch and not args.config:
        raise ExportError("give an architecture, --config PATH or --all OUTDIR")
    if not args.out:
        raise ExportError("--out FILE is required")
    export_one(args.arch, args.size, args.out, config=args.config, **common)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ExportError as exc:
        print(f"export_hf.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - one line for the user, never a traceback
        print(f"export_hf.py: error: {error_line(exc)}", file=sys.stderr)
        sys.exit(1)
