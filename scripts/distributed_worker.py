#!/usr/bin/env python3
"""One distributed fine-tuning job, every rank: the torchrun entry point of scripts/distributed_runs.py.

Measures what each rank's tensors really occupy when PyTorch's own engines (DistributedDataParallel,
ZeroRedundancyOptimizer, FSDP2 `fully_shard`, DTensor tensor parallelism) run training steps of a Hugging Face
model built exactly as models/export_hf.py builds it for its TorchScript export (same preset, seed, dropout 0,
train mode, use_cache False, SDPA attention; the loss is export_hf.LossWrapper's model(input_ids, labels).loss).

  python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/distributed_worker.py \
      --arch llama --size tiny --method fsdp2 --batch 2 --seq 256 --out-dir build/run1

Memory on CPU: a counting c10 CPU allocator (scripts/counting_allocator.py) installed before anything else, so
every CPU tensor storage of the process is counted (absolute live bytes: weights, gradients, optimizer states,
DDP buckets, FSDP2 all-gather/reduce-scatter buffers, activations, inputs). On CUDA: the caching allocator's
torch.cuda.memory_allocated / max_memory_allocated.

Steps: --steps (default 3). The reported peak_bytes is the maximum of live bytes from the start of step index 1
(after its inputs exist) to the end of the last step's zero_grad; phase peaks and start_bytes are those of the
last step. Phases: forward (forward + loss, under autocast when asked), backward (loss.backward(), then the loss
is released), optimizer (optimizer.step() + zero_grad(set_to_none=True)). --recipe changes
the loop as scripts/training_recipe.py describes (checkpointing, gradient accumulation, chunked loss, kept outputs,
optimizer in backward, gradient clipping, PEFT LoRA / QLoRA (single only); parallel methods take grad-accum (see
grad_sync_context for each engine's loop), optimizer-in-backward under FSDP2 and TP, fsdp-reduce-every-micro-batch
under FSDP2, loss and checkpointing under ddp, zero1, zero2 and fsdp2 (the chunked loss then runs as the model's
forward, inside the engine's hooks, as torchtune's chunked TransformerDecoder does); the record then carries
"recipe".

Each rank writes OUT_DIR/rank<R>.json (one JSON object); on an error it writes OUT_DIR/rank<R>.error (the last
line of the error first, then the traceback) and exits 1.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(REPO, "models"))

import training_recipe  # noqa: E402

METHODS = ["single", "ddp", "zero1", "zero2", "fsdp2", "tp", "fsdp2_tp"]
LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # q/k/v/o_proj + gate/up/down_proj decoder layers
ADAMW_LR = 1e-4       # torch.optim.AdamW defaults otherwise (weight_decay 0.01), as llmem measure runs it
SGD_LR, SGD_MOMENTUM = 1e-4, 0.9
INPUT_SEED = 1234     # input ids of data-parallel rank d come from torch.Generator().manual_seed(INPUT_SEED + d)
OPTIMIZERS = ["adamw", "sgd", "sgd-nomomentum", "adafactor", "adamw8bit", "paged-adamw8bit"]
# --optimizer-impl: torch.optim's step loops (default: PyTorch's own choice, foreach=None), or the library of
# the 8-bit AdamW. Which applies to which optimizer: OPTIMIZER_IMPLS.
TORCH_IMPLS = ["single-tensor", "foreach", "fused"]
OPTIMIZER_IMPLS = {"adamw": TORCH_IMPLS, "sgd": TORCH_IMPLS, "sgd-nomomentum": TORCH_IMPLS, "adafactor": [],
                   "adamw8bit": ["bitsandbytes", "torchao"], "paged-adamw8bit": ["bitsandbytes"]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, help="architecture key of models/export_hf.py (llama, gpt2, ...)")
    ap.add_argument("--size", default="tiny", help="preset of models/export_hf.py (tiny, small, real-size name)")
    ap.add_argument("--export", default="", help="the TorchScript export of the same config (recorded only)")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (tp: world size; fsdp2_tp: 2)")
    ap.add_argument("--batch", type=int, required=True, help="micro-batch per data-parallel rank")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast"])
    ap.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                    help="adamw (torch.optim.AdamW), sgd (momentum 0.9), sgd-nomomentum, adafactor (HF "
                         "transformers' Adafactor as Trainer builds it), adamw8bit, paged-adamw8bit (bitsandbytes)")
    ap.add_argument("--optimizer-impl", default="", choices=[""] + sorted({i for v in OPTIMIZER_IMPLS.values()
                                                                           for i in v}),
                    help="torch.optim: single-tensor|foreach|fused (default: PyTorch's choice); adamw8bit: "
                         "bitsandbytes (default, as HF Trainer's adamw_bnb_8bit) or torchao (adamw_torch_8bit)")
    ap.add_argument("--fsdp-param-dtype", default=None, choices=["bf16", "fp32"],
                    help="fsdp2/fsdp2_tp/zero2: MixedPrecisionPolicy(param_dtype=...) on every fully_shard unit "
                         "(fp32 weights, no autocast)")
    ap.add_argument("--fsdp-reduce-dtype", default=None, choices=["bf16", "fp32"],
                    help="fsdp2/fsdp2_tp/zero2: MixedPrecisionPolicy(reduce_dtype=...)")
    ap.add_argument("--tp-vocab-parallel", action="store_true",
                    help="tp/fsdp2_tp: also shard the embedding (RowwiseParallel(input_layouts=Replicate())) and "
                         "lm_head (ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)); the loss "
                         "runs under loss_parallel()")
    ap.add_argument("--recipe", default="", type=_recipe,
                    help="the training recipe, key=value pairs joined by ',' (scripts/training_recipe.py says what "
                         "each runs; parallel methods: grad-accum, optimizer-in-backward); default: the plain HF "
                         "Trainer step")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--log-allocs", type=int, default=0, metavar="BYTES",
                    help="cpu: record the sizes of allocations (positive) and frees (negative) >= BYTES, in "
                         "order, in each phase of the last step and in the DDP/FSDP/TP setup (0 = off)")
    ap.add_argument("--out-dir", required=True)
    return ap.parse_args(argv)


# The recipe keys a parallel engine's loop runs (the others are single-process only).
PARALLEL_RECIPE_KEYS = ("grad-accum", "optimizer-in-backward", "fsdp-reduce-every-micro-batch", "loss",
                        "checkpointing", "checkpointing-impl")
FSDP_METHODS = ("fsdp2", "zero2", "fsdp2_tp")
# The recipe keys that change the model's own forward (the loss, checkpointing), run by the data-parallel engines
LOCAL_FORWARD_KEYS = ("loss", "checkpointing", "checkpointing-impl")
LOCAL_FORWARD_METHODS = ("ddp", "zero1", "zero2", "fsdp2")
# PEFT LoRA / QLoRA (training_recipe.LORA_KEYS): the engines that replicate the frozen base, and FSDP2, which
# shards it with the adapters
LORA_METHODS = ("single", "ddp", "zero1", "fsdp2", "zero2")


def check_parallel_recipe(recipe, method):
    """The recipe options a parallel run takes; RuntimeError (one line) otherwise."""
    other = [k for k in recipe if k not in PARALLEL_RECIPE_KEYS + training_recipe.LORA_KEYS]
    if other:
        raise RuntimeError(f"--recipe with --method {method} takes only "
                           f"{', '.join(PARALLEL_RECIPE_KEYS + training_recipe.LORA_KEYS)} "
                           f"(got {', '.join(other)})")
    local = [k for k in recipe if k in LOCAL_FORWARD_KEYS]
    if local and method not in LOCAL_FORWARD_METHODS:
        raise RuntimeError(f"{', '.join(local)} with --method {method}: only {', '.join(LOCAL_FORWARD_METHODS)} "
                           "run them")
    lora = [k for k in recipe if k in training_recipe.LORA_KEYS]
    if lora and method not in LORA_METHODS:
        raise RuntimeError(f"{', '.join(lora)} with --method {method}: only {', '.join(LORA_METHODS)} run LoRA")
    if recipe.get("fsdp-reduce-every-micro-batch") and method not in FSDP_METHODS:
        raise RuntimeError(f"fsdp-reduce-every-micro-batch applies to {', '.join(FSDP_METHODS)}, not {method}")
    if recipe.get("optimizer-in-backward") and method not in ("fsdp2", "zero2", "tp"):
        # DDP's reducer runs after the parameter's post-accumulate-grad hooks: each rank would step on its own
        # unreduced gradient (and the reducer would then read a freed .grad)
        raise RuntimeError(f"optimizer-in-backward runs with FSDP2 (fsdp2, zero2) and tp only, not {method}: "
                           "the per-parameter step would run before the gradient is reduced")


def chunked_output_forward(model, chunks):
    """The model's forward as torchtune's TransformerDecoder runs it with output chunks (forward(input_ids) ->
    the list of logit chunks), so that the engine's hooks (DDP's forward, FSDP2's pre-/post-forward) wrap the
    chunked LM head as they wrap the model's own forward."""

    def forward(input_ids):
        return training_recipe.chunked_output(model, input_ids, chunks)

    return forward


@contextlib.contextmanager
def _fsdp_no_sync(model):
    """accelerate's Accelerator.no_sync for FSDP2 (accelerator.py): gradient sync off, back on after."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def grad_sync_context(step_module, model, method, micro, accum, reduce_every):
    """The data-parallel loop around one micro-batch (forward and backward): accelerate's `accumulate()` (what
    HF Trainer runs) enters its `no_sync()` for every micro-batch but the last, so only the last one reduces:
    `DistributedDataParallel.no_sync()` for DDP/ZeRO-1, `set_requires_gradient_sync(False)` for FSDP2 (the
    unsharded gradients accumulate until then). `reduce_every` (fsdp-reduce-every-micro-batch): torchtitan's
    FSDP2 loop, which leaves gradient sync on, so every micro-batch reduce-scatters into the sharded gradient."""
    if micro == accum - 1:
        return contextlib.nullcontext()
    if method in ("ddp", "zero1"):
        return step_module.no_sync()
    if method in FSDP_METHODS and not reduce_every:
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def _recipe(text):
    try:
        return training_recipe.parse_recipe(text)
    except training_recipe.RecipeError as e:
        raise argparse.ArgumentTypeError(str(e))


# ---------------------------------------------------------------------------------------------------------
# Memory probes. Both expose: current(), a per-phase peak (slot 0) and a window peak (slot 1).
# ---------------------------------------------------------------------------------------------------------

class CpuProbe:
    def __init__(self):
        import counting_allocator

        self.alloc = counting_allocator.install()  # before any tensor that should be counted

    def current(self):
        return self.alloc.current()

    def reset_peak(self, slot):
        self.alloc.reset_peak(slot)

    def peak(self, slot):
        return self.alloc.peak(slot)

    def start_log(self, min_bytes):
        self.alloc.start_log(min_bytes, True)

    def stop_log(self):
        return self.alloc.stop_log()


class CudaProbe:
    """torch.cuda has one peak counter (slot 0); the window peak is the maximum of the phase peaks that tile
    the window (between phases only the next batch is made, after the previous one was released)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def current(self):
        return self.torch.cuda.memory_allocated(self.device)

    def reset_peak(self, slot):
        if slot == 0:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, slot):
        if slot != 0:
            return None
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.max_memory_allocated(self.device)

    def reserved_peak(self):
        return self.torch.cuda.max_memory_reserved(self.device)

    def start_log(self, min_bytes):
        pass

    def stop_log(self):
        return []


# ---------------------------------------------------------------------------------------------------------
# Model, parallelism, optimizer.
# ---------------------------------------------------------------------------------------------------------

def build_eager_model(arch, size):
    """The export's model: export_hf.resolve + build_model (fp32, dropout 0, train, use_cache False, seed 0)."""
    import torch
    import export_hf

    arch, model_type, kwargs, label = export_hf.resolve(arch, size)
    model, attn = export_hf.build_model(arch, model_type, kwargs, "cpu", torch.float32, keep_dropout=False,
                                        seed=0)
    return arch, model, attn, label


def decoder_layers(model):
    """The nn.ModuleList of decoder layers (model.model.layers, model.transformer.h, ...)."""
    import torch

    n = model.config.num_hidden_layers
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise RuntimeError(f"cannot find the decoder layers: {len(lists)} ModuleLists of length {n}: "
                           f"{[name for name, _ in lists]}")
    return lists[0]


def tp_layer_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def apply_tp(model, arch, tp_mesh, vocab_parallel, src_data_rank=0):
    """Megatron-style TP of every decoder layer; optionally vocab-parallel embedding and lm_head.

    src_data_rank None: each rank keeps its own slice, nothing is sent (as loading one's shard of a checkpoint)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if arch not in LLAMA_FAMILY:
        raise RuntimeError(f"tensor parallelism is implemented for the Llama family ({', '.join(LLAMA_FAMILY)}), "
                           f"not {arch}")
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    size = tp_mesh.size()
    if heads % size or kv % size:
        raise RuntimeError(f"tp degree {size} does not divide {heads} attention heads / {kv} key-value heads")
    _, layers = decoder_layers(model)
    for layer in layers:
        parallelize_module(layer, tp_mesh, tp_layer_plan(), src_data_rank=src_data_rank)
    if vocab_parallel:
        if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
            # parallelize_module replaces embed_tokens.weight with a new DTensor Parameter; lm_head keeps the old
            # one and gets its own shard: the tie is silently broken (qwen2 tiny: 51 parameters instead of 50).
            raise RuntimeError("--tp-vocab-parallel with tied embeddings is not supported (parallelize_module "
                               "would untie lm_head from the embedding)")
        parallelize_module(model, tp_mesh, {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        })


FSDP_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def mixed_precision_policy(param_dtype, reduce_dtype):
    """FSDP2's MixedPrecisionPolicy for --fsdp-param-dtype / --fsdp-reduce-dtype (None: not given; FSDP then
    reduces in the parameter dtype), or None when neither is given (no policy, as before)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None and reduce_dtype is None:
        return None
    dtype = lambda name: getattr(torch, FSDP_DTYPES[name]) if name else None  # noqa: E731
    return MixedPrecisionPolicy(param_dtype=dtype(param_dtype), reduce_dtype=dtype(reduce_dtype))


def apply_fully_shard(model, mesh, reshard_after_forward, mp_policy=None):
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **kw)


def optimizer_class(name, impl):
    """(class, keyword arguments, needs the embedding override) for an optimizer name, built as HF Trainer
    (transformers 4.57 trainer.py, get_optimizer_cls_and_kwargs) builds the same kind, with lr 1e-4 and the
    library's defaults otherwise (no weight-decay parameter groups: Trainer's default weight_decay is 0)."""
    import torch

    loop = {"single-tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    if impl and impl not in OPTIMIZER_IMPLS[name]:
        choices = ", ".join(OPTIMIZER_IMPLS[name]) or "none"
        raise RuntimeError(f"--optimizer-impl {impl} does not apply to {name} (choices: {choices})")
    if name == "adamw":
        return torch.optim.AdamW, dict(lr=ADAMW_LR, **loop.get(impl, {})), False
    if name in ("sgd", "sgd-nomomentum"):
        momentum = SGD_MOMENTUM if name == "sgd" else 0.0
        return torch.optim.SGD, dict(lr=SGD_LR, momentum=momentum, **loop.get(impl, {})), False
    if name == "adafactor":
        # optim="adafactor": Adafactor(lr=..., scale_parameter=False, relative_step=False), beta1 None
        from transformers.optimization import Adafactor

        return Adafactor, dict(lr=ADAMW_LR, scale_parameter=False, relative_step=False), False
    if impl == "torchao":
        # optim="adamw_torch_8bit": torchao.optim.AdamW8bit (block 256, weight_decay 0.01)
        from torchao.optim import AdamW8bit

        return AdamW8bit, dict(lr=ADAMW_LR), False
    # optim="adamw_bnb_8bit" / "paged_adamw_8bit": bitsandbytes.optim.AdamW(optim_bits=8, is_paged=...), and
    # Trainer keeps the weights of every nn.Embedding in 32-bit states (GlobalOptimManager override)
    import bitsandbytes

    return (bitsandbytes.optim.AdamW, dict(lr=ADAMW_LR, optim_bits=8, is_paged=(name == "paged-adamw8bit")),
            True)


def embeddings_in_32bit(model):
    """HF Trainer's override for bitsandbytes 8-bit optimizers: nn.Embedding weights get 32-bit states.
    Returns the overridden parameter names. The manager is a process-wide singleton that holds the modules it
    was given and matches parameters by id(): it is reset first, so that an earlier case's model (eager_runs.py
    runs many in one process) neither stays alive nor lends its overrides to a parameter that reuses an id."""
    import bitsandbytes
    import torch

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    manager.initialize()
    names = []
    for mod_name, module in (model.named_modules() if model is not None else []):
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
            names.append(f"{mod_name}.weight")
    return names


def make_optimizer(name, params, method, impl="", model=None):
    """The optimizer of --optimizer NAME (OPTIMIZERS) with --optimizer-impl IMPL ("" = the default choice).

    DTensor and plain parameters go into separate param groups: a foreach step (the CUDA default) cannot mix
    them in one group ("got mixed torch.Tensor and DTensor"). On CPU the default is the single-tensor loop, where
    the grouping changes nothing. zero1: ZeroRedundancyOptimizer around the same optimizer class. `model`: where
    the bitsandbytes optimizers look for nn.Embedding modules (HF Trainer's 32-bit override); the names it
    overrides are in the optimizer's `embeddings_32bit` attribute.
    """
    from torch.distributed.tensor import DTensor

    cls, kw, override = optimizer_class(name, impl)
    params = list(params)
    if method == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt, ngroups = ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw), 1
    else:
        dt = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        groups = [{"params": g} for g in (dt, plain) if g]
        opt, ngroups = cls(groups, **kw), len(groups)
    opt.embeddings_32bit = embeddings_in_32bit(model) if override else []
    return opt, ngroups


def optimizer_impl(opt):
    """What each param group's step will run: foreach/fused when set, else PyTorch's default choice; for the
    optimizers outside torch.optim, the library's one step loop."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    inner = getattr(opt, "optim", opt)
    module = type(inner).__module__
    out = []
    for g in inner.param_groups:
        if module.startswith("bitsandbytes"):
            # the CPU backend runs a PyTorch reference of the 8-bit step (fp32 dequantized copies); CUDA a kernel
            devices = {p.device.type for p in g["params"]}
            out.append("bitsandbytes-" + "+".join(sorted(devices)))
        elif module.startswith("torchao"):
            out.append("torchao-compiled")  # torch.compile(single_param_adam) per parameter
        elif module.startswith("transformers"):
            out.append("single-tensor")  # Adafactor.step: one parameter at a time
        elif g.get("fused"):
            out.append("fused")
        elif g.get("foreach") is not None:
            out.append("foreach" if g["foreach"] else "single-tensor")
        else:
            _, foreach = _default_to_fused_or_foreach(g["params"], False, use_fused=False)
            out.append("foreach" if foreach else "single-tensor")
    return out


# ---------------------------------------------------------------------------------------------------------
# Byte counts of identifiable state.
# ---------------------------------------------------------------------------------------------------------

def _sizes(value):
    """DDP logging data keeps bucket sizes as a string "a, b, c"; returns [a, b, c] (ints)."""
    if value is None or isinstance(value, list):
        return value
    return [int(x) for x in str(value).replace(",", " ").split()]


def _local(t):
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def plain_parts(t):
    """The plain tensors that hold a tensor's data, by name: {"": t} for a plain tensor; the local shard of a
    DTensor; the inner tensors of a wrapper subclass (torchao's OptimState8bit: codes, scale, qmap)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    t = _local(t)
    if not is_traceable_wrapper_subclass(t):
        return {"": t}
    out = {}
    for attr in t.__tensor_flatten__()[0]:
        out.update({(f"{attr}.{k}" if k else attr): v for k, v in plain_parts(getattr(t, attr)).items()})
    return out


def storage_bytes(tensors):
    """Bytes of the distinct storages behind the tensors (local shards of DTensors, inner tensors of wrapper
    subclasses; tied weights and shared tables once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        for part in plain_parts(t).values():
            st = part.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen and st.nbytes() > 0:
                seen.add(key)
                total += st.nbytes()
    return total


def optimizer_state_tensors(opt):
    import torch

    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its local optimizer in .optim
    out = []
    for state in inner.state.values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


def optimizer_state_layout(opt, named_params):
    """Per parameter with optimizer state, in parameter order: its (local) shape and dtype and each state
    tensor's parts with dtype, shape and storage bytes. A storage already listed (bitsandbytes' qmap tables,
    shared by every parameter) is marked "shared" and not counted again in optimizer_state_bytes."""
    import torch

    inner = getattr(opt, "optim", opt)
    seen, out = set(), []
    for name, p in named_params:
        state = inner.state.get(p)
        if not state:
            continue
        local = _local(p)
        entry = {"param": name, "shape": list(local.shape), "dtype": str(local.dtype).replace("torch.", ""),
                 "states": {}}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            for part_name, part in plain_parts(value).items():
                st = part.untyped_storage()
                row = {"dtype": str(part.dtype).replace("torch.", ""), "shape": list(part.shape),
                       "bytes": st.nbytes()}
                if (st.data_ptr(), st.nbytes()) in seen:
                    row["shared"] = True
                seen.add((st.data_ptr(), st.nbytes()))
                entry["states"][f"{key}.{part_name}" if part_name else key] = row
        out.append(entry)
    return out


def own_storages(model, probe):
    """Gives every parameter and buffer storage a copy made by the allocator, as a load onto a GPU copies every
    weight into the caching allocator: from_pretrained can leave a weight on its safetensors file's memory, which
    the counting allocator never sees. The quantizer's own tensors (Params4bit, Int8Params) are left alone.
    Returns the bytes that were not counted before (the live count rose by them; a counted original is freed
    as its copy is made and leaves the count where it was)."""
    import gc

    import torch

    tensors = [t for m in model.modules() for t in list(m._parameters.values()) + list(m._buffers.values())
               if t is not None and type(t).__name__ not in ("Params4bit", "Int8Params")]
    by_storage = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes():
            by_storage.setdefault((st.data_ptr(), st.nbytes()), []).append(t)
    uncounted = 0
    for (_, nbytes), users in by_storage.items():
        before = probe.current()
        old = users[0].untyped_storage()
        fresh = torch.empty(nbytes, dtype=torch.uint8, device=users[0].device)
        fresh.copy_(torch.empty(0, dtype=torch.uint8, device=users[0].device).set_(old))
        for t in users:  # the same objects keep their identity (tied weights stay tied)
            t.data = torch.empty(0, dtype=t.dtype, device=t.device).set_(fresh.untyped_storage(), t.storage_offset(),
                                                                        t.shape, t.stride())
        del fresh, old
        gc.collect()
        uncounted += probe.current() - before
    return uncounted


def _dtype_name(p):
    return str(p.dtype).replace("torch.", "")


def _storage_format(p):
    kind = type(p).__name__
    if kind == "Params4bit":
        return f"{p.quant_state.quant_type}-packed-{_dtype_name(p)}"
    if kind == "Int8Params":
        return "int8-rowwise"
    return _dtype_name(p)


def _bytes_by(params, key):
    from collections import defaultdict

    acc = defaultdict(int)
    for p in params:
        acc[key(p)] += storage_bytes([p])
    return dict(sorted(acc.items()))


def frozen_bytes_by_format(model):
    """Bytes of the frozen parameters by storage format: float dtypes, "nf4-packed-uint8", "int8-rowwise", ..."""
    return _bytes_by((p for p in dict(model.named_parameters()).values() if not p.requires_grad), _storage_format)


def adapter_report(model, recipe, precision):
    """What an estimate of a LoRA / QLoRA step is checked against: the adapter settings PEFT resolved, the
    adapted modules (grouped over the decoder layers), the trainable parameters (count, bytes by dtype), the
    frozen ones by storage format (4-bit packed, int8, float dtypes) and the quantization state beside them."""
    import re
    from collections import defaultdict

    import torch
    from peft.tuners.lora import LoraLayer

    o = training_recipe.options(recipe)
    lora = {"r": o["lora-r"], "alpha": o["lora-alpha"], "dropout": o["lora-dropout"],
            "targets": o["lora-targets"] or "peft-default", "modules_to_save": o["lora-modules-to-save"],
            "bias": "none", "autocast_adapter_dtype": True}
    groups = {}
    adapter_dtypes = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        key = re.sub(r"\.\d+\.", ".*.", name)
        g = groups.setdefault(key, {"module": key, "count": 0, "base": type(base).__name__,
                                    "in_features": module.in_features, "out_features": module.out_features,
                                    "dropout": type(module.lora_dropout["default"]).__name__,
                                    "scaling": module.scaling["default"]})
        g["count"] += 1
        adapter_dtypes.update(str(p.dtype).replace("torch.", "") for n, p in module.named_parameters()
                              if "lora_" in n)
    lora["adapted_modules"] = sum(g["count"] for g in groups.values())
    lora["adapted"] = list(groups.values())
    lora["adapter_dtypes"] = sorted(adapter_dtypes)
    # enable_input_require_grads() (PEFT with checkpointing): the embedding output becomes a leaf with a .grad
    lora["input_require_grads_hook"] = hasattr(model, "_require_grads_hook")
    out = {"lora": lora}

    params = dict(model.named_parameters())  # one entry per Parameter (tied weights once)
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    frozen = {n: p for n, p in params.items() if not p.requires_grad}

    def logical_numel(p):
        state = getattr(p, "quant_state", None)
        return int(torch.Size(state.shape).numel()) if state is not None else p.numel()

    out["trainable_parameters"] = sum(p.numel() for p in trainable.values())
    out["trainable_bytes"] = storage_bytes(trainable.values())
    out["trainable_bytes_by_dtype"] = _bytes_by(trainable.values(), _dtype_name)
    out["frozen_parameters"] = sum(logical_numel(p) for p in frozen.values())
    out["frozen_bytes"] = storage_bytes(frozen.values())
    out["frozen_bytes_by_format"] = frozen_bytes_by_format(model)
    out["buffer_bytes"] = storage_bytes(model.buffers())

    if o["quant"] != "none":
        # the tensors of the quantization state, each storage once: 4-bit absmax (uint8 with double quant), its
        # nested fp32 absmax, the 256-entry nested code, the mean offset, the 16-entry LUT; int8: SCB (fp32 [N])
        parts = defaultdict(list)
        state_dtypes, modules = set(), 0
        for p in frozen.values():
            state = getattr(p, "quant_state", None)
            if state is not None:
                modules += 1
                state_dtypes.add(str(state.dtype).replace("torch.", ""))
                parts["absmax"].append(state.absmax)
                parts["code"].append(state.code)
                if state.nested:
                    parts["offset"].append(state.offset)
                    parts["nested_absmax"].append(state.state2.absmax)
                    parts["nested_code"].append(state.state2.code)
            elif type(p).__name__ == "Int8Params":
                modules += 1
                parts["SCB"].append(p.SCB)
        config = model.config.quantization_config  # as the quantizer ran it
        _, dtype = training_recipe.bnb_quantization_config(recipe, precision)
        quant = {"type": o["quant"], "quantized_modules": modules, "load_dtype": str(dtype).replace("torch.", "")}
        if o["quant"] == "int8":
            quant.update(threshold=config.llm_int8_threshold, has_fp16_weight=config.llm_int8_has_fp16_weight)
        else:
            quant.update(double_quant=config.bnb_4bit_use_double_quant,
                         compute_dtype=str(config.bnb_4bit_compute_dtype).replace("torch.", ""),
                         quant_storage=str(config.bnb_4bit_quant_storage).replace("torch.", ""),
                         blocksize=64, quant_state_dtypes=sorted(state_dtypes))
        quant["state_bytes_by_part"] = {k: storage_bytes(v) for k, v in sorted(parts.items())}
        quant["state_bytes"] = storage_bytes(t for v in parts.values() for t in v)
        out["quant"] = quant
    return out


def fsdp_groups(model):
    """Per fully_shard group: its parameters' padded shard and padded unsharded (all-gather) bytes; the
    all-gather moves the MixedPrecisionPolicy's param_dtype when one is set (FSDPParamGroup.mp_policy; the
    FSDPParam's own dtype attributes only exist after the first forward)."""
    from torch.distributed.fsdp import FSDPModule

    groups = []
    for name, m in model.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        pg = m._get_fsdp_state()._fsdp_param_group
        if pg is None:
            continue
        sharded = unsharded = 0
        for fp in pg.fsdp_params:
            n = 1
            for d in fp.padded_sharded_param_size:
                n *= d
            elt = fp.sharded_param.element_size()
            gathered_elt = pg.mp_policy.param_dtype.itemsize if pg.mp_policy.param_dtype is not None else elt
            sharded += n * elt
            unsharded += n * gathered_elt * pg.mesh_info.shard_mesh_size
        groups.append({"module": name or "<root>", "params": len(pg.fsdp_params), "padded_shard_bytes": sharded,
                       "padded_unsharded_bytes": unsharded})
    return groups


# ---------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------

def moe_routing_record(model, ids):
    """{"moe_routing": ...} for a mixture-of-experts model: the rows its router gives each expert of each layer for
    the last batch (one forward after the measured steps, so the counting is not in them), beside the balanced
    tokens x top_k / experts that llmem's estimate assumes; {} for another model."""
    import torch

    blocks = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m, "top_k")]
    if not blocks or ids is None:
        return {}
    rows = []

    def count(block):
        def hook(module, args, logits):
            chosen = torch.topk(logits, block.top_k, dim=-1).indices
            rows.append(torch.bincount(chosen.flatten(), minlength=len(block.experts)).tolist())
        return hook

    handles = [b.gate.register_forward_hook(count(b)) for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    experts, top_k = len(blocks[0].experts), blocks[0].top_k
    return {"moe_routing": {"experts": experts, "top_k": top_k, "balanced_rows": ids.numel() * top_k / experts,
                            "rows_per_layer": rows, "max_rows": max(max(r) for r in rows),
                            "min_rows": min(min(r) for r in rows)}}


def run(args, rank, world, local_rank, record):
    import torch

    times = record.setdefault("times_s", {})
    t_start = time.perf_counter()
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
        probe = CudaProbe(device)
    else:
        probe = CpuProbe()  # first: everything the process allocates from here on is counted
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    # -- layout: data-parallel x tensor-parallel ranks
    method = args.method
    if method == "single":
        tp = 1
    elif method == "tp":
        tp = args.tp or world
    elif method == "fsdp2_tp":
        tp = args.tp or 2
    else:
        tp = 1
    if method in ("ddp", "zero1", "zero2", "fsdp2") and args.tp not in (None, 1):
        raise RuntimeError(f"{method} takes no --tp")
    if method == "single" and world != 1:
        raise RuntimeError(f"single runs one process (got world size {world})")
    if method == "tp" and tp != world:
        raise RuntimeError(f"tp uses every rank for tensor parallelism: --tp {tp} != world size {world}")
    if world % tp:
        raise RuntimeError(f"world size {world} is not a multiple of --tp {tp}")
    dp = world // tp
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        raise RuntimeError("--steps and --batch must be >= 1 and --seq >= 2")
    if args.tp_vocab_parallel and method not in ("tp", "fsdp2_tp"):
        raise RuntimeError("--tp-vocab-parallel applies to tp and fsdp2_tp only")
    recipe = args.recipe
    if method != "single":
        check_parallel_recipe(recipe, method)
    elif recipe.get("fsdp-reduce-every-micro-batch"):
        raise RuntimeError("fsdp-reduce-every-micro-batch applies to FSDP2 methods, not single")
    opts = training_recipe.options(recipe)
    mp_policy = mixed_precision_policy(args.fsdp_param_dtype, args.fsdp_reduce_dtype)
    if mp_policy is not None and method not in ("fsdp2", "zero2", "fsdp2_tp"):
        raise RuntimeError("--fsdp-param-dtype/--fsdp-reduce-dtype apply to fsdp2, zero2 and fsdp2_tp only")
    if mp_policy is not None and args.precision != "fp32":
        raise RuntimeError("--fsdp-param-dtype/--fsdp-reduce-dtype replace autocast: use --precision fp32")
    backend = "nccl" if args.device == "cuda" else "gloo"
    record.update(dp=dp, tp=tp, backend=backend if method != "single" else None)

    import torch.distributed as dist

    if method != "single":
        dist.init_process_group(backend)
    record["baseline_bytes"] = probe.current()  # live before the model exists (process group state, ...)

    # -- model (same preset, seed and settings as the TorchScript export)
    t0 = time.perf_counter()
    arch, model, attn, label = build_eager_model(args.arch, args.size)
    record.update(arch=arch, attn_implementation=attn, label=label,
                  num_parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    model.to(device)
    peft_model = None  # the PeftModel around `model` (whose modules PEFT replaced in place) with lora-r
    if recipe:
        record["recipe"] = dict(recipe)
        if opts["lora-r"] is not None and opts["quant"] == "torchao-nf4":
            record["checkpointed_layers"] = []
            record["lora"] = {"impl": "torchtune", "adapted_modules": training_recipe.apply_torchtune_qlora(
                model, decoder_layers(model)[1], recipe)}
            record["trainable_bytes"] = storage_bytes(p for p in model.parameters() if p.requires_grad)
        elif opts["lora-r"] is not None:
            if opts["quant"] != "none":
                if arch == "codegen":  # export_hf turns its position table into buffers after the build
                    raise training_recipe.RecipeError("quant: codegen's reloaded model would differ from the "
                                                      "export's (its sin/cos table is made a buffer after the build)")
                model = training_recipe.load_quantized(model, recipe, args.precision, device,
                                                       float_storage=args.method == "fsdp2")
                record["copied_uncounted_bytes"] = own_storages(model, probe)
            peft_model, record["checkpointed_layers"] = training_recipe.apply_lora(model, decoder_layers(model)[1],
                                                                                   recipe)
            record.update(adapter_report(model, recipe, args.precision))
        else:
            record["checkpointed_layers"] = training_recipe.apply_checkpointing(model, decoder_layers(model)[1],
                                                                                recipe)
    record["model_bytes"] = probe.current()
    times["build"] = time.perf_counter() - t0

    # -- parallelism
    t0 = time.perf_counter()
    if args.log_allocs:
        probe.start_log(args.log_allocs)
    mesh = None
    dp_rank = 0
    if method in ("fsdp2", "zero2", "tp", "fsdp2_tp"):
        from torch.distributed.device_mesh import init_device_mesh

        if method == "fsdp2_tp":
            mesh = init_device_mesh(args.device, (dp, tp), mesh_dim_names=("dp", "tp"))
        elif method == "tp":
            mesh = init_device_mesh(args.device, (tp,), mesh_dim_names=("tp",))
        else:
            mesh = init_device_mesh(args.device, (dp,), mesh_dim_names=("dp",))
    import export_hf

    chunks = int(opts["loss"].split("-")[1]) if opts["loss"].startswith("chunked-") else 0
    if chunks and method != "single":
        model.forward = chunked_output_forward(model, chunks)  # an instance attribute: nn.Module's hooks still run
    if method in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {"device_ids": [local_rank]} if args.device == "cuda" else {}
        step_module = DDP(model if chunks else export_hf.LossWrapper(model), **kw)  # defaults: bucket_cap_mb None, no bucket views
        dp_rank = rank
        ld = step_module._get_ddp_logging_data()
        record["ddp"] = {"bucket_sizes_at_construction": _sizes(ld.get("bucket_sizes")),
                         "bucket_cap_bytes": ld.get("bucket_cap_bytes"),
                         "gradient_as_bucket_view": ld.get("gradient_as_bucket_view")}
    else:
        if method in ("tp", "fsdp2_tp"):
            apply_tp(model, arch, mesh["tp"], args.tp_vocab_parallel)
        if method in ("fsdp2", "zero2", "fsdp2_tp"):
            apply_fully_shard(model, mesh["dp"], reshard_after_forward=(method != "zero2"), mp_policy=mp_policy)
            record["fsdp_groups"] = fsdp_groups(model)
        if method in ("fsdp2", "zero2"):
            dp_rank = rank
        elif method == "fsdp2_tp":
            dp_rank = mesh["dp"].get_local_rank()
        step_module = export_hf.LossWrapper(peft_model or model)
    if args.log_allocs:
        record["setup_alloc_sizes"] = probe.stop_log()
    record["wrapped_bytes"] = probe.current()
    record["param_bytes"] = storage_bytes(model.parameters())
    record["dp_rank"] = dp_rank
    times["wrap"] = time.perf_counter() - t0

    # HF Trainer's optimizer takes the parameters that require grad (all of them, except under LoRA)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    if opts["optimizer-in-backward"]:
        per_param = training_recipe.optimizers_in_backward(
            trainable,
            lambda ps: make_optimizer(args.optimizer, ps, method, args.optimizer_impl, model)[0])
        optimizers = list(per_param.values())
        record["optimizers_in_backward"] = len(optimizers)
        record["optimizer_param_groups"] = 1
    else:
        opt, ngroups = make_optimizer(args.optimizer, trainable, method, args.optimizer_impl, model)
        optimizers = [opt]
        record["optimizer_param_groups"] = ngroups
    record["optimizer_impl"] = optimizer_impl(optimizers[0])
    record["optimizer_embeddings_32bit"] = optimizers[0].embeddings_32bit
    record["optimizer_init_bytes"] = probe.current()

    # -- steps
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(INPUT_SEED + dp_rank)

    def autocast():
        if args.precision == "bf16-autocast":
            return torch.autocast(args.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if args.tp_vocab_parallel:
        from torch.distributed.tensor.parallel import loss_parallel
        loss_ctx = loss_parallel
    else:
        loss_ctx = contextlib.nullcontext
    window_start = 1 if args.steps > 1 else 0
    accum = opts["grad-accum"]
    keep_outputs = opts["keep-outputs"]
    if chunks:  # torchtune makes its ignore column once, at setup
        ignore_column = torch.full((args.batch, 1), training_recipe.IGNORE_INDEX, dtype=torch.long, device=device)
    losses, steps = [], []
    ids = labels = None
    outputs = None  # keep-outputs: the last forward's outputs, bound until the next forward returns
    routing = contextlib.ExitStack()  # moe-routing=balanced / busiest:F: the experts get the rows the estimate assumes
    if opts["moe-routing"] == "balanced" or opts["moe-routing"].startswith("busiest:"):
        import export_hf
        busiest = opts["moe-routing"].partition(":")[2]
        routing.enter_context(export_hf.balanced_moe_routing(
            busiest_percent=int(round(float(busiest) * 100)) if busiest else 100))
    for step in range(args.steps):
        step_rec = {"peak": {}, "end": {}, "times_s": {}}
        micro_batches = []
        log = step == args.steps - 1 and args.log_allocs

        def phase(name, fn):
            if log:
                probe.start_log(args.log_allocs)
            probe.reset_peak(0)
            t = time.perf_counter()
            out = fn()
            if args.device == "cuda":
                torch.cuda.synchronize(device)
            seconds = round(time.perf_counter() - t, 4)
            peak, end = probe.peak(0), probe.current()
            if name != "optimizer":
                micro_batches[-1]["peak"][name] = peak
            # over the micro-batches of the step: the highest peak, the total time, the last end
            step_rec["times_s"][name] = round(step_rec["times_s"].get(name, 0.0) + seconds, 4)
            step_rec["peak"][name] = max(step_rec["peak"].get(name, peak), peak)
            step_rec["end"][name] = end
            if log:
                step_rec.setdefault("alloc_sizes", {})[name] = probe.stop_log()
            return out

        for micro in range(accum):
            sync_context = contextlib.ExitStack()
            sync_context.enter_context(grad_sync_context(step_module, model, method, micro, accum,
                                                         opts["fsdp-reduce-every-micro-batch"]))
            micro_batches.append({"peak": {}})
            ids = labels = None  # the previous batch is gone before the next one exists
            ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen, dtype=torch.long).to(device)
            labels = ids.clone()  # a separate tensor, as data collators (and llmem measure) make it
            if step == 0 and micro == 0:
                record["input_bytes"] = storage_bytes([ids, labels])
            if step == window_start and micro == 0:
                probe.reset_peak(1)
            if micro == 0:
                step_rec["start_bytes"] = probe.current()

            def forward():
                """(loss, what the loop keeps bound: the outputs for keep-outputs, else nothing)."""
                with loss_ctx(), autocast():
                    if chunks:
                        logits = (training_recipe.chunked_output(model, ids, chunks) if method == "single"
                                  else step_module(ids) if method in ("ddp", "zero1") else model(ids))
                        shifted = training_recipe.shifted_labels(labels, ignore_column)
                        return training_recipe.chunked_cross_entropy(logits, shifted), logits
                    if keep_outputs:
                        out = (peft_model or model)(input_ids=ids, labels=labels, use_cache=False, return_dict=True)
                        return out.loss, out
                    return step_module(ids, labels), None

            loss, new_outputs = phase("forward", forward)
            outputs = new_outputs if keep_outputs else None
            new_outputs = None

            def backward():
                nonlocal loss
                if accum > 1:
                    loss = loss / accum  # HF Trainer scales each micro-batch's loss
                with loss_ctx():
                    loss.backward()
                value = _local(loss).detach().item()  # replicated DTensor loss: the local value is the loss
                loss = None
                return value

            losses.append(round(phase("backward", backward), 6))
            sync_context.close()
        if step == args.steps - 1:
            record["grad_bytes"] = storage_bytes(p.grad for p in step_module.parameters())

        def optimizer_step():
            if opts["optimizer-in-backward"]:
                return  # every parameter was stepped and zeroed by its hook during backward
            if opts["grad-clip"] is not None:
                torch.nn.utils.clip_grad_norm_(step_module.parameters(), opts["grad-clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)

        phase("optimizer", optimizer_step)
        left = [n for n, p in step_module.named_parameters() if p.grad is not None]
        if left:
            raise RuntimeError(f"zero_grad(set_to_none=True) left {len(left)} gradients, e.g. {left[0]}")
        step_rec["peak_bytes"] = max(step_rec["peak"].values())
        if accum > 1:
            step_rec["micro_batches"] = micro_batches
        if method in ("ddp", "zero1"):
            ld = step_module._get_ddp_logging_data()
            step_rec["ddp_bucket_sizes"] = _sizes(ld.get("rebuilt_bucket_sizes") or ld.get("bucket_sizes"))
        steps.append(step_rec)

    routing.close()
    record.update(moe_routing_record(model, ids))
    last = steps[-1]
    window_phase_max = max(s["peak_bytes"] for s in steps[window_start:])
    record["peak_bytes"] = probe.peak(1) if args.device == "cpu" else window_phase_max
    if record["peak_bytes"] != window_phase_max:
        raise RuntimeError(f"window peak {record['peak_bytes']} != max of phase peaks {window_phase_max}")
    record["phase_peak_bytes"] = dict(last["peak"])
    record["phase_end_bytes"] = dict(last["end"])
    record["start_bytes"] = last["start_bytes"]
    record["end_bytes"] = probe.current()
    record["optimizer_state_bytes"] = storage_bytes(t for o in optimizers for t in optimizer_state_tensors(o))
    if accum > 1:
        record["micro_batch_phase_peak_bytes"] = [mb["peak"] for mb in last["micro_batches"]]
    # names as in the HF model (the same Parameter objects under DDP/FSDP2 wrappers), as optimizer_embeddings_32bit
    if len(optimizers) == 1:
        record["optimizer_state_layout"] = optimizer_state_layout(optimizers[0], model.named_parameters())
    if peft_model is not None:
        # bitsandbytes' Linear4bit.forward casts its bias to the input's (compute) dtype in place, for good
        record["frozen_bytes_by_format_end"] = frozen_bytes_by_format(model)
    record["losses"] = losses
    record["steps"] = steps
    if args.device == "cuda":
        record["peak_reserved_bytes"] = probe.reserved_peak()
    if method in ("ddp", "zero1"):
        record["ddp"]["bucket_sizes_after_steps"] = steps[-1]["ddp_bucket_sizes"]
    times["total"] = time.perf_counter() - t_start
    for k in times:
        times[k] = round(times[k], 3)
    if method != "single":
        dist.barrier()
        dist.destroy_process_group()


def main():
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.makedirs(args.out_dir, exist_ok=True)
    import torch

    record = {"arch": args.arch, "size": args.size, "export": args.export, "method": args.method,
              "world_size": world, "rank": rank, "batch": args.batch, "seq": args.seq,
              "precision": args.precision, "optimizer": args.optimizer, "optimizer_impl_requested": args.optimizer_impl,
              "fsdp_param_dtype": args.fsdp_param_dtype, "fsdp_reduce_dtype": args.fsdp_reduce_dtype,
              "tp_vocab_parallel": args.tp_vocab_parallel,
              "device": args.device, "torch": torch.__version__, "steps_run": args.steps}
    if args.device == "cuda":  # llmem validate maps the name to its GPU catalog
        record["device_name"] = torch.cuda.get_device_name(local_rank)
    try:
        run(args, rank, world, local_rank, record)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then the rank fails
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        head = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        with open(os.path.join(args.out_dir, f"rank{rank}.error"), "w") as f:
            f.write(head + "\n" + traceback.format_exc())
        raise
    # key order: what the C++ side reads first
    first = ["arch", "size", "export", "method", "dp", "tp", "world_size", "rank", "batch", "seq", "precision",
             "optimizer", "tp_vocab_parallel", "device", "backend", "torch", "peak_bytes", "phase_peak_bytes",
             "start_bytes", "losses"]
    out = {k: record[k] for k in first if k in record}
    out.update({k: v for k, v in record.items() if k not in out})
    tmp = os.path.join(args.out_dir, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, os.path.join(args.out_dir, f"rank{rank}.json"))


if __name__ == "__main__":
    main()
