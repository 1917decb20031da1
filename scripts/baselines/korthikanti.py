"""The activation formula of Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv 2205.05198), section 4.1: per transformer layer s*b*h*(34 + 5*a*s/h) bytes with 16-bit
activations and 1-byte dropout masks, no recomputation, no parallelism; plus the usual model-state bytes per
parameter (weights + gradients + optimizer states: 16 for Adam, as in the ZeRO paper's 2+2+12; 12 for SGD with
momentum). Over several GPUs: tensor parallelism of degree t without sequence parallelism stores
s*b*h*(10 + 24/t + 5*a*s/(h*t)) per layer (same section) and 1/t of the model states; ZeRO-1/2/3 (Rajbhandari et
al., SC 2020) divide the optimizer states / + gradients / + weights by the data-parallel degree, as the ZeRO
paper's table does.
"""
from baselines.hf_model import CannotExpress, build_meta_model, dims, layout, parameter_count

WHAT = ("L x s*b*h*(34 + 5*a*s/h) for the activations (in fp32 the 2-byte terms double: 66 and 9; the 1-byte "
        "masks stay) + 16 bytes/parameter (Adam) or 12 (SGD momentum); no embedding, LM head or loss activations, "
        "no optimizer temporaries; TP splits as the paper says, ZeRO stages shard model states as the ZeRO paper says; "
        "no communication buffers.")

# Bytes per parameter of weights, gradients and optimizer states: the "usual" 16 of Adam training (4 + 4 + 8 with
# fp32 weights, which autocast keeps; the ZeRO paper's 2 + 2 + 12 in mixed precision) and 12 for SGD momentum.
WEIGHT_BYTES, GRAD_BYTES = 4, 4
STATE_BYTES = {"adamw": 8, "sgd": 4}
# Which of (weights, gradients, states) the data-parallel engine divides by the degree (ZeRO paper, Figure 1).
SHARDED = {"single": (), "ddp": (), "tp": (), "zero1": ("states",), "zero2": ("grads", "states"),
           "fsdp2": ("weights", "grads", "states"), "fsdp2_tp": ("weights", "grads", "states")}


def estimate(case):
    method, dp, t = layout(case)
    if method not in SHARDED:
        raise CannotExpress(f"no rule for {method}")
    model = build_meta_model(case["arch"], case["size"])
    h, layers, a, _ = dims(model)
    s, b = case["seq"], case["batch"]
    e = 2 if case["precision"] == "bf16-autocast" else 4  # bytes of an activation element
    # The paper's 34 sbh = 32 sbh of 2-byte values + 2 sbh of masks; 5 as^2b = 4 as^2b of 2-byte values + 1 of mask.
    # Under TP: 10 sbh (of which 8 of 2-byte values and 2 of masks) stay whole, the 24 sbh and 5 as^2b split by t.
    per_layer = ((4 * e + 2) + 12 * e / t) * s * b * h + (2 * e + 1) * a * s * s * b / t
    parts = dict(weights=WEIGHT_BYTES, grads=GRAD_BYTES, states=STATE_BYTES[case["optimizer"]])
    per_param = sum(v / (dp if k in SHARDED[method] else 1) for k, v in parts.items()) / t
    return int(layers * per_layer + per_param * parameter_count(model))
