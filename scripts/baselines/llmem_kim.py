"""LLMem (Kim et al., "LLMem: Estimating GPU Memory Usage for Fine-Tuning Pre-Trained LLMs", IJCAI 2024,
arXiv 2404.10933), single-GPU estimate as its public code computes it.

Source: taehokim20/LLMem, size_estimator.py (SizeEstimator: get_output_sizes, param_bytes, calc_input_bytes,
calc_output_bytes, estimate_size) and dp_real.py (how it is called: bytes=2, bytes_input=8, lm_fp32 when the
model upcasts its logits). Its rules, followed here:
- every size is rounded up to 2 MiB blocks (`base_size`), the granularity it assumes for the GPU memory;
- m_base: memory measured after the model is placed (CUDA context + Colossal-AI Gemini's parameter chunks); here
  the resident weights of the ground truth's program (fp32, also under autocast), no CUDA context (the ground
  truth is allocated bytes). Gradients have no term of their own: Gemini keeps them in the 16-bit chunks;
- optimizer states: two fp32 tensors (Adam's moments) per parameter of every nn.Embedding / nn.Linear, the last
  such parameter (the LM head) counted once at the activation width instead;
- over N data-parallel GPUs (its CDP/ADP method is Colossal-AI Gemini, a ZeRO-3: here the FSDP2 runs): the states
  and m_base divided by N, plus (N-1)/N of every 16-bit parameter (the gathered copies);
- tensor parallelism of degree T over N = D x T GPUs (tp_real.py: init_colo_module(model, TP1D) before the
  estimator reads the model, then Gemini over the rest): every nn.Linear and nn.Embedding weight is split by T
  (ColoLinear's default 1-D row mode, ColoEmbedding's 1-D col mode; only its LLaMA and OPT layers are registered),
  so param_bytes reads the local shards; their outputs are replicated (the row Linear all-reduces, the col
  Embedding gathers), so the output sizes are those of the whole model; the states are divided by N; pure TP
  (T = N) has no 16-bit term, DP+TP adds ((N - T)/N - 1/N) of every rounded 16-bit shard; calc_output_bytes adds
  (T-1)/T of every decoder layer's input after the first (backward_all_gather_sizes). m_base (measured after
  placement in the paper's code) is the rank's parameter bytes the run recorded after the layout was applied;
- input: token ids at 8 bytes;
- transformer part: the output of every nn.Embedding (twice: token and position) and nn.Linear, and every
  decoder layer's input, in module order, with the code's skips (the first Linear of a `*Block`, a second
  Embedding); LM head part: the logits (in fp32 when the loss upcasts them) plus twice the shifted logits.
The code chains each module's output into the next module to learn the sizes; here each module's real output
shape is read from a forward pass (the same sizes wherever the chaining works).
"""
import torch

from baselines.hf_model import CannotExpress, fake_cpu_model, layout, untraced_paths

WHAT = ("2 MiB-rounded sizes: weights (m_base), two fp32 Adam states per Embedding/Linear parameter, the outputs "
        "of every Embedding/Linear and decoder-layer input, the LM head + loss part; no separate gradients, no "
        "attention scores or other non-Linear activations, no temporaries. Data parallelism: ZeRO-3 chunks "
        "(FSDP2 rows); TP and DP+TP: its 1-D TP formulas (every Linear and Embedding weight split, the "
        "backward all-gather term), Llama and OPT only.")

BASE = 2 * 1024 * 1024  # SizeEstimator.base_size
INPUT_BYTES = 8  # int64 token ids (dp_real.py: bytes_input=8)
STATE_BYTES = 4  # the optimizer states are fp32 (`numel * bytes * 2` with bytes=2)


def _up(nbytes):
    return -(-int(nbytes) // BASE) * BASE


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


TP_ARCHS = ("llama", "opt")  # ColoLinear registers its shard specs for model names with 'llama' or 'opt'


def _tp_numel(module, param, tp):
    """Elements of the local shard under TP1D: weights split by tp (row Linear: in_features; col Embedding: the
    embedding dim); OPT's Linear biases stay whole (their dist spec is None in row mode)."""
    if tp == 1 or param is not module.weight:
        return param.numel()
    if param.shape[-1] % tp:
        raise CannotExpress(f"tp {tp} does not divide a weight's last dimension {param.shape[-1]}")
    return param.numel() // tp


def _holds_params(module):
    """param_bytes' test: any *Embedding* module (learned positions too) or an nn.Linear."""
    name = module._get_name()
    return "Embedding" in name or name == "Linear"


def _has_output(module):
    """get_output_sizes' test: exactly nn.Embedding or nn.Linear."""
    return module._get_name() in ("Embedding", "Linear")


def estimate(case):
    if case["optimizer"] != "adamw":
        raise CannotExpress("its optimizer term is Adam's two fp32 states (Colossal-AI HybridAdam)")
    method, dp, tp = layout(case)
    if method not in ("single", "fsdp2", "tp", "fsdp2_tp"):
        raise CannotExpress("its data parallelism is ZeRO-3 chunks (FSDP2 rows here), its model parallelism 1-D "
                            "TP (+ ZeRO-3 chunks over the data-parallel ranks)")
    if tp > 1 and case["arch"] not in TP_ARCHS:
        raise CannotExpress("its TP layers (ColoLinear) are registered for LLaMA and OPT only")
    gpu_n = dp * tp  # SizeEstimator's gpu_n is the world size (tp_real.py / dp_real.py pass world_size)
    mode, model = fake_cpu_model(case["arch"], case["size"])
    mods = list(model.modules())
    if any(m._get_name() == "Conv1D" for m in mods):
        raise CannotExpress("its rules read nn.Linear / nn.Embedding modules; this model's layers are Conv1D")
    width = 2 if case["precision"] == "bf16-autocast" else 4  # SizeEstimator.bytes
    lm_fp32 = width == 2  # the loss upcasts 16-bit logits to fp32 (transformers' ForCausalLMLoss)
    b, s = case["batch"], case["seq"]

    # Output shapes of every module, from one forward pass.
    out_shape = {}

    def record(mod, inputs, output):  # returns None: the output is left as it is
        out_shape.setdefault(mod, tuple(output.shape))

    hooks = [m.register_forward_hook(record) for m in mods if _has_output(m)]
    with mode, untraced_paths():
        ids = torch.zeros(b, s, dtype=torch.long)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=width == 2)
        with autocast, torch.no_grad():
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()

    # get_output_sizes: the transformer part's tensors in module order.
    sizes, layer_seen, embeddings, block_first, hidden_in = [], 0, 0, False, (b, s, model.config.hidden_size
                                                                               if hasattr(model.config, "hidden_size")
                                                                               else model.config.n_embd)
    last = len(mods) - 1
    for i, m in enumerate(mods[1:], start=1):
        name = m._get_name()
        if "DecoderLayer" in name or "Block" in name:
            if layer_seen:
                sizes.append(hidden_in)
            layer_seen += 1
            block_first = "Block" in name and "DecoderLayer" not in name
        if not _has_output(m) or m not in out_shape:
            continue
        if name == "Embedding":
            embeddings += 1
            if embeddings > 1:
                continue
        if name == "Linear" and block_first:
            block_first = False
            continue
        if name == "Embedding":
            sizes += [out_shape[m], out_shape[m]]  # embed_tokens, embed_positions
        elif i == last:
            sizes += [sizes[-1], out_shape[m]]  # the last layer's output, then lm_head
        else:
            sizes.append(out_shape[m])
    if mods[last] not in out_shape:
        raise CannotExpress("its LM head rule needs the model's last module to be the Linear LM head")

    # param_bytes: per parameter (its local TP shard) the gathered 16-bit copies of the other ranks' shards
    # (ZeRO-3; DP+TP: its hybrid fraction) and Adam's fp32 states over all gpu_n ranks; the last parameter
    # (lm_head) once, 16-bit.
    params = [(p, _tp_numel(m, p, tp)) for m in mods[1:] if _holds_params(m) for p in m.parameters(recurse=False)]
    param_bytes = _up(params[-1][1] * width)
    for p, numel in params[:-1]:
        rounded = _up(numel * width)
        if tp == 1 and gpu_n > 1:  # ZeRO-3
            param_bytes += _up(rounded * (gpu_n - 1) / gpu_n)
        elif tp > 1 and gpu_n != tp:  # DP + TP (hybrid)
            param_bytes += _up(rounded * ((gpu_n - tp) / gpu_n - 1 / gpu_n))
        param_bytes += 2 * _up(numel * STATE_BYTES / gpu_n)
    input_bytes = _up(b * s * INPUT_BYTES)
    body = sum(_up(_numel(sz) * width) for sz in sizes[:-1])
    if tp > 1:  # backward all-gathers: (T-1)/T of each decoder layer's input after the first
        body += (layer_seen - 1) * _up(_numel(hidden_in) * width * (tp - 1) / tp)
    logits = list(sizes[-1])
    lm_width = width * 2 if lm_fp32 else width
    lm_part = _up(_numel(logits) * lm_width)
    logits[1] -= 1  # the shifted logits of the loss
    lm_part += 2 * _up(_numel(logits) * lm_width)
    if "placed_param_bytes" in case:  # measured after placement, as the paper's m_base is
        m_base = _up(case["placed_param_bytes"])
    else:
        m_base = _up(sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
                     / gpu_n)
    return m_base + param_bytes + input_bytes + body + lm_part
