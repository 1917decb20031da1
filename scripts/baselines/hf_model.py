"""The Hugging Face model of a case, built from its config on the meta device (no weights), for the baselines.

Every baseline starts from the same place a user of it would: the architecture's config (the presets and
real-size configs of models/export_hf.py, the ones the ground-truth exports were made from).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
import export_hf  # noqa: E402


def build_meta_model(arch, size, dtype=torch.float32):
    """The training-mode causal LM of export_hf's (arch, size), parameters on meta, dropout off as exported."""
    arch, model_type, kwargs, _ = export_hf.resolve(arch, size)
    model, _ = export_hf.build_model(arch, model_type, kwargs, "meta", dtype, False, 0)
    return model


def unique_parameters(model):
    """Parameters counted once (tied embeddings share one tensor)."""
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def parameter_count(model):
    return sum(p.numel() for p in unique_parameters(model))


def dims(model):
    """(hidden, layers, heads, vocab) as named by the config of any of the exported architectures."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or getattr(c, "num_layers")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or getattr(c, "num_heads")
    return hidden, layers, heads, c.vocab_size


class CannotExpress(Exception):
    """The method has no way to state this case (its model or rules do not cover it)."""


def fake_cpu_model(arch, size):
    """(fake_mode, model): the model with FakeTensor parameters on the CPU device (shapes, dtypes and devices
    of the real thing, no storage), for running the real PyTorch program without memory or compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build_meta_model(arch, size)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter a new tensor, which unties a tied LM head
    for module in model.modules():
        # OPT's LayerDrop draws torch.rand([]) < layerdrop in train mode, a data-dependent branch fake tensors
        # cannot take; at layerdrop 0 (as exported) it never skips a layer, so leaving the draw out is the
        # same program. Only this module leaves train mode; its layers (dropout) keep it.
        if getattr(module, "layerdrop", None) == 0.0:
            module.training = False
    return mode, model


def untraced_paths():
    """HF's mask code on the path an untraced training step without padding takes (no data-dependent
    torch.all check, which fake tensors cannot answer); the ground-truth exports were traced under it too."""
    return export_hf.untraced_masking()


def layout(case):
    """(method, dp, tp) of a case; single-process cases have neither key."""
    return case.get("method", "single"), case.get("dp", 1), case.get("tp", 1)


def require_single_process(case, why):
    method, dp, tp = layout(case)
    if dp * tp > 1:
        raise CannotExpress(why)
