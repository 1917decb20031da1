#!/usr/bin/env python3
"""The real-run harness builds each optimizer as HF Trainer does and reports the states the libraries really
keep. Expected layouts follow the libraries' sources (docs/OPTIMIZER_STATES.md): bitsandbytes 8-bit states
for >= 4096 elements with fp32 absmax per 256-element block, HF Adafactor's fp32 factored second moment,
torchao's 8-bit states only for multiples of its block, Trainer's 32-bit override for nn.Embedding."""
import json
import math
import os
import subprocess
import sys
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "scripts")
sys.path.insert(0, SCRIPTS)

import torch  # noqa: E402

import distributed_worker  # noqa: E402


def probe(optimizer, shapes, dtypes=("fp32",), impl=""):
    """scripts/optimizer_states.py in its own process (it installs the counting allocator)."""
    cmd = [sys.executable, os.path.join(SCRIPTS, "optimizer_states.py"), "--optimizer", optimizer]
    cmd += [a for s in shapes for a in ("--shape", "x".join(map(str, s)))]
    cmd += [a for d in dtypes for a in ("--dtype", d)]
    if impl:
        cmd += ["--optimizer-impl", impl]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise AssertionError(out.stderr[-2000:])
    return [json.loads(line) for line in out.stdout.splitlines()]


def states_after_one_step(optimizer, model, impl=""):
    opt, _ = distributed_worker.make_optimizer(optimizer, model.parameters(), "single", impl, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    layout = distributed_worker.optimizer_state_layout(opt, model.named_parameters())
    return opt, {e["param"]: e["states"] for e in layout}


class BitsandbytesAdamW8bit(unittest.TestCase):
    def test_block_statistics_and_32bit_below_min_size(self):
        rows = {tuple(r["shape"]): r for r in probe("adamw8bit", [(1024, 512), (4097,), (4095,)], ("fp32", "bf16"))
                if r["dtype"] == "bf16"}
        for shape in [(1024, 512), (4097,)]:
            n = math.prod(shape)
            st = rows[shape]["states"]
            for i in ("1", "2"):
                self.assertEqual((st["state" + i]["dtype"], st["state" + i]["shape"]), ("uint8", list(shape)))
                self.assertEqual((st["absmax" + i]["dtype"], st["absmax" + i]["shape"]), ("float32", [-(n // -256)]))
                self.assertEqual((st["qmap" + i]["dtype"], st["qmap" + i]["shape"]), ("float32", [256]))
        small = rows[(4095,)]["states"]  # numel < min_8bit_size: fp32 states even for a bf16 parameter
        self.assertEqual({k: (v["dtype"], v["shape"]) for k, v in small.items()},
                         {"state1": ("float32", [4095]), "state2": ("float32", [4095])})

    def test_paged_on_cpu_is_the_plain_optimizer(self):
        plain, paged = probe("adamw8bit", [(512, 256)]), probe("paged-adamw8bit", [(512, 256)])
        for key in ("states", "state_bytes", "step_peak_bytes"):
            self.assertEqual(plain[0][key], paged[0][key])

    def test_trainer_keeps_embeddings_in_32bit(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(64, 128), torch.nn.Linear(128, 64))
        opt, states = states_after_one_step("adamw8bit", model)
        self.assertEqual(opt.embeddings_32bit, ["0.weight"])
        self.assertEqual(states["0.weight"]["state1"]["dtype"], "float32")
        self.assertEqual(states["1.weight"]["state1"]["dtype"], "uint8")


class HfAdafactor(unittest.TestCase):
    def test_factored_fp32_states_and_16bit_step_copies(self):
        rows = {(tuple(r["shape"]), r["dtype"]): r for r in probe("adafactor", [(1024, 512), (4096,)], ("fp32", "bf16"))}
        for dtype in ("fp32", "bf16"):
            st = rows[((1024, 512), dtype)]["states"]
            self.assertEqual({k: (v["dtype"], v["shape"]) for k, v in st.items()},
                             {"exp_avg_sq_row": ("float32", [1024]), "exp_avg_sq_col": ("float32", [512]),
                              "RMS": ("float32", [])})
            self.assertEqual(rows[((4096,), dtype)]["states"]["exp_avg_sq"]["dtype"], "float32")
        n = 1024 * 512
        # fp32: `update` next to grad**2 (or the next update, or -update); 16-bit: plus fp32 copies of grad and p
        self.assertGreaterEqual(rows[((1024, 512), "fp32")]["step_peak_bytes"], 2 * 4 * n)
        self.assertLess(rows[((1024, 512), "fp32")]["step_peak_bytes"], 3 * 4 * n)
        self.assertGreaterEqual(rows[((1024, 512), "bf16")]["step_peak_bytes"], 4 * 4 * n)
        self.assertLess(rows[((1024, 512), "bf16")]["step_peak_bytes"], 5 * 4 * n)


class TorchaoAdamW8bit(unittest.TestCase):
    def test_8bit_only_for_multiples_of_the_block(self):
        rows = {tuple(r["shape"]): r for r in probe("adamw8bit", [(1024, 512), (4100,)], ("bf16",), impl="torchao")}
        st = rows[(1024, 512)]["states"]
        for name in ("exp_avg", "exp_avg_sq"):
            self.assertEqual((st[name + ".codes"]["dtype"], st[name + ".codes"]["shape"]), ("uint8", [1024, 512]))
            self.assertEqual((st[name + ".scale"]["dtype"], st[name + ".scale"]["shape"]), ("float32", [2048]))
            self.assertEqual(st[name + ".qmap"]["shape"], [256])
            self.assertNotIn("shared", st[name + ".qmap"])  # one table per state tensor
        # optimizer_state_bytes counts the subclass's inner tensors: codes, scales, tables and the step
        self.assertEqual(rows[(1024, 512)]["state_bytes"], 2 * (1024 * 512 + 2048 * 4 + 256 * 4) + 4)
        fallback = rows[(4100,)]["states"]  # 4100 % 256 != 0: plain states in the parameter's dtype
        self.assertEqual((fallback["exp_avg"]["dtype"], fallback["exp_avg_sq"]["dtype"]), ("bfloat16", "bfloat16"))


class Choices(unittest.TestCase):
    def test_impl_must_fit_the_optimizer(self):
        with self.assertRaisesRegex(RuntimeError, "does not apply to sgd"):
            distributed_worker.make_optimizer("sgd", [torch.nn.Parameter(torch.ones(2))], "single", "torchao")

    def test_sgd_without_momentum_keeps_no_state(self):
        _, states = states_after_one_step("sgd-nomomentum", torch.nn.Linear(8, 8))
        self.assertEqual(states, {})

    def test_fsdp_mixed_precision_policy(self):
        self.assertIsNone(distributed_worker.mixed_precision_policy(None, None))
        mp = distributed_worker.mixed_precision_policy("bf16", "fp32")
        self.assertEqual((mp.param_dtype, mp.reduce_dtype), (torch.bfloat16, torch.float32))
        mp = distributed_worker.mixed_precision_policy(None, "bf16")
        self.assertEqual((mp.param_dtype, mp.reduce_dtype), (None, torch.bfloat16))


if __name__ == "__main__":
    unittest.main()
