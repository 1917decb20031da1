#!/usr/bin/env python3
"""End-to-end tests of the llmem command line: bad input gets one line on stderr and exit code 2, a job that
does not fit exits 3, and JSON output parses. Needs the llmem binary (LLMEM_BIN), the tiny exports
(LLMEM_TINY_MODELS) and the bundled weight-free exports (LLMEM_MODELS_DIR)."""
import json
import os
import tempfile
import unittest

import torch

from cli_assertions import OneLineErrorAssertions, run

TINY = os.environ["LLMEM_TINY_MODELS"]
BUNDLED = os.environ["LLMEM_MODELS_DIR"]


class CliTest(OneLineErrorAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.gpt2 = os.path.join(TINY, "gpt2-tiny.pt")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

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
        self.assert_one_line_error(run("estimate", path), 2, "is a truncated or damaged zip archive", path)

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
        self.assertIn("llmem: warning: ", ok.stderr)
        self.assertIn("aten::special_erfcx", ok.stderr)
        self.assertNotIn("warning", ok.stdout)
        # The warning is on stderr, so --json output stays parseable.
        as_json = run("estimate", path, "--gpu", "cpu", "--allow-unknown-ops", "--json")
        self.assertEqual(json.loads(as_json.stdout)["unknown_ops"], ["aten::special_erfcx"])

    def test_bad_sizes(self):
        self.assert_one_line_error(run("estimate", self.gpt2, "-b", "0"), 2, "batch")
        self.assert_one_line_error(run("estimate", self.gpt2, "-s", "-5"), 2, "sequence")
        self.assert_one_line_error(run("measure", self.gpt2, "-b", "0"), 2)
        huge = run("estimate", self.gpt2, "-b", "4000000000", "-s", "4000000000")
        self.assert_one_line_error(huge, 2, "overflow")

    def test_checkpointing_every_k_out_of_range(self):
        llama = os.path.join(TINY, "llama-tiny.pt")  # 4 decoder layers
        self.assert_one_line_error(run("estimate", llama, "--gpu", "cpu", "--checkpointing", "every-5"), 2,
                                   "every-5", "4 decoder layers")

    def test_checkpointing_keeps_only_layer_inputs(self):
        # A checkpointed forward saves nothing inside the layers, so its forward peak is below the plain one's.
        llama = os.path.join(TINY, "llama-tiny.pt")
        peaks = {}
        for mode in ("none", "full", "every-2"):
            r = run("estimate", llama, "-b", "2", "-s", "128", "--gpu", "cpu", "--json", "--checkpointing", mode)
            self.assertEqual(r.returncode, 0, r.stderr)
            peaks[mode] = json.loads(r.stdout)["phase_peak_bytes"]["forward"]
        self.assertLess(peaks["full"], peaks["every-2"])
        self.assertLess(peaks["every-2"], peaks["none"])

    def test_checkpointing_selective_is_non_reentrant(self):
        # torchtitan's selective policy needs use_reentrant=False: that is its default, and reentrant is refused.
        llama = os.path.join(TINY, "llama-tiny.pt")
        base = ("estimate", llama, "-b", "1", "-s", "64", "--gpu", "cpu", "--checkpointing", "selective")
        r = run(*base, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["recipe"]["checkpointing_impl"], "non-reentrant")
        self.assert_one_line_error(run(*base, "--checkpointing-impl", "reentrant"), 2, "selective", "non-reentrant")
        plain = run("estimate", llama, "-b", "1", "-s", "64", "--gpu", "cpu", "--json", "--checkpointing", "full")
        self.assertEqual(json.loads(plain.stdout)["recipe"]["checkpointing_impl"], "reentrant")

    def test_checkpoint_inputs_are_what_the_checkpoints_keep(self):
        # Llama-2-7B: 32 decoder layers, hidden size 4096, head dim 128. Under bf16 autocast the residual stream
        # stays fp32, so every layer's input is b x s x 4096 fp32. HF binds the layer's keyword arguments into the
        # checkpointed callable (transformers/modeling_layers.py, functools.partial), so each checkpoint keeps the
        # causal mask (bool [b, 1, s, s]) and the rotary cos and sin (fp32 [1, s, 128] each) too, and, with
        # preserve_rng_state, torch.get_rng_state() (a CPU tensor: in the cpu target's memory only).
        llama = os.path.join(BUNDLED, "llama-2-7b.meta.pt")
        b, s, layers = 2, 1024, 32
        kept = layers * b * s * 4096 * 4 + b * s * s + 2 * s * 128 * 4
        rng_state = torch.get_rng_state().numel()
        base = ("estimate", llama, "-b", str(b), "-s", str(s))
        for gpu, expected in (("a100-80", kept), ("cpu", kept + layers * rng_state)):
            r = run(*base, "--gpu", gpu, "--json", "--checkpointing", "full")
            self.assertIn(r.returncode, (0, 3), r.stderr)
            forward = json.loads(r.stdout)["phase_peaks"]["forward"]
            self.assertEqual(forward["op"].split()[0], "aten::cross_entropy_loss")  # every layer has run
            self.assertEqual(forward["at_peak_bytes"]["checkpoint inputs"], expected, gpu)
        plain = json.loads(run(*base, "--gpu", "a100-80", "--json").stdout)
        self.assertNotIn("checkpoint inputs", plain["at_peak_bytes"])
        for phase in plain["phase_peaks"].values():
            self.assertNotIn("checkpoint inputs", phase["at_peak_bytes"])
            self.assertNotIn("recomputed activations", phase["at_peak_bytes"])
        # The checkpointed step peaks in the optimizer step, which holds no activations: the text output shows
        # the forward and backward peaks too.
        text = run(*base, "--gpu", "a100-80", "--checkpointing", "full")
        self.assertIn("live at the peak (optimizer", text.stdout)
        forward_block = text.stdout.split("live at the forward peak")[1].split("\n\n")[0]
        self.assertIn("checkpoint inputs", forward_block)
        self.assertIn("live at the backward peak", text.stdout)

    def test_bad_names(self):
        self.assert_one_line_error(run("estimate", self.gpt2, "--gpu", "tpu-v9"), 2, "unknown GPU 'tpu-v9'", "a100-80")
        self.assert_one_line_error(run("estimate", self.gpt2, "-p", "fp8"), 2, "unknown precision 'fp8'")
        self.assert_one_line_error(run("estimate", self.gpt2, "-o", "lion"), 2, "unknown optimizer 'lion'")
        self.assert_one_line_error(run("measure", self.gpt2, "--device", "tpu"), 2)

    def test_optimizer_choices_a_library_lacks(self):
        # foreach / fused / for-loop are torch.optim's; bitsandbytes and HF Adafactor have one step loop
        self.assert_one_line_error(run("estimate", self.gpt2, "-o", "adamw8bit", "--optimizer-impl", "fused"), 2,
                                   "--optimizer-impl fused", "adamw8bit")
        self.assert_one_line_error(run("estimate", self.gpt2, "-o", "adafactor", "--dp", "2", "--engine", "gemini",
                                       "-p", "bf16-autocast"), 2, "chunk-based ZeRO", "adafactor")

    def test_paged_states_are_named_outside_the_allocator(self):
        r = run("estimate", self.gpt2, "-b", "1", "-s", "64", "-o", "paged-adamw8bit", "--gpu", "a100-80", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        paged = json.loads(r.stdout)
        plain = json.loads(run("estimate", self.gpt2, "-b", "1", "-s", "64", "-o", "adamw8bit", "--gpu", "a100-80",
                               "--json").stdout)
        self.assertGreater(paged["managed_optimizer_state_bytes"], 0)
        self.assertEqual(paged["fixed_overhead_bytes"],
                         plain["fixed_overhead_bytes"] + paged["managed_optimizer_state_bytes"])
        self.assertLess(paged["peak_allocated_bytes"], plain["peak_allocated_bytes"])

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

    # --- several GPUs -------------------------------------------------------------------------------------------

    def test_parallel_bad_input(self):
        llama = os.path.join(TINY, "llama-tiny.pt")  # 4 heads, 2 key/value heads, hidden 256, MLP 688, vocab 8192
        rec = ("recommend", llama, "--gpu", "a100-80", "--seq", "64")
        self.assert_one_line_error(run(*rec, "--gpus", "6", "--tp", "4"), 2, "not divisible by the tensor-parallel degree 4")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--tp", "8"), 2, "does not divide the 4 attention heads")
        self.assert_one_line_error(run(*rec, "--gpus", "4", "--tp", "4"), 2, "does not divide the 2 key/value heads")
        self.assert_one_line_error(run(*rec, "--gpus", "0"), 2, "at least 1")
        self.assert_one_line_error(run(*rec, "--gpus", "-2"), 2, "at least 1")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--nodes", "3"), 2, "do not split evenly over 3 nodes")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--batch", "2", "--global-batch", "16"), 2, "not both")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--batch", "-1"), 2, "positive")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--batch", "0"), 2, "--batch must be positive")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--global-batch", "0"), 2, "--global-batch must be positive")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--tp", "0"), 2, "at least 1")
        self.assert_one_line_error(run("recommend", llama, "--gpus", "8", "--gpu", "tpu-v9"), 2, "unknown GPU 'tpu-v9'")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--interconnect", "smoke-signals"), 2,
                                   "unknown interconnect 'smoke-signals'", "nvlink3")
        self.assert_one_line_error(run(*rec, "--gpus", "16", "--nodes", "2", "--inter-node", "carrier-pigeon"), 2,
                                   "unknown interconnect 'carrier-pigeon'")
        self.assert_one_line_error(run(*rec, "--gpus", "8", "--engines", "ddp,zero9"), 2, "unknown engine 'zero9'")
        est = ("estimate", llama, "-b", "1", "-s", "64", "--gpu", "cpu")
        self.assert_one_line_error(run(*est, "--tp", "3"), 2, "does not divide the 4 attention heads")
        self.assert_one_line_error(run(*est, "--dp", "0"), 2, "at least 1")
        self.assert_one_line_error(run(*est, "--dp", "2", "--engine", "zero7"), 2, "unknown engine 'zero7'")
        self.assert_one_line_error(run(*est, "--dp", "2", "--engine", "gemini", "-p", "fp32"), 2, "16-bit")

    def test_recommend_ranks_layouts_and_the_best_fits(self):
        proc = run("recommend", os.path.join(BUNDLED, "opt-1.3b.meta.pt"), "--gpus", "8", "--gpu", "a100-80",
                   "--seq", "2048", "--batch", "8", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        j = json.loads(proc.stdout)
        plans = j["plans"]
        layouts = {p["layout"] for p in plans}
        for name in ("DP8", "ZeRO-3×8", "TP8", "DP4×TP2", "DP2×TP4", "ZeRO-3×4×TP2", "ZeRO-1×8", "ZeRO-2×8"):
            self.assertIn(name, layouts)
        self.assertEqual(j["recommended"], plans[0]["layout"])
        best = plans[0]
        self.assertTrue(best["fits"])
        self.assertLessEqual(best["nvidia_smi_bytes"], j["capacity_bytes"])
        fitting = [p for p in plans if p.get("fits")]
        # Ranked by throughput among the layouts that fit; nothing that fits ranks below one that does not.
        self.assertEqual([p["tokens_per_second"] for p in fitting],
                         sorted((p["tokens_per_second"] for p in fitting), reverse=True))
        self.assertEqual([p.get("fits", False) for p in plans[:len(fitting)]], [True] * len(fitting))
        for p in plans:
            if "skipped" in p:
                continue
            self.assertEqual(p["dp"] * p["tp"], 8)
            self.assertEqual(p["fits"], p["nvidia_smi_bytes"] <= j["capacity_bytes"])
            self.assertGreater(p["step_seconds"], 0)
            self.assertEqual(p["max_micro_batch"] >= 8, p["fits"])
        # Sharding can only help: ZeRO-3 needs less memory per GPU than plain data parallelism.
        by_name = {p["layout"]: p for p in plans}
        self.assertLess(by_name["ZeRO-3×8"]["peak_allocated_bytes"], by_name["DP8"]["peak_allocated_bytes"])
        self.assertTrue(j["assumptions"])

    def test_recommend_when_nothing_fits_names_a_gpu_count(self):
        proc = run("recommend", os.path.join(BUNDLED, "llama-2-7b.meta.pt"), "--gpus", "1", "--gpu", "a100-40",
                   "--seq", "512", "--batch", "1", "--precision", "bf16-autocast", "--json")
        self.assertEqual(proc.returncode, 3, proc.stderr)
        j = json.loads(proc.stdout)
        self.assertIsNone(j["recommended"])
        self.assertGreater(j["smallest_gpu_count_that_fits"], 1)

    def test_distributed_estimate_shards_states(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        common = ("estimate", llama, "-b", "1", "-s", "64", "--gpu", "cpu", "-p", "fp32", "--json")
        single = json.loads(run(*common).stdout)
        ddp = json.loads(run(*common, "--dp", "2").stdout)
        zero3 = json.loads(run(*common, "--dp", "2", "--engine", "zero3").stdout)
        # DDP adds one gradient bucket set (the fp32 gradients' size); ZeRO-3 halves the optimizer states.
        self.assertEqual(ddp["peak_allocated_bytes"] - single["peak_allocated_bytes"], single["gradients_bytes"])
        self.assertLess(zero3["optimizer_state_bytes"], single["optimizer_state_bytes"] * 0.51)

    def test_validate_rejects_bad_runs_files(self):
        path = os.path.join(self.dir, "runs.jsonl")
        with open(path, "w") as f:
            f.write('{"arch": "llama"}\n')
        self.assert_one_line_error(run("validate", path), 2, "runs line 1 has no")
        with open(path, "w") as f:
            f.write("not json\n")
        self.assert_one_line_error(run("validate", path), 2, "line 1 is not JSON")
        self.assert_one_line_error(run("validate", os.path.join(self.dir, "absent.jsonl")), 2, "cannot read")

    def test_validate_compares_and_fails_outside_the_limits(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        # validate estimates a run without a loop recipe with HF Trainer's loop, which the harness runs
        est = json.loads(run("estimate", llama, "-b", "1", "-s", "64", "--gpu", "cpu", "-p", "fp32", "--dp", "2",
                             "--drop-outputs", "--json").stdout)["peak_allocated_bytes"]
        path = os.path.join(self.dir, "runs2.jsonl")

        def write(peaks):
            with open(path, "w") as f:
                for rank, peak in enumerate(peaks):
                    f.write(json.dumps(dict(arch="llama", size="tiny", export=llama, method="ddp", dp=2, tp=1,
                                            world_size=2, rank=rank, batch=1, seq=64, precision="fp32",
                                            optimizer="adamw", device="cpu", peak_bytes=peak)) + "\n")

        write([est, est])
        ok = run("validate", path, "--json")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertEqual(json.loads(ok.stdout)["max_abs_case_error_percent"], 0)
        write([int(est / 0.9), int(est / 0.9)])  # the estimate 10 % under the measurement
        bad = run("validate", path, "--json")
        self.assertEqual(bad.returncode, 4, bad.stderr)
        j = json.loads(bad.stdout)
        self.assertFalse(j["ok"])
        self.assertAlmostEqual(j["cases"][0]["error_percent"], -10.0, places=2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
