#!/usr/bin/env python3
"""What each optimizer of the real-run harness really allocates for one parameter, on this CPU: its state
tensors (dtype, shape, bytes) and the temporaries of its step, counted by scripts/counting_allocator.py.

The optimizers are scripts/distributed_worker.py's make_optimizer (the ones HF Trainer builds); the parameter
is a plain tensor of the given shape and dtype with a gradient of ones. Two steps run (the first creates the
states); the second is reported:

  state_bytes      bytes of the parameter's state tensors (shared tables such as bitsandbytes' qmaps included)
  step_peak_bytes  the step's peak above what was live before it (parameter, gradient and states): the
                   largest set of temporaries alive at once
  step_allocs      sizes of the step's allocations (positive) and frees (negative) in order, >= --log-min bytes

docs/OPTIMIZER_STATES.md explains the figures from the libraries' sources.

  scripts/optimizer_states.py --shape 1024x512 --dtype bf16 --optimizer adafactor --optimizer adamw8bit
"""
import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import distributed_worker  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def measure(alloc, optimizer, impl, shape, dtype, log_min):
    import torch

    p = torch.nn.Parameter(torch.randn(*shape).to(getattr(torch, DTYPES[dtype])))
    opt, _ = distributed_worker.make_optimizer(optimizer, [p], "single", impl)
    for step in range(2):
        p.grad = torch.ones_like(p)
        before = alloc.current()
        if step == 1:
            alloc.reset_peak(0)
            alloc.start_log(log_min, True)
        opt.step()
        if step == 1:
            allocs = alloc.stop_log()
            peak = alloc.peak(0) - before
        p.grad = None
    layout = distributed_worker.optimizer_state_layout(opt, [("p", p)])
    states = layout[0]["states"] if layout else {}
    return {"optimizer": optimizer, "optimizer_impl": distributed_worker.optimizer_impl(opt)[0],
            "shape": list(shape), "dtype": dtype, "param_bytes": p.numel() * p.element_size(),
            "states": states, "state_bytes": sum(s["bytes"] for s in states.values()),
            "step_peak_bytes": peak, "step_allocs": allocs}


def parse_shape(text):
    try:
        return tuple(int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1024x512, got {text!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", action="append", choices=distributed_worker.OPTIMIZERS,
                    help="repeat; default: every optimizer")
    ap.add_argument("--optimizer-impl", default="", help="as scripts/distributed_worker.py takes it")
    ap.add_argument("--shape", type=parse_shape, action="append", help="repeat; default: 1024x512 and 4096")
    ap.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="repeat; default: fp32 and bf16")
    ap.add_argument("--log-min", type=int, default=4096, metavar="BYTES")
    args = ap.parse_args()
    import counting_allocator

    alloc = counting_allocator.install()
    for optimizer in args.optimizer or distributed_worker.OPTIMIZERS:
        for dtype in args.dtype or ["fp32", "bf16"]:
            for shape in args.shape or [(1024, 512), (4096,)]:
                print(json.dumps(measure(alloc, optimizer, args.optimizer_impl, shape, dtype, args.log_min)),
                      flush=True)


if __name__ == "__main__":
    main()
