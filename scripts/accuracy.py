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

ARCHS = ["gpt2", "opt", "bloom", "llama", "gpt_neo", "codegen", "gpt_bigcode", "mistral", "qwen2"]
POINTS = [(1, 128), (2, 256), (4, 512)]
META_POINTS = [(1, 512), (1, 2048), (4, 1024)]
PRECISIONS = ["fp32", "bf16-autocast"]
QUICK = dict(points="2x256", precisions="fp32,bf16-autocast", optimizers="adamw")
PHASES = ["forward", "backward", "optimizer"]
COLUMNS = PHASES + ["step"]  # "step": the peak of the whole step


def run_json(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
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
    ap.add_argument("--distributed", choices=["quick", "full"],
                    help="also run scripts/distributed_runs.py with these cases and compare per rank (llmem validate)")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--check", type=float, help="fail if any |error| (percent) of any phase exceeds this")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)

    def parse_points(text):
        return [tuple(int(x) for x in p.split("x")) for p in text.split(",") if p]

    def estimate(model, precision, optimizer, batch, seq, lifetimes):
        return run_json([args.llmem, "estimate", model, "-b", str(batch), "-s", str(seq), "-p", precision,
                         "-o", optimizer, "--json", "--gpu", "cpu", "--lifetimes", lifetimes])

    def error(e, m):
        return 100.0 * (e - m) / m

    def compare_eager(model, arch, precision, optimizer, batch, seq):
        t0 = time.time()
        est = estimate(model, precision, optimizer, batch, seq, "eager")
        t_est = time.time() - t0
        run = eager_runs.run_case(arch, precision, optimizer, batch, seq, size=args.size)
        e = {ph: est["phase_peak_bytes"][ph] for ph in PHASES}
        e["step"] = est["peak_allocated_bytes"]
        m = {ph: run["phase_peak_bytes"][ph] for ph in PHASES}
        m["step"] = run["peak_bytes"]
        row = dict(arch=arch, precision=precision, optimizer=optimizer, batch=batch, seq=seq, estimated=e,
                   measured=m, errors={c: error(e[c], m[c]) for c in COLUMNS}, peak_phase=est["peak_phase"],
                   estimate_seconds=t_est, measure_seconds=run["times_s"]["total"])
        print(f"{arch:12s} {precision:14s} {optimizer:5s} b={batch} s={seq:4d}  step est {mib(e['step']):8.2f} MiB "
              f"eager {mib(m['step']):8.2f} MiB  err " +
              " ".join(f"{c} {row['errors'][c]:+.3f}%" for c in COLUMNS) + f"  ({est['peak_phase']})", flush=True)
        return row

    def compare_torchscript(model, name, precision, optimizer, batch, seq, device):
        common = [model, "-b", str(batch), "-s", str(seq), "-p", precision, "-o", optimizer, "--json"]
        t0 = time.time()
        est = estimate(model, precision, optimizer, batch, seq, "torchscript")
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
    started = time.time()
    rows = []
    if cases:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import eager_runs  # torch, the counting allocator and the model code load once for every case

        rows = [compare_eager(*c) for c in cases]
    ts_rows = [compare_torchscript(*c, "cpu") for c in cases] if args.torchscript else []
    meta_rows = []
    for path in [f for f in args.meta_files.split(",") if f]:
        name = os.path.basename(path).replace(".meta.pt", "")
        for batch, seq in parse_points(args.meta_points):
            meta_rows.append(compare_torchscript(path, name, "fp32", "adamw", batch, seq, "meta"))
    rows_all = rows + ts_rows + meta_rows
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
            f.write(f"| {r['arch']} | {r['precision']} | {r['optimizer']} | {r['batch']} | {r['seq']} | " +
                    " | ".join(f"{mib(r['measured'][c]):.2f} | {r['errors'][c]:+.3f}%" for c in COLUMNS) +
                    f" | {r['peak_phase']} |\n")

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
                f.write("- estimated: `llmem estimate --gpu cpu --lifetimes eager` (the default)\n")
                f.write(f"- models: `{args.size}` presets of `models/export_hf.py` (random weights)\n\n")
                for c in COLUMNS:
                    f.write(f"- **{c}: {summary(rows, c)}.**\n")
                f.write("\n")
                phase_table(f, rows)
            if ts_rows:
                f.write("\n## The TorchScript step in LibTorch (`llmem measure`)\n\n")
                f.write("- measured: `llmem measure --device cpu`: LibTorch runs AdamW (C++ torch::optim::AdamW) "
                        "or SGD with momentum training steps of the TorchScript export (graph-executor "
                        "optimizations off, 2 steps, peak over both) through a counting CPU allocator\n")
                f.write("- estimated: `llmem estimate --gpu cpu --lifetimes torchscript`\n\n")
                f.write(f"**{summary(ts_rows)}.**\n\n")
                table(f, ts_rows, "measured")
            if meta_rows:
                f.write("\n## Real-size exports against the meta-device oracle\n\n")
                f.write("- measured: `llmem measure --device meta`: the same LibTorch step (AdamW) on the meta device, "
                        "every allocation counted by PyTorch's own allocator hook (no memory is touched); fp32 only, "
                        "since autocast does not apply to meta tensors; estimated with `--lifetimes torchscript`\n\n")
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
                        "--tp --engine`); the error of a case is against its highest rank\n\n")
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
    if args.check is not None and worst > args.check:
        bad = [(r, c) for r in rows_all for c, err in r["errors"].items() if abs(err) > args.check]
        for r, c in bad:
            print(f"FAIL {r['arch']} {r['precision']} {r['optimizer']} b={r['batch']} s={r['seq']} {c}: "
                  f"{r['errors'][c]:+.2f}%")
        print(f"{len(rows_all) - len({id(r) for r, _ in bad})} passed, {len({id(r) for r, _ in bad})} failed")
        sys.exit(1)
    if dist and not dist["ok"]:
        print("distributed: outside the limits (mean 3 %, any case 6 %)")
        sys.exit(1)
    if args.check is not None:
        print(f"{len(rows_all)} passed, 0 failed")


if __name__ == "__main__":
    main()
