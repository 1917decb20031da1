#!/usr/bin/env python3
"""Real Hugging Face generation on this CPU through the counting allocator: the ground truth of `llmem infer`.

A case is ARCH:PRECISION:BxP+N[:CACHE][:tpT][:QUANT]: the export's model (models/export_hf.py's preset, seed 0, random
weights) in eval mode, in PRECISION (fp32 | bf16: the weights cast as from_pretrained(dtype=...) leaves them),
generating N new tokens greedily for B prompts of P random tokens without padding:

    model.generate(input_ids, attention_mask=ones, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                   use_cache=True, cache_implementation=None | "static")

min_new_tokens = max_new_tokens makes the length exact whatever the model emits. CACHE is dynamic (HF's
DynamicCache, the default) or static (StaticCache sized for P + N). tpT runs T gloo ranks (torchrun) with every
decoder layer split as transformers' tp_plan for the Llama family does (q/k/v/gate/up ColwiseParallel, o/down
RowwiseParallel; embedding and LM head replicated), each generating the same tokens; the figures are rank 0's,
`rank_peak_bytes` and `rank_forward_peak_bytes` list every rank's (gloo's worker threads free a row-parallel partial
sum earlier or later from run to run, so ranks can differ by one such tensor). QUANT (nf4, fp4, nf4-dq, fp4-dq, int8)
loads the same weights through transformers' bitsandbytes quantizer in the precision's dtype, as one loads a model to
generate (training_recipe.load_quantized, then eval mode). One JSON line per case:

- weights_bytes: the model's storages (counted as the model is built, after the dtype cast);
- peak_bytes: the highest live bytes above the weights during generate() (the input ids included);
- forward_peak_bytes: per model forward (0: the prefill of B x P tokens, then the N - 1 decode steps), the
  highest live bytes above the weights from that forward's start to the next one's (so a step includes the
  logits processing after it); forward_start_bytes: live bytes above the weights when each forward starts;
- cache_bytes: the key/value cache's tensors after the last step; cache_layers: per layer its key and value shapes.

  scripts/inference_runs.py --case llama:fp32:2x32+8 --case mistral:bf16:1x64+16:static [--out runs.jsonl]
  scripts/inference_runs.py --case qwen2:bf16:2x32+8:dynamic:tp2
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import distributed_worker  # noqa: E402

CACHES = ("dynamic", "static")
PRECISIONS = ("fp32", "bf16")


class CaseError(ValueError):
    pass


QUANTS = ("nf4", "fp4", "nf4-dq", "fp4-dq", "int8")


def parse_case(text):
    """ARCH:PRECISION:BxP+N[:CACHE][:tpT][:QUANT] -> (arch, precision, batch, prompt, new_tokens, cache, tp, quant)."""
    fields = text.split(":")
    quant = fields.pop() if len(fields) >= 4 and fields[-1] in QUANTS else None
    tp = 1
    if len(fields) >= 4 and fields[-1].startswith("tp"):
        try:
            tp = int(fields.pop()[2:])
        except ValueError:
            raise CaseError(f"case '{text}': the tensor-parallel field must be tpT, e.g. tp2") from None
        if tp < 1:
            raise CaseError(f"case '{text}': the tensor-parallel degree must be positive")
    if len(fields) not in (3, 4):
        raise CaseError(f"case '{text}': expected ARCH:PRECISION:BxP+N[:CACHE][:tpT]")
    arch, precision, point = fields[:3]
    cache = fields[3] if len(fields) == 4 else "dynamic"
    try:
        batch, rest = point.split("x")
        prompt, new = rest.split("+")
        batch, prompt, new = int(batch), int(prompt), int(new)
    except ValueError:
        raise CaseError(f"case '{text}': the point must be BxP+N, e.g. 2x32+8") from None
    if min(batch, prompt, new) <= 0:
        raise CaseError(f"case '{text}': batch, prompt and new tokens must be positive")
    if precision not in PRECISIONS:
        raise CaseError(f"case '{text}': precision must be one of {', '.join(PRECISIONS)}")
    if cache not in CACHES:
        raise CaseError(f"case '{text}': cache must be one of {', '.join(CACHES)}")
    if quant and tp > 1:
        raise CaseError(f"case '{text}': quantized weights are measured on one process")
    return arch, precision, batch, prompt, new, cache, tp, quant


def cache_tensors(cache):
    """(layer, key, value) of a DynamicCache / StaticCache after generation."""
    return [(i, layer.keys, layer.values) for i, layer in enumerate(cache.layers)]


def load_quantized(model, quant, precision):
    """The same weights loaded through transformers' bitsandbytes quantizer in the precision's dtype, as one loads a
    model to generate: from_pretrained(quantization_config=BitsAndBytesConfig(...), dtype=...). On CPU, tensors that
    keep the checkpoint's dtype stay memory-mapped from the file, outside the counting allocator; a GPU load copies
    every one to the device, so each is copied here too."""
    import tempfile

    import training_recipe
    from transformers import AutoModelForCausalLM

    config, dtype = training_recipe.bnb_quantization_config({"quant": quant},
                                                            "bf16-autocast" if precision == "bf16" else "fp32")
    attn = model.config._attn_implementation
    with tempfile.TemporaryDirectory(prefix="llmem-quant-") as directory:
        model.save_pretrained(directory)
        del model
        gc.collect()
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=dtype,
                                                     device_map="cpu", attn_implementation=attn)
        import torch

        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                # quantized weights were made by the quantizer (counted); Int8Params also keep them as .CB
                if type(t).__name__ not in ("Params4bit", "Int8Params"):
                    t.data = t.data.clone()
    return model


def run_case(arch, precision, batch, prompt, new_tokens, cache="dynamic", tp=1, quant=None, size="tiny", probe=None):
    import torch

    probe = probe or distributed_worker.CpuProbe()
    gc.collect()
    before = probe.current()
    arch, model, attn, label = distributed_worker.build_eager_model(arch, size)
    if quant:
        model = load_quantized(model, quant, precision)
        for m in model.modules():
            # bitsandbytes' CPU-only repacking of 4-bit weights for AVX512-BF16 kernels (Linear4bit.forward in eval
            # mode) exists on no GPU, and asserts out features divisible by 32: off, for the dequantizing path
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    model.eval()
    if precision == "bf16" and not quant:
        model.to(torch.bfloat16)
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        # transformers' from_pretrained(tp_plan=...) reads each rank's shard from the checkpoint: no scatter
        distributed_worker.apply_tp(model, arch, init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",)), False,
                                    src_data_rank=None)
    gc.collect()
    weights = probe.current() - before
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    base = before + weights
    starts, peaks = [], []

    def pre_hook(module, args, kwargs):
        if starts:
            peaks.append(probe.peak(0) - base)
        probe.reset_peak(0)
        starts.append(probe.current() - base)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    probe.reset_peak(1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             cache_implementation=None if cache == "dynamic" else cache,
                             pad_token_id=model.config.eos_token_id or 0, return_dict_in_generate=True)
    peaks.append(probe.peak(0) - base)
    handle.remove()
    layers = cache_tensors(out.past_key_values)
    record = {"arch": arch, "label": label, "size": size, "precision": precision, "batch": batch, "prompt": prompt,
              "new_tokens": new_tokens, "cache": cache, "tp": tp, "quant": quant, "attn_implementation": attn,
              "weights_bytes": weights, "peak_bytes": probe.peak(1) - base,
              "forward_peak_bytes": peaks, "forward_start_bytes": starts,
              "cache_bytes": sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for _, k, v in layers),
              "cache_layers": [{"key": list(k.shape), "value": list(v.shape)} for _, k, v in layers],
              "sequences": list(out.sequences.shape)}
    if len(starts) != new_tokens:
        raise RuntimeError(f"{label}: {len(starts)} forwards for {new_tokens} new tokens")
    return record


def run_rank(case, size, out_dir):
    """One rank of a tensor-parallel case under torchrun: its record into out_dir/rank{R}.json."""
    import torch.distributed as dist

    probe = distributed_worker.CpuProbe()  # first: the process group's own allocations are counted as baseline
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record = run_case(*parse_case(case), size=size, probe=probe)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


def run_tensor_parallel(case, tp, size):
    """Launches the T ranks of a case; rank 0's record with every rank's peak."""
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp),
               os.path.abspath(__file__), "--rank-case", case, "--size", size, "--rank-out", out_dir]
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        records = []
        for r in range(tp):
            path = os.path.join(out_dir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    records.append(json.load(f))
        if proc.returncode != 0 or len(records) != tp:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{case}: exit {proc.returncode}, {len(records)}/{tp} ranks: {tail[0][-300:]}")
    record = records[0]
    record["rank_peak_bytes"] = [r["peak_bytes"] for r in records]
    record["rank_forward_peak_bytes"] = [r["forward_peak_bytes"] for r in records]
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="ARCH:PRECISION:BxP+N[:CACHE][:tpT]")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--out", help="append one JSON line per case (default: stdout)")
    ap.add_argument("--rank-case", help=argparse.SUPPRESS)  # a rank of a tensor-parallel case (torchrun)
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_case:
        run_rank(args.rank_case, args.size, args.rank_out)
        return
    if not args.case:
        sys.exit("inference_runs: give at least one --case")
    try:
        cases = [parse_case(c) for c in args.case]
    except CaseError as e:
        sys.exit(f"inference_runs: {e}")
    probe = distributed_worker.CpuProbe()
    for text, case in zip(args.case, cases):
        if case[6] > 1:
            record = run_tensor_parallel(text, case[6], args.size)
        else:
            record = run_case(*case, size=args.size, probe=probe)
        line = json.dumps(record)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        else:
            print(line, flush=True)


if __name__ == "__main__":
    main()
