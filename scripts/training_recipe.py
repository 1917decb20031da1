#!/usr/bin/env python3
"""The training recipe of a real-run case: `key=value` pairs joined by `,`, keys named as llmem's flags without
their dashes (`checkpointing=full,checkpointing-impl=non-reentrant,grad-accum=2`; a flag without value is
`keep-outputs=1`), and the libraries' own code that each option runs on the eager Hugging Face model. A value equal
to its default is dropped, so an all-default recipe is the empty one and gives exactly the plain case.

What each option runs (the loop itself is scripts/distributed_worker.py's `run`):

- checkpointing=full: HF `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": R})`
  with R from checkpointing-impl (reentrant, the default, is HF transformers 4.57's own default; non-reentrant is
  what torchtitan uses). transformers 4.57 wraps every `GradientCheckpointingLayer` (modeling_layers.py): its
  `__call__` runs `torch.utils.checkpoint.checkpoint(partial(layer.__call__, **kwargs), *args, use_reentrant=R)`
  (preserve_rng_state left at torch's default True) and forces use_cache=False. A model whose decoder layers are
  not GradientCheckpointingLayer (gpt_bigcode in 4.57: HF sets the flag but never checkpoints) is refused, not run
  as a silently uncheckpointed step.
- checkpointing=every-K: the same, then the per-layer flag turned off except on the layers torchtitan checkpoints:
  torchtitan's layer-selective AC (`_apply_ac_to_transformer_block`, selective_ac_option "K", in
  torchtitan/models/llama3/parallelize_llama.py) counts the blocks from 1 and wraps a block when count % K == 0,
  i.e. the 0-based layers K-1, 2K-1, ... ; 1 <= K <= number of layers.
- checkpointing=selective: torchtitan v0.1.0's op-level selective AC (selective_ac_option "op",
  torchtitan/models/llama3/infra/parallelize.py, `_save_list`; later releases pick saved tensors by name instead):
  every decoder layer runs `torch.utils.checkpoint.checkpoint(layer, use_reentrant=False, preserve_rng_state=False,
  context_fn=...)` where context_fn returns `create_selective_checkpoint_contexts(policy)` with a fresh counter per
  call; the policy saves (MUST_SAVE) the outputs of aten.mm, aten._scaled_dot_product_efficient_attention,
  aten._scaled_dot_product_flash_attention and aten.max, except every second aten.mm of the layer (counted
  separately in the forward and in the recompute), and recomputes everything else. The CPU's SDPA kernel
  (aten._scaled_dot_product_flash_attention_for_cpu) and addmm (Conv1D/biased Linear) are not on that list, so on
  this CPU they are recomputed. Non-reentrant only (context_fn needs use_reentrant=False).
- grad-accum=K: HF Trainer's loop: K micro-batches of the case's batch, `(loss / K).backward()` each, one
  `opt.step(); opt.zero_grad(set_to_none=True)` after the K-th. (Trainer.training_step divides by K when the model
  takes no loss kwargs; for HF causal LMs it passes num_items_in_batch into the loss instead, a token sum divided
  by the count: the two differ by scalar tensors only.) Phase peaks: the maximum over the micro-batches of the
  steady-state step, and per micro-batch in `micro_batch_phase_peak_bytes`; `losses` holds the scaled losses.
- loss=chunked-N: torchtune's loop shape: the last hidden state from the base model (`model.base_model`), the LM
  head applied per chunk, `[lm_head(c) for c in h.tensor_split(N, dim=1)]` (torchtune/modules/transformer.py,
  TransformerDecoder.chunked_output), the labels shifted as torchtune's recipes do after the forward
  (`torch.hstack((labels[..., 1:], ignore_labels_cache))`), then CEWithChunkedOutputLoss
  (torchtune/modules/loss/ce_chunked_output_loss.py): per chunk `F.cross_entropy(chunk.float(), labels,
  reduction="sum", ignore_index=-100)`, summed, divided by the count of labels that are not ignored.
  loss=fused-linear is not run: Liger-Kernel's fused linear cross-entropy and cut-cross-entropy's CCE are Triton
  (GPU) kernels, and cut-cross-entropy's other implementation, "torch_compile" (cut_cross_entropy/torch_compile.py),
  computes `logits = e @ c.T` and then cross_entropy, so its logits exist in full: no package runs a fused
  linear + cross-entropy on CPU.
- keep-outputs=1: the accelerate / PEFT example loop `outputs = model(**batch); loss = outputs.loss;
  loss.backward(); opt.step(); opt.zero_grad()`: `outputs` (the ModelOutput with the logits) stays bound until the
  next forward returns, so the previous step's logits are live in the next forward.
- optimizer-in-backward=1: torchtune's pattern: one optimizer per parameter (the case's optimizer class, the same
  settings), stepped and zeroed (`zero_grad()`, set_to_none) in the parameter's
  `register_post_accumulate_grad_hook`; the optimizer phase then runs nothing. torchtune refuses it with gradient
  accumulation or clipping, and so does this harness.
- grad-clip=NORM: `torch.nn.utils.clip_grad_norm_(parameters, NORM)` (default foreach choice) before `opt.step()`,
  inside the optimizer phase.
- fsdp-reduce-every-micro-batch=1 (FSDP2 runs of scripts/distributed_worker.py only, with grad-accum): torchtitan's
  loop, gradient sync left on, so every micro-batch reduce-scatters; without it, accelerate's no_sync()
  (`set_requires_gradient_sync(False)` on every micro-batch but the last).

- lora-r=R (turns LoRA on), lora-alpha=A (PEFT's default 8), lora-dropout=P (default 0: PEFT then builds
  nn.Identity, no dropout op), lora-targets=NAME+NAME (PEFT's suffix match on whole dotted components, or
  `all-linear`; default: PEFT's per-model-type default, q_proj+v_proj for llama/mistral/opt, c_attn for gpt2),
  lora-modules-to-save=NAME+NAME (PEFT's modules_to_save): the model is wrapped with
  `peft.get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=A, lora_dropout=P,
  target_modules=..., modules_to_save=..., bias="none"))`, PEFT's defaults otherwise (autocast_adapter_dtype=True:
  the adapters are fp32; init_lora_weights=True: B is zero). Lists are joined by `+` because `,` separates recipe
  items. The step module is the PeftModel (what HF Trainer is given); the optimizer sees only the parameters that
  require grad (Trainer's get_decay_parameter_names filter), so frozen weights get neither grads nor states.
  With checkpointing, the HF call above runs first and get_peft_model after it: PeftModel.__init__ then sees
  `is_gradient_checkpointing` and calls `enable_input_require_grads()` (peft_model.py,
  _prepare_model_for_gradient_checkpointing), which makes the embedding output a leaf that requires grad (it gets
  a [B,T,H] .grad in backward). That is the order PEFT's docs give; the reverse order (get_peft_model, then
  PeftModel.gradient_checkpointing_enable with reentrant checkpointing) installs no hook and trains nothing.
- quant=torchao-nf4 (needs lora-r and lora-targets): torchtune's QLoRA instead of PEFT's, run on the HF model
  (apply_torchtune_qlora): torchao NF4Tensor weights in every decoder linear, torchtune's FrozenNF4Linear and
  LoRALinear forwards, adapters in the model's dtype; no checkpointing, no modules to save.
- quant=nf4|fp4|nf4-dq|fp4-dq|int8 (needs lora-r): QLoRA as the QLoRA paper's script and PEFT's docs run it: the model (built
  as above, fp32) is saved with save_pretrained and reloaded by `AutoModelForCausalLM.from_pretrained(dir,
  quantization_config=BitsAndBytesConfig(...), dtype=D, device_map=<device>)` (bitsandbytes Linear4bit /
  Linear8bitLt in place of every nn.Linear / Conv1D except the output embedding, which transformers keeps), then
  `peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=<checkpointing on>,
  gradient_checkpointing_kwargs=<the kwargs above>)` (freezes everything, casts every non-4-bit bf16/fp16
  parameter to fp32; with reentrant checkpointing it calls enable_input_require_grads() itself), then
  get_peft_model. nf4/fp4: `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=Q,
  bnb_4bit_compute_dtype=D)`; nf4-dq/fp4-dq add `bnb_4bit_use_double_quant=True` (the QLoRA paper's double
  quantization); blocksize 64, uint8 storage; int8: `BitsAndBytesConfig(load_in_8bit=True)` (threshold 6.0). D is bf16 under
  precision bf16-autocast (the QLoRA script's --bf16: bf16 load and compute dtype, Trainer's autocast) and fp32
  under fp32. Weights the reload leaves outside the counted allocator (a safetensors-backed storage) are copied
  once, as a load onto a GPU would copy them.

Not in the single-process harness: optimizer-impl (the implementation is PyTorch's default choice, recorded as
`optimizer_impl`), fsdp-param-dtype / fsdp-reduce-dtype (FSDP2 runs only).
"""
import re

CHECKPOINTING_IMPLS = ("reentrant", "non-reentrant")
QUANT_TYPES = ("none", "nf4", "fp4", "nf4-dq", "fp4-dq", "int8", "torchao-nf4")
PEFT_LORA_ALPHA = 8.0  # LoraConfig's default lora_alpha
LORA_KEYS = ("lora-r", "lora-alpha", "lora-dropout", "lora-targets", "lora-modules-to-save", "quant")
DEFAULTS = {"checkpointing": "none", "checkpointing-impl": "reentrant", "grad-accum": 1, "loss": "standard",
            "keep-outputs": False, "optimizer-in-backward": False, "grad-clip": None,
            "fsdp-reduce-every-micro-batch": False, "lora-r": None, "lora-alpha": PEFT_LORA_ALPHA,
            "lora-dropout": 0.0, "lora-targets": None, "lora-modules-to-save": None, "quant": "none",
            "moe-routing": "router"}
# Keys that say how the measured run routes, not what llmem is told: llmem's estimate of a mixture-of-experts model
# takes the routing its export was traced with (models/export_hf.py _expert_slots: balanced, or the busiest expert at
# F x the balanced rows with --moe-imbalance F); `moe-routing=balanced` or `busiest:F` makes the eager run route that
# way too, so that the estimate's modelling is checked apart from its routing assumption.
RUN_ONLY_KEYS = ("moe-routing",)
NOT_IN_HARNESS = {
    "optimizer-impl": "the optimizer runs PyTorch's default implementation (recorded as optimizer_impl)",
    "fsdp-param-dtype": "it applies to FSDP2 runs (scripts/distributed_runs.py), not to a single process",
    "fsdp-reduce-dtype": "it applies to FSDP2 runs (scripts/distributed_runs.py), not to a single process",
}
IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default, what HF and torchtune mask labels with


class RecipeError(ValueError):
    """A recipe that cannot be run as given (bad key or value, or one the model cannot take); one line."""


def _positive_int(key, text):
    try:
        value = int(text)
    except ValueError:  # int() of a non-number
        value = 0
    if value < 1 or str(value) != text:
        raise RecipeError(f"{key} needs a positive integer, got {text!r}")
    return value


def _flag(key, text):
    if text not in ("0", "1"):
        raise RecipeError(f"{key} is 0 or 1, got {text!r}")
    return text == "1"


def _checkpointing(key, text):
    if text in ("none", "full", "selective"):
        return text
    if text.startswith("every-"):
        _positive_int("checkpointing every-K: K", text[len("every-"):])
        return text
    raise RecipeError(f"{key} is none, full, every-K or selective, got {text!r}")


def _impl(key, text):
    if text not in CHECKPOINTING_IMPLS:
        raise RecipeError(f"{key} is {' or '.join(CHECKPOINTING_IMPLS)}, got {text!r}")
    return text


def _loss(key, text):
    if text == "standard":
        return text
    if text.startswith("chunked-"):
        _positive_int("loss chunked-N: N", text[len("chunked-"):])
        return text
    if text == "fused-linear":
        raise RecipeError("loss fused-linear cannot run here: the fused linear cross-entropy kernels (Liger-Kernel, "
                          "cut-cross-entropy) are Triton-only; no package runs one on CPU")
    raise RecipeError(f"{key} is standard, chunked-N or fused-linear, got {text!r}")


def _norm(key, text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0.0 or value == float("inf"):
        raise RecipeError(f"{key} needs a positive finite number, got {text!r}")
    return value


def _probability(key, text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise RecipeError(f"{key} needs a number in [0, 1), got {text!r}")
    return value


_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _module_names(key, text):
    """NAME+NAME+... (module names or dotted suffixes); lora-targets also takes all-linear."""
    if text == "all-linear" and key == "lora-targets":
        return text
    names = text.split("+")
    bad = [n for n in names if not _MODULE_NAME.fullmatch(n)]
    if bad:
        hint = " or all-linear" if key == "lora-targets" else ""
        raise RecipeError(f"{key} is module names joined by '+'{hint}, got {text!r}")
    if len(set(names)) != len(names):
        raise RecipeError(f"{key} names a module twice: {text!r}")
    return text


def _routing(key, text):
    """router (the model's own), balanced (llmem's default assumption) or busiest:F (export_hf --moe-imbalance F)."""
    if text in ("router", "balanced"):
        return text
    if text.startswith("busiest:"):
        try:
            f = float(text.split(":", 1)[1])
        except ValueError:
            f = 0.0
        if f >= 1.0:
            return text
    raise RecipeError(f"{key} is router, balanced or busiest:F (F >= 1), got {text!r}")


def _quant(key, text):
    if text not in QUANT_TYPES:
        raise RecipeError(f"{key} is {', '.join(QUANT_TYPES)}, got {text!r}")
    return text


PARSERS = {"checkpointing": _checkpointing, "checkpointing-impl": _impl, "grad-accum": _positive_int,
           "loss": _loss, "keep-outputs": _flag, "optimizer-in-backward": _flag, "grad-clip": _norm,
           "fsdp-reduce-every-micro-batch": _flag, "lora-r": _positive_int, "lora-alpha": _norm,
           "lora-dropout": _probability, "lora-targets": _module_names, "lora-modules-to-save": _module_names,
           "quant": _quant, "moe-routing": _routing}


def parse_recipe(text):
    """'k=v,k=v' -> {key: value} without the keys at their default; RecipeError (one line) on bad input."""
    recipe = {}
    for item in text.split(",") if text else []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise RecipeError(f"recipe item {item!r} is not key=value")
        if key in NOT_IN_HARNESS:
            raise RecipeError(f"recipe key {key} is not run by this harness: {NOT_IN_HARNESS[key]}")
        if key not in PARSERS:
            raise RecipeError(f"unknown recipe key {key!r} (known: {', '.join(PARSERS)})")
        if key in recipe:
            raise RecipeError(f"recipe key {key} given twice")
        recipe[key] = PARSERS[key](key, value)
    check_combination(recipe)
    return {k: v for k, v in recipe.items() if v != DEFAULTS[k]}


def check_combination(recipe):
    options = {**DEFAULTS, **recipe}
    if "checkpointing-impl" in recipe and options["checkpointing"] == "none":
        raise RecipeError("checkpointing-impl needs checkpointing full, every-K or selective")
    if options["checkpointing"] == "selective" and recipe.get("checkpointing-impl") == "reentrant":
        raise RecipeError("checkpointing selective is non-reentrant only (context_fn needs use_reentrant=False)")
    if options["optimizer-in-backward"] and options["grad-accum"] > 1:
        raise RecipeError("optimizer-in-backward does not combine with grad-accum > 1 (torchtune refuses it: "
                         "the per-parameter step would run on every micro-batch)")
    if options["fsdp-reduce-every-micro-batch"] and options["grad-accum"] == 1:
        raise RecipeError("fsdp-reduce-every-micro-batch needs grad-accum > 1")
    if options["optimizer-in-backward"] and options["grad-clip"] is not None:
        raise RecipeError("optimizer-in-backward does not combine with grad-clip (torchtune refuses it: no full "
                         "set of gradients exists to take the norm of)")
    lora_given = [k for k in LORA_KEYS if k in recipe and k != "lora-r" and (k, recipe[k]) != ("quant", "none")]
    if lora_given and options["lora-r"] is None:
        what = ("a quantized base is frozen, nothing would train" if "quant" in lora_given
                else "it configures the LoRA adapters")
        verb = "needs" if len(lora_given) == 1 else "need"
        raise RecipeError(f"{', '.join(lora_given)} {verb} lora-r ({what})")


def options(recipe):
    """Every option, defaults filled in."""
    return {**DEFAULTS, **recipe}


def recipe_text(recipe):
    """The case's 5th field for a parsed recipe (keys in their canonical order)."""
    def text(v):
        return "1" if v is True else ("0" if v is False else (f"{v:g}" if isinstance(v, float) else str(v)))

    return ",".join(f"{k}={text(recipe[k])}" for k in PARSERS if k in recipe)


def llmem_flags(recipe):
    """The same recipe as llmem estimate flags (`--checkpointing full --grad-accum 2 --drop-outputs`). The LoRA
    keys become llmem's planned `--lora r=R,alpha=A,dropout=P[,targets=A+B]` (every value spelled out, targets
    only when given), `--lora-modules-to-save A,B` and `--quant Q`."""
    flags = []
    if recipe.get("lora-r") is not None:
        o = options(recipe)
        items = [f"r={o['lora-r']}", f"alpha={o['lora-alpha']:g}", f"dropout={o['lora-dropout']:g}"]
        if o["lora-targets"] is not None:
            items.append(f"targets={o['lora-targets']}")  # '+'-joined: ',' separates --lora's own items
        flags += ["--lora", ",".join(items)]
        if o["lora-modules-to-save"] is not None:
            flags += ["--lora-modules-to-save", o["lora-modules-to-save"].replace("+", ",")]
    for key in PARSERS:
        if key not in recipe or key in LORA_KEYS and key != "quant" or key in RUN_ONLY_KEYS:
            continue
        value = recipe[key]
        if value is True:
            flags.append(f"--{key}")
        else:
            flags += [f"--{key}", recipe_text({key: value}).split("=", 1)[1]]
    if not recipe.get("keep-outputs"):
        flags.append("--drop-outputs")  # the eager runs' loop is HF Trainer's; llmem's default keeps the outputs
    return flags


# ---------------------------------------------------------------------------------------------------------
# What the options run on the model.
# ---------------------------------------------------------------------------------------------------------

def _torchtitan_op_sac_context_fn():
    """torchtitan v0.1.0's op-level selective AC policy (torchtitan/models/llama3/infra/parallelize.py), a fresh
    mm counter per checkpointed call (its forward and its recompute count separately)."""
    from collections import defaultdict

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = {torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default, torch.ops.aten.max.default}
    counts = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == torch.ops.aten.mm.default:
            counts[mode] += 1
        every_second_mm = func == torch.ops.aten.mm.default and counts[mode] % 2 == 0
        return (CheckpointPolicy.MUST_SAVE if func in save and not every_second_mm
                else CheckpointPolicy.PREFER_RECOMPUTE)

    return create_selective_checkpoint_contexts(policy)


def apply_checkpointing(model, layers, recipe, enable=None):
    """Turns on the recipe's activation checkpointing on the HF model; returns the indices of the checkpointed
    decoder layers (empty without checkpointing). enable(kwargs) is the call that turns it on: HF's
    gradient_checkpointing_enable by default, peft.prepare_model_for_kbit_training for a quantized base."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    mode = options(recipe)["checkpointing"]
    if mode == "none":
        return []
    if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        kind = type(layers[0]).__name__
        raise RecipeError(f"checkpointing {mode}: {kind} is not a GradientCheckpointingLayer, so HF's "
                         f"gradient_checkpointing_enable() would not checkpoint it")
    if mode == "selective":
        kwargs = {"use_reentrant": False, "preserve_rng_state": False,
                  "context_fn": _torchtitan_op_sac_context_fn}
    else:
        kwargs = {"use_reentrant": options(recipe)["checkpointing-impl"] == "reentrant"}
    if enable is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable(kwargs)
    wrapped = list(range(len(layers)))
    if mode.startswith("every-"):
        k = int(mode[len("every-"):])
        if k > len(layers):
            raise RecipeError(f"checkpointing {mode}: K is above the model's {len(layers)} decoder layers")
        wrapped = [i for i in wrapped if (i + 1) % k == 0]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i in wrapped
    return wrapped


def lora_config(recipe):
    """The recipe's peft.LoraConfig (CAUSAL_LM, bias none, PEFT's defaults for everything not in the recipe)."""
    from peft import LoraConfig

    o = options(recipe)
    alpha = o["lora-alpha"]
    targets, keep = o["lora-targets"], o["lora-modules-to-save"]
    return LoraConfig(task_type="CAUSAL_LM", r=o["lora-r"], lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                      lora_dropout=o["lora-dropout"], bias="none",
                      target_modules=targets if targets in (None, "all-linear") else targets.split("+"),
                      modules_to_save=None if keep is None else keep.split("+"))


def bnb_quantization_config(recipe, precision, float_storage=False):
    """(BitsAndBytesConfig, load/compute dtype) for quant=nf4|fp4|int8 (the QLoRA script's settings). float_storage:
    the packed 4-bit codes stored in the load dtype (bnb_4bit_quant_storage), as FSDP needs to shard them (it shards
    only floating parameters), the setting of transformers' and PEFT's FSDP-QLoRA guides."""
    import torch
    from transformers import BitsAndBytesConfig

    quant = options(recipe)["quant"]
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    if quant == "int8":
        if float_storage:
            raise RecipeError("quant=int8 under FSDP: Int8Params are int8 and cannot be sharded")
        return BitsAndBytesConfig(load_in_8bit=True), dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.split("-")[0],
                              bnb_4bit_use_double_quant=quant.endswith("-dq"), bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype if float_storage else torch.uint8), dtype


def load_quantized(model, recipe, precision, device, float_storage=False):
    """The same weights reloaded through transformers' bitsandbytes quantizer: save_pretrained, then
    from_pretrained(quantization_config=..., dtype=D, device_map=device), in train mode. The caller drops its
    reference to `model`. float_storage: as bnb_quantization_config."""
    import tempfile

    from transformers import AutoModelForCausalLM

    config, dtype = bnb_quantization_config(recipe, precision, float_storage)
    attn = model.config._attn_implementation
    with tempfile.TemporaryDirectory(prefix="llmem-qlora-") as directory:
        model.save_pretrained(directory)
        model = None
        quantized = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=dtype,
                                                         device_map=str(device), attn_implementation=attn)
    quantized.train()
    return quantized


def apply_lora(model, layers, recipe):
    """Checkpointing (as apply_checkpointing; through prepare_model_for_kbit_training for a quantized base), then
    get_peft_model. Returns (the PeftModel, the indices of the checkpointed decoder layers)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if options(recipe)["quant"] != "none":
        def enable(kwargs):
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs=kwargs)

        wrapped = apply_checkpointing(model, layers, recipe, enable)
        if options(recipe)["checkpointing"] == "none":
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        wrapped = apply_checkpointing(model, layers, recipe)
    try:
        peft_model = get_peft_model(model, lora_config(recipe))
    except ValueError as e:  # no module matches the targets, a target type LoRA cannot wrap, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"peft.get_peft_model refused the LoRA settings: {first}")
    return peft_model, wrapped


def _targeted(name, targets):
    """PEFT's (and llmem's) target rule: the module's dotted name equals a target or ends in "." + target."""
    return targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets.split("+"))


def apply_torchtune_qlora(model, layers, recipe):
    """torchtune's QLoRA on the HF model (quant=torchao-nf4): every nn.Linear of the decoder layers gets its weight
    as torchao's NF4Tensor (to_nf4: block 64, scaler block 256, in the weight's dtype), frozen, and the forward of
    torchtune's modules: FrozenNF4Linear `linear_nf4(x, weight) [+ bias]` for a linear lora-targets does not name,
    LoRALinear(quantize_base=True) `out + (alpha / r) * lora_b(lora_a(dropout(x)))` for one it names, lora_a /
    lora_b bias-free nn.Linear in the weight's dtype (torchtune builds them under the model's dtype; lora_a
    Kaiming-uniform, lora_b zeros). Everything else is frozen (set_trainable_params with the adapter parameters
    only). Returns the number of adapted modules."""
    import math

    import torch
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    o = options(recipe)
    if o["checkpointing"] != "none":
        raise RecipeError("quant=torchao-nf4: torchtune's activation-checkpointing wrapper is not run by this harness")
    if o["lora-modules-to-save"] is not None:
        raise RecipeError("quant=torchao-nf4: torchtune has no modules_to_save")
    targets = o["lora-targets"]
    if targets is None:
        raise RecipeError("quant=torchao-nf4 needs lora-targets (torchtune names its LoRA modules explicitly)")

    class Nf4Linear(torch.nn.Module):
        def __init__(self, linear, adapted):
            super().__init__()
            weight = linear.weight.detach()
            self.weight = torch.nn.Parameter(to_nf4(weight), requires_grad=False)
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
            self.adapted = adapted
            if adapted:
                rank, out_f, in_f = o["lora-r"], weight.shape[0], weight.shape[1]
                self.scaling = o["lora-alpha"] / rank
                self.dropout = torch.nn.Dropout(o["lora-dropout"]) if o["lora-dropout"] > 0 else torch.nn.Identity()
                self.lora_a = torch.nn.Linear(in_f, rank, bias=False, dtype=weight.dtype)
                self.lora_b = torch.nn.Linear(rank, out_f, bias=False, dtype=weight.dtype)
                torch.nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
                torch.nn.init.zeros_(self.lora_b.weight)

        def forward(self, x):
            out = linear_nf4(input=x, weight=self.weight)
            if self.bias is not None:
                out = out + self.bias
            if not self.adapted:
                return out
            lora_out = self.lora_a(self.dropout(x))
            lora_out = self.scaling * self.lora_b(lora_out)
            return out + lora_out

    for p in model.parameters():
        p.requires_grad_(False)
    adapted = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                full = f"{name}.{child_name}" if name else child_name
                hit = _targeted(full, targets)
                adapted += hit
                setattr(module, child_name, Nf4Linear(child, hit))
    if adapted == 0:
        raise RecipeError(f"quant=torchao-nf4: lora-targets {targets} names no linear module of the decoder layers")
    return adapted


def shifted_labels(labels, ignore_column):
    """torchtune's label shift, done after the model's forward: tokens < n predict n, the last one ignored."""
    import torch

    return torch.hstack((labels[..., 1:], ignore_column[: labels.shape[0]]))


def chunked_output(model, input_ids, chunks):
    """torchtune's TransformerDecoder.chunked_output on the HF model: the LM head per sequence chunk."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False, return_dict=True).last_hidden_state
    head = model.get_output_embeddings()
    return [head(chunk) for chunk in hidden.tensor_split(chunks, dim=1)]


def chunked_cross_entropy(logit_chunks, labels):
    """torchtune's CEWithChunkedOutputLoss: upcast one chunk at a time, CE sum, divide by the label count."""
    import torch.nn.functional as F

    total_elements = (labels != IGNORE_INDEX).sum()
    label_chunks = [c.reshape(-1) for c in labels.tensor_split(len(logit_chunks), dim=1)]
    logit_chunks = [c.reshape(-1, c.size(-1)) for c in logit_chunks]
    total_loss = 0.0
    for logits, target in zip(logit_chunks, label_chunks):
        total_loss += F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total_loss / total_elements


def optimizers_in_backward(parameters, make_one):
    """torchtune's optimizer-in-backward: {parameter: its own optimizer}, each stepped and zeroed by the
    parameter's post-accumulate-grad hook. make_one(params) builds the case's optimizer over params."""
    optimizers = {p: make_one([p]) for p in parameters}

    def step(param):
        optimizers[param].step()
        optimizers[param].zero_grad()

    for p in optimizers:
        p.register_post_accumulate_grad_hook(step)
    return optimizers


def main():
    """Checks a recipe: prints it canonical and as llmem flags, or one error line and exit 2."""
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: training_recipe.py KEY=VALUE[,KEY=VALUE...]")
    try:
        recipe = parse_recipe(sys.argv[1])
    except RecipeError as e:
        print(f"training_recipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(recipe_text(recipe))
    print(" ".join(llmem_flags(recipe)))


if __name__ == "__main__":
    main()
