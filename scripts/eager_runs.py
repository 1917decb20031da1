#!/usr/bin/env python3
"""Eager PyTorch / Hugging Face training steps on this CPU, many cases in ONE Python process: the ground truth of
the single-process accuracy matrix (scripts/accuracy.py).

Each case is scripts/distributed_worker.py's `--method single` job, called as a function: the HF model built
exactly as models/export_hf.py builds it for its TorchScript export (same preset, seed 0, dropout 0, train mode,
use_cache False, SDPA attention), every CPU tensor storage counted by scripts/counting_allocator.py, and this
loop, the one HF Trainer's `compute_loss` runs (the ModelOutput is dropped before backward):

    with torch.autocast("cpu", dtype=torch.bfloat16):      # bf16-autocast only
        loss = model(input_ids, labels=labels).loss
    loss.backward(); loss = None
    opt.step(); opt.zero_grad(set_to_none=True)           # torch.optim.AdamW(lr 1e-4) or SGD(momentum 0.9)

The peaks of each phase (forward incl. the loss, backward, optimizer) are those of the last step (steady state:
the optimizer states exist from step 1 on); peak_bytes is the peak over steps 1..N-1. Byte counts are relative to
what was live before the case's model existed, so earlier cases of the same process do not count.
torch and the counting allocator's extension are loaded once for all cases.

A case is ARCH:PRECISION:OPTIMIZER:BxS[:RECIPE]. The optional recipe is `key=value` pairs joined by `,`, the keys
llmem's flag names without dashes: checkpointing (none|full|every-K|selective), checkpointing-impl
(reentrant|non-reentrant), grad-accum (K), loss (standard|chunked-N), keep-outputs (0|1), optimizer-in-backward
(0|1), grad-clip (NORM), and PEFT LoRA / QLoRA: lora-r (R), lora-alpha (A), lora-dropout (P), lora-targets
(NAME+NAME or all-linear), lora-modules-to-save (NAME+NAME), quant (nf4|fp4|nf4-dq|fp4-dq|int8). scripts/training_recipe.py says
which library code and which loop each option runs (HF gradient_checkpointing_enable, torchtitan's layer and op
selective AC, HF Trainer's accumulation, torchtune's chunked output and CEWithChunkedOutputLoss and
optimizer-in-backward, the accelerate/PEFT example loop, clip_grad_norm_, peft.get_peft_model, transformers'
BitsAndBytesConfig reload + peft.prepare_model_for_kbit_training). Values at their default are dropped; a case
whose recipe is all defaults gives exactly the plain case's record, any other carries "recipe" (the options that
differ from the default), "checkpointed_layers" and, with grad-accum, "micro_batch_phase_peak_bytes" (the forward
and backward peak of each micro-batch of the steady-state step; phase_peak_bytes holds their maximum).
A LoRA case also carries "lora" (the settings, the adapted modules grouped over the layers with their base class,
in/out features, dropout module and scaling, the adapter dtypes, whether the input-require-grads hook is on),
"trainable_parameters", "trainable_bytes", "trainable_bytes_by_dtype", "frozen_parameters" (unquantized count),
"frozen_bytes", "frozen_bytes_by_format" (float dtypes, "nf4-packed-uint8", "int8-rowwise", ...) after the setup
and "frozen_bytes_by_format_end" after the last step (bitsandbytes' Linear4bit casts its bias to the compute dtype
in its forward), "buffer_bytes"; with quant also "quant" (the BitsAndBytesConfig settings and the quantization
state's bytes by part) and "copied_uncounted_bytes" (reloaded weights copied into counted memory, see
training_recipe.py).

  scripts/eager_runs.py --case llama:bf16-autocast:adamw:1x128:lora-r=8,lora-alpha=16,lora-targets=all-linear,quant=nf4

  scripts/eager_runs.py --case llama:bf16-autocast:adamw:4x512 --case gpt2:fp32:sgd:1x128 [--out runs.jsonl]
  scripts/eager_runs.py --case llama:fp32:adamw:2x128:checkpointing=every-2,grad-accum=2
"""
import argparse
import gc
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import distributed_worker  # noqa: E402
import training_recipe  # noqa: E402

STEPS = 2  # step 0 creates the optimizer states; step 1 is the steady-state step that is reported


def release_process_wide_state():
    """Drop what a library singleton still holds of the previous case before this case's baseline is taken.
    bitsandbytes' GlobalOptimManager keeps every module given to register_module_override (HF Trainer's 32-bit
    override of nn.Embedding weights): without this the previous case's embedding stays alive into the baseline
    and is freed during this case, which then measures that weight's bytes too small in every phase."""
    if "bitsandbytes" in sys.modules:
        sys.modules["bitsandbytes"].optim.GlobalOptimManager.get_instance().initialize()


def run_case(arch, precision, optimizer, batch, seq, recipe=None, size="tiny", steps=STEPS):
    """One eager single-process case (recipe: a parsed training_recipe, None or {} for the plain step); returns
    distributed_worker's record with byte counts made relative."""
    argv = ["--arch", arch, "--size", size, "--method", "single", "--batch", str(batch), "--seq", str(seq),
            "--precision", precision, "--optimizer", optimizer, "--steps", str(steps), "--out-dir", "."]
    if recipe:
        argv += ["--recipe", training_recipe.recipe_text(recipe)]
    args = distributed_worker.parse_args(argv)
    release_process_wide_state()
    gc.collect()  # the previous case's model and optimizer are gone before this one's baseline is taken
    record = {"arch": arch, "size": size, "batch": batch, "seq": seq, "precision": precision,
              "optimizer": optimizer}
    distributed_worker.run(args, 0, 1, 0, record)
    base = record["baseline_bytes"]
    record["peak_bytes"] -= base
    record["phase_peak_bytes"] = {k: v - base for k, v in record["phase_peak_bytes"].items()}
    if "micro_batch_phase_peak_bytes" in record:
        record["micro_batch_phase_peak_bytes"] = [{k: v - base for k, v in mb.items()}
                                                  for mb in record["micro_batch_phase_peak_bytes"]]
    record.pop("steps", None)  # per-step details of every step: not needed by the matrix
    return record


def parse_case(text):
    """ARCH:PRECISION:OPTIMIZER:BxS[:RECIPE] -> (arch, precision, optimizer, batch, seq, recipe)."""
    fields = text.split(":")
    try:
        arch, precision, optimizer, point = fields[:4]
        if len(fields) > 5:
            raise ValueError
        batch, seq = (int(x) for x in point.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ARCH:PRECISION:OPTIMIZER:BxS[:RECIPE], got {text!r}")
    try:
        recipe = training_recipe.parse_recipe(fields[4] if len(fields) == 5 else "")
    except training_recipe.RecipeError as e:
        raise argparse.ArgumentTypeError(f"case {text!r}: {e}")
    return arch, precision, optimizer, batch, seq, recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="ARCH:PRECISION:OPTIMIZER:BxS[:RECIPE]")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--out", help="append one JSON line per case (default: stdout)")
    args = ap.parse_args()
    try:  # every case is checked before the first one runs
        cases = [parse_case(c) for c in args.case]
    except argparse.ArgumentTypeError as e:
        print(f"eager_runs: error: {e}", file=sys.stderr)
        sys.exit(2)
    out = open(args.out, "a") if args.out else sys.stdout
    for text, c in zip(args.case, cases):
        try:
            rec = run_case(*c, size=args.size)
        except training_recipe.RecipeError as e:  # a recipe this model cannot take
            print(f"eager_runs: error: case {text!r}: {e}", file=sys.stderr)
            sys.exit(2)
        out.write(json.dumps(rec) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
