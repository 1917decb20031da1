#!/usr/bin/env python3
"""Compares `llmem estimate --gpu cpu` with real training steps on this CPU and writes docs/ACCURACY.md from that run.

The single-process matrix (every architecture x (batch, seq) point x precision x optimizer) compares the estimate's
peak of EVERY phase (forward incl. the loss, backward, optimizer: `phase_peak_bytes`) and the step peak with the
user's program: an eager PyTorch / Hugging Face training step (scripts/eager_runs.py; the loop
`loss = model(input_ids, labels=labels).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)` with
torch.optim.AdamW or SGD, under torch.autocast for bf16-autocast), all cases in one Python process. Optionally
(--torchscript) a second table compares `llmem estimate --lifetimes torchscript` with `llmem measure` (the same
step as a TorchScript program in LibTorch), and the real-size weight-free exports are compared with `llmem measure
--device meta` (PyTorch's own allocations of the TorchScript step on the meta device).

Errors are signed: (estimate - measured) / measured. A negative error is an under-estimate, the dangerous kind
(it would let a job run out of memory).

  scripts/accuracy.py --llmem build/cli/llmem --models build/tiny_models --out docs/ACCURACY.md   # full matrix
  scripts/accuracy.py ... --quick --check 3.0   # what CI runs: 9 architectures x {fp32, bf16-autocast}, 2 x 256
  scripts/accuracy.py ... --torchscript         # also the TorchScript step (llmem measure), step peak
  scripts/accuracy.py ... --meta-files models/llama-2-7b.meta.pt,models/opt-1.3b.meta.pt  # the meta oracle
  scripts/accuracy.py ... --distributed full   # also real torchrun runs (DDP, ZeRO-1/2/3, TP, FSDP2+TP), per rank
  scripts/accuracy.py ... --distributed recipes   # FSDP2 MixedPrecisionPolicy (FSDP2+TP too), optimizer kinds
  scripts/accuracy.py ... --distributed all   # both sets once (what docs/ACCURACY.md is generated with)
  scripts/accuracy.py ... --archs "" --recipes [--quick]   # the training-recipe cases (RECIPE_CASES) only
  scripts/accuracy.py ... --inference   # also llmem infer against real generate() (scripts/inference_accuracy.py)
  scripts/accuracy.py ... --model-types --update docs/ACCURACY.md   # the further decoder types' own section

--recipes adds RECIPE_CASES: each training-recipe feature (activation checkpointing full / non-reentrant / every-K /
selective, gradient accumulation, chunked loss, kept outputs, optimizer in backward, gradient clipping) on several
architectures, shapes and precisions, run by scripts/eager_runs.py with the case's recipe (scripts/training_recipe.py
says what each option runs) and estimated with the same recipe as llmem flags (`--checkpointing full ...`), phase by
phase like the plain cases. A case llmem cannot estimate (a flag it does not have yet) is listed as not estimated,
with llmem's error line, instead of stopping the run; under --check such a case fails.

--check P exits 1 if any |error| of any phase (or step) exceeds P percent.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_runs  # noqa: E402  (ensure_export: the exports of cases on another preset)
import eager_runs  # noqa: E402  (torch and the counting allocator load at the first case, once for all)
import inference_accuracy  # noqa: E402
import training_recipe  # noqa: E402

ARCHS = ["gpt2", "opt", "bloom", "llama", "gpt_neo", "codegen", "gpt_bigcode", "mistral", "qwen2"]
# Further decoder types (models/export_hf.py's tiny presets of them), their own section (--model-types).
MODEL_TYPE_ARCHS = ["phi", "phi3", "qwen3", "olmo", "olmo2", "stablelm", "starcoder2", "gpt_neox", "granite", "gemma",
                    "gemma2", "gemma3_text", "cohere", "gptj", "mpt", "persimmon", "mixtral", "qwen2_moe"]
# Mixture-of-experts presets: measured with their router's routing, with the balanced one llmem assumes, and with
# the stated imbalance of MOE_BUSIEST.
MOE_ARCHS = ["mixtral", "qwen2_moe"]
# The busiest expert's share of the balanced rows in the imbalanced MoE cases (export_hf.py --moe-imbalance).
MOE_BUSIEST = 2.0
MODEL_TYPES_SECTION = "## Further decoder types: eager training steps on this CPU"
POINTS = [(1, 128), (2, 256), (4, 512)]
META_POINTS = [(1, 512), (1, 2048), (4, 1024)]
PRECISIONS = ["fp32", "bf16-autocast"]
QUICK = dict(points="2x256", precisions="fp32,bf16-autocast", optimizers="adamw")
PHASES = ["forward", "backward", "optimizer"]
COLUMNS = PHASES + ["step"]  # "step": the peak of the whole step
# One recipe per feature; each runs on RECIPE_ARCHS x RECIPE_POINTS x PRECISIONS with AdamW.
RECIPES = ["checkpointing=full", "checkpointing=full,checkpointing-impl=non-reentrant", "checkpointing=every-2",
           "checkpointing=selective", "grad-accum=2", "loss=chunked-4", "keep-outputs=1", "optimizer-in-backward=1",
           "grad-clip=1.0"]
RECIPE_ARCHS = ["llama", "gpt2", "mistral", "opt"]
RECIPE_POINTS = [(1, 128), (2, 256)]
# Recipes in the full matrix only (too slow for --quick): checkpointed layers under gradient accumulation, where
# the later micro-batch checkpoints and recomputes again; a second chunk count of the chunked loss, and the chunked
# loss whose logit chunks the loop keeps
FULL_ONLY_RECIPES = ["checkpointing=full,grad-accum=2",
                     "checkpointing=full,checkpointing-impl=non-reentrant,grad-accum=2", "loss=chunked-8",
                     "loss=chunked-4,keep-outputs=1"]
RECIPE_CASES = [f"{arch}:{precision}:adamw:{b}x{s}:{recipe}" for recipe in RECIPES + FULL_ONLY_RECIPES
                for arch in RECIPE_ARCHS for precision in PRECISIONS for b, s in RECIPE_POINTS]
# The optimizers besides AdamW / SGD (docs/OPTIMIZER_STATES.md), each on OPTIMIZER_ARCHS x RECIPE_POINTS x PRECISIONS
OPTIMIZERS = ["sgd-nomomentum", "adafactor", "adamw8bit", "paged-adamw8bit"]
OPTIMIZER_ARCHS = ["llama", "gpt2", "mistral"]
RECIPE_CASES += [f"{arch}:{precision}:{optimizer}:{b}x{s}" for optimizer in OPTIMIZERS for arch in OPTIMIZER_ARCHS
                 for precision in PRECISIONS for b, s in RECIPE_POINTS]
# PEFT LoRA on a frozen base (llmem --lora), on LORA_ARCHS x RECIPE_POINTS x PRECISIONS: GPT-2's attention and
# MLP are Conv1D modules, which llmem does not adapt yet, so it is not among them.
LORA_RECIPES = ["lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj",
                "lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj,lora-dropout=0.05",
                "lora-r=8,lora-alpha=16,lora-targets=all-linear",
                "lora-r=8,lora-alpha=16,lora-targets=all-linear,lora-dropout=0.05,checkpointing=full",
                "lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj,lora-modules-to-save=lm_head"]
LORA_ARCHS = ["llama", "mistral", "opt"]
RECIPE_CASES += [f"{arch}:{precision}:adamw:{b}x{s}:{recipe}" for recipe in LORA_RECIPES for arch in LORA_ARCHS
                 for precision in PRECISIONS for b, s in RECIPE_POINTS]
# QLoRA: the same adapters on a bitsandbytes 4-bit base (llmem --quant), with and without double quantization
QLORA_RECIPES = ["lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj,quant=nf4",
                 "lora-r=8,lora-alpha=16,lora-targets=all-linear,quant=nf4-dq",
                 "lora-r=8,lora-alpha=16,lora-targets=all-linear,lora-dropout=0.05,quant=fp4-dq",
                 "lora-r=8,lora-alpha=16,lora-targets=all-linear,checkpointing=full,quant=nf4-dq"]
# bitsandbytes LLM.int8() (Linear8bitLt); non-reentrant checkpointing shows the layer inputs its Function keeps
INT8_RECIPES = ["lora-r=8,lora-alpha=16,lora-targets=all-linear,quant=int8",
                "lora-r=8,lora-alpha=16,lora-targets=all-linear,checkpointing=full,checkpointing-impl=non-reentrant,"
                "quant=int8"]
RECIPE_CASES += [f"{arch}:{precision}:adamw:{b}x{s}:{recipe}" for recipe in QLORA_RECIPES + INT8_RECIPES
                 for arch in LORA_ARCHS for precision in PRECISIONS for b, s in RECIPE_POINTS]
# torchtune's QLoRA (llmem --quant torchao-nf4): torchao's to_nf4 needs weights of a multiple of 64 x 256 elements,
# which the tiny presets' MLPs are not, so these run on the small presets (ARCH@SIZE: that preset's export and model)
TORCHAO_RECIPES = ["lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj,quant=torchao-nf4",
                   "lora-r=8,lora-alpha=16,lora-targets=all-linear,lora-dropout=0.05,quant=torchao-nf4"]
RECIPE_CASES += [f"{arch}@small:{precision}:adamw:{b}x{s}:{recipe}" for recipe in TORCHAO_RECIPES
                 for arch in ("llama", "mistral") for precision in PRECISIONS for b, s in RECIPE_POINTS]
# --quick: every feature once in each precision, on two architectures
RECIPE_QUICK_CASES = [f"{arch}:{precision}:adamw:2x256:{recipe}" for recipe in RECIPES
                      for arch, precision in (("llama", "bf16-autocast"), ("gpt2", "fp32"))]
RECIPE_QUICK_CASES += [f"{arch}:{precision}:{optimizer}:2x256" for optimizer in OPTIMIZERS
                       for arch, precision in (("llama", "bf16-autocast"), ("gpt2", "fp32"))]
RECIPE_QUICK_CASES += [f"{arch}:{precision}:adamw:2x256:{recipe}" for recipe in LORA_RECIPES[2:4] + QLORA_RECIPES[1:2]
                       for arch, precision in (("llama", "bf16-autocast"), ("opt", "fp32"))]
RECIPE_QUICK_CASES += [f"llama@small:bf16-autocast:adamw:1x128:{TORCHAO_RECIPES[1]}",
                       f"mistral:bf16-autocast:adamw:1x128:{INT8_RECIPES[1]}"]


class CommandFailed(RuntimeError):
    def __init__(self, cmd, proc):
        super().__init__(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        lines = proc.stderr.strip().splitlines()
        self.last_line = lines[-1] if lines else f"exit code {proc.returncode}"


def run_json(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise CommandFailed(cmd, proc)
    return json.loads(proc.stdout)


def mib(b):
    return b / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmem", required=True, help="path to the llmem binary")
    ap.add_argument("--models", required=True, help="folder with <arch>-<size>.pt exports")
    ap.add_argument("--size", default="tiny", help="preset of the exports (file suffix) and of the eager models")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--points", default=",".join(f"{b}x{s}" for b, s in POINTS), help="BxS list")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--optimizers", default="adamw,sgd")
    ap.add_argument("--quick", action="store_true",
                    help=f"the CI subset: points {QUICK['points']}, precisions {QUICK['precisions']}, "
                         f"optimizers {QUICK['optimizers']}")
    ap.add_argument("--torchscript", action="store_true",
                    help="also compare `llmem estimate --lifetimes torchscript` with `llmem measure` (step peak)")
    ap.add_argument("--meta-files", default="", help="weight-free exports to compare with the meta oracle")
    ap.add_argument("--meta-points", default=",".join(f"{b}x{s}" for b, s in META_POINTS))
    ap.add_argument("--distributed", choices=["quick", "full", "recipes", "all"],
                    help="also run scripts/distributed_runs.py with these cases and compare per rank (llmem validate)")
    ap.add_argument("--recipes", action="store_true",
                    help="also the training-recipe cases (RECIPE_CASES; with --quick RECIPE_QUICK_CASES)")
    ap.add_argument("--recipe-filter", default="",
                    help="with --recipes: only the cases that contain one of these comma-free substrings, "
                         "given as a |-separated list (e.g. 'grad-accum|keep-outputs|adafactor')")
    ap.add_argument("--inference", action="store_true",
                    help="also `llmem infer` against real generate() runs (scripts/inference_accuracy.py; with "
                         "--quick its quick cases)")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--check", type=float, help="fail if any |error| (percent) of any phase exceeds this")
    ap.add_argument("--model-types", action="store_true",
                    help=f"the further decoder types ({', '.join(MODEL_TYPE_ARCHS)}) with AdamW instead of --archs")
    ap.add_argument("--update", help="with --model-types: replace (or append) their section of this report (e.g. "
                                     "docs/ACCURACY.md), dated by this run")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.model_types:
        args.archs, args.optimizers = ",".join(MODEL_TYPE_ARCHS), "adamw"
    elif args.update:
        sys.exit("accuracy: --update writes the --model-types section; the whole report is --out")

    def parse_points(text):
        return [tuple(int(x) for x in p.split("x")) for p in text.split(",") if p]

    def estimate(model, precision, optimizer, batch, seq, lifetimes, flags=()):
        return run_json([args.llmem, "estimate", model, "-b", str(batch), "-s", str(seq), "-p", precision,
                         "-o", optimizer, "--json", "--gpu", "cpu", "--lifetimes", lifetimes, *flags])

    def error(e, m):
        return 100.0 * (e - m) / m

    def compare_eager(model, arch, precision, optimizer, batch, seq, recipe=None, size=None):
        t0 = time.time()
        try:
            est = estimate(model, precision, optimizer, batch, seq, "eager", training_recipe.llmem_flags(recipe or {}))
        except CommandFailed as e:
            if not recipe:
                raise
            est = None  # llmem cannot estimate this recipe (yet): the real run is still listed
            est_error = e.last_line
        t_est = time.time() - t0
        run = eager_runs.run_case(arch, precision, optimizer, batch, seq, recipe, size=size or args.size)
        m = {ph: run["phase_peak_bytes"][ph] for ph in PHASES}
        m["step"] = run["peak_bytes"]
        row = dict(arch=arch, precision=precision, optimizer=optimizer, batch=batch, seq=seq, measured=m,
                   estimate_seconds=t_est, measure_seconds=run["times_s"]["total"])
        if "moe_routing" in run:
            row["moe_routing"] = run["moe_routing"]
            row["routing"] = (recipe or {}).get("moe-routing", "router")
        if size and size != args.size:
            arch = f"{arch}@{size}"  # the row names the preset it ran
            row["arch"] = arch
        label = f"{arch:12s} {precision:14s} {optimizer:5s} b={batch} s={seq:4d}"
        if recipe:
            row["recipe"] = training_recipe.recipe_text(recipe)
            label += f" {row['recipe']}"
        if est is None:
            row["estimate_error"] = est_error
            print(f"{label}  NOT ESTIMATED ({est_error})  eager " +
                  " ".join(f"{c} {mib(m[c]):.2f} MiB" for c in COLUMNS), flush=True)
            return row
        e = {ph: est["phase_peak_bytes"][ph] for ph in PHASES}
        e["step"] = est["peak_allocated_bytes"]
        row.update(estimated=e, errors={c: error(e[c], m[c]) for c in COLUMNS}, peak_phase=est["peak_phase"])
        print(f"{label}  step est {mib(e['step']):8.2f} MiB "
              f"eager {mib(m['step']):8.2f} MiB  err " +
              " ".join(f"{c} {row['errors'][c]:+.3f}%" for c in COLUMNS) + f"  ({est['peak_phase']})", flush=True)
        return row

    def compare_torchscript(model, name, precision, optimizer, batch, seq, device):
        common = [model, "-b", str(batch), "-s", str(seq), "-p", precision, "-o", optimizer, "--json"]
        t0 = time.time()
        # measure's loop drops the loss after backward and returns nothing else: HF Trainer's loop
        est = estimate(model, precision, optimizer, batch, seq, "torchscript", ["--drop-outputs"])
        t_est = time.time() - t0
        meas = run_json([args.llmem, "measure", *common, "--device", device])
        e, m = est["peak_allocated_bytes"], meas["peak_allocated_bytes"]
        row = dict(arch=name, precision=precision, optimizer=optimizer, batch=batch, seq=seq,
                   estimated={"step": e}, measured={"step": m}, errors={"step": error(e, m)},
                   peak_phase=est["peak_phase"], estimate_seconds=t_est, measure_seconds=meas["seconds"],
                   device=device)
        print(f"{name:12s} {precision:14s} {optimizer:5s} b={batch} s={seq:4d}  est {mib(e):9.2f} MiB  "
              f"{device} {mib(m):9.2f} MiB  err {row['errors']['step']:+7.3f}%  ({est['peak_phase']})", flush=True)
        return row

    cases = []
    for arch in [a for a in args.archs.split(",") if a]:
        model = os.path.join(args.models, f"{arch}-{args.size}.pt")
        if not os.path.exists(model):
            sys.exit(f"accuracy: missing export {model} (run models/export_hf.py --all {args.models} --size {args.size})")
        for optimizer in args.optimizers.split(","):
            for precision in args.precisions.split(","):
                for batch, seq in parse_points(args.points):
                    cases.append((model, arch, precision, optimizer, batch, seq))
                    if arch in MOE_ARCHS:  # the modelling apart from the routing assumption
                        cases.append((model, arch, precision, optimizer, batch, seq, {"moe-routing": "balanced"}))
                        # and a stated imbalance (--moe-imbalance), traced and run alike
                        busy, _ = distributed_runs.ensure_export(arch, args.size, args.models, sys.executable,
                                                                 moe_imbalance=MOE_BUSIEST)
                        cases.append((busy, arch, precision, optimizer, batch, seq,
                                      {"moe-routing": f"busiest:{MOE_BUSIEST:g}"}))
    recipe_cases = []
    if args.recipes:
        wanted = [w for w in args.recipe_filter.split("|") if w]
        for text in RECIPE_QUICK_CASES if args.quick else RECIPE_CASES:
            if wanted and not any(w in text for w in wanted):
                continue
            arch, precision, optimizer, batch, seq, recipe = eager_runs.parse_case(text)
            arch, _, size = arch.partition("@")
            if size:  # a case on another preset: its export is made here once, beside the others
                model, _ = distributed_runs.ensure_export(arch, size, args.models, sys.executable)
            else:
                model = os.path.join(args.models, f"{arch}-{args.size}.pt")
            if not os.path.exists(model):
                sys.exit(f"accuracy: missing export {model} (run models/export_hf.py --all {args.models} "
                         f"--size {args.size})")
            recipe_cases.append((model, arch, precision, optimizer, batch, seq, recipe, size or None))
    started = time.time()
    rows = [compare_eager(*c) for c in cases]  # eager_runs loads torch and the counting allocator once for all
    recipe_rows = [compare_eager(*c) for c in recipe_cases]
    not_estimated = [r for r in recipe_rows if "estimate_error" in r]
    recipe_rows_estimated = [r for r in recipe_rows if "estimate_error" not in r]
    ts_rows = [compare_torchscript(*c, "cpu") for c in cases] if args.torchscript else []
    meta_rows = []
    for path in [f for f in args.meta_files.split(",") if f]:
        name = os.path.basename(path).replace(".meta.pt", "")
        for batch, seq in parse_points(args.meta_points):
            meta_rows.append(compare_torchscript(path, name, "fp32", "adamw", batch, seq, "meta"))
    rows_all = rows + recipe_rows_estimated + ts_rows + meta_rows
    generation = []
    if args.inference:
        generation = inference_accuracy.compare(args.llmem, args.models, inference_accuracy.QUICK_CASES
                                                if args.quick else inference_accuracy.CASES)
        for phase in ("prefill", "decode"):
            print("generation " + inference_accuracy.summary(generation, phase))
    dist = None
    if args.distributed:
        runs = os.path.join(os.path.dirname(os.path.abspath(args.llmem)), "..", "accuracy_distributed_runs.jsonl")
        runs = os.path.normpath(runs)
        if os.path.exists(runs):
            os.remove(runs)
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.join(here, "distributed_runs.py"), "--cases", args.distributed,
                        "--export-dir", os.path.abspath(args.models), "--out", runs], check=True,
                       cwd=os.path.dirname(here))
        proc = subprocess.run([args.llmem, "validate", runs, "--json"], capture_output=True, text=True)
        if proc.returncode not in (0, 4):
            raise RuntimeError(f"llmem validate failed ({proc.returncode}): {proc.stderr.strip()}")
        dist = json.loads(proc.stdout)
        print(f"distributed: {len(dist['cases'])} cases, {dist['ranks']} ranks, mean |error| "
              f"{dist['mean_abs_error_percent']:.3f}%, max case |error| {dist['max_abs_case_error_percent']:.3f}%")

    def summary(rs, column="step"):
        errs = [abs(r["errors"][column]) for r in rs]
        under = [r for r in rs if r["errors"][column] < 0]
        worst_under = min(under, key=lambda r: r["errors"][column], default=None)
        text = (f"{len(rs)} cases: median |error| {statistics.median(errs):.3f}%, max |error| {max(errs):.3f}%, "
                f"{len(under)} under-estimates")
        if worst_under:
            text += (f" (largest {worst_under['errors'][column]:+.4f}%, "
                     f"{worst_under['estimated'][column] - worst_under['measured'][column]:+d} bytes)")
        return text

    worst = max((abs(err) for r in rows_all for err in r["errors"].values()), default=0.0)
    if rows:
        for c in COLUMNS:
            print(f"eager {c:9s}: " + summary(rows, c))
    if recipe_rows_estimated:
        for c in COLUMNS:
            print(f"recipe {c:9s}: " + summary(recipe_rows_estimated, c))
    if not_estimated:
        print(f"recipes: {len(not_estimated)} of {len(recipe_rows)} cases not estimated by llmem "
              f"(first: {not_estimated[0]['estimate_error']})")
    if ts_rows:
        print("torchscript step: " + summary(ts_rows))
    if meta_rows:
        print("meta: " + summary(meta_rows))
    print(f"{time.time() - started:.0f} s")

    def table(f, rs, measured_label):
        f.write(f"| model | precision | optimizer | batch | seq | estimated MiB | {measured_label} MiB | error | "
                "peak in |\n")
        f.write("|---|---|---|---:|---:|---:|---:|---:|---|\n")
        for r in rs:
            f.write(f"| {r['arch']} | {r['precision']} | {r['optimizer']} | {r['batch']} | {r['seq']} | "
                    f"{mib(r['estimated']['step']):.2f} | "
                    f"{mib(r['measured']['step']):.2f} | {r['errors']['step']:+.3f}% | {r['peak_phase']} |\n")

    def phase_table(f, rs):
        f.write("| model | precision | optimizer | batch | seq | " +
                " | ".join(f"{c} eager MiB | {c} error" for c in COLUMNS) + " | peak in |\n")
        f.write("|---|---|---|---:|---:|" + "---:|---:|" * len(COLUMNS) + "---|\n")
        for r in rs:
            f.write(f"| {model_name(r)} | {r['precision']} | {r['optimizer']} | {r['batch']} | {r['seq']} | " +
                    " | ".join(f"{mib(r['measured'][c]):.2f} | {r['errors'][c]:+.3f}%" for c in COLUMNS) +
                    f" | {r['peak_phase']} |\n")

    def model_name(r):
        """The row's model; for a mixture-of-experts run also how it routed: balanced as llmem assumes, or by its
        router, with the busiest expert's rows against the balanced count."""
        routing = r.get("moe_routing")
        if not routing:
            return r["arch"]
        if r["routing"] == "balanced":
            return f"{r['arch']} (balanced routing)"
        if r["routing"].startswith("busiest:"):
            return f"{r['arch']} (busiest expert {float(r['routing'].split(':')[1]):.2f}x balanced, --moe-imbalance)"
        return (f"{r['arch']} (router: busiest expert {routing['max_rows'] / routing['balanced_rows']:.2f}x, "
                f"idlest {routing['min_rows'] / routing['balanced_rows']:.2f}x balanced)")

    def recipe_table(f, rs):
        f.write("| model | precision | batch | seq | optimizer | recipe | " +
                " | ".join(f"{c} eager MiB | {c} error" for c in COLUMNS) + " | peak in |\n")
        f.write("|---|---|---:|---:|---|---|" + "---:|---:|" * len(COLUMNS) + "---|\n")
        for r in rs:
            errs = r.get("errors")
            recipe = f"`{r['recipe']}`" if r.get("recipe") else "—"
            f.write(f"| {r['arch']} | {r['precision']} | {r['batch']} | {r['seq']} | {r['optimizer']} | {recipe} | " +
                    " | ".join(f"{mib(r['measured'][c]):.2f} | " + (f"{errs[c]:+.3f}%" if errs else "—")
                               for c in COLUMNS) +
                    f" | {r.get('peak_phase', 'not estimated')} |\n")

    if args.update and rows:
        import io

        import report_sections

        section = io.StringIO()
        section.write(f"\n{MODEL_TYPES_SECTION}\n\n")
        section.write(f"- when: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
                      "(this section's own run: `scripts/accuracy.py --model-types --update`)\n")
        section.write("- measured and estimated as the first table (eager steps, AdamW), on `tiny` presets of "
                      "further decoder types in `models/export_hf.py`: partial rotary (phi, stablelm, gpt_neox, "
                      "persimmon), q/k norms (qwen3, olmo2), fused qkv / gate-up (phi3), scaled embeddings and "
                      "logits (gemma, granite, cohere), local/global layers and soft-capping (gemma2, gemma3_text), "
                      "parallel attention + MLP (cohere, gptj), ALiBi (mpt), mixture of experts (mixtral: 8 "
                      "experts, top-2; qwen2_moe: 8 experts, top-2, and a shared expert; llmem assumes balanced "
                      "routing, every routed expert tokens x 2 / 8 rows; each case is measured with "
                      "the router's own routing at random initialisation, its busiest and idlest expert named, "
                      "with the balanced routing, which checks the modelling apart from the assumption, and with "
                      f"the busiest expert at {MOE_BUSIEST:g}x the balanced rows, estimated from an export traced "
                      f"with --moe-imbalance {MOE_BUSIEST:g} and run routed alike)\n\n")
        # The modelling (every dense case, and the MoE cases routed as llmem assumes) apart from the routing
        # assumption (the MoE cases routed by their router).
        modelled = [r for r in rows if r.get("routing") != "router"]
        routed = [r for r in rows if r.get("routing") == "router"]
        for c in COLUMNS:
            section.write(f"- **{c}: {summary(modelled, c)}.**\n")
        if routed:
            section.write(f"- with the router's own routing ({', '.join(sorted({r['arch'] for r in routed}))}), the "
                          "step: " + summary(routed, "step") + "\n")
        section.write("\n")
        phase_table(section, rows)
        report_sections.update_section(args.update, MODEL_TYPES_SECTION, section.getvalue())
    if args.out:
        import torch  # the venv's torch version goes into the report
        with open(args.out, "w") as f:
            f.write("# Accuracy: estimate vs. a real training step\n\n")
            f.write("Generated by `scripts/accuracy.py` from a real run; do not edit by hand.\n\n")
            f.write(f"- when: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n")
            f.write(f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
            f.write("- estimated: `llmem estimate --gpu cpu` (the simulator with the cpu backend rules): peak allocated\n"
                    "  bytes of each phase and of one steady-state step (optimizer states already exist)\n")
            f.write("- error = (estimated - measured) / measured; negative = under-estimate (would risk OOM)\n\n")
            if rows:
                f.write("## Eager PyTorch / Hugging Face training steps on this CPU, every phase\n\n")
                f.write("- measured: `scripts/eager_runs.py`: the Hugging Face model of the export's config, "
                        "`loss = model(input_ids, labels=labels).loss; loss.backward(); opt.step(); "
                        "opt.zero_grad(set_to_none=True)` (torch.optim.AdamW or SGD with momentum 0.9; "
                        "torch.autocast for bf16-autocast), every CPU tensor counted by a counting allocator; "
                        "the peaks of each phase of the second (steady-state) step\n")
                f.write("- estimated: `llmem estimate --gpu cpu --lifetimes eager --drop-outputs` (eager lifetimes are "
                        "the default; `--drop-outputs`: the loop above, HF Trainer's)\n")
                f.write(f"- models: `{args.size}` presets of `models/export_hf.py` (random weights)\n\n")
                for c in COLUMNS:
                    f.write(f"- **{c}: {summary(rows, c)}.**\n")
                f.write("\n")
                phase_table(f, rows)
            if recipe_rows:
                f.write("\n## Training recipes: eager steps with checkpointing, accumulation, loss and loop variants\n\n")
                f.write("- measured: `scripts/eager_runs.py` with the case's recipe (`scripts/training_recipe.py`: HF "
                        "`gradient_checkpointing_enable` reentrant / non-reentrant, torchtitan's every-K layer rule "
                        "and op-level selective AC policy, HF Trainer's gradient accumulation, torchtune's chunked "
                        "output with CEWithChunkedOutputLoss and optimizer-in-backward, the accelerate / PEFT loop "
                        "that keeps the outputs, `clip_grad_norm_`); the peaks of each phase of the steady-state "
                        "step (with accumulation: the highest micro-batch)\n")
                f.write("- estimated: `llmem estimate --gpu cpu` with the recipe as flags (`--checkpointing full`, "
                        "`--grad-accum 2`, ...; `--drop-outputs` unless the recipe keeps the outputs)\n")
                f.write("- not measured: `--loss fused-linear` (Liger-Kernel's fused linear cross-entropy) is modelled "
                        "from Liger-Kernel 0.8.2's source; its kernels are Triton-only, so no CPU run exists (and "
                        "llmem refuses it on the cpu target); unit tests check its byte counts against cases "
                        "worked by hand from the source\n")
                f.write("- quantized bases measured: bitsandbytes 0.50.2 Linear4bit (`quant=nf4|fp4|nf4-dq|fp4-dq`) "
                        "and Linear8bitLt (`quant=int8`: MatMul8bitFp, the CPU training path) loaded by transformers' "
                        "quantizer, torchao 0.18 NF4Tensor under torchtune-style LoRA (`quant=torchao-nf4`)\n")
                f.write("- not measured: `--quant gptq-4|gptq-8` is modelled from gptqmodel 5.0's QuantLinear "
                        "(storage byte counts unit-tested against the tensors gptqmodel creates; the training "
                        "forward from its source): PEFT 0.21, pinned here, adapts only gptqmodel >= 7 layers, which "
                        "need transformers 5, so no pinned run exists; the CUDA paths of `int8` (MatMul8bitLt, no "
                        "outlier columns assumed) and of the 4-bit kernels are modelled from bitsandbytes' source\n\n")
                if recipe_rows_estimated:
                    for c in COLUMNS:
                        f.write(f"- **{c}: {summary(recipe_rows_estimated, c)}.**\n")
                if not_estimated:
                    f.write(f"- **{len(not_estimated)} of {len(recipe_rows)} cases not estimated** "
                            f"(first: `{not_estimated[0]['estimate_error']}`)\n")
                f.write("\n")
                recipe_table(f, recipe_rows)
            if ts_rows:
                f.write("\n## The TorchScript step in LibTorch (`llmem measure`)\n\n")
                f.write("- measured: `llmem measure --device cpu`: LibTorch runs AdamW (C++ torch::optim::AdamW) "
                        "or SGD with momentum training steps of the TorchScript export (graph-executor "
                        "optimizations off, 2 steps, peak over both) through a counting CPU allocator\n")
                f.write("- estimated: `llmem estimate --gpu cpu --lifetimes torchscript --drop-outputs` (measure "
                        "drops the loss after backward)\n\n")
                f.write(f"**{summary(ts_rows)}.**\n\n")
                table(f, ts_rows, "measured")
            if meta_rows:
                f.write("\n## Real-size exports against the meta-device oracle\n\n")
                f.write("- measured: `llmem measure --device meta`: the same LibTorch step (AdamW) on the meta device, "
                        "every allocation counted by PyTorch's own allocator hook (no memory is touched); fp32 only, "
                        "since autocast does not apply to meta tensors; estimated with `--lifetimes torchscript "
                        "--drop-outputs`\n\n")
                f.write(f"**{summary(meta_rows)}.**\n\n")
                table(f, meta_rows, "meta oracle")
            if dist:
                errs = [c["error_percent"] for c in dist["cases"]]
                under = [e for e in errs if e < 0]
                f.write("\n## Distributed training: real torchrun runs, per rank\n\n")
                f.write("- measured: `scripts/distributed_runs.py` launches `torchrun` (gloo backend, CPU ranks) "
                        "with PyTorch's own engines on the eager Hugging Face model of the same config: "
                        "DistributedDataParallel, ZeroRedundancyOptimizer (ZeRO-1), FSDP2 `fully_shard` per "
                        "decoder layer with `reshard_after_forward` False (ZeRO-2) / True (ZeRO-3), DTensor tensor "
                        "parallel (ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down; vocab-parallel embedding, "
                        "LM head and `loss_parallel` where marked) and FSDP2 + TP on a 2-D mesh; each rank counts its "
                        "tensors with a counting CPU allocator; the peak is over steps 2-3 (steady state)\n")
                f.write("- estimated: `llmem validate`: one rank of the same layout (`llmem estimate --gpu cpu --dp "
                        "--tp --engine --drop-outputs`, the harness's HF Trainer loop); the error of a case is against "
                        "its highest rank\n\n")
                f.write(f"**{len(dist['cases'])} cases, {dist['ranks']} ranks: mean |error| per rank "
                        f"{dist['mean_abs_error_percent']:.3f}%, max |error| of a case "
                        f"{dist['max_abs_case_error_percent']:.3f}%, {len(under)} under-estimates"
                        + (f" (largest {min(under):+.4f}%)" if under else "") + ".**\n\n")
                f.write("| case | ranks | measured MiB (max over ranks) | estimated MiB | error | per-rank errors |\n")
                f.write("|---|---:|---:|---:|---:|---|\n")
                for c in dist["cases"]:
                    per_rank = " ".join(f"{r['error_percent']:+.3f}%" for r in c["ranks"])
                    f.write(f"| {c['case']} | {len(c['ranks'])} | {mib(c['measured_max_bytes']):.2f} | "
                            f"{mib(c['estimated_bytes']):.2f} | {c['error_percent']:+.3f}% | {per_rank} |\n")
            if generation:
                inference_accuracy.write_section(f, generation)
    if args.check is not None and inference_accuracy.worst(generation) > args.check:
        print(f"FAIL generation: an error of {inference_accuracy.worst(generation):.3f}% exceeds {args.check}%")
        sys.exit(1)
    if args.check is not None and worst > args.check:
        bad = [(r, c) for r in rows_all for c, err in r["errors"].items() if abs(err) > args.check]
        for r, c in bad:
            print(f"FAIL {r['arch']} {r['precision']} {r['optimizer']} b={r['batch']} s={r['seq']} {c}: "
                  f"{r['errors'][c]:+.2f}%")
        print(f"{len(rows_all) - len({id(r) for r, _ in bad})} passed, {len({id(r) for r, _ in bad})} failed")
        sys.exit(1)
    if args.check is not None and not_estimated:
        print(f"FAIL {len(not_estimated)} recipe cases not estimated by llmem")
        sys.exit(1)
    if dist and not dist["ok"]:
        print("distributed: outside the limits (mean 3 %, any case 6 %)")
        sys.exit(1)
    if args.check is not None:
        print(f"{len(rows_all)} passed, 0 failed")


if __name__ == "__main__":
    main()
