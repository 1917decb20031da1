"""accelerate's `accelerate estimate-memory`: the model's load size, times 4 for training with Adam.

Source: huggingface/accelerate, src/accelerate/commands/estimate.py (gather_data: `dtype_training_size =
dtype_total_size * 4`) and utils/modeling.py (calculate_maximum_sizes: every parameter and buffer at its dtype).
"""
from baselines.hf_model import CannotExpress, build_meta_model, require_single_process

NAME = "accelerate estimate-memory"
SOURCE = "huggingface/accelerate `commands/estimate.py` (training with Adam = 4 x load size)"
WHAT = ("parameters + buffers at the weights' dtype, x4 (weights, gradients, two Adam states); no activations, "
        "no LM head, no temporaries. Autocast keeps fp32 weights, so the float32 row applies.")


def estimate(case):
    require_single_process(case, "a one-GPU rule (no data or tensor parallelism)")
    if case["optimizer"] != "adamw":
        raise CannotExpress("the rule is stated for Adam only")
    model = build_meta_model(case["arch"], case["size"])
    # calculate_maximum_sizes: named_parameters (tied weights once) and named_buffers, numel x element size
    total = sum(p.numel() * p.element_size() for _, p in model.named_parameters())
    total += sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    return total * 4
