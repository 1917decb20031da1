#!/usr/bin/env python3
"""Measures the real per-rank memory of distributed fine-tuning with PyTorch's own engines (DDP, ZeRO-1,
FSDP2 ZeRO-2/ZeRO-3, DTensor tensor parallelism, FSDP2 + TP) for a matrix of cases, one torchrun launch per case,
and appends one JSON line per rank to --out. The C++ side compares its per-rank estimates with these lines.

For each case the driver makes sure the TorchScript export of the same config exists (models/export_hf.py ARCH
--size SIZE, reused when present), checks once per export that the eager model the workers build has exactly the
export's parameters and buffers (names, shapes, values), then runs

  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node N \
      scripts/distributed_worker.py --method M ... --out-dir RANKDIR

and merges RANKDIR/rank*.json into --out (the ranks' stdout interleaves, so each rank writes its own file).
On CPU the ranks use gloo and a counting CPU allocator (scripts/counting_allocator.py, built once into
$LLMEM_BUILD_DIR/countalloc); with --device cuda, NCCL and torch.cuda.max_memory_allocated (one GPU per rank;
cases that need more GPUs than there are are skipped with the reason printed).

  scripts/distributed_runs.py --cases quick --out build/distributed_runs.jsonl   # what CI runs (< 4 min, 2 cores)
  scripts/distributed_runs.py --cases full --only fsdp2 --out runs.jsonl
  scripts/distributed_runs.py --cases recipes --out runs.jsonl   # FSDP2 MixedPrecisionPolicy, optimizer kinds,
                                                                 # accumulation and optimizer-in-backward loops
  scripts/distributed_runs.py --list --cases full

Exit status: 0 when every launched case succeeded, 1 when one failed (its rank's last error line is printed),
2 on bad arguments. Cases marked known-unsupported are not launched (the reason is printed) unless
--try-unsupported.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "distributed_worker.py")
EXPORTER = os.path.join(REPO, "models", "export_hf.py")


def case(arch, method, nproc, batch, seq, size="tiny", tp=None, precision="fp32", optimizer="adamw",
         vocab_parallel=False, unsupported=None, optimizer_impl="", fsdp_param_dtype=None, fsdp_reduce_dtype=None,
         recipe=""):
    """One launch. `unsupported`: a reason; the case is printed and skipped unless --try-unsupported.
    fsdp_param_dtype / fsdp_reduce_dtype: FSDP2's MixedPrecisionPolicy (None: not set). `recipe`: the worker's
    --recipe (grad-accum=K, optimizer-in-backward=1)."""
    if method == "single":
        dp, tp = 1, 1
    elif method == "tp":
        dp, tp = 1, nproc
    elif method == "fsdp2_tp":
        tp = tp or 2
        dp = nproc // tp
    else:
        dp, tp = nproc, 1
    mp = fsdp_param_dtype or fsdp_reduce_dtype
    name = (f"{arch}-{size}/{method}/dp{dp}xtp{tp}/b{batch}s{seq}/{precision}/{optimizer}"
            + (f"-{optimizer_impl}" if optimizer_impl else "")
            + (f"/mp-param-{fsdp_param_dtype or 'default'}-reduce-{fsdp_reduce_dtype or 'default'}" if mp else "")
            + ("/vocab-parallel" if vocab_parallel else "")
            + (f"/{recipe}" if recipe else ""))
    return dict(name=name, arch=arch, size=size, method=method, nproc=nproc, dp=dp, tp=tp, batch=batch, seq=seq,
                precision=precision, optimizer=optimizer, vocab_parallel=vocab_parallel, unsupported=unsupported,
                optimizer_impl=optimizer_impl, fsdp_param_dtype=fsdp_param_dtype,
                fsdp_reduce_dtype=fsdp_reduce_dtype, recipe=recipe)


def quick_cases():
    """CI: about 3 minutes on 2 cores (a launch of 1 or 2 ranks takes 7-10 s, of 4 ranks 15-17 s)."""
    # llama tiny (hidden 256, 4 layers, GQA 4/2 heads, vocab 8192) at two shapes
    cs = [case("llama", "single", 1, 2, 256),
          case("llama", "ddp", 2, 2, 256),
          case("llama", "fsdp2", 2, 2, 256),
          case("llama", "zero2", 2, 2, 256),
          case("llama", "tp", 2, 2, 256),
          case("llama", "single", 1, 4, 128),
          case("llama", "ddp", 2, 4, 128),
          case("llama", "fsdp2", 2, 4, 128)]
    cs += [case("llama", "zero1", 2, 2, 256),
           case("llama", "tp", 2, 2, 256, vocab_parallel=True),
           case("llama", "fsdp2_tp", 4, 2, 256, tp=2),
           case("llama", "ddp", 4, 2, 256),
           case("llama", "fsdp2", 4, 2, 256),
           # gpt2 tiny: tied embeddings (wte is lm_head), learned positions, Conv1D layers
           case("gpt2", "ddp", 2, 2, 256),
           case("gpt2", "fsdp2", 2, 2, 256),
           # bf16 autocast around forward + loss, fp32 weights, grads and states
           case("llama", "ddp", 2, 2, 256, precision="bf16-autocast"),
           case("llama", "fsdp2", 2, 2, 256, precision="bf16-autocast"),
           # LoRA: the frozen base sharded with the adapters, only the adapters' gradients reduced
           case("llama", "fsdp2", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear")]
    return cs


def full_cases():
    cs = quick_cases()
    cs += [case("llama", "zero2", 2, 4, 128),
           case("llama", "tp", 2, 4, 128),
           case("llama", "single", 1, 2, 256, optimizer="sgd"),
           case("llama", "ddp", 2, 2, 256, optimizer="sgd"),
           case("llama", "fsdp2", 2, 2, 256, optimizer="sgd"),
           case("llama", "zero1", 4, 2, 256),
           case("llama", "zero2", 4, 2, 256),
           case("llama", "tp", 4, 2, 256, unsupported="tp 4 does not divide the 2 key/value heads of llama tiny"),
           case("llama", "fsdp2_tp", 4, 2, 256, tp=2, vocab_parallel=True),
           case("llama", "fsdp2_tp", 4, 4, 128, tp=2),
           case("llama", "tp", 2, 2, 256, precision="bf16-autocast"),
           case("llama", "tp", 2, 2, 256, precision="bf16-autocast", vocab_parallel=True),
           case("llama", "zero2", 2, 2, 256, precision="bf16-autocast"),
           case("llama", "fsdp2_tp", 4, 2, 256, tp=2, precision="bf16-autocast"),
           case("llama", "ddp", 4, 4, 128),
           case("llama", "fsdp2", 4, 4, 128),
           case("gpt2", "single", 1, 2, 256),
           case("gpt2", "zero2", 2, 2, 256),
           case("gpt2", "zero1", 2, 2, 256),
           case("gpt2", "tp", 2, 2, 256, unsupported="the TP plan is written for Llama-family layers "
                                                       "(q/k/v/o_proj, gate/up/down_proj); gpt2 has fused c_attn"),
           case("qwen2", "tp", 2, 2, 256, vocab_parallel=True,
                unsupported="qwen2 ties lm_head to the embedding; parallelize_module replaces the embedding's "
                            "Parameter, which silently unties lm_head (51 instead of 50 parameters), so the run "
                            "would measure an untied model"),
           case("opt", "ddp", 2, 2, 256),
           case("opt", "fsdp2", 2, 2, 256)]
    for arch in ("mistral", "qwen2"):  # sliding-window mask (mistral), q/k/v biases + tied embeddings (qwen2)
        cs += [case(arch, "single", 1, 2, 256),
               case(arch, "ddp", 2, 2, 256),
               case(arch, "fsdp2", 2, 2, 256),
               case(arch, "zero2", 2, 2, 256),
               case(arch, "tp", 2, 2, 256),
               case(arch, "fsdp2_tp", 4, 2, 256, tp=2),
               case(arch, "fsdp2", 4, 2, 256)]
    # MixedPrecisionPolicy cases llmem validate can estimate from the fp32 exports: a 16-bit param_dtype needs an
    # export traced with 16-bit weights (the fp32 traces bake their casts in)
    return cs + [c for c in mixed_precision_cases() if not c["fsdp_param_dtype"]] + loop_cases()


def mixed_precision_cases():
    """FSDP2's MixedPrecisionPolicy: fp32 weights and optimizer states, 16-bit gathered parameters, no autocast."""
    cs = []
    for arch in ("llama", "gpt2"):
        cs += [case(arch, "fsdp2", 2, 2, 128, fsdp_param_dtype="bf16", fsdp_reduce_dtype="fp32"),  # torchtitan's
               case(arch, "fsdp2", 2, 2, 128, fsdp_param_dtype="bf16", fsdp_reduce_dtype="bf16"),
               case(arch, "fsdp2", 2, 2, 128, fsdp_param_dtype="bf16"),  # reduce in the param dtype
               case(arch, "fsdp2", 2, 2, 128, fsdp_reduce_dtype="bf16")]  # fp32 compute, bf16 reduce-scatter
    cs += [case("llama", "zero2", 2, 2, 128, fsdp_param_dtype="bf16", fsdp_reduce_dtype="fp32"),
           case("llama", "fsdp2_tp", 4, 2, 128, tp=2, fsdp_param_dtype="bf16", fsdp_reduce_dtype="fp32"),
           case("llama", "fsdp2_tp", 4, 2, 128, tp=2, vocab_parallel=True, fsdp_param_dtype="bf16",
                fsdp_reduce_dtype="fp32")]
    return cs


def recipe_cases():
    """FSDP2's MixedPrecisionPolicy and the optimizer kinds beyond AdamW/SGD under the data-parallel engines."""
    cs = mixed_precision_cases()
    cs += [case("llama", "fsdp2", 2, 2, 128),  # the same shape without a policy, for comparison
           case("llama", "ddp", 2, 2, 128, optimizer="adafactor"),
           case("llama", "zero1", 2, 2, 128, optimizer="adafactor"),
           case("llama", "ddp", 2, 2, 128, optimizer="sgd-nomomentum"),
           case("llama", "ddp", 2, 2, 128, optimizer="adamw8bit")]
    return cs + loop_cases() + local_forward_cases() + lora_cases()


def lora_cases():
    """PEFT LoRA and QLoRA under the engines that replicate the frozen base (DDP, ZeRO-1: only the adapters'
    gradients are in DDP's buckets, only their states are sharded), and LoRA under FSDP2, which shards and gathers
    the frozen base with the adapters and reduce-scatters only the adapters' gradients; QLoRA under FSDP2 gathers
    the 4-bit codes the same way."""
    cs = []
    for precision in ("fp32", "bf16-autocast"):
        cs.append(case("llama", "ddp", 2, 2, 128, precision=precision,
                       recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear"))
        cs.append(case("llama", "ddp", 2, 2, 128, precision=precision,
                       recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear,quant=nf4-dq"))
        cs.append(case("llama", "fsdp2", 2, 2, 128, precision=precision,
                       recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear"))
    cs += [case("opt", "ddp", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj"),
           case("llama", "zero1", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj"),
           case("llama", "ddp", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear,checkpointing=full"),
           case("opt", "fsdp2", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj"),
           case("llama", "zero2", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj"),
           case("llama", "fsdp2", 2, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear,checkpointing=full"),
           case("llama", "fsdp2", 4, 2, 128, recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear")]
    # QLoRA under FSDP2: the 4-bit codes stored in the load dtype (bnb_4bit_quant_storage), sharded and gathered
    for precision in ("fp32", "bf16-autocast"):
        cs.append(case("llama", "fsdp2", 2, 2, 128, precision=precision,
                       recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear,quant=nf4-dq"))
    cs.append(case("llama", "fsdp2", 2, 2, 128,
                   recipe="lora-r=8,lora-alpha=16,lora-targets=all-linear,checkpointing=full,quant=nf4"))
    return cs


def local_forward_cases():
    """The chunked loss and activation checkpointing under DDP and FSDP2: the model's forward changes, the
    engine's hooks run around it (FSDP2's run again for a checkpointed layer's recompute)."""
    cs = []
    for arch in ("llama", "gpt2"):
        for precision in ("fp32", "bf16-autocast"):
            for method in ("ddp", "fsdp2"):
                for recipe in ("loss=chunked-4", "checkpointing=full"):
                    cs.append(case(arch, method, 2, 2, 128, precision=precision, recipe=recipe))
    cs.append(case("llama", "fsdp2", 2, 2, 128, recipe="checkpointing=full,checkpointing-impl=non-reentrant"))
    return cs


def loop_cases():
    """Gradient accumulation and optimizer-in-backward under the data-parallel engines (the worker's
    grad_sync_context says which loop each engine runs)."""
    cs = []
    for arch in ("llama", "gpt2"):
        for precision in ("fp32", "bf16-autocast"):
            for method in ("ddp", "fsdp2"):
                cs.append(case(arch, method, 2, 2, 128, precision=precision, recipe="grad-accum=2"))
            cs.append(case(arch, "fsdp2", 2, 2, 128, precision=precision,
                           recipe="grad-accum=2,fsdp-reduce-every-micro-batch=1"))
            cs.append(case(arch, "fsdp2", 2, 2, 128, precision=precision, recipe="optimizer-in-backward=1"))
    cs += [case("llama", "zero1", 2, 2, 128, recipe="grad-accum=2"),
           case("llama", "zero2", 2, 2, 128, recipe="grad-accum=2"),
           case("llama", "zero2", 2, 2, 128, recipe="optimizer-in-backward=1"),
           case("llama", "tp", 2, 2, 128, recipe="grad-accum=2"),
           case("llama", "fsdp2_tp", 4, 2, 128, tp=2, recipe="grad-accum=2"),
           case("llama", "tp", 2, 2, 128, recipe="optimizer-in-backward=1"),
           # the reduce-scatter output cast into fp32 sharded gradients
           case("llama", "fsdp2", 2, 2, 128, fsdp_reduce_dtype="bf16",
                recipe="grad-accum=2,fsdp-reduce-every-micro-batch=1"),
           case("llama", "fsdp2", 2, 2, 128, fsdp_reduce_dtype="bf16", recipe="optimizer-in-backward=1")]
    return cs


def all_cases():
    """Every case once: the full matrix and the recipe cases (they share the loop cases)."""
    seen, cs = set(), []
    for c in full_cases() + recipe_cases():
        if c["name"] not in seen:
            seen.add(c["name"])
            cs.append(c)
    return cs


CASES = {"quick": quick_cases, "full": full_cases, "recipes": recipe_cases, "all": all_cases}


def rel(path):
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def default_export_dir():
    base = os.environ.get("LLMEM_BUILD_DIR", "build")
    return os.path.join(base if os.path.isabs(base) else os.path.join(REPO, base), "tiny_models")


# The export a case is estimated from: FSDP2's 16-bit param_dtype computes in bf16, which only a trace with bf16
# weights records (an fp32 trace bakes its fp32 casts in); the run itself keeps fp32 weights and lets the policy
# cast them.
EXPORT_DTYPES = {"bf16": "bfloat16"}


def export_dtype(c):
    return EXPORT_DTYPES.get(c["fsdp_param_dtype"] or "", "")


def ensure_export(arch, size, export_dir, python, dtype="", moe_imbalance=None):
    suffix = {"bfloat16": "-bf16"}.get(dtype, "") + (f"-busiest{moe_imbalance:g}" if moe_imbalance else "")
    path = os.path.join(export_dir, f"{arch}-{size}{suffix}.pt")
    if os.path.exists(path):
        return path, None
    os.makedirs(export_dir, exist_ok=True)
    t0 = time.time()
    cmd = [python, EXPORTER, arch, "--size", size, "--out", path] + (["--dtype", dtype] if dtype else []) + \
        (["--moe-imbalance", f"{moe_imbalance:g}"] if moe_imbalance else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export of {arch} {size} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return path, time.time() - t0


def check_export(arch, size, path, dtype=""):
    """The workers' eager model (export_hf.build_model of the same preset, seed 0; in `dtype` for an export traced
    in it) has exactly the export's parameters and buffers: same names, shapes, dtypes and values. Returns a
    one-line summary."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "models"))
    import export_hf

    a, model_type, kwargs, _ = export_hf.resolve(arch, size)
    eager, _ = export_hf.build_model(a, model_type, kwargs, "cpu", getattr(torch, dtype or "float32"),
                                     keep_dropout=False, seed=0)
    want = {"model." + k: v for k, v in eager.state_dict(keep_vars=False).items()}
    loaded = torch.jit.load(path, map_location="cpu")
    got = dict(loaded.state_dict())
    # non-persistent buffers (rotary inv_freq, codegen tables) are module state of the trace as well
    for name, buf in eager.named_buffers():
        want.setdefault("model." + name, buf)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise RuntimeError(f"{path}: the export's state differs from the eager {arch} {size} model: missing "
                           f"{missing[:3]}, extra {extra[:3]}")
    for name, t in want.items():
        g = got[name]
        if g.shape != t.shape or g.dtype != t.dtype or not torch.equal(g, t):
            raise RuntimeError(f"{path}: {name} differs from the eager model ({tuple(g.shape)} {g.dtype} vs "
                               f"{tuple(t.shape)} {t.dtype}, equal values: "
                               f"{g.shape == t.shape and bool(torch.equal(g, t))})")
    n = len({id(p) for p in eager.parameters()})
    return f"{len(want)} parameters and buffers ({n} distinct parameters) equal to the eager model's"


def last_error_line(rank_dir, output):
    """The first rank's error head (written by the worker), else the last error-looking line of torchrun's output."""
    for f in sorted(glob.glob(os.path.join(rank_dir, "rank*.error")),
                    key=lambda p: int(os.path.basename(p)[4:-6])):
        with open(f) as fh:
            return f"rank {os.path.basename(f)[4:-6]}: {fh.readline().strip()}"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[-400:]
    return lines[-1][-400:] if lines else "no output"


def run_case(c, args, export_path, rank_dir):
    cmd = [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(c["nproc"]), WORKER,
           "--arch", c["arch"], "--size", c["size"], "--export", rel(export_path), "--method", c["method"],
           "--batch", str(c["batch"]), "--seq", str(c["seq"]), "--precision", c["precision"],
           "--optimizer", c["optimizer"], "--device", args.device, "--steps", str(args.steps),
           "--out-dir", rank_dir]
    if c["method"] == "fsdp2_tp":
        cmd += ["--tp", str(c["tp"])]
    if c["vocab_parallel"]:
        cmd += ["--tp-vocab-parallel"]
    if c["optimizer_impl"]:
        cmd += ["--optimizer-impl", c["optimizer_impl"]]
    for flag, value in (("--fsdp-param-dtype", c["fsdp_param_dtype"]), ("--fsdp-reduce-dtype", c["fsdp_reduce_dtype"])):
        if value:
            cmd += [flag, value]
    if c["recipe"]:
        cmd += ["--recipe", c["recipe"]]
    if args.log_allocs:
        cmd += ["--log-allocs", str(args.log_allocs)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and its ranks: the session started for this launch
        output, _ = proc.communicate()
        rc = "timeout"
    wall = time.time() - t0
    records = []
    for r in range(c["nproc"]):
        f = os.path.join(rank_dir, f"rank{r}.json")
        if os.path.exists(f):
            with open(f) as fh:
                records.append(json.load(fh))
    if rc != 0 or len(records) != c["nproc"]:
        why = f"timed out after {args.timeout} s" if rc == "timeout" else f"exit {rc}"
        return None, wall, f"{why}, {len(records)}/{c['nproc']} rank results; {last_error_line(rank_dir, output)}"
    return records, wall, None


def mib(b):
    return f"{b / 2**20:8.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="quick", choices=sorted(CASES))
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="run only cases whose name contains SUBSTRING (repeat: any of them); names look like "
                         "llama-tiny/fsdp2/dp2xtp1/b2s256/fp32/adamw")
    ap.add_argument("--out", help="append one JSON line per rank here")
    ap.add_argument("--export-dir", default=None, help="TorchScript exports <arch>-<size>.pt (made when missing; "
                    "default $LLMEM_BUILD_DIR/tiny_models, i.e. build/tiny_models)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    ap.add_argument("--no-check-export", dest="check_export", action="store_false",
                    help="skip comparing each export's parameters with the eager model")
    ap.add_argument("--try-unsupported", action="store_true", help="launch the known-unsupported cases too")
    ap.add_argument("--log-allocs", type=int, default=0, metavar="BYTES",
                    help="record allocation sizes >= BYTES per phase of the last step (cpu)")
    ap.add_argument("--keep-rank-files", metavar="DIR", help="keep each case's rank files under DIR")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    args = ap.parse_args()

    cases = [c for c in CASES[args.cases]() if not args.only or any(s in c["name"] for s in args.only)]
    if args.list:
        for c in cases:
            print(c["name"] + (f"   [known unsupported: {c['unsupported']}]" if c["unsupported"] else ""))
        return 0
    if not cases:
        print(f"distributed_runs: no case of '{args.cases}' matches {args.only}", file=sys.stderr)
        return 2
    if not args.out:
        print("distributed_runs: --out FILE is required", file=sys.stderr)
        return 2
    started = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    export_dir = os.path.abspath(args.export_dir or default_export_dir())

    gpus = None
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            print("distributed_runs: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
    else:
        # build the counting allocator once, before N ranks would wait on load_inline's lock
        sys.path.insert(0, HERE)
        import counting_allocator

        t0 = time.time()
        counting_allocator.build()
        print(f"counting allocator: {rel(counting_allocator.build_dir())} ({time.time() - t0:.1f} s)", flush=True)

    exports, failures, skipped, summary = {}, [], [], []
    for c in cases:
        if c["unsupported"] and not args.try_unsupported:
            print(f"SKIP {c['name']}: known unsupported: {c['unsupported']}", flush=True)
            skipped.append(c["name"])
            continue
        if gpus is not None and c["nproc"] > gpus:
            print(f"SKIP {c['name']}: needs {c['nproc']} GPUs (NCCL: one per rank), this machine has {gpus}",
                  flush=True)
            skipped.append(c["name"])
            continue
        key = (c["arch"], c["size"], export_dtype(c))
        if key not in exports:
            try:
                path, secs = ensure_export(c["arch"], c["size"], export_dir, args.python, key[2])
                if secs is not None:
                    print(f"exported {rel(path)} ({secs:.1f} s)", flush=True)
                if args.check_export:
                    print(f"export {rel(path)}: {check_export(c['arch'], c['size'], path, key[2])}", flush=True)
                exports[key] = path
            except Exception as exc:  # noqa: BLE001 - every case of this export fails, with the reason
                exports[key] = exc
        if isinstance(exports[key], Exception):
            failures.append((c["name"], str(exports[key])))
            print(f"FAIL {c['name']}: {exports[key]}", flush=True)
            continue
        rank_dir = tempfile.mkdtemp(prefix="llmem_dist_")
        try:
            records, wall, error = run_case(c, args, exports[key], rank_dir)
            if args.keep_rank_files:
                dest = os.path.join(args.keep_rank_files, c["name"].replace("/", "_"))
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(rank_dir, dest)
        finally:
            shutil.rmtree(rank_dir, ignore_errors=True)
        if error:
            failures.append((c["name"], error))
            print(f"FAIL {c['name']} ({wall:.1f} s): {error}", flush=True)
            continue
        with open(args.out, "a") as f:
            for r in records:
                r = dict(r, case=c["name"], nproc=c["nproc"], launch_wall_s=round(wall, 2))
                f.write(json.dumps(r) + "\n")
        peaks = [r["peak_bytes"] for r in records]
        spread = max(peaks) - min(peaks)
        print(f"ok   {c['name']:50s} {wall:5.1f} s  peak MiB/rank: " + " ".join(mib(p).strip() for p in peaks)
              + (f"  (ranks differ by {spread} B)" if spread else ""), flush=True)
        summary.append((c, wall, records))

    total = time.time() - started
    print(f"\n{len(summary)} cases ok, {len(failures)} failed, {len(skipped)} skipped; {total:.0f} s in all; "
          f"results appended to {args.out}")
    for name, why in failures:
        print(f"FAILED {name}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
