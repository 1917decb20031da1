#!/usr/bin/env python3
"""Writes a runs file in the format of `scripts/distributed_runs.py --device cuda` from a real CPU run, for testing
`scripts/compare.py --gpu-runs` where there is no GPU: one single-process step of scripts/distributed_worker.py
(its counting allocator), its record relabelled as a CUDA run whose device name says that it is a CPU run.

  gpu_runs_from_cpu_run.py OUT.jsonl --arch llama --batch 1 --seq 64 --export build/tiny_models/llama-tiny.pt
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import distributed_runs  # noqa: E402  (the case names of the runs files)

RELABELLED = "CPU run relabelled as CUDA (test)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--export", required=True)
    a = ap.parse_args()
    c = distributed_runs.case(a.arch, "single", 1, a.batch, a.seq)
    with tempfile.TemporaryDirectory() as rank_dir:
        subprocess.run([sys.executable, distributed_runs.WORKER, "--arch", a.arch, "--method", "single", "--batch",
                        str(a.batch), "--seq", str(a.seq), "--export", a.export, "--out-dir", rank_dir],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(os.path.join(rank_dir, "rank0.json")) as f:
            record = json.load(f)
    record.update(case=c["name"], nproc=1, device="cuda", device_name=RELABELLED)
    with open(a.out, "w") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
