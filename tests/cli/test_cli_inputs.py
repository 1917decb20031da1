#!/usr/bin/env python3
"""Inputs the command line must answer right or refuse in one line: parse errors, options that would be ignored,
weight-free exports and overflowing sizes in `measure`, a process memory limit, every field of a `validate` runs
file, GPU names and sizes, and the --trace file format. Needs LLMEM_BIN, LLMEM_TINY_MODELS and LLMEM_MODELS_DIR."""
import csv
import json
import os
import resource
import tempfile
import unittest

from cli_assertions import OneLineErrorAssertions, run

TINY = os.environ["LLMEM_TINY_MODELS"]
BUNDLED = os.environ["LLMEM_MODELS_DIR"]
GiB = 2**30


def built_with_address_sanitizer():
    with open(os.environ["LLMEM_BIN"], "rb") as f:
        return b"__asan_init" in f.read()


def read_tsv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


class InputsTest(OneLineErrorAssertions, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.gpt2 = os.path.join(TINY, "gpt2-tiny.pt")
        cls.llama = os.path.join(TINY, "llama-tiny.pt")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assert_bad_input(self, proc, *needles):
        self.assert_one_line_error(proc, 2, *needles)

    # --- parsing ---------------------------------------------------------------------------------------------

    def test_parse_errors_are_one_line(self):
        self.assert_bad_input(run("estimate", self.gpt2, "--batch", "abc"), "--batch", "abc")
        self.assert_bad_input(run("estimate", self.gpt2, "--bogus"), "--bogus")
        self.assert_bad_input(run("estimate"), "model")
        self.assert_bad_input(run())
        self.assert_bad_input(run("measure", self.gpt2, "--steps"), "--steps")
        self.assertEqual(run("--help").returncode, 0)
        self.assertEqual(run("estimate", "--help").returncode, 0)

    def test_a_subcommand_typo_is_named_with_the_closest(self):
        self.assert_bad_input(run("estimat", self.gpt2), "unknown subcommand 'estimat'", "'estimate'")
        self.assert_bad_input(run("recomend", self.gpt2), "'recomend'", "'recommend'")
        self.assert_bad_input(run("zzzzzzzzzz"), "unknown subcommand 'zzzzzzzzzz'")

    # --- options that would be silently ignored ----------------------------------------------------------------

    def test_an_empty_trace_path_is_refused(self):
        self.assert_bad_input(run("estimate", self.gpt2, "--gpu", "cpu", "--trace", ""), "--trace")
        self.assert_bad_input(run("measure", self.gpt2, "--trace", ""), "--trace")

    def test_layout_options_without_the_layout_are_refused(self):
        est = ("estimate", self.llama, "-b", "1", "-s", "64", "--gpu", "cpu")
        self.assert_bad_input(run(*est, "--engine", "zero3"), "--engine zero3", "--dp")
        self.assert_bad_input(run(*est, "--tp", "2", "--engine", "zero1"), "--dp")
        self.assert_bad_input(run(*est, "--no-vocab-parallel"), "--no-vocab-parallel", "--tp")
        self.assert_bad_input(run(*est, "--dp", "2", "--no-vocab-parallel"), "--tp")
        self.assertEqual(run(*est, "--dp", "2", "--engine", "zero3").returncode, 0)
        self.assertEqual(run(*est, "--tp", "2", "--no-vocab-parallel").returncode, 0)

    def test_fsdp_mixed_precision_needs_fsdp2_and_fp32(self):
        autocast = ("estimate", self.llama, "-b", "1", "-s", "64", "--gpu", "cpu")
        est = autocast + ("-p", "fp32")
        self.assert_bad_input(run(*est, "--fsdp-param-dtype", "bf16"), "--fsdp-param-dtype", "zero3", "--dp")
        self.assert_bad_input(run(*est, "--dp", "2", "--engine", "ddp", "--fsdp-reduce-dtype", "bf16"),
                              "MixedPrecisionPolicy", "zero2")
        self.assert_bad_input(run(*autocast, "--dp", "2", "--engine", "zero3", "--fsdp-reduce-dtype", "bf16"),
                              "replaces autocast", "--precision fp32")
        self.assert_bad_input(run("recommend", self.llama, "--gpus", "2", "--seq", "64", "-p", "bf16-autocast",
                                  "--fsdp-param-dtype", "bf16"), "--precision fp32")
        self.assert_bad_input(run(*est, "--dp", "2", "--engine", "zero3", "--fsdp-param-dtype", "fp8"),
                              "--fsdp-param-dtype", "fp8")
        self.assert_bad_input(run(*est, "--dp", "2", "--engine", "zero3", "--fsdp-param-dtype", "bf16"),
                              "16-bit", "--dtype bfloat16")  # the fp32 trace bakes its casts in
        self.assertEqual(run(*est, "--dp", "2", "--tp", "2", "--engine", "zero3", "--fsdp-reduce-dtype",
                             "bf16").returncode, 0)  # with tensor parallelism too
        self.assertEqual(run(*est, "--dp", "2", "--engine", "zero2", "--fsdp-reduce-dtype", "bf16").returncode, 0)
        bf16_export = os.path.join(TINY, "llama-tiny-bf16.pt")
        self.assertEqual(run("estimate", bf16_export, "-b", "1", "-s", "64", "--gpu", "cpu", "-p", "fp32", "--dp",
                             "2", "--engine", "zero3", "--fsdp-param-dtype", "bf16").returncode, 0)
        self.assert_bad_input(run("estimate", bf16_export, "-b", "1", "-s", "64", "--gpu", "cpu", "-p", "fp32"),
                              "bf16 weights")
        # recommend: the FSDP2 rows take the policy, the others cannot train in fp32 from this export
        proc = run("recommend", bf16_export, "--gpus", "2", "--seq", "64", "-p", "fp32", "--fsdp-param-dtype", "bf16",
                   "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        plans = {p["engine"]: p for p in json.loads(proc.stdout)["plans"] if p["dp"] == 2}
        self.assertGreater(plans["ZeRO-3 (FSDP2)"]["peak_allocated_bytes"], 0)
        self.assertIn("fp32", plans["DDP"]["skipped"])

    # --- measure -----------------------------------------------------------------------------------------------

    def test_measure_refuses_a_weight_free_export_off_meta(self):
        opt = os.path.join(BUNDLED, "opt-1.3b.meta.pt")
        self.assert_bad_input(run("measure", opt, "-b", "1", "-s", "16"), "weight-free", "--device meta")
        on_meta = run("measure", opt, "-b", "1", "-s", "16", "--device", "meta", "--steps", "1", "--json")
        self.assertEqual(on_meta.returncode, 0, on_meta.stderr)
        # OPT-1.3B's 1.3e9 fp32 weights alone are over 4.9 GiB.
        self.assertGreater(json.loads(on_meta.stdout)["peak_allocated_bytes"], 4.9 * GiB)

    def test_measure_refuses_byte_counts_past_64_bits(self):
        # 2^40 x 64 tokens: every tensor fits in int64 bytes, their sum does not.
        proc = run("measure", self.gpt2, "--device", "meta", "-b", str(2**40), "-s", "64", "--steps", "1")
        self.assert_bad_input(proc, "overflow")
        self.assert_bad_input(run("measure", self.gpt2, "--device", "meta", "-b", str(2**62), "-s", "64"),
                                   "overflow")

    @unittest.skipIf(built_with_address_sanitizer(), "AddressSanitizer's shadow memory needs more address space")
    def test_measure_under_a_memory_limit_says_memory_ran_out(self):
        def limit_address_space():  # LibTorch maps about 3 GiB of libraries; the inputs alone need 32 GiB
            resource.setrlimit(resource.RLIMIT_AS, (6 * GiB, 6 * GiB))

        proc = run("measure", self.gpt2, "-b", "4096", "-s", str(2**20), preexec_fn=limit_address_space)
        self.assert_bad_input(proc, "out of memory")

    # --- validate ----------------------------------------------------------------------------------------------

    def record(self, **changes):
        r = dict(arch="llama", size="tiny", export=self.llama, method="ddp", dp=2, tp=1, world_size=2, rank=0,
                 batch=1, seq=64, precision="fp32", optimizer="adamw", device="cpu", peak_bytes=10_000_000)
        r.update(changes)
        return json.dumps(r)

    def validate(self, *lines, args=()):
        path = os.path.join(self.dir, "runs.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return run("validate", path, *args)

    def test_validate_checks_every_record(self):
        r0, r1 = self.record(rank=0), self.record(rank=1)
        self.assert_bad_input(self.validate(r0, "[1, 2]"), "line 2", "not a JSON object")
        self.assert_bad_input(self.validate('"a string"'), "line 1", "not a JSON object")
        self.assert_bad_input(self.validate(r0, self.record(rank=1, peak_bytes=-5)), "line 2", "peak_bytes")
        self.assert_bad_input(self.validate(self.record(peak_bytes=0), r1), "line 1", "peak_bytes")
        self.assert_bad_input(self.validate(r0, self.record(rank=1, peak_bytes="big")), "line 2", "peak_bytes")
        self.assert_bad_input(self.validate(r0, self.record(rank=1, dp=2.5)), "line 2", "\"dp\"")
        self.assert_bad_input(self.validate(r0, self.record(rank=2)), "line 2", "rank 2")
        self.assert_bad_input(self.validate(r0, self.record(rank=-1)), "line 2", "rank -1")
        self.assert_bad_input(self.validate(r0, self.record(rank=1, world_size=3)), "line 2", "world_size")
        self.assert_bad_input(self.validate(r0, r1, self.record(rank=1, method="zero9")), "line 3",
                                   "unknown method 'zero9'")
        self.assert_bad_input(self.validate(self.record(method="tp")), "line 1", "method tp")
        self.assert_bad_input(self.validate(r0, self.record(rank=1, precision="fp8")), "line 2", "fp8")
        self.assert_bad_input(self.validate(r0, self.record(rank=1, device="tpu")), "line 2", "tpu")

    def test_validate_refuses_runs_with_a_recipe_it_does_not_apply(self):
        r0, r1 = self.record(rank=0), self.record(rank=1)
        for field, value, needle in (("optimizer_impl_requested", "fused", "optimizer_impl_requested"),
                                     ("recipe", {"grad-clip": 1.0}, "grad-clip")):
            self.assert_bad_input(self.validate(r0, self.record(rank=1, **{field: value})), "line 2", needle)
        plain = dict(fsdp_param_dtype=None, optimizer_impl_requested="", recipe={})
        proc = self.validate(self.record(rank=0, **plain), self.record(rank=1, **plain))
        self.assertNotIn("does not apply", proc.stderr)

    def estimate_of_recipe(self, recipe):
        """validate's case for a 2-rank DDP run of the recipe, at 2 x 128."""
        proc = self.validate(*(self.record(rank=r, recipe=recipe, batch=2, seq=128) for r in (0, 1)),
                             args=("--json",))
        self.assertIn(proc.returncode, (0, 4), proc.stderr)
        return json.loads(proc.stdout)["cases"][0]

    def test_validate_applies_the_loop_of_the_run(self):
        estimate = self.estimate_of_recipe
        plain, accum = estimate({}), estimate({"grad-accum": 2})
        self.assertIn("grad-accum=2", accum["case"])
        # the later micro-batch runs with the earlier gradients alive (at 2 x 128 the peak is in backward)
        self.assertGreater(accum["estimated_bytes"], plain["estimated_bytes"])
        self.assert_bad_input(self.validate(*(self.record(rank=r, recipe={"grad-accum": 0}) for r in (0, 1))),
                              "line 1", "grad-accum")
        self.assert_bad_input(self.validate(*(self.record(rank=r, recipe={"optimizer-in-backward": True})
                                              for r in (0, 1))), "line 1", "--optimizer-in-backward", "DDP")

    def test_validate_applies_the_loss_and_checkpointing_of_the_run(self):
        estimate = self.estimate_of_recipe
        plain = estimate({})
        chunked = estimate({"loss": "chunked-4"})
        full = estimate({"checkpointing": "full", "checkpointing-impl": "non-reentrant"})
        self.assertIn("loss=chunked-4", chunked["case"])
        self.assertIn("checkpointing=full/non-reentrant", full["case"])
        # checkpointing drops the layers' saved activations; the chunked loss the full fp32 copy of the logits
        self.assertLess(full["estimated_bytes"], plain["estimated_bytes"])
        self.assertNotEqual(chunked["estimated_bytes"], plain["estimated_bytes"])
        for recipe, needle in (({"loss": "chunked-x"}, "chunked-x"), ({"checkpointing": "most"}, "most")):
            self.assert_bad_input(self.validate(*(self.record(rank=r, recipe=recipe) for r in (0, 1))),
                                  "line 1", needle)

    def test_validate_needs_every_rank_exactly_once(self):
        r0, r1 = self.record(rank=0), self.record(rank=1)
        self.assert_bad_input(self.validate(r0), "line 1", "rank 1")
        self.assert_bad_input(self.validate(r0, r1, r1), "line 3", "rank 1", "line 2")
        self.assert_bad_input(self.validate(r0, r0, r1), "line 2", "rank 0")

    def test_validate_refuses_an_unknown_gpu(self):
        r0, r1 = self.record(rank=0), self.record(rank=1)
        self.assert_bad_input(self.validate(r0, r1, args=("--gpu", "foo")), "unknown GPU 'foo'")
        cuda = [self.record(rank=r, device="cuda", device_name="NVIDIA A100 80GB PCIe") for r in (0, 1)]
        self.assert_bad_input(self.validate(*cuda), "line 1", "NVIDIA A100 80GB PCIe", "--gpu")

    def test_validate_refuses_limits_that_cannot_be_met_or_missed(self):
        r0, r1 = self.record(rank=0), self.record(rank=1)
        self.assert_bad_input(self.validate(r0, r1, args=("--max-error", "nan")), "--max-error")
        self.assert_bad_input(self.validate(r0, r1, args=("--max-mean-error", "-1")), "--max-mean-error")

    def test_validate_reads_the_gpu_from_the_name_nvidia_smi_prints(self):
        def estimate(device_name, *args):
            lines = [self.record(rank=r, device="cuda", device_name=device_name) for r in (0, 1)]
            proc = self.validate(*lines, args=("--json", "--max-error", "1e9", "--max-mean-error", "1e9", *args))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            return json.loads(proc.stdout)["cases"][0]["estimated_bytes"]

        for device_name, key in (("Tesla V100-SXM2-32GB", "v100-32"), ("NVIDIA L4", "l4-24"),
                                 ("NVIDIA H100 80GB HBM3", "h100-80")):
            self.assertEqual(estimate(device_name), estimate("unknown part", "--gpu", key), device_name)
        # The 32 MiB Hopper cuBLAS workspace against 8.1 MiB before Hopper tells the two apart.
        self.assertGreater(estimate("NVIDIA H100 80GB HBM3"), estimate("NVIDIA A100-SXM4-80GB"))

    # --- GPU names and sizes -----------------------------------------------------------------------------------

    def estimate_json(self, *args):
        proc = run("estimate", self.gpt2, "-b", "1", "-s", "64", "--json", *args)
        self.assertIn(proc.returncode, (0, 3), proc.stderr)
        return json.loads(proc.stdout)

    def test_gpu_names_ignore_case_and_take_what_nvidia_smi_prints(self):
        reference = self.estimate_json("--gpu", "h100-80")
        for name in ("H100-80", "NVIDIA H100 80GB HBM3", "H100 80GB HBM3", "nvidia h100 80gb hbm3"):
            self.assertEqual(self.estimate_json("--gpu", name)["peak_reserved_bytes"],
                             reference["peak_reserved_bytes"], name)
            self.assertEqual(self.estimate_json("--gpu", name)["capacity_bytes"], reference["capacity_bytes"], name)
        self.assertEqual(self.estimate_json("--gpu", "NVIDIA H200")["capacity_bytes"],
                         self.estimate_json("--gpu", "h200-141")["capacity_bytes"])
        self.assert_bad_input(run("estimate", self.gpt2, "--gpu", "NVIDIA H100 PCIe"), "unknown GPU",
                                   "--gpu-memory")

    def test_gpu_memory_sets_the_capacity(self):
        self.assertEqual(self.estimate_json("--gpu", "l4-24", "--gpu-memory", "20GiB")["capacity_bytes"], 20 * GiB)
        self.assertEqual(self.estimate_json("--gpu-memory", "81920 MiB")["capacity_bytes"], 80 * GiB)
        self.assertEqual(self.estimate_json("--gpu-memory", "48GB")["capacity_bytes"], 48 * 10**9)
        tiny = self.estimate_json("--gpu-memory", "500MiB")
        self.assertFalse(tiny["fits"])  # 400 MiB of CUDA context plus the step exceed 500 MiB
        text = run("estimate", self.gpt2, "-b", "1", "-s", "64", "--gpu-memory", "24GiB").stdout
        self.assertIn("--gpu-memory", text)
        for bad in ("24", "GiB", "-3GiB", "24 parsecs", "0B", "1e30GiB"):
            self.assert_bad_input(run("estimate", self.gpt2, "--gpu-memory", bad), "memory size")
        self.assert_bad_input(run("estimate", self.gpt2, "--gpu-memory", "100MiB"), "CUDA context")
        self.assert_bad_input(run("estimate", self.gpt2, "--gpu", "cpu", "--gpu-memory", "8GiB"), "cpu")

    # --- trace files -------------------------------------------------------------------------------------------

    def test_estimate_trace_is_tab_separated_and_reaches_the_peak(self):
        path = os.path.join(self.dir, "estimate.tsv")
        proc = run("estimate", self.gpt2, "-b", "2", "-s", "32", "--gpu", "cpu", "--json", "--trace", path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        header, rows = read_tsv(path)
        self.assertEqual(header, ["event", "bytes", "live_bytes", "category", "phase", "label"])
        self.assertTrue(rows)
        live = 0
        for row in rows:
            self.assertEqual(len(row), len(header), row)
            self.assertIn(row[0], ("alloc", "free"))
            live += int(row[1]) if row[0] == "alloc" else -int(row[1])
            self.assertEqual(int(row[2]), live)
        self.assertIn("optimizer states", {row[3] for row in rows})  # a category with a space stays one field
        self.assertEqual(max(int(row[2]) for row in rows), json.loads(proc.stdout)["peak_allocated_bytes"])

    def test_measure_trace_is_tab_separated_and_reaches_the_peak(self):
        path = os.path.join(self.dir, "measure.tsv")
        proc = run("measure", self.gpt2, "-b", "2", "-s", "32", "--json", "--trace", path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        j = json.loads(proc.stdout)
        header, rows = read_tsv(path)
        self.assertEqual(header, ["event", "bytes", "live_bytes", "phase", "op"])
        for row in rows:
            self.assertEqual(len(row), len(header), row)
            self.assertIn(row[0], ("alloc", "free"))
        self.assertTrue({"forward", "backward", "optimizer"} <= {row[3] for row in rows})
        after_load = [int(row[2]) for row in rows if row[3] != "load"]
        self.assertEqual(max(after_load) - j["loader_bytes"], j["peak_allocated_bytes"])

    def test_optimizer_in_backward_refuses_accumulation_and_clipping(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16", "--gpu", "cpu", "--optimizer-in-backward"]
        self.assert_one_line_error(run(*base, "--grad-accum", "2"), 2, "--grad-accum")
        self.assert_one_line_error(run(*base, "--grad-clip", "1.0"), 2, "--grad-clip")

    def test_loss_variants_refuse_what_they_do_not_model(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16"]
        self.assert_one_line_error(run(*base, "--gpu", "cpu", "--loss", "chunked-17"), 2, "chunked-17",
                                   "sequence length 16")
        self.assert_one_line_error(run(*base, "--gpu", "cpu", "--loss", "fused-linear"), 2, "fused-linear",
                                   "GPU target")
        self.assert_one_line_error(run(*base, "--loss", "fused-linear", "--dp", "2", "--engine", "ddp"), 2,
                                   "fused-linear", "parallel engine")

    def test_parallel_loops_are_modelled_or_refused_with_the_reason(self):
        est = ("estimate", self.llama, "-b", "1", "-s", "64", "--gpu", "cpu")
        ddp = run(*est, "--dp", "2", "--engine", "ddp", "--grad-accum", "2", "--json")
        self.assertEqual(ddp.returncode, 0, ddp.stderr)
        self.assertIn("no_sync()", " ".join(json.loads(ddp.stdout)["assumptions"]))
        zero3 = run(*est, "--dp", "2", "--engine", "zero3", "--grad-accum", "2", "--json")
        self.assertIn("set_requires_gradient_sync(False)", " ".join(json.loads(zero3.stdout)["assumptions"]))
        every = run(*est, "--dp", "2", "--engine", "zero3", "--grad-accum", "2", "--fsdp-reduce-every-micro-batch",
                    "--json")
        self.assertIn("reduce-scatters every micro-batch", " ".join(json.loads(every.stdout)["assumptions"]))
        self.assertTrue(json.loads(every.stdout)["recipe"]["fsdp_reduce_every_micro_batch"])
        # the unsharded gradients kept until the last micro-batch weigh more than the shards
        self.assertGreater(json.loads(zero3.stdout)["peak_allocated_bytes"],
                           json.loads(every.stdout)["peak_allocated_bytes"])
        self.assert_bad_input(run(*est, "--dp", "2", "--engine", "ddp", "--grad-accum", "2",
                                  "--fsdp-reduce-every-micro-batch"), "--fsdp-reduce-every-micro-batch", "zero3")
        self.assert_bad_input(run(*est, "--dp", "2", "--engine", "zero3", "--fsdp-reduce-every-micro-batch"),
                              "--fsdp-reduce-every-micro-batch", "--grad-accum")
        self.assert_bad_input(run(*est, "-p", "fp32", "--dp", "2", "--engine", "zero3", "--grad-accum", "2",
                                  "--fsdp-reduce-dtype", "bf16"), "--fsdp-reduce-every-micro-batch")
        self.assertEqual(run(*est, "--dp", "2", "--engine", "zero3", "--optimizer-in-backward").returncode, 0)
        self.assert_bad_input(run(*est, "--dp", "2", "--engine", "ddp", "--optimizer-in-backward"),
                              "--optimizer-in-backward", "DDP", "all-reduce")
        self.assert_bad_input(run(*est, "-p", "bf16-autocast", "--dp", "2", "--engine", "gemini", "--grad-accum",
                                  "2"), "--grad-accum", "Gemini")
        # recommend skips the rows whose engine cannot run the loop, with the reason, and sweeps the others
        proc = run("recommend", self.llama, "--gpus", "2", "--seq", "64", "--grad-accum", "2", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        plans = {p["engine"]: p for p in json.loads(proc.stdout)["plans"] if p["dp"] == 2}
        self.assertIn("Gemini", plans["ZeRO-3 (chunks)"]["skipped"])
        self.assertGreater(plans["DDP"]["peak_allocated_bytes"], 0)

    def test_lora_bad_settings_are_one_line(self):
        base = ("estimate", self.llama, "-b", "1", "-s", "16", "--gpu", "cpu")
        self.assert_bad_input(run(*base, "--lora", "r=8,targets=proj"), "'proj' matches no linear module", "q_proj")
        self.assert_bad_input(run(*base, "--lora", "r=0,targets=q_proj"), "r must be a positive integer")
        self.assert_bad_input(run(*base, "--lora", "r=2.5,targets=q_proj"), "r must be a positive integer")
        self.assert_bad_input(run(*base, "--lora", "alpha=0,targets=q_proj"), "alpha must be positive")
        self.assert_bad_input(run(*base, "--lora", "dropout=1,targets=q_proj"), "dropout must lie in [0, 1)")
        self.assert_bad_input(run(*base, "--lora", "dropout=x,targets=q_proj"), "dropout=x is not a number")
        self.assert_bad_input(run(*base, "--lora", "r=8"), "needs targets=")
        self.assert_bad_input(run(*base, "--lora", "rank=8,targets=q_proj"), "unknown --lora key 'rank'")
        self.assert_bad_input(run(*base, "--lora-modules-to-save", "lm_head"), "--lora-modules-to-save needs --lora")
        self.assert_bad_input(run(*base, "--lora", "targets=q_proj", "--lora-modules-to-save", "embed_tokens"),
                              "'embed_tokens' matches no linear module")
        self.assert_bad_input(run(*base, "--lora", "targets=q_proj", "--dp", "2", "--engine", "gemini",
                                  "--precision", "bf16-autocast"), "not modelled yet")
        self.assert_bad_input(run(*base, "--lora", "targets=q_proj", "--quant", "int8", "--dp", "2", "--engine", "zero3"),
                              "--quant int8 under FSDP2", "cannot shard")
        self.assert_bad_input(run(*base, "--lora", "targets=q_proj", "--tp", "2"), "not modelled yet")

    def test_lora_trains_only_the_adapters(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16", "--gpu", "cpu", "--json"]
        full = json.loads(run(*base).stdout)
        lora = run(*base, "--lora", "r=4,alpha=8,targets=q_proj,v_proj")
        self.assertEqual(lora.returncode, 0, lora.stderr)
        lora = json.loads(lora.stdout)
        self.assertEqual(lora["recipe"]["lora"]["targets"], ["q_proj", "v_proj"])
        # A [4, in] and B [out, 4] per adapted module, fp32: their gradients are the only ones.
        self.assertGreater(lora["gradients_bytes"], 0)
        self.assertLess(lora["gradients_bytes"], full["gradients_bytes"] / 20)
        self.assertEqual(lora["optimizer_state_bytes"], 2 * lora["gradients_bytes"])
        self.assertGreater(lora["weights_bytes"], full["weights_bytes"])  # the base plus the adapters

    def test_quant_bad_settings_are_one_line(self):
        base = ("estimate", self.llama, "-b", "1", "-s", "16", "--gpu", "cpu")
        lora = ("--lora", "r=8,targets=q_proj")
        self.assert_bad_input(run(*base, *lora, "--quant", "nf3"), "unknown --quant 'nf3'", "nf4-dq")
        self.assert_bad_input(run(*base, *lora, "--quant", "gptq-3"), "unknown --quant 'gptq-3'", "gptq-8")
        self.assert_bad_input(run(*base, *lora, "--quant", "awq-4"), "--quant awq-4 is not modelled", "AutoAWQ")
        # the tiny MLP's 688 features are no multiple of 32: GPTQ cannot pack them
        self.assert_bad_input(run(*base, *lora, "--quant", "gptq-4"), "mlp", "multiples of 32")
        self.assert_bad_input(run(*base, *lora, "--quant", "nf4", "--quant-group", "64"), "--quant-group applies to")
        self.assert_bad_input(run(*base, "--quant-group", "64"), "--quant-group needs --quant gptq")
        seven_b = ("estimate", os.path.join(BUNDLED, "llama-2-7b-bf16.meta.pt"), "-b", "1", "-s", "16", "--gpu",
                   "a100-80", "--precision", "bf16")
        self.assert_bad_input(run(*seven_b, *lora, "--quant", "gptq-4", "--quant-group", "100"),
                              "group size 100 does not divide its 4096 input features")
        self.assert_bad_input(run(*seven_b, *lora, "--quant", "gptq-4", "--quant-group", "0"), "must be positive")
        self.assert_bad_input(run(*seven_b, *lora, "--quant", "gptq-8", "--dp", "2", "--engine", "zero3"),
                              "under FSDP2", "buffers")
        self.assert_bad_input(run(*base, "--quant", "nf4"), "--quant needs --lora", "frozen")
        # torchao's to_nf4 takes only weights of a multiple of 64 x 256 elements (the tiny MLP's 688 x 256 is not)
        self.assert_bad_input(run(*base, *lora, "--quant", "torchao-nf4"), "gate_proj", "multiple of 64 x 256")
        self.assert_bad_input(run(*base, *lora, "--quant", "torchao-nf4", "--dp", "2"), "modelled on one GPU")

    def test_qlora_stores_the_linears_in_4_bit(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16", "--gpu", "cpu", "--json",
                "--lora", "r=4,alpha=8,targets=q_proj,v_proj"]
        lora = json.loads(run(*base).stdout)
        for quant in ("nf4", "nf4-dq"):
            proc = run(*base, "--quant", quant)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            q = json.loads(proc.stdout)
            self.assertEqual(q["recipe"]["quant"]["format"], quant)
            groups = {g["group"]: g for g in q["weights"]}
            codes = groups["frozen 4-bit codes"]
            # Two codes per byte: the packed bytes are half the quantized weights' elements, and those elements
            # are what the unquantized run stored in fp32 beside the head and embeddings.
            frozen_lora = {g["group"]: g for g in lora["weights"]}["frozen f32"]
            self.assertEqual(frozen_lora["elements"] - groups["frozen f32"]["elements"], 2 * codes["elements"])
            self.assertEqual(codes["bytes"], codes["elements"])
            # The adapters, their gradients and states do not change.
            self.assertEqual(groups["trainable f32"], {g["group"]: g for g in lora["weights"]}["trainable f32"])
            self.assertEqual(q["gradients_bytes"], lora["gradients_bytes"])
            self.assertLess(q["weights_bytes"], lora["weights_bytes"])

    def test_int8_stores_the_linears_row_wise(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16", "--gpu", "cpu", "--json",
                "--lora", "r=4,alpha=8,targets=q_proj,v_proj"]
        lora = json.loads(run(*base).stdout)
        proc = run(*base, "--quant", "int8")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        q = json.loads(proc.stdout)
        self.assertEqual(q["recipe"]["quant"]["format"], "int8")
        self.assertEqual(q["recipe"]["quant"]["outlier_columns_assumed"], 0)
        self.assertIn("outlier threshold", " ".join(q["assumptions"]))
        groups = {g["group"]: g for g in q["weights"]}
        codes = groups["frozen int8 codes"]
        # One byte per weight, and one fp32 scale per output row beside it.
        frozen_lora = {g["group"]: g for g in lora["weights"]}["frozen f32"]
        self.assertEqual(frozen_lora["elements"] - groups["frozen f32"]["elements"], codes["elements"])
        self.assertEqual(codes["bytes"], codes["elements"])
        state = groups["frozen quantization state"]
        self.assertEqual(state["bytes"], 4 * state["elements"])
        self.assertLess(state["elements"], codes["elements"] / 100)
        self.assertEqual(q["gradients_bytes"], lora["gradients_bytes"])

    def test_gptq_stores_the_decoder_linears_packed_in_int32(self):
        base = ["estimate", os.path.join(BUNDLED, "llama-2-7b-bf16.meta.pt"), "--batch", "1", "--seq", "64", "--gpu",
                "a100-80", "--precision", "bf16", "--json", "--lora", "r=8,alpha=16,targets=q_proj,v_proj"]
        lora = json.loads(run(*base).stdout)
        frozen = {g["group"]: g for g in lora["weights"]}["frozen bf16"]
        for quant, group, bits in (("gptq-4", None, 4), ("gptq-8", "64", 8)):
            proc = run(*base, "--quant", quant, *(("--quant-group", group) if group else ()))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            q = json.loads(proc.stdout)
            self.assertEqual(q["recipe"]["quant"]["group_size"], int(group or 128))
            groups = {g["group"]: g for g in q["weights"]}
            codes = groups["frozen GPTQ codes (int32)"]
            # 32 / bits weights per int32: the decoder linears left the bf16 group, the head and embeddings stayed
            linear = frozen["elements"] - groups["frozen bf16"]["elements"]
            self.assertEqual(codes["elements"] * 32 // bits, linear)
            self.assertEqual(codes["bytes"], 4 * codes["elements"])
            # per group of G input features one fp16 scale and one packed zero point per output feature
            state = groups["frozen quantization state"]
            self.assertLess(state["bytes"], codes["bytes"] / 10)
            self.assertIn("not measured", " ".join(q["assumptions"]))

    def test_accumulation_raises_the_forward_by_the_gradients(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16", "--gpu", "cpu", "--json"]
        plain = json.loads(run(*base).stdout)
        accum = json.loads(run(*base, "--grad-accum", "2").stdout)
        self.assertEqual(accum["recipe"]["grad_accum"], 2)
        # the later micro-batch's forward runs with every gradient alive
        self.assertGreaterEqual(accum["phase_peak_bytes"]["forward"] - plain["phase_peak_bytes"]["forward"],
                                plain["gradients_bytes"])

    def test_checkpointed_later_micro_batch_checkpoints_again(self):
        base = ["estimate", self.llama, "--batch", "1", "--seq", "16", "--gpu", "cpu", "--json",
                "--checkpointing", "full"]
        for impl in ("reentrant", "non-reentrant"):
            plain = json.loads(run(*base, "--checkpointing-impl", impl).stdout)
            accum = run(*base, "--checkpointing-impl", impl, "--grad-accum", "2")
            self.assertEqual(accum.returncode, 0, accum.stderr)
            accum = json.loads(accum.stdout)
            # the later micro-batch's forward keeps its layers' inputs and RNG states as the first does, with every
            # gradient alive besides; its backward recomputes the layers again on top of those gradients
            self.assertEqual(accum["phase_peak_bytes"]["forward"] - plain["phase_peak_bytes"]["forward"],
                             plain["gradients_bytes"], impl)
            self.assertGreater(accum["phase_peak_bytes"]["backward"], plain["phase_peak_bytes"]["backward"], impl)


if __name__ == "__main__":
    unittest.main(verbosity=2)
