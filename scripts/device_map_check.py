"""`llmem infer --device-map auto` against accelerate's own placement: for each case, the model of the export's preset
is built on the meta device (models/export_hf.py's build_model, as the export was) and placed by accelerate's
get_balanced_memory + infer_auto_device_map with the GPUs' free memory llmem assumed (`free_bytes_per_gpu`, with the
unused reserved segment transformers' _get_device_map adds back), as from_pretrained(device_map="auto") does with
more than one GPU. Compared: the balanced max_memory of every GPU (bytes) and the device of every parameter and
buffer.

  scripts/device_map_check.py --llmem build/cli/llmem --models build/tiny_models [--case llama:2:18MiB]

A case is ARCH:GPUS:CAPACITY (the --gpu-memory of an H100-class GPU; small values split the tiny presets).
Prints one line per case and exits 1 on any difference.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "models"))
sys.path.insert(0, HERE)

PROBE_SEGMENT = 2 << 20  # the reserved, unused segment of get_max_memory's probe tensor (llmem's assumption)
# Capacities a little above the CUDA context of llmem's H100 (about 400 MiB) leave 100-130 MiB per GPU; the balanced
# share of the tiny presets (10-30 MB) then splits them over the GPUs.
CASES = [f"{arch}:{gpus}:{cap}" for arch in ("llama", "gpt2", "opt", "bloom", "gpt_neo", "codegen", "gpt_bigcode",
                                             "qwen2", "mistral")
         for gpus, cap in ((2, "530MiB"), (3, "524MiB"), (4, "520MiB"))]


def llmem_map(llmem, export, gpus, capacity):
    proc = subprocess.run([llmem, "infer", export, "--gpu", "h100-80", "--gpu-memory", capacity, "-p", "fp32",
                           "--prompt", "4", "--new-tokens", "2", "--device-map", "auto", "--gpus", str(gpus),
                           "--json"], capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        return None, proc.stderr.strip().splitlines()[-1]
    return json.loads(proc.stdout), None


def accelerate_map(arch, gpus, free):
    import logging

    import torch
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    import export_hf

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Device 0 is not available": this machine has none
    name, model_type, kwargs, _ = export_hf.resolve(arch, "tiny")
    model, _ = export_hf.build_model(name, model_type, kwargs, "meta", torch.float32, False, 0)
    no_split = model._get_no_split_modules("auto")
    max_memory = {i: free for i in range(gpus)}
    max_memory["cpu"] = 1 << 40
    balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                   dtype=torch.float32)
    for i in range(gpus):
        balanced[i] += PROBE_SEGMENT
    device_map = infer_auto_device_map(model, max_memory=dict(balanced), no_split_module_classes=no_split,
                                       dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [balanced[i] for i in range(gpus)], device_map, names


def device_of(device_map, name):
    best, device = -1, None
    for module, d in device_map.items():
        if module == "" or name == module or name.startswith(module + "."):
            if len(module) > best:
                best, device = len(module), d
    return device


def check(llmem, models, case):
    arch, gpus, capacity = case.split(":")
    gpus = int(gpus)
    est, refused = llmem_map(llmem, os.path.join(models, f"{arch}-tiny.pt"), gpus, capacity)
    if refused:
        return f"{case}: llmem refused: {refused}", False
    balanced, device_map, names = accelerate_map(arch, gpus, est["free_bytes_per_gpu"])
    ours = {a["module"]: a["device"] for a in est["device_map"]}
    problems = []
    llmem_max = [d["max_memory_bytes"] for d in est["devices"]]
    if llmem_max != balanced:
        problems.append(f"max_memory {llmem_max} vs accelerate {balanced}")
    moved = [n for n in names if device_of(ours, n) != device_of(device_map, n)]
    if moved:
        problems.append(f"{len(moved)} tensors elsewhere, e.g. {moved[0]}: llmem {device_of(ours, moved[0])}, "
                        f"accelerate {device_of(device_map, moved[0])}")
    layout = ", ".join(f"{m or '(model)'}->{d}" for m, d in device_map.items())
    return f"{case}: {'same' if not problems else '; '.join(problems)} ({layout})", not problems


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmem", required=True)
    ap.add_argument("--models", required=True, help="folder of <arch>-tiny.pt exports")
    ap.add_argument("--case", action="append")
    args = ap.parse_args()
    ok = True
    for case in args.case or CASES:
        line, same = check(args.llmem, args.models, case)
        print(line, flush=True)
        ok = ok and same
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
