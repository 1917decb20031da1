#!/usr/bin/env python3
"""End-to-end tests of the llmem command line: bad input gets one line on stderr and exit code 2, a job that
does not fit exits 3, and JSON output parses. Needs the llmem binary (LLMEM_BIN), the tiny exports
(LLMEM_TINY_MODELS) and the bundled weight-free exports (LLMEM_MODELS_DIR)."""
import json
import os
import subprocess
import tempfile
import unittest

import torch

LLMEM = os.environ["LLMEM_BIN"]
TINY = os.environ["LLMEM_TINY_MODELS"]
BUNDLED = os.environ["LLMEM_MODELS_DIR"]


def run(*args):
    return subprocess.run([LLMEM, *args], capture_output=True, text=True, timeout=600)


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.gpt2 = os.path.join(TINY, "gpt2-tiny.pt")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assert_one_line_error(self, proc, code, *needles):
        self.assertEqual(proc.returncode, code, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith("llmem: error: "), lines[0])
        for n in needles:
            self.assertIn(n, lines[0])

    def test_missing_file(self):
        path = os.path.join(self.dir, "nope.pt")
        self.assert_one_line_error(run("estimate", path), 2, "not found", path)

    def test_directory(self):
        self.assert_one_line_error(run("inspect", self.dir), 2, "directory")

    def test_text_file(self):
        path = os.path.join(self.dir, "text.pt")
        with open(path, "w") as f:
            f.write("hello\n")
        self.assert_one_line_error(run("estimate", path), 2, "not a readable TorchScript file", path)

    def test_truncated_file(self):
        path = os.path.join(self.dir, "truncated.pt")
        with open(self.gpt2, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read(4096))
        self.assert_one_line_error(run("estimate", path), 2, "not a readable TorchScript file")

    def test_not_a_decoder_lm(self):
        class Doubler(torch.nn.Module):
            def forward(self, x):
                return x * 2

        path = os.path.join(self.dir, "doubler.pt")
        torch.jit.trace(Doubler(), torch.ones(2, 2)).save(path)
        self.assert_one_line_error(run("estimate", path), 2, "not a decoder LM")

    def test_forward_returning_a_matrix_is_not_a_loss(self):
        class Embed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.e = torch.nn.Embedding(16, 4)

            def forward(self, input_ids, labels):
                return self.e(input_ids)

        path = os.path.join(self.dir, "embed.pt")
        ids = torch.zeros(2, 3, dtype=torch.long)
        torch.jit.trace(Embed(), (ids, ids)).save(path)
        self.assert_one_line_error(run("estimate", path, "--gpu", "cpu"), 2, "not a decoder LM")

    def test_unknown_op_is_named_and_can_be_allowed(self):
        class OddLM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.e = torch.nn.Embedding(16, 4)
                self.head = torch.nn.Linear(4, 16)

            def forward(self, input_ids, labels):
                h = torch.special.erfcx(self.e(input_ids))  # an op without a memory rule
                return torch.nn.functional.cross_entropy(self.head(h).view(-1, 16), labels.view(-1))

        path = os.path.join(self.dir, "odd.pt")
        ids = torch.zeros(2, 3, dtype=torch.long)
        torch.jit.trace(OddLM(), (ids, ids)).save(path)
        self.assert_one_line_error(run("estimate", path, "--gpu", "cpu"), 2, "aten::special_erfcx",
                                   "--allow-unknown-ops")
        ok = run("estimate", path, "--gpu", "cpu", "--allow-unknown-ops")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertIn("WARNING", ok.stdout)
        self.assertIn("aten::special_erfcx", ok.stdout)

    def test_bad_sizes(self):
        self.assert_one_line_error(run("estimate", self.gpt2, "-b", "0"), 2, "batch")
        self.assert_one_line_error(run("estimate", self.gpt2, "-s", "-5"), 2, "sequence")
        self.assert_one_line_error(run("measure", self.gpt2, "-b", "0"), 2)
        huge = run("estimate", self.gpt2, "-b", "4000000000", "-s", "4000000000")
        self.assert_one_line_error(huge, 2, "overflow")

    def test_bad_names(self):
        self.assert_one_line_error(run("estimate", self.gpt2, "--gpu", "tpu-v9"), 2, "unknown GPU 'tpu-v9'", "a100-80")
        self.assert_one_line_error(run("estimate", self.gpt2, "-p", "fp8"), 2, "unknown precision 'fp8'")
        self.assert_one_line_error(run("estimate", self.gpt2, "-o", "lion"), 2, "unknown optimizer 'lion'")
        self.assert_one_line_error(run("measure", self.gpt2, "--device", "tpu"), 2)

    def test_pure_bf16_on_an_fp32_trace_that_bakes_dtypes(self):
        self.assert_one_line_error(run("estimate", os.path.join(BUNDLED, "llama-2-7b.meta.pt"), "-p", "bf16"), 2,
                                   "bf16 weights")

    def test_does_not_fit_exits_3_and_json_parses(self):
        proc = run("estimate", os.path.join(BUNDLED, "llama-2-7b.meta.pt"), "-b", "1", "-s", "512", "--gpu",
                   "l4-24", "--json")
        self.assertEqual(proc.returncode, 3, proc.stderr)
        j = json.loads(proc.stdout)
        self.assertFalse(j["fits"])
        # 6.74e9 fp32 weights alone are 25.1 GiB > 24 GiB of an L4.
        self.assertGreater(j["weights_bytes"], 25 * 2**30)
        self.assertGreaterEqual(j["peak_reserved_bytes"], j["peak_allocated_bytes"])

    def test_fits_exits_0(self):
        proc = run("estimate", self.gpt2, "-b", "2", "-s", "64", "--gpu", "a100-80", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        j = json.loads(proc.stdout)
        self.assertTrue(j["fits"])
        self.assertEqual(j["nvidia_smi_bytes"], j["peak_reserved_bytes"] + j["fixed_overhead_bytes"])

    def test_inspect_regions(self):
        proc = run("inspect", os.path.join(BUNDLED, "llama-2-7b.meta.pt"), "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        j = json.loads(proc.stdout)
        self.assertEqual(j["layers"], 32)
        # Llama-2-7B: 6,738,415,616 parameters (its published config), embedding 32000 x 4096.
        self.assertEqual(j["parameters"], 6738415616)
        self.assertEqual(j["regions"]["embedding"]["parameters"], 32000 * 4096)


if __name__ == "__main__":
    unittest.main(verbosity=2)
