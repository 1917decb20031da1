#!/usr/bin/env python3
"""Eager PyTorch / Hugging Face training steps on this CPU, many cases in ONE Python process: the ground truth of
the single-process accuracy matrix (scripts/accuracy.py).

Each case is scripts/distributed_worker.py's `--method single` job, called as a function: the HF model built
exactly as models/export_hf.py builds it for its TorchScript export (same preset, seed 0, dropout 0, train mode,
use_cache False, SDPA attention), every CPU tensor storage counted by scripts/counting_allocator.py, and this
loop, the one HF Trainer's `compute_loss` runs (the ModelOutput is dropped before backward):

    with torch.autocast("cpu", dtype=torch.bfloat16):      # bf16-autocast only
        loss = model(input_ids, labels=labels).loss
    loss.backward(); loss = None
    opt.step(); opt.zero_grad(set_to_none=True)           # torch.optim.AdamW(lr 1e-4) or SGD(momentum 0.9)

The peaks of each phase (forward incl. the loss, backward, optimizer) are those of the last step (steady state:
the optimizer states exist from step 1 on); peak_bytes is the peak over steps 1..N-1. Byte counts are relative to
what was live before the case's model existed, so earlier cases of the same process do not count.
torch and the counting allocator's extension are loaded once for all cases.

  scripts/eager_runs.py --case llama:bf16-autocast:adamw:4x512 --case gpt2:fp32:sgd:1x128 [--out runs.jsonl]
"""
import argparse
import gc
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import distributed_worker  # noqa: E402

STEPS = 2  # step 0 creates the optimizer states; step 1 is the steady-state step that is reported


def run_case(arch, precision, optimizer, batch, seq, size="tiny", steps=STEPS):
    """One eager single-process case; returns distributed_worker's record with byte counts made relative."""
    args = distributed_worker.parse_args([
        "--arch", arch, "--size", size, "--method", "single", "--batch", str(batch), "--seq", str(seq),
        "--precision", precision, "--optimizer", optimizer, "--steps", str(steps), "--out-dir", "."])
    gc.collect()  # the previous case's model and optimizer are gone before this one's baseline is taken
    record = {"arch": arch, "size": size, "batch": batch, "seq": seq, "precision": precision,
              "optimizer": optimizer}
    distributed_worker.run(args, 0, 1, 0, record)
    base = record["baseline_bytes"]
    record["peak_bytes"] -= base
    record["phase_peak_bytes"] = {k: v - base for k, v in record["phase_peak_bytes"].items()}
    record.pop("steps", None)  # per-step details of every step: not needed by the matrix
    return record


def parse_case(text):
    """ARCH:PRECISION:OPTIMIZER:BxS -> (arch, precision, optimizer, batch, seq)."""
    try:
        arch, precision, optimizer, point = text.split(":")
        batch, seq = (int(x) for x in point.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ARCH:PRECISION:OPTIMIZER:BxS, got {text!r}")
    return arch, precision, optimizer, batch, seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", type=parse_case, action="append", required=True)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--out", help="append one JSON line per case (default: stdout)")
    args = ap.parse_args()
    out = open(args.out, "a") if args.out else sys.stdout
    for c in args.case:
        rec = run_case(*c, size=args.size)
        out.write(json.dumps(rec) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
