"""DeepSpeed's ZeRO model-state estimators (no offload, the GPU figure).

Source: deepspeedai/DeepSpeed, deepspeed/runtime/zero/stage_1_and_2.py
(estimate_zero2_model_states_mem_needs: gpu = 4 P + 16 P / gpus) and deepspeed/runtime/zero/stage3.py
(estimate_zero3_model_states_mem_needs: gpu = 4 x largest layer + 18 P / gpus), with P counted as model_to_params
does (tied parameters once; largest layer = most parameters held directly by one module).
"""
from baselines.hf_model import CannotExpress, build_meta_model, layout, unique_parameters

WHAT = ("model states only (16-bit weights and gradients, fp32 master weights and Adam states, as DeepSpeed's "
        "mixed-precision engine holds them); no activations, no LM head, no temporaries.")


def _counts(case):
    if case["optimizer"] != "adamw":
        raise CannotExpress("the estimators assume DeepSpeed's Adam states")
    model = build_meta_model(case["arch"], case["size"])
    total = sum(p.numel() for p in unique_parameters(model))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _gpus(case, engines):
    """The data-parallel degree when the case runs the estimator's own engine (or one process)."""
    method, dp, tp = layout(case)
    if method == "single":
        return 1
    if method not in engines or tp > 1:
        raise CannotExpress(f"the estimator is for its own ZeRO stage, not {method}")
    return dp


def zero2(case):
    gpus = _gpus(case, ("zero2",))
    total, _ = _counts(case)
    return 4 * total + int(16 * total / gpus)


def zero3(case):
    gpus = _gpus(case, ("fsdp2",))
    total, largest = _counts(case)
    return 4 * largest + int(18 * total / gpus)
