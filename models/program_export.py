"""torch.export of the loss wrapper: an ExportedProgram (.pt2) beside the TorchScript export.

export_hf.py builds the model and the records (config, expression calls, rebound names) once; this module
exports the same forward(input_ids, labels) -> loss with torch.export, batch and sequence dynamic, under the same
tracing stand-ins, and saves it with the records as the archive's extra files (llmem reads them from
`<archive>/extra/`). The graph is torch.export's default IR (ATen ops before decomposition, as autograd sees
them), which is what llmem's importer executes on the meta device.
"""

import contextlib
import json
import logging
import os
import random
import warnings

import torch

# The ops a cast (Tensor.to, .float(), ...) is recorded as in torch.export's default IR.
# torch.tensor(x, dtype=d) in a forward is a lifted constant's lift_fresh_copy, which llmem runs as the cast eager
# makes (and a trace records) there.
_CAST_TARGETS = {"aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.to.other", "aten._to_copy.default",
                 "aten.lift_fresh_copy.default"}


@contextlib.contextmanager
def python_layerdrop_draws():
    """`torch.rand([])` as a Python float while exporting (OPT's layerdrop: `if torch.rand([]) < p: continue`).

    Eager draws a number and branches on it; torch.export cannot branch on a tensor's data. A Python draw makes the
    same branch in Python, so the program keeps every layer the draw keeps (all of them at layerdrop 0)."""
    saved = torch.rand

    def rand(*size, **kwargs):
        if size in (([],), ((),), ()) and not kwargs:
            return random.random()
        return saved(*size, **kwargs)

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = saved


@contextlib.contextmanager
def innermost_stack_traces():
    """Each node's stack trace down to the line that ran the op, not only the module forwards on the way.

    torch.export records forward frames only (the tracer's _record_forward_stack_traces_only); a cast inside a
    helper (CodeGen's _attn) then shows the line that called the helper. The autocast record pairs casts by their
    source line, and llmem reads from the innermost file whether a module's own code ran the op, as a TorchScript
    trace's source range says."""
    tracer = torch.fx.proxy.TracerBase
    saved = tracer._filter_traceback_frames

    def every_frame(self, summary):
        forward_only = getattr(self, "_record_forward_stack_traces_only", False)
        self._record_forward_stack_traces_only = False
        try:
            return saved(self, summary)
        finally:
            self._record_forward_stack_traces_only = forward_only

    tracer._filter_traceback_frames = every_frame
    try:
        yield
    finally:
        tracer._filter_traceback_frames = saved


def export_program(wrapper, ids, labels, shims):
    """torch.export.export of `wrapper` at (ids, labels), both [batch, seq] with both dims dynamic.

    `shims` is a context manager factory: the stand-ins the TorchScript trace runs under (masks, SDPA's is_causal,
    MoE routing), so both formats record the same forward. Non-strict: the model's Python runs as in eager, on
    fake tensors. Dim.DYNAMIC rather than named dims: HF's shape code produces guards the constraint solver cannot
    prove for a named range (e.g. min(64*s, 128*s) == 64*s), which fails a named-dim export."""
    dyn = torch.export.Dim.DYNAMIC
    with warnings.catch_warnings(), shims(), python_layerdrop_draws(), innermost_stack_traces():
        warnings.simplefilter("ignore")
        return torch.export.export(wrapper, (ids, labels), dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}),
                                   strict=False)


def program_nodes(program):
    return list(_nodes(program.graph_module))


def _nodes(graph_module):
    """Every call node of the program, submodules of higher-order ops (grad mode, autocast regions) inlined where
    they are called, in execution order."""
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        yield node
        for arg in node.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                sub = getattr(graph_module, arg.target, None)
                if isinstance(sub, torch.fx.GraphModule):
                    yield from _nodes(sub)


# Frames of torch's tracing machinery (dispatch, fake tensors, fx, export's torch-function handler): a node's stack
# trace ends in them below the line that ran the op.
_MACHINERY = ("/torch/fx/", "/torch/_subclasses/", "/torch/_ops.py", "/torch/utils/_python_dispatch.py",
              "/torch/_export/", "/torch/export/", "/torch/_higher_order_ops/", "/torch/utils/_stats.py",
              "/torch/_library/", "/torch/overrides.py", "/torch/_dynamo/", "/torch/_guards.py",
              "/torch/utils/_contextlib.py", "/torch/_compile.py", "/torch/_jit_internal.py")


def _frames(stack_trace):
    """A formatted stack trace as [(header line, source line)], outermost first."""
    lines = (stack_trace or "").split("\n")
    frames = []
    for line in lines:
        if line.strip().startswith('File "'):
            frames.append([line.strip(), ""])
        elif frames and not frames[-1][1]:
            frames[-1][1] = line.strip()
    return frames


def restore_cudnn_flag(program):
    """torch.export turns cuDNN off while it traces (torch/export/_trace.py), and F.layer_norm passes the flag on as
    its cudnn_enable argument; the eager step passes the flag it runs with."""
    for node in _nodes(program.graph_module):
        if str(node.target) == "aten.layer_norm.default" and len(node.args) == 6:
            node.args = node.args[:5] + (torch.backends.cudnn.enabled,)


def trim_machinery_frames(program):
    """Drops, from every node's stack trace, the frames of torch's tracing machinery below the op's own line, so the
    innermost frame is the Python line that called the op (what a TorchScript trace's source range names)."""
    for node in _nodes(program.graph_module):
        trace = node.meta.get("stack_trace")
        if not trace:
            continue
        frames = _frames(trace)
        while frames and any(m in frames[-1][0] for m in _MACHINERY):
            frames.pop()
        node.meta["stack_trace"] = "\n".join(f"  {h}\n    {src}" for h, src in frames)


def _innermost_frame(stack_trace, exporter_file):
    """The innermost frame of a node's stack trace outside the exporter, in the form a TorchScript source range and
    export_hf's cast recorder name a line: `file(line): function`."""
    frames = []
    lines = (stack_trace or "").split("\n")
    for line in lines:
        line = line.strip()
        if not line.startswith('File "'):
            continue
        try:
            path, rest = line[len('File "'):].split('", line ', 1)
            number, function = rest.split(", in ", 1)
        except ValueError:
            continue
        frames.append(f"{path}({number}): {function}")
    for frame in reversed(frames):
        if not frame.startswith(exporter_file):
            return frame
    return frames[-1] if frames else ""


def cast_sites(program, exporter_file, scalar_type_codes):
    """The casts of the program in execution order, as (source line, ScalarType code or None: `scalar_type_codes`
    maps a dtype to its code), with each cast's node name: what export_hf.autocast_targets pairs with a forward
    run under autocast."""
    sites, names = [], []
    for node in _nodes(program.graph_module):
        if str(node.target) not in _CAST_TARGETS:
            continue
        dtype = node.kwargs.get("dtype")
        if dtype is None and str(node.target) == "aten.lift_fresh_copy.default":
            dtype = getattr(node.meta.get("val"), "dtype", None)
        if dtype is None:
            dtype = next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None)
        code = scalar_type_codes.get(dtype) if isinstance(dtype, torch.dtype) else None
        sites.append((_innermost_frame(node.meta.get("stack_trace"), exporter_file), code))
        names.append(node.name)
    return sites, names


def autocast_cast_record(names, targets):
    """The autocast record of a program: per cast node (by name), whether autocast's 16-bit dtype is its target."""
    return json.dumps({"casts": dict(zip(names, targets))})


def save_program(program, out, extra):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.export.save(program, out, extra_files=extra)


def verify_program(path, wrapper, vocab, shapes, trace_shape, device, seed, make_inputs, routing):
    """The saved program's loss equals the eager loss at shapes other than the trace shape (CPU), or runs and
    returns a scalar on meta. Returns the shapes checked."""
    quiet = logging.getLogger("torch.export.pt2_archive._package")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the loader's note on empty (meta) weights
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # and on read-only buffers
            loaded = torch.export.load(path).module()
    finally:
        quiet.setLevel(level)
    gen = torch.Generator().manual_seed(seed + 1)
    checked = []
    for batch, seq in shapes:
        if (batch, seq) == trace_shape:
            continue
        ids, labels = make_inputs(batch, seq, vocab, device, gen)
        with torch.no_grad(), routing():
            got = loaded(ids, labels)
            if device == "meta":
                if got.dim() != 0:
                    raise RuntimeError(f"program verification FAILED at B={batch} S={seq}: shape {list(got.shape)}")
                checked.append((batch, seq))
                continue
            want = wrapper(ids, labels).float()
            got = got.float()
        diff = (want - got).abs().item()
        tol = (1e-4 if next(wrapper.parameters()).dtype == torch.float32 else 2e-2) * max(1.0, abs(want.item()))
        if got.dim() != 0 or not torch.isfinite(got) or diff > tol:
            raise RuntimeError(f"program verification FAILED at B={batch} S={seq}: eager loss {want.item():.6f}, "
                               f"exported loss {got.item():.6f} (|diff| {diff:.3g} > {tol:.3g})")
        checked.append((batch, seq, want.item(), got.item(), diff))
    return checked


# The extra file of a .pt2 export that holds the module hierarchy (torch.export keeps parameters and buffers by
# name, not the nn.Module tree that accelerate places by).
MODULE_TREE_FILE = "module_tree.json"


def module_tree_record(root):
    """JSON of the nn.Module tree under `root`: per module its path, class name, own parameters then buffers (a tied
    tensor names the first path that holds it) and its children, in registration order, as TorchScript keeps a
    module's slots."""
    first_name = {}

    def record(name, module):
        tensors = []
        for is_parameter, store in ((True, module._parameters), (False, module._buffers)):
            for attr, t in store.items():
                if t is None:
                    continue
                full = f"{name}.{attr}" if name else attr
                entry = {"name": full, "parameter": is_parameter}
                first = first_name.setdefault(id(t), full)
                if first != full:
                    entry["tied_to"] = first
                tensors.append(entry)
        children = [record(f"{name}.{child}" if name else child, sub)
                    for child, sub in module._modules.items() if sub is not None]
        return {"name": name, "class": type(module).__name__, "tensors": tensors, "children": children}

    return json.dumps(record("", root))
