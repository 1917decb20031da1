"""Writes tiny TorchScript decoder LMs for the measure/ tests.

Each model is a Hugging Face architecture built from a tiny config (random weights, no downloads), wrapped so that
forward(input_ids, labels) returns the scalar loss, and traced at B=2, S=16. Each also gets a bf16 trace (tiny_NAME_bf16.pt). Also writes a TorchScript module that
is not an LM (for the error-path test). Usage: make_tiny_models.py OUT_DIR [name ...]
"""
import os
import sys

import torch
import transformers
from transformers import masking_utils


class LossOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def tiny_configs():
    common = dict(vocab_size=96, use_cache=False)
    return {
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          **common),
        "opt": transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
                                      attention_dropout=0.0, **common),
        "bloom": transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                                          attention_dropout=0.0, **common),
        "gpt_neo": transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                             attention_types=[[["global", "local"], 1]], window_size=8,
                                             embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, **common),
        "codegen": transformers.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "gpt_bigcode": transformers.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "mistral": transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, sliding_window=None, **common),
        "qwen2": transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          **common),
    }


def traceable_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0,
                        mask_function=masking_utils.causal_mask_function, attention_mask=None, local_size=None,
                        allow_is_causal_skip=True, **kwargs):
    """Like transformers' sdpa_mask without vmap (which fails under torch.jit.trace). With no padding and a full
    causal mask it returns None, so attention runs with is_causal=True as in ordinary training."""
    padding_mask = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    q_length = cache_position.shape[0]
    full_causal = local_size is None or kv_length <= local_size
    if allow_is_causal_skip and padding_mask is None and q_length == kv_length and full_causal:
        return None
    kv_index = torch.arange(kv_length, device=cache_position.device) + kv_offset
    mask = mask_function(0, 0, cache_position[:, None], kv_index[None, :])
    mask = mask[None, None, :, :].expand(batch_size, -1, -1, -1)
    if padding_mask is not None:
        mask = mask * padding_mask[:, None, None, :]
    return mask


class NotAnLm(torch.nn.Module):
    def forward(self, x):
        return x * 2


def main():
    out_dir = sys.argv[1]
    names = sys.argv[2:] or ["gpt2", "llama"]
    os.makedirs(out_dir, exist_ok=True)
    masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", traceable_sdpa_mask)
    torch.manual_seed(0)
    configs = tiny_configs()
    ids = torch.randint(0, 50, (2, 16), dtype=torch.int64)
    for name in names:
        config = configs[name]
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        except ValueError:  # architectures without SDPA support (BLOOM, GPT-Neo, CodeGen) use eager attention
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model.train()
        traced = torch.jit.trace(LossOnly(model), (ids, ids), check_trace=False)
        traced.save(os.path.join(out_dir, f"tiny_{name}.pt"))
        # Pure bf16 needs a bf16 trace: tracing bakes dtypes (e.g. of masks and casts) into constants.
        traced = torch.jit.trace(LossOnly(model.to(torch.bfloat16)), (ids, ids), check_trace=False)
        traced.save(os.path.join(out_dir, f"tiny_{name}_bf16.pt"))
    torch.jit.script(NotAnLm()).save(os.path.join(out_dir, "not_an_lm.pt"))


if __name__ == "__main__":
    main()
