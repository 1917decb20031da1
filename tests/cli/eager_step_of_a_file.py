#!/usr/bin/env python3
"""Trains a TorchScript file's `forward(input_ids, labels) -> loss` for real in this Python process on the CPU, in
one of two loops, every CPU tensor storage counted by scripts/counting_allocator.py, and prints the peak of each
phase (forward, backward, optimizer) of the last step as JSON, relative to what was live before the model loaded:

  drop: HF Trainer's loop, `loss = model(input_ids, labels); loss.backward(); loss = None`
  keep: the accelerate / PEFT example loop, `outputs = model(input_ids, labels); outputs.backward()`, `outputs`
        bound until the next forward returns

then `opt.step(); opt.zero_grad(set_to_none=True)` with torch.optim.AdamW (one parameter at a time, the cpu
target's default). Three steps: the optimizer states exist from the second on.

  eager_step_of_a_file.py MODEL.pt --batch 2 --seq 16 --loop keep
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "scripts"))
import counting_allocator  # noqa: E402

STEPS = 3
INPUT_ID_RANGE = 60  # below the test models' vocabulary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--loop", choices=("drop", "keep"), required=True)
    args = ap.parse_args()
    alloc = counting_allocator.install()  # before any tensor that should be counted
    import torch

    base = alloc.current()
    model = torch.jit.load(args.model)
    model.train()
    input_ids = torch.arange(args.batch * args.seq).remainder(INPUT_ID_RANGE).view(args.batch, args.seq)
    labels = input_ids.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    outputs = None
    for _ in range(STEPS):
        peaks = {}
        alloc.reset_peak()
        loss = model(input_ids, labels)
        if args.loop == "keep":
            outputs = loss  # the previous step's outputs go only now, once the forward has returned
        peaks["forward"] = alloc.peak() - base
        alloc.reset_peak()
        loss.backward()
        loss = None
        peaks["backward"] = alloc.peak() - base
        alloc.reset_peak()
        opt.step()
        peaks["optimizer"] = alloc.peak() - base
        opt.zero_grad(set_to_none=True)
    del outputs
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
