"""DNNMem (Gao et al., "Estimating GPU Memory Consumption of Deep Learning Models", ESEC/FSE 2020): static
analysis of the training iteration's computation graph plus a simulation of the framework's allocator.

The paper's procedure, as implemented here:
1. Build the iteration's computation graph (forward and the backward derived from it). Here: the aten-level
   joint graph that make_fx records for `loss -> autograd.grad(loss, params)` of the Hugging Face model under
   FakeTensorMode (DNNMem read the framework's own graph; the aten graph is PyTorch's).
2. Persistent tensors: weights, inputs and the optimizer's state tensors (slot variables) live the whole iteration.
3. Walk the operators in topological order: each allocates its output tensors; a tensor is released when its
   last consumer has run (reference counting); an output that aliases an input (a view, an in-place op) adds no
   memory. Weight gradients stay until the update.
4. Every allocation goes through the allocator's size rule: PyTorch's caching allocator rounds to 512 bytes.
The peak of the simulated allocated bytes is the estimate. DNNMem has no notion of mixed precision: an autocast
case is analysed on its fp32 graph, as the paper's tool would see it. Ephemeral cuDNN/cuBLAS workspaces and the
CUDA context are GPU-only terms that the ground truth here (allocated bytes) does not contain.
"""
import operator

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functional_call

from baselines.hf_model import fake_cpu_model, require_single_process, unique_parameters, untraced_paths

WHAT = ("the fp32 training graph (aten ops of forward + backward), tensor lifetimes by reference counting, weights "
        "+ inputs + optimizer states persistent, 512 B rounding; no mixed precision, no optimizer temporaries.")

BLOCK = 512  # PyTorch caching allocator: kMinBlockSize, every request rounded up to a multiple
STATES_PER_PARAM = {"adamw": 2, "sgd": 1}


def _rounded(nbytes):
    return max(1, -(-nbytes // BLOCK)) * BLOCK


def _tensor_bytes(t):
    return t.untyped_storage().nbytes() if t.is_contiguous() else t.numel() * t.element_size()


def _joint_graph(case):
    mode, model = fake_cpu_model(case["arch"], case["size"])
    with mode, untraced_paths():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())

        def step(params, buffers, ids):
            loss = functional_call(model, {**params, **buffers}, (),
                                   {"input_ids": ids, "labels": ids, "use_cache": False}).loss
            return torch.autograd.grad(loss, list(params.values()))

        ids = torch.zeros(case["batch"], case["seq"], dtype=torch.long)
        return model, make_fx(step)(params, buffers, ids)


def _aliases_input(node):
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def estimate(case):
    require_single_process(case, "the paper models one GPU")
    model, gm = _joint_graph(case)
    nodes = list(gm.graph.nodes)
    # Step 1: the storage of every value (its own, an element of a tuple result, or the one it aliases) and
    # the rounded bytes each operator allocates.
    storage, size, allocs = {}, {}, {}
    for i, node in enumerate(nodes):
        val = node.meta.get("val")
        if node.op == "call_function" and node.target is operator.getitem:
            storage[node] = (node.args[0], node.args[1])
        elif node.op == "call_function" and _aliases_input(node):
            first = next(a for a in node.args if isinstance(a, torch.fx.Node))
            storage[node] = storage.get(first, first)
        elif isinstance(val, torch.Tensor):
            storage[node] = node
            size[node] = _rounded(_tensor_bytes(val))
            allocs[i] = [node]
        elif isinstance(val, (list, tuple)):
            allocs[i] = []
            for j, v in enumerate(val):
                if isinstance(v, torch.Tensor):
                    size[(node, j)] = _rounded(_tensor_bytes(v))
                    allocs[i].append((node, j))
    # Step 2: persistent tensors (weights, buffers, inputs, the optimizer's states) and the weight gradients,
    # kept until the update; every other storage is released after its last consumer.
    placeholders = [n for n in nodes if n.op == "placeholder"]
    kept = {storage[a] for a in nodes[-1].all_input_nodes if a in storage}
    last_use = {}
    for i, node in enumerate(nodes):
        for key in allocs.get(i, []):
            last_use.setdefault(key, i)
        for arg in node.all_input_nodes:
            if arg in storage:
                last_use[storage[arg]] = i
    frees = {}
    for key, i in last_use.items():
        if key not in kept and key in size and not (isinstance(key, torch.fx.Node) and key.op == "placeholder"):
            frees.setdefault(i, []).append(key)
    states = STATES_PER_PARAM[case["optimizer"]] * sum(
        _rounded(p.numel() * p.element_size()) for p in unique_parameters(model))
    resident = states + sum(size[n] for n in placeholders if n in size)
    # Step 3: walk the schedule; the peak of allocated bytes.
    live = peak = 0
    for i, node in enumerate(nodes):
        if node.op == "call_function":
            live += sum(size[k] for k in allocs.get(i, []))
        peak = max(peak, live)
        live -= sum(size[k] for k in frees.get(i, []))
    return resident + peak
