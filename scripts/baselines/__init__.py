"""Published GPU-memory estimators, re-implemented from their papers and public code for scripts/compare.py.

Each module exposes NAME, SOURCE, WHAT (what it counts and what it leaves out) and estimate(case) -> bytes, or
raises hf_model.CannotExpress for a case its method has no way to state. A case is a dict with arch, size,
batch, seq, precision (fp32 | bf16-autocast) and optimizer (adamw | sgd).
"""
