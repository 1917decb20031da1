"""PyTorch's own tracker, torch.distributed._tools.mem_tracker.MemTracker, run for real on the Hugging Face model
under FakeTensorMode (the real eager program: forward, `.loss`, backward, optimizer step, zero_grad; tensors with
shapes and no storage).

Source: pytorch/pytorch, torch/distributed/_tools/mem_tracker.py (the peak of its per-device snapshot, "Total").
"""
import contextlib

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from baselines.hf_model import fake_cpu_model, require_single_process, untraced_paths

WHAT = ("every tensor storage the eager program creates, tracked per module and phase: parameters, buffers, "
        "gradients, activations, temporaries, optimizer states (torch.optim.AdamW / SGD momentum 0.9, two steps "
        "as the ground truth runs); storage sizes as PyTorch reports them, no allocator rounding.")

STEPS = 2  # the ground-truth step count: optimizer states exist from step 2 on


def estimate(case):
    require_single_process(case, "MemTracker tracks one process (fully_shard rows: fsdp_memtracker)")
    mode, model = fake_cpu_model(case["arch"], case["size"])
    with mode, untraced_paths():
        params = list(model.parameters())
        if case["optimizer"] == "adamw":
            opt = torch.optim.AdamW(params)
        else:
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        ids = torch.zeros(case["batch"], case["seq"], dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        return tracked_peak(tracker, case, model, opt, ids, ids)


def tracked_peak(tracker, case, model, opt, ids, labels):
    """The device peak ("Total") of the tracker over STEPS eager training steps of the case."""
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if case["precision"] == "bf16-autocast"
                else contextlib.nullcontext())
    with tracker:
        for step in range(STEPS):
            if step:
                tracker.reset_mod_stats()  # per-module stats are per iteration; the device peak is kept
            with autocast:
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    return max(dev["Total"] for dev in peak.values())
