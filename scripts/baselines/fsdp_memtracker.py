"""PyTorch's tracker for FSDP2, torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker, run for real on rank 0
of the case's world under FakeTensorMode and a fake process group (collectives that move no data; FSDP2 still
allocates its all-gather and reduce-scatter buffers, which the tracker counts).

The model is built as the MemTracker baseline builds it (the Hugging Face model of the export's config, FakeTensor
parameters on the CPU device) and sharded as scripts/distributed_worker.py shards it (fully_shard per decoder layer,
then the root; reshard_after_forward False for ZeRO-2, True for ZeRO-3), with the same optimizer and step program.

Source: pytorch/pytorch, torch/distributed/_tools/fsdp2_mem_tracker.py (the peak of its per-device snapshot,
"Total"); torch/testing/_internal/distributed/fake_pg.py (FakeStore, the "fake" backend).
"""
import contextlib

import torch
import torch.distributed as dist

from baselines.hf_model import CannotExpress, fake_cpu_model, layout, untraced_paths
from baselines.memtracker import tracked_peak

WHAT = ("every tensor storage rank 0 creates, tracked per FSDP module and phase: sharded and unsharded parameters "
        "and gradients, FSDP2's all-gather and reduce-scatter buffers, activations, temporaries, optimizer states "
        "of the local shards (torch.optim.AdamW / SGD momentum 0.9, two steps); storage sizes as PyTorch reports "
        "them, no allocator rounding; fully_shard cases only (ZeRO-2/3).")

# distributed_runs.py methods run with fully_shard alone -> reshard_after_forward (ZeRO-3 frees the gathered
# parameters after each layer's forward; ZeRO-2 keeps them until backward)
FULLY_SHARD = {"fsdp2": True, "zero2": False}


@contextlib.contextmanager
def fake_process_group(world):
    """Rank 0 of `world` ranks on the fake backend, destroyed afterwards (one case after another in a process)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def estimate(case):
    import distributed_worker  # its fully_shard wrapping and optimizer, imported, not restated
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    method, dp, tp = layout(case)
    if method == "fsdp2_tp":
        raise CannotExpress("FSDP2 over a 2-D mesh: fully_shard's sub-mesh reads rank coordinates with nonzero, "
                            "which FakeTensorMode cannot run")
    if method not in FULLY_SHARD:
        raise CannotExpress("FSDPMemTracker tracks fully_shard (FSDP2) modules only; this layout has none")
    with fake_process_group(dp):
        mesh = init_device_mesh("cpu", (dp,), mesh_dim_names=("dp",))  # real tensors: its rank map is read
        mode, model = fake_cpu_model(case["arch"], case["size"])
        with mode, untraced_paths():
            distributed_worker.apply_fully_shard(model, mesh["dp"], reshard_after_forward=FULLY_SHARD[method])
            opt, _ = distributed_worker.make_optimizer(case["optimizer"], model.parameters(), method)
            ids = torch.zeros(case["batch"], case["seq"], dtype=torch.long)
            labels = ids.clone()  # a tensor of its own, as the worker's data makes it
            tracker = FSDPMemTracker(model, opt)
            tracker.track_inputs((ids, labels))
            return tracked_peak(tracker, case, model, opt, ids, labels)
