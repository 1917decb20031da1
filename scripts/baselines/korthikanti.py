"""The activation formula of Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv 2205.05198), section 4.1: per transformer layer s*b*h*(34 + 5*a*s/h) bytes with 16-bit
activations and 1-byte dropout masks, no recomputation, no parallelism; plus the usual model-state bytes per
parameter (weights + gradients + optimizer states: 16 for Adam, as in the ZeRO paper's 2+2+12; 12 for SGD with
momentum).
"""
from baselines.hf_model import build_meta_model, dims, parameter_count

WHAT = ("L x s*b*h*(34 + 5*a*s/h) for the activations (in fp32 the 2-byte terms double: 66 and 9; the 1-byte "
        "masks stay) + 16 bytes/parameter (Adam) or 12 (SGD momentum); no embedding, LM head or loss activations, "
        "no optimizer temporaries.")

STATE_BYTES_PER_PARAM = {"adamw": 16, "sgd": 12}


def estimate(case):
    model = build_meta_model(case["arch"], case["size"])
    h, layers, a, _ = dims(model)
    s, b = case["seq"], case["batch"]
    e = 2 if case["precision"] == "bf16-autocast" else 4  # bytes of an activation element
    # The paper's 34 sbh = 32 sbh of 2-byte values + 2 sbh of masks; 5 as^2b = 4 as^2b of 2-byte values + 1 of mask.
    per_layer = (16 * e + 2) * s * b * h + (2 * e + 1) * a * s * s * b
    return layers * per_layer + STATE_BYTES_PER_PARAM[case["optimizer"]] * parameter_count(model)
