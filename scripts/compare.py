#!/usr/bin/env python3
"""Puts llmem next to the published GPU-memory estimators on the same cases, the same ground truth and the same
clock, and writes docs/COMPARISON.md (every case) and its plots from that run.

  scripts/compare.py --llmem build/cli/llmem --models build/tiny_models            # the default, small run
  scripts/compare.py --llmem build/cli/llmem --models build/tiny_models --full     # every architecture and shape
  scripts/compare.py ... --headline      # also print README's headline table (paste it, never type numbers)
  scripts/compare.py ... --truth torchscript   # single-process truth: `llmem measure` instead of eager PyTorch
  scripts/compare.py ... --gpu-runs runs.jsonl  # also GPU runs (scripts/distributed_runs.py --device cuda)

Methods: llmem (`estimate --gpu cpu`) and the baselines of scripts/baselines/ (DNNMem, LLMem of Kim et al.,
accelerate estimate-memory, DeepSpeed's ZeRO-2/3 estimators, Korthikanti et al.'s activation formula, PyTorch's
MemTracker under FakeTensorMode, FSDPMemTracker under a fake process group for the fully_shard rows). Error = (estimate - measured) / measured, signed: negative is an
under-estimate, an out-of-memory risk. A method "fails at a 3 % margin" when the real peak exceeds its estimate
plus 3 % (a GPU sized by it would run out of memory).

Ground truth is pluggable: TRUTH maps a source name to a function from a list of cases to measured peak bytes.
A case names its source in case["truth"]. The single-process cases (tiny presets) are measured by --truth: eager
(the default: the user's eager PyTorch / HF training step, scripts/eager_runs.py, all cases in this process) or
torchscript (`llmem measure --device cpu`, the exported step in LibTorch); the real-size cases by the meta oracle,
the distributed ones by scripts/distributed_runs.py, and --gpu-runs FILE adds the GPU runs of its --device cuda mode
(single-GPU and distributed cases; llmem estimates them for the GPU the run names).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import (accelerate_estimate, deepspeed_zero, dnnmem, fsdp_memtracker, korthikanti,  # noqa: E402
                       llmem_kim, memtracker)
from baselines.hf_model import CannotExpress, build_meta_model, layout, parameter_count  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = dict(archs="llama,opt,gpt2", points="1x128,2x256", precisions="fp32,bf16-autocast", optimizers="adamw",
               meta="opt-1.3b", meta_points="1x512",
               # names of scripts/distributed_runs.py cases (--cases full); '' for none
               distributed="llama-tiny/ddp/dp2xtp1/b2s256/fp32/adamw,llama-tiny/zero2/dp2xtp1/b2s256/fp32/adamw,"
                           "llama-tiny/fsdp2/dp2xtp1/b2s256/fp32/adamw,llama-tiny/tp/dp1xtp2/b2s256/fp32/adamw,"
                           "llama-tiny/fsdp2_tp/dp2xtp2/b2s256/fp32/adamw")
FULL = dict(archs="gpt2,opt,bloom,llama,gpt_neo,codegen,gpt_bigcode,mistral,qwen2", points="1x128,2x256,4x512",
            precisions="fp32,bf16-autocast", optimizers="adamw,sgd", meta="llama-2-7b,opt-1.3b",
            meta_points="1x512,1x2048", distributed="all")
MARGIN = 3.0  # percent


# ---------------------------------------------------------------------------------------------
# Ground truth: name -> function(cases) -> [measured bytes or None]
# ---------------------------------------------------------------------------------------------

def _llmem_json(args, *cmd):
    proc = subprocess.run([args.llmem, *cmd, "--json"], capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"llmem {' '.join(cmd)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _step_args(case):
    return [case["export"], "-b", str(case["batch"]), "-s", str(case["seq"]), "-p", case["precision"],
            "-o", case["optimizer"]]


def eager_steps(args, cases):
    """scripts/eager_runs.py: the eager HF training step of each case, all in this process; the step peak of the
    steady-state step (the optimizer states exist)."""
    import eager_runs  # torch's counting allocator and the model code load once for every case
    out = []
    for c in cases:
        out.append(eager_runs.run_case(c["arch"], c["precision"], c["optimizer"], c["batch"], c["seq"],
                                       size=c["size"])["peak_bytes"])
        print(f"  measured {c['label']}: {out[-1]} B", flush=True)
    return out


def llmem_measure(device):
    """`llmem measure --device DEVICE`: a real LibTorch training step (cpu: counting allocator; meta: PyTorch's
    own allocation trace of the real-size step)."""
    def measure(args, cases):
        out = []
        for c in cases:
            out.append(_llmem_json(args, "measure", *_step_args(c), "--device", device)["peak_allocated_bytes"])
            print(f"  measured {c['label']}: {out[-1]} B", flush=True)
        return out
    return measure


def recorded_runs(args, cases):
    """Per-rank peaks recorded by scripts/distributed_runs.py (torchrun, PyTorch's engines): the largest rank."""
    return [c["recorded_peak"] for c in cases]


TRUTH = {"eager": eager_steps, "torchscript": llmem_measure("cpu"), "meta": llmem_measure("meta"),
         "distributed": recorded_runs, "gpu": recorded_runs}
SINGLE_PROCESS_TRUTHS = ("eager", "torchscript")  # the choices of --truth for the tiny single-process cases
TRUTH_DOC = {
    "eager": "`scripts/eager_runs.py` (the default `--truth`): the Hugging Face model of the export's config trained "
             "eagerly on this CPU, `loss = model(input_ids, labels=labels).loss; loss.backward(); opt.step(); "
             "opt.zero_grad(set_to_none=True)` (under torch.autocast for bf16-autocast), every CPU tensor storage "
             "counted; the step peak of the steady-state step (step 2, the optimizer states exist), all cases in one "
             "Python process",
    "torchscript": "`llmem measure --device cpu` (`--truth torchscript`): the exported TorchScript training step (2 "
                   "steps) run for real with LibTorch on this CPU through a counting allocator; peak allocated bytes",
    "meta": "`llmem measure --device meta`: the real-size weight-free export's step run by PyTorch on the meta "
            "device, peak of PyTorch's own allocation trace",
    "distributed": "`scripts/distributed_runs.py` (`--distributed-runs FILE`): torchrun fine-tuning with PyTorch's "
                   "engines (DDP, ZeroRedundancyOptimizer, FSDP2, DTensor TP) on CPU ranks (gloo), each rank's peak "
                   "from a counting allocator; the case's figure is its largest rank",
    "gpu": "`--gpu-runs FILE`: the same harness's `--device cuda` mode (NCCL, one GPU per rank; single-GPU cases "
           "too), each rank's torch.cuda.max_memory_allocated; the case's figure is its largest rank; llmem "
           "estimates for the GPU the run names (`--gpu-target` overrides)",
}


# ---------------------------------------------------------------------------------------------
# Methods: name -> (function(args, case) -> bytes, source, what it counts)
# ---------------------------------------------------------------------------------------------

# distributed_runs.py method -> llmem's --engine (as `llmem validate` maps them)
ENGINE = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "fsdp2": "zero3", "fsdp2_tp": "zero3"}


# sources that run the TorchScript program: their forward values die at last use, not with Python's frames
TORCHSCRIPT_TRUTHS = ("torchscript", "meta")


def llmem_estimate(args, case):
    # Every truth runs HF Trainer's loop (the outputs dropped before backward; `llmem measure` drops its loss
    # after backward), not llmem's default that keeps them.
    loop = ["--drop-outputs"]
    extra = ["--lifetimes", "torchscript" if case["truth"] in TORCHSCRIPT_TRUTHS else "eager"]
    if case.get("method", "single") != "single":
        extra = ["--dp", str(case["dp"]), "--tp", str(case["tp"])]
        if case["method"] in ENGINE:
            extra += ["--engine", ENGINE[case["method"]]]
        if case["tp"] > 1 and not case["vocab_parallel"]:
            extra.append("--no-vocab-parallel")
    return _llmem_json(args, "estimate", *_step_args(case), "--gpu", case.get("gpu", "cpu"),
                       *extra, *loop)["peak_allocated_bytes"]


def pytorch_tracker(case):
    """PyTorch's trackers: MemTracker for one process, FSDPMemTracker (rank 0, fake process group) for the
    fully_shard rows."""
    return (memtracker if layout(case)[0] == "single" else fsdp_memtracker).estimate(case)


METHODS = {
    "llmem": (llmem_estimate, "this repository, `llmem estimate --gpu cpu --drop-outputs` (`--lifetimes torchscript` "
              "against the TorchScript truths, `eager` otherwise)",
              "the TorchScript graph simulated op by op (saved tensors, autocast copies, optimizer, allocator)"),
    "DNNMem": (lambda a, c: dnnmem.estimate(c), "Gao et al., ESEC/FSE 2020 (paper's algorithm; no public code)",
               dnnmem.WHAT),
    "LLMem (Kim et al.)": (lambda a, c: llmem_kim.estimate(c),
                           "Kim et al., IJCAI 2024; taehokim20/LLMem `size_estimator.py` (as `dp_real.py` and `tp_real.py` "
                           "call it; TP1D layouts of its `colossalai/nn/parallel/layers`)", llmem_kim.WHAT),
    "MemTracker": (lambda a, c: pytorch_tracker(c),
                   "pytorch/pytorch `torch/distributed/_tools/mem_tracker.py` (one process) and "
                   "`fsdp2_mem_tracker.py` (FSDPMemTracker, the fully_shard rows), torch 2.11",
                   memtracker.WHAT + " Over several GPUs (FSDPMemTracker): " + fsdp_memtracker.WHAT),
    "accelerate": (lambda a, c: accelerate_estimate.estimate(c), accelerate_estimate.SOURCE,
                   accelerate_estimate.WHAT),
    "DeepSpeed ZeRO-2": (lambda a, c: deepspeed_zero.zero2(c),
                         "deepspeedai/DeepSpeed `runtime/zero/stage_1_and_2.py` estimate_zero2_model_states_mem_needs",
                         deepspeed_zero.WHAT),
    "DeepSpeed ZeRO-3": (lambda a, c: deepspeed_zero.zero3(c),
                         "deepspeedai/DeepSpeed `runtime/zero/stage3.py` estimate_zero3_model_states_mem_needs",
                         deepspeed_zero.WHAT),
    "Korthikanti et al.": (lambda a, c: korthikanti.estimate(c), "Korthikanti et al., MLSys 2023, section 4.1",
                           korthikanti.WHAT),
}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def _points(text):
    return [tuple(int(x) for x in p.split("x")) for p in text.split(",") if p]


def _names(text):
    return [x for x in text.split(",") if x]


def build_cases(args):
    cases = []
    for arch in _names(args.archs):
        for b, s in _points(args.points):
            for prec in _names(args.precisions):
                for opt in _names(args.optimizers):
                    cases.append(dict(arch=arch, size="tiny", truth=args.truth, batch=b, seq=s, precision=prec,
                                      optimizer=opt, export=os.path.join(args.models, f"{arch}-tiny.pt")))
    for name in _names(args.meta):
        for b, s in _points(args.meta_points):
            # models/<name>.meta.pt is export_hf's real-size preset <name> (fp32 weights on meta)
            cases.append(dict(arch=name, size=name, truth="meta", batch=b, seq=s, precision="fp32",
                              optimizer="adamw", export=os.path.join(REPO, "models", f"{name}.meta.pt")))
    for c in cases:
        model = c["arch"] if c["truth"] == "meta" else f"{c['arch']}-{c['size']}"
        c["label"] = f"{model} {c['batch']}x{c['seq']} {c['precision']} {c['optimizer']}"
    runs = args.distributed_runs
    if not runs and args.distributed:
        runs = run_distributed(args)
    if runs:
        cases += recorded_cases(runs, "distributed")
    if args.gpu_runs:
        cases += recorded_cases(args.gpu_runs, "gpu", args.gpu_target)
    return cases


def run_distributed(args):
    """Launch the named cases of scripts/distributed_runs.py (torchrun, gloo) into a runs file."""
    out = os.path.join(REPO, "build", "compare_distributed_runs.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.join(REPO, "scripts", "distributed_runs.py"), "--cases", "full", "--out", out,
           "--export-dir", args.models]
    for name in ([] if args.distributed == "all" else _names(args.distributed)):
        cmd += ["--only", name]
    print("ground truth 'distributed': " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 and not os.path.exists(out):
        raise RuntimeError(f"distributed_runs.py failed ({proc.returncode})")
    return out


# a recorded CUDA device name -> llmem's --gpu (the rule `llmem validate` applies to the same files)
GPU_NAMES = (("h200", "h200-141"), ("h100", "h100-80"), ("a100", None))


def gpu_target(device_name):
    n = device_name.lower()
    for key, target in GPU_NAMES:
        if key in n:
            return target or ("a100-40" if "40" in n else "a100-80")
    return None


def recorded_cases(path, truth, target=None):
    """One case per launch of a scripts/distributed_runs.py runs file (its ranks grouped by the case name).
    truth 'distributed': its cpu runs; 'gpu': its CUDA runs, estimated for `target` or the GPU each names."""
    by_case = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_case.setdefault(r["case"], []).append(r)
    cases = []
    for name, ranks in by_case.items():
        r = ranks[0]
        on_gpu = r.get("device", "cpu") != "cpu"
        if on_gpu != (truth == "gpu"):
            if truth == "gpu":
                raise SystemExit(f"compare: --gpu-runs {path}: {name} is a {r.get('device', 'cpu')} run")
            continue  # CUDA runs in a cpu runs file are compared through --gpu-runs
        gpu = "cpu"
        if on_gpu:
            gpu = target or gpu_target(r.get("device_name", ""))
            if not gpu:
                raise SystemExit(f"compare: --gpu-runs {path}: {name} ran on {r.get('device_name')!r}; name "
                                 "llmem's GPU with --gpu-target")
        cases.append(dict(arch=r["arch"], size=r["size"], truth=truth, gpu=gpu, batch=r["batch"], seq=r["seq"],
                          precision=r["precision"], optimizer=r["optimizer"], method=r["method"], dp=r["dp"],
                          tp=r["tp"], vocab_parallel=r.get("tp_vocab_parallel", False), export=r["export"],
                          label=name + (f" ({r.get('device_name')})" if on_gpu else ""),
                          recorded_peak=max(x["peak_bytes"] for x in ranks)))
        if all("param_bytes" in x for x in ranks):  # the rank's weights after the layout was applied
            cases[-1]["placed_param_bytes"] = max(x["param_bytes"] for x in ranks)
    return cases


# ---------------------------------------------------------------------------------------------
# Statistics and report
# ---------------------------------------------------------------------------------------------

def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(rows, method):
    errs = [r["methods"][method]["error"] for r in rows if r["methods"][method].get("error") is not None]
    times = [r["methods"][method]["seconds"] for r in rows if r["methods"][method].get("bytes") is not None]
    cannot = sum(1 for r in rows if "cannot" in r["methods"][method])
    failed = sum(1 for r in rows if "failed" in r["methods"][method])
    if not errs:
        return dict(n=0, cannot=cannot, failed=failed)
    abs_errs = [abs(e) for e in errs]
    ooms = sum(1 for r in rows if r["methods"][method].get("bytes") is not None and r["measured"]
               > r["methods"][method]["bytes"] * (1 + MARGIN / 100))
    worst = min((r for r in rows if r["methods"][method].get("error") is not None),
                key=lambda r: r["methods"][method]["error"])
    under_bytes = worst["methods"][method]["bytes"] - worst["measured"]  # of the case with the worst error
    return dict(n=len(errs), cannot=cannot, failed=failed, median=statistics.median(abs_errs),
                p90=_pct(abs_errs, 0.9), max=max(abs_errs), mean_signed=statistics.mean(errs), worst_under=min(errs),
                worst_under_bytes=under_bytes,
                under=sum(1 for e in errs if e < 0), fail_rate=100.0 * ooms / len(errs),
                seconds=statistics.median(times))


def headline(summary):
    lines = ["| method | median \\|error\\| | max \\|error\\| | worst under-estimate | OOM at 3 % margin | "
             "cannot express | time / estimate |", "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        if not s["n"]:
            lines.append(f"| {m} | – | – | – | – | {s['cannot']} | – |")
            continue
        under = (f"{s['worst_under']:+.2f} % ({s['worst_under_bytes']:+,} B)" if s["worst_under_bytes"] < 0
                 else "none")
        lines.append(f"| {m} | {s['median']:.2f} % | {s['max']:.2f} % | {under} | "
                     f"{s['fail_rate']:.0f} % | {s['cannot']} | {s['seconds']:.2f} s |")
    return "\n".join(lines)


def write_plots(rows, summary, out_dir):
    """Error per case and method, |error| vs model size, time per estimate: three PNGs in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = {}

    def errors_of(m):
        return [r for r in rows if r["methods"][m].get("error") is not None]

    def save(key, fig, ax, title, ylabel):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        paths[key] = os.path.join(out_dir, f"comparison_{key}.png")
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)

    methods = [m for m in summary if summary[m]["n"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.axhline(0, color="grey", lw=0.8)
    for i, m in enumerate(methods):
        errs = [r["methods"][m]["error"] for r in errors_of(m)]
        ax.scatter([i] * len(errs), errs, s=14, alpha=0.7)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yscale("symlog", linthresh=1)
    save("errors", fig, ax, "Error per case and method", "signed error, % (symlog; < 0 under-estimates)")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for m in methods:
        ax.scatter([r["params"] for r in errors_of(m)], [abs(r["methods"][m]["error"]) for r in errors_of(m)],
                   s=16, alpha=0.7, label=m)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("parameters")
    ax.legend(fontsize=7, ncol=2)
    save("error_vs_size", fig, ax, "Error vs model size", "|error|, % (symlog)")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(methods)), [summary[m]["seconds"] for m in methods])
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_yscale("log")
    save("time", fig, ax, "Time per estimate on this machine", "median wall seconds per estimate (log)")
    return paths


def write_markdown(path, args, rows, summary, plots, started):
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))  # noqa: E731
    cmd = shlex.join(["scripts/compare.py"] + sys.argv[1:])
    out = ["# llmem vs published GPU-memory estimators", "",
           f"Written by `scripts/compare.py` from one run on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
           f"UTC ({platform.machine()}, {os.cpu_count()} cores, {time.time() - started:.0f} s): `{cmd}`. "
           "Every method sees the same cases; every error is against the same real run, never against another "
           "estimate. Error = (estimate - measured) / measured; negative = under-estimate (an out-of-memory risk). "
           f"*OOM at {MARGIN:g} % margin*: the real peak exceeds the method's estimate + {MARGIN:g} %, i.e. a GPU "
           "sized by the method would run out of memory.", "",
           "## Summary", "", headline(summary), "",
           f"![errors]({rel(plots['errors'])})", "", f"![error vs size]({rel(plots['error_vs_size'])})", "",
           f"![time]({rel(plots['time'])})", "",
           "| method | n | median | p90 | max | mean signed | under-estimates |", "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        if s["n"]:
            out.append(f"| {m} | {s['n']} | {s['median']:.3f} % | {s['p90']:.3f} % | {s['max']:.3f} % | "
                       f"{s['mean_signed']:+.3f} % | {s['under']} |")
    for source in TRUTH_DOC:
        part = [r for r in rows if r["truth"] == source]
        if part:
            out += ["", f"### Ground truth '{source}' ({len(part)} case{'s' if len(part) > 1 else ''})", "",
                    headline({m: summarize(part, m) for m in METHODS})]
    used = {r["truth"] for r in rows}
    out += ["", "## Ground truth", ""] + [f"- **{k}**{'' if k in used else ' (not in this run)'}: {v}"
                                          for k, v in TRUTH_DOC.items()]
    out += ["", "## Methods: what each counts and where it comes from", ""]
    for m, (_, source, what) in METHODS.items():
        out.append(f"- **{m}** — {source}. {what}")
    out += ["", "All baselines start from the architecture's config (`models/export_hf.py`, the one the ground-truth "
            "export was made from); those that run the model (DNNMem, LLMem, MemTracker) run it under "
            "FakeTensorMode (FSDPMemTracker also under a fake process group, rank 0 of the case's world). None has the CUDA context or a GPU workspace in it: the ground truth is allocated bytes.",
            "", "## Every case", "",
            "| case | truth | measured | " + " | ".join(METHODS) + " |",
            "|---|---|---|" + "---|" * len(METHODS)]
    for r in rows:
        cells = []
        for m in METHODS:
            e = r["methods"][m]
            if "cannot" in e:
                cells.append("cannot: " + e["cannot"])
            elif "failed" in e:
                cells.append("failed: " + e["failed"])
            else:
                cells.append(f"{e['bytes'] / 2**20:.1f} MiB ({e['error']:+.2f} %{', OOM' if r['measured'] > e['bytes'] * (1 + MARGIN / 100) else ''})")
        out.append(f"| {r['label']} | {r['truth']} | {r['measured'] / 2**20:.2f} MiB | " + " | ".join(cells) + " |")
    if "gpu" not in used:
        out += ["", "No GPU run has been compared yet: this run had no `--gpu-runs FILE` (the runs of "
                "`scripts/distributed_runs.py --device cuda`); every number above is from this CPU.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmem", required=True, help="path to the llmem binary")
    ap.add_argument("--models", required=True, help="folder with the <arch>-tiny.pt exports")
    ap.add_argument("--full", action="store_true", help="every architecture, shape, precision and optimizer")
    for key in DEFAULT:
        ap.add_argument("--" + key.replace("_", "-"), help=f"comma list (default {DEFAULT[key]!r}; --full: "
                        f"{FULL[key]!r}); '' for none")
    ap.add_argument("--truth", choices=SINGLE_PROCESS_TRUTHS, default="eager",
                    help="ground truth of the single-process cases (default eager)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    ap.add_argument("--distributed-runs", metavar="FILE",
                    help="also compare on the per-rank peaks of scripts/distributed_runs.py --out FILE")
    ap.add_argument("--gpu-runs", metavar="FILE",
                    help="also compare on GPU runs: scripts/distributed_runs.py --device cuda --out FILE")
    ap.add_argument("--gpu-target", metavar="GPU",
                    help="llmem's --gpu for the --gpu-runs cases (default: from each run's device name)")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "COMPARISON.md"))
    ap.add_argument("--plots-dir", help="folder for the plots (default: the folder of --out)")
    ap.add_argument("--headline", action="store_true", help="print README's headline table")
    ap.add_argument("--require-numbers", action="store_true",
                    help="exit 1 unless every method produced a number for every case")
    args = ap.parse_args()
    for key, value in (FULL if args.full else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [m for m in _names(args.methods) if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r} (choose from: {', '.join(METHODS)})")
    for m in [m for m in METHODS if m not in _names(args.methods)]:
        del METHODS[m]

    started = time.time()
    cases = build_cases(args)
    measured = {}
    for source in sorted({c["truth"] for c in cases}):
        group = [c for c in cases if c["truth"] == source]
        print(f"ground truth '{source}': {len(group)} cases", flush=True)
        for c, m in zip(group, TRUTH[source](args, group)):
            measured[c["label"]] = m
    rows, params = [], {}
    for c in cases:
        key = (c["arch"], c["size"])
        if key not in params:
            params[key] = parameter_count(build_meta_model(*key))
        row = dict(label=c["label"], truth=c["truth"], measured=measured[c["label"]], params=params[key], methods={})
        for name, (fn, _, _) in METHODS.items():
            t0 = time.time()
            try:
                est = int(fn(args, c))
                row["methods"][name] = dict(bytes=est, seconds=time.time() - t0,
                                            error=100.0 * (est - row["measured"]) / row["measured"])
            except CannotExpress as e:
                row["methods"][name] = dict(cannot=str(e))
            except Exception as e:  # a baseline that breaks on a case is reported, not hidden
                row["methods"][name] = dict(failed=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        print(f"{c['label']:40s} measured {row['measured'] / 2**20:9.2f} MiB  " + "  ".join(
            f"{n}: {v['error']:+.2f}%" if "error" in v else f"{n}: -" for n, v in row["methods"].items()), flush=True)
        rows.append(row)
    summary = {m: summarize(rows, m) for m in METHODS}
    plots = write_plots(rows, summary, args.plots_dir or os.path.dirname(os.path.abspath(args.out)))
    write_markdown(args.out, args, rows, summary, plots, started)
    print(f"wrote {args.out}")
    if args.headline:
        print(headline(summary))
    if args.require_numbers:
        missing = [(r["label"], m) for r in rows for m, v in r["methods"].items() if "bytes" not in v]
        if missing:
            print(f"compare: no number from {missing[0][1]} for {missing[0][0]} ({len(missing)} in all)",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
