"""`llmem infer --gpu cpu` against real Hugging Face generate() runs on this CPU: the generation section of
docs/ACCURACY.md (scripts/accuracy.py --inference).

Each case is ARCH:PRECISION:BxP+N[:CACHE][:tpT][:QUANT] (CACHE dynamic, the default, or static; tpT: T
tensor-parallel gloo ranks, `llmem infer --tp T`; QUANT nf4, fp4, nf4-dq, fp4-dq: `llmem infer --quant`). The real run is scripts/inference_runs.py (greedy generate(), min_new_tokens =
max_new_tokens, every CPU tensor counted); the one-process cases run in one subprocess, which loads torch once.
A tensor-parallel case is measured on its highest rank (ranks can differ by one partial sum: gloo's threads).
Compared: the prefill's peak (the first forward and the loop's work after it), the last decode step's peak and the
KV cache after the last step (bytes, exact). Errors are of the whole peak (weights included) and, harder, of the part
above the weights. An architecture llmem refuses is listed with its one-line reason, not compared.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import distributed_runs  # noqa: E402  (ensure_export)

# Every architecture of the tiny presets.
ARCHS = ["llama", "gpt2", "opt", "gpt_bigcode", "qwen2", "mistral", "bloom", "gpt_neo", "codegen"]
POINTS = [(1, 128, 16), (2, 32, 8), (4, 256, 4)]  # batch, prompt, new tokens
BF16_ARCHS = ["llama", "gpt2", "codegen"]  # bf16 needs an export traced in bf16 (the ctest fixture makes these)
CASES = [f"{a}:fp32:{b}x{p}+{n}" for a in ARCHS for b, p, n in POINTS]
CASES += [f"{a}:bf16:{b}x{p}+{n}" for a in BF16_ARCHS for b, p, n in POINTS]
# StaticCache (cache_implementation="static") on every scaled_dot_product_attention architecture
STATIC_ARCHS = ["llama", "gpt2", "opt", "gpt_bigcode", "qwen2"]
CASES += [f"{a}:fp32:{b}x{p}+{n}:static" for a in STATIC_ARCHS for b, p, n in POINTS[1:]]
CASES += [f"{a}:bf16:2x32+8:static" for a in BF16_ARCHS if a in STATIC_ARCHS]
# eager attention (BLOOM, GPT-Neo, CodeGen): llmem models their dynamic cache only
CASES += ["bloom:fp32:2x32+8:static"]
# Tensor parallelism (transformers' tp_plan: the Llama family) over 2 gloo ranks: the tiny presets have 2 key/value
# heads, the most a degree may split.
TP_ARCHS = ["llama", "mistral", "qwen2"]
CASES += [f"{a}:fp32:{b}x{p}+{n}:dynamic:tp2" for a in TP_ARCHS for b, p, n in POINTS[1:]]
CASES += ["llama:bf16:2x32+8:dynamic:tp2", "llama:fp32:2x32+8:static:tp2", "qwen2:fp32:4x256+4:static:tp2"]
# Linears loaded 4-bit by transformers' bitsandbytes quantizer (`llmem infer --quant`), on the Llama family (GPT-2's
# Conv1D layers are not quantized by llmem)
QUANT_CASES = ["llama:fp32:2x32+8:dynamic:nf4", "llama:fp32:4x256+4:dynamic:nf4", "llama:bf16:2x32+8:dynamic:nf4",
               "llama:fp32:2x32+8:dynamic:nf4-dq", "llama:bf16:4x64+8:dynamic:fp4-dq", "qwen2:fp32:2x32+8:dynamic:nf4",
               "mistral:fp32:2x32+8:dynamic:fp4", "llama:fp32:2x48+8:static:nf4"]
CASES += QUANT_CASES
QUICK_CASES = ["llama:fp32:2x32+8", "opt:fp32:2x32+8", "qwen2:fp32:2x32+8", "gpt2:bf16:2x32+8",
               "qwen2:fp32:4x256+4:static", "qwen2:fp32:2x32+8:dynamic:tp2", "llama:fp32:2x32+8:dynamic:nf4"]
QUANTS = ("nf4", "fp4", "nf4-dq", "fp4-dq", "int8")


def parse(case):
    arch, precision, shape, *rest = case.split(":")
    batch, tokens = shape.split("x")
    prompt, new = tokens.split("+")
    quant = rest.pop() if rest and rest[-1] in QUANTS else None
    tp = int(rest.pop()[2:]) if rest and rest[-1].startswith("tp") else 1
    return arch, precision, int(batch), int(prompt), int(new), rest[0] if rest else "dynamic", tp, quant


def error(estimated, measured):
    return 100.0 * (estimated - measured) / measured


def compare(llmem, models, cases):
    """One row per case: the estimate, the real run and the errors (or the reason llmem refused the case)."""
    rows, real_cases = [], []
    for case in cases:
        arch, precision, batch, prompt, new, cache, tp, quant = parse(case)
        dtype = "bfloat16" if precision == "bf16" else ""
        export, _ = distributed_runs.ensure_export(arch, "tiny", models, sys.executable, dtype)
        proc = subprocess.run([llmem, "infer", export, "--gpu", "cpu", "-p", precision, "-b", str(batch),
                               "--prompt", str(prompt), "--new-tokens", str(new), "--cache", cache,
                               "--tp", str(tp), "--json"] + (["--quant", quant] if quant else []),
                              capture_output=True, text=True)
        row = {"case": case, "arch": arch, "precision": precision, "batch": batch, "prompt": prompt, "new": new,
               "cache": cache, "tp": tp, "quant": quant or "—"}
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            row["refused"] = lines[-1] if lines else f"exit code {proc.returncode}"
        else:
            row["estimate"] = json.loads(proc.stdout)
            real_cases.append(case)
        rows.append(row)
    if real_cases:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "runs.jsonl")
            cmd = [sys.executable, os.path.join(HERE, "inference_runs.py"), "--out", out]
            for case in real_cases:
                cmd += ["--case", case]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                real = [json.loads(line) for line in f if line.strip()]
        by_case = dict(zip(real_cases, real))
        for row in rows:
            if row["case"] not in by_case:
                continue
            r, e = by_case[row["case"]], row["estimate"]
            w = r["weights_bytes"]
            peaks = r.get("rank_forward_peak_bytes", [r["forward_peak_bytes"]])
            measured = {"prefill": w + max(p[0] for p in peaks), "decode": w + max(p[-1] for p in peaks)}
            estimated = {"prefill": e["prefill"]["peak_allocated_bytes"]}
            if "decode" in e:
                estimated["decode"] = e["decode"]["peak_allocated_bytes"]
            row.update(weights=w, measured=measured, estimated=estimated, cache_measured=r["cache_bytes"],
                       cache_estimated=e["cache_bytes"], weights_estimated=e["weights_bytes"])
            row["errors"] = {k: error(estimated[k], measured[k]) for k in estimated}
            row["errors_above_weights"] = {k: error(estimated[k] - w, measured[k] - w) for k in estimated}
    return rows


def worst(rows):
    """The largest |error| of the whole peak over the compared rows, in percent; 0 when none."""
    return max((abs(v) for r in rows if "errors" in r for v in r["errors"].values()), default=0.0)


def summary(rows, phase):
    compared = [r for r in rows if phase in r.get("errors", {})]
    if not compared:
        return f"{phase}: no case"
    errs = sorted(abs(r["errors"][phase]) for r in compared)
    above = [abs(r["errors_above_weights"][phase]) for r in compared]
    under = [r for r in compared if r["errors"][phase] < 0]
    text = (f"{phase}: {len(compared)} cases: median |error| {errs[len(errs) // 2]:.3f}%, max |error| {errs[-1]:.3f}% "
            f"(above the weights: max {max(above):.2f}%), {len(under)} under-estimates")
    if under:
        low = min(under, key=lambda r: r["errors"][phase])
        text += (f" (largest {low['errors'][phase]:+.4f}%, "
                 f"{low['estimated'][phase] - low['measured'][phase]:+d} bytes)")
    return text


SECTION = "## Generation: Hugging Face generate() on this CPU (`llmem infer`)"


def write_section(f, rows, when=None):
    """The section's markdown; `when` (a UTC time) dates it when it is run apart from the rest of the report."""
    mib = 2.0 ** 20
    f.write(f"\n{SECTION}\n\n")
    if when:
        f.write(f"- when: {when} (this section's own run: `scripts/inference_accuracy.py --update`)\n")
    f.write("- measured: `scripts/inference_runs.py`: the Hugging Face model of the export's config in eval mode, "
            "`model.generate(input_ids, attention_mask=ones, max_new_tokens=N, min_new_tokens=N, do_sample=False, "
            "use_cache=True)` (greedy, DynamicCache, no padding), every CPU tensor counted by a counting allocator; "
            "the peak of each forward and the loop's work after it (prefill: the first; decode: the last, where the "
            "cache is longest), weights included\n")
    f.write("- estimated: `llmem infer --gpu cpu -p PRECISION -b B --prompt P --new-tokens N`: its prefill and last "
            "decode step's allocated peaks; the cache after the last step, compared byte for byte\n")
    f.write("- error = (estimated - measured) / measured of the whole peak; \"above weights\": the same of the part "
            "above the weights (activations, cache, the loop's tensors)\n")
    f.write("- cache: `dynamic` (DynamicCache, the default) or `static` (`cache_implementation=\"static\"`, "
            "`llmem infer --cache static`)\n")
    f.write("- tp: tensor-parallel ranks (`llmem infer --tp T`): T gloo processes, each decoder layer split as "
            "transformers' tp_plan does (q/k/v, gate/up ColwiseParallel; o, down RowwiseParallel; embedding and LM head "
            "replicated; each rank's shards made in place, as loading them from a checkpoint), figures of the rank "
            "that peaks highest: gloo's worker threads free a row-parallel partial sum sooner or later from run to "
            "run, so ranks can differ by one such tensor\n")
    f.write("- quant: linears loaded by transformers' bitsandbytes quantizer (`from_pretrained(quantization_config="
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=nf4|fp4, bnb_4bit_use_double_quant=-dq, "
            "bnb_4bit_compute_dtype=D), dtype=D)`, `llmem infer --quant`), with bitsandbytes' CPU-only AVX512-BF16 "
            "repacking off (no GPU has it; it needs out features divisible by 32): the dequantizing path\n")
    f.write("- not modelled: the workspace of the CPU GEMM of a bf16 `linear` (CPU only), which sets the CPU peak where "
            "the activations are smallest (the largest error above the weights below); a local of a helper method "
            "that outlives its last use (CodeGen's `_attn` holds its fp32 copy of the keys, `key = key.to(float32)`, "
            "until it returns: llmem frees it after the score product; codegen bf16 4 x 256 + 4 decode)\n\n")
    for phase in ("prefill", "decode"):
        f.write(f"- **{summary(rows, phase)}.**\n")
    cache_exact = [r for r in rows if "errors" in r and r["cache_estimated"] == r["cache_measured"]]
    compared = [r for r in rows if "errors" in r]
    f.write(f"- **KV cache: {len(cache_exact)} of {len(compared)} cases exact.**\n")
    refused = [r for r in rows if "refused" in r]
    if refused:
        f.write(f"- {len(refused)} cases refused by llmem (listed with its reason)\n")
    f.write("\n| model | precision | cache | tp | quant | batch | prompt + new | prefill measured MiB | prefill error | above weights | "
            "last decode measured MiB | decode error | above weights | cache |\n")
    f.write("|---|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
    for r in rows:
        head = (f"| {r['arch']} | {r['precision']} | {r['cache']} | {r['tp']} | {r['quant']} | {r['batch']} | "
                f"{r['prompt']} + {r['new']} | ")
        if "refused" in r:
            f.write(head + f"refused: {r['refused'].replace('|', '/')} | | | | | | |\n")
            continue
        cells = []
        for phase in ("prefill", "decode"):
            if phase in r["errors"]:
                cells.append(f"{r['measured'][phase] / mib:.2f} | {r['errors'][phase]:+.3f}% | "
                             f"{r['errors_above_weights'][phase]:+.2f}%")
            else:
                cells.append("— | — | —")
        cache = "exact" if r["cache_estimated"] == r["cache_measured"] else \
            f"{r['cache_estimated'] - r['cache_measured']:+d} B"
        f.write(head + " | ".join(cells) + f" | {cache} |\n")


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmem", required=True)
    ap.add_argument("--models", required=True, help="folder of <arch>-tiny.pt exports (missing ones are made)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)}")
    ap.add_argument("--case", action="append", help="only this case (repeatable), e.g. bloom:fp32:2x32+8")
    ap.add_argument("--out", help="write the section's markdown here")
    ap.add_argument("--update", help="replace this section of a report written by scripts/accuracy.py (e.g. "
                                     "docs/ACCURACY.md), or append it, dated by this run")
    ap.add_argument("--check", type=float, help="exit 1 if any |error| of a whole peak exceeds this (percent)")
    args = ap.parse_args()
    rows = compare(args.llmem, args.models, args.case or (QUICK_CASES if args.quick else CASES))
    for phase in ("prefill", "decode"):
        print(summary(rows, phase))
    if args.out:
        with open(args.out, "w") as f:
            write_section(f, rows)
    if args.update:
        import datetime
        import io

        import report_sections

        section = io.StringIO()
        write_section(section, rows, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        report_sections.update_section(args.update, SECTION, section.getvalue())
    if args.check is not None and worst(rows) > args.check:
        sys.exit(f"inference_accuracy: an error of {worst(rows):.3f}% exceeds {args.check}%")


if __name__ == "__main__":
    main()
