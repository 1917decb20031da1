#!/usr/bin/env python3
"""End-to-end tests of `llmem recommend`: the largest batch per layout is the same whatever batch is asked for
and its exact estimate (`llmem estimate` of the layout) fits while the next batch does not; GPUs beyond a node
are spread over whole nodes of 8 unless --nodes says otherwise, an assumption printed with the table and in
JSON; fp32 requests that fit nowhere still name the smallest GPU count (with a global batch, and with the chunk
engine asked for, which needs 16-bit training); NCCL's buffer assumption comes with every table of parallel
layouts (recommend and estimate, text and JSON). Needs LLMEM_BIN, LLMEM_TINY_MODELS and
LLMEM_MODELS_DIR."""
import json
import os
import unittest

from cli_assertions import OneLineErrorAssertions, run

TINY = os.environ["LLMEM_TINY_MODELS"]
BUNDLED = os.environ["LLMEM_MODELS_DIR"]

ENGINE_FLAGS = {"DDP": "ddp", "ZeRO-1": "zero1", "ZeRO-2 (FSDP2)": "zero2", "ZeRO-3 (FSDP2)": "zero3",
                "ZeRO-3 (chunks)": "gemini"}


def recommend_json(*args):
    proc = run("recommend", *args, "--json")
    if proc.returncode not in (0, 3):
        raise AssertionError(proc.stderr)
    return json.loads(proc.stdout)


class RecommendTest(OneLineErrorAssertions, unittest.TestCase):

    def fits(self, model, plan, batch, common):
        args = ["estimate", model, "--batch", str(batch), "--dp", str(plan["dp"]), "--tp", str(plan["tp"]),
                "--json", *common]
        if plan["dp"] > 1:
            args += ["--engine", ENGINE_FLAGS[plan["engine"]]]
        proc = run(*args)
        self.assertIn(proc.returncode, (0, 3), proc.stderr)
        return json.loads(proc.stdout)["fits"]

    def test_a_skipped_layout_leaves_the_other_rows_as_they_are(self):
        # Gemini cannot run gradient accumulation and is skipped with the reason; every other row must be the
        # same whether or not a skipped one was in the sweep (memory and step time alike).
        model = os.path.join(TINY, "llama-tiny.pt")

        def rows(engines):
            proc = run("recommend", model, "--gpus", "2", "--seq", "64", "--grad-accum", "2", "--engines", engines,
                       "--json")
            self.assertEqual(proc.returncode, 0, proc.stderr)
            return {p["layout"]: p for p in json.loads(proc.stdout)["plans"]}

        alone = rows("ddp,zero1")
        with_skipped = rows("gemini,ddp,zero1")
        self.assertIn("skipped", with_skipped["Gemini×2"])
        for layout, row in alone.items():
            for key in ("peak_allocated_bytes", "step_seconds", "time"):
                self.assertEqual(row[key], with_skipped[layout][key], f"{layout} {key}")

    def test_lora_rows_match_estimate_and_skip_what_is_not_modelled(self):
        model = os.path.join(TINY, "llama-tiny.pt")
        lora = ["--lora", "r=8,alpha=16,targets=q_proj,v_proj"]
        proc = run("recommend", model, "--gpus", "2", "--seq", "64", "--gpu", "a100-80", *lora, "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        plans = {p["layout"]: p for p in json.loads(proc.stdout)["plans"]}
        self.assertIn("not modelled", plans["TP2"]["skipped"])
        self.assertIn("Gemini", plans["Gemini×2"]["skipped"])
        for layout, engine in (("DP2", "ddp"), ("ZeRO-1×2", "zero1"), ("ZeRO-3×2", "zero3")):
            row = plans[layout]
            self.assertNotIn("skipped", row)
            est = run("estimate", model, "-b", "1", "-s", "64", "--gpu", "a100-80", "--dp", "2", "--engine", engine,
                      *lora, "--json")
            self.assertEqual(est.returncode, 0, est.stderr)
            self.assertEqual(row["peak_allocated_bytes"], json.loads(est.stdout)["peak_allocated_bytes"], layout)
        # QLoRA: every data-parallel layout runs the 4-bit base, FSDP2 with the codes in a float storage dtype
        # (said once); int8 weights FSDP2 cannot shard.
        q = recommend_json(model, "--gpus", "2", "--seq", "64", "--gpu", "a100-80", *lora, "--quant", "nf4")
        qplans = {p["layout"]: p for p in q["plans"]}
        for layout in ("DP2", "ZeRO-1×2", "ZeRO-3×2"):
            self.assertNotIn("skipped", qplans[layout])
            self.assertLess(qplans[layout]["peak_allocated_bytes"], plans[layout]["peak_allocated_bytes"])
        self.assertIn("bnb_4bit_quant_storage", " ".join(q["assumptions"]))
        q8 = recommend_json(model, "--gpus", "2", "--seq", "64", "--gpu", "a100-80", *lora, "--quant", "int8")
        q8plans = {p["layout"]: p for p in q8["plans"]}
        self.assertIn("cannot shard", q8plans["ZeRO-3×2"]["skipped"])
        self.assertNotIn("skipped", q8plans["DP2"])

    def test_max_batch_is_exact_and_independent_of_the_batch_asked(self):
        model = os.path.join(BUNDLED, "opt-1.3b.meta.pt")
        common = ["--gpu", "a100-80", "--seq", "2048"]
        maxima = {}
        for batch in ("1", "8", "200"):
            j = recommend_json(model, "--gpus", "8", "--tp", "1", "--batch", batch, *common)
            for p in j["plans"]:
                if "skipped" in p:
                    continue
                maxima.setdefault(p["layout"], set()).add(p["max_micro_batch"])
        self.assertTrue(maxima)
        for layout, found in maxima.items():
            self.assertEqual(len(found), 1, f"{layout}: {found}")
        # `estimate` of the layout agrees: the max batch fits, the next one does not.
        zero1 = {"dp": 8, "tp": 1, "engine": "ZeRO-1"}
        best = maxima["ZeRO-1×8"].pop()
        self.assertTrue(self.fits(model, zero1, best, common))
        self.assertFalse(self.fits(model, zero1, best + 1, common))

    def test_gpus_beyond_a_node_default_to_nodes_of_eight_unless_given(self):
        llama = os.path.join(BUNDLED, "llama-2-7b.meta.pt")
        j = recommend_json(llama, "--gpus", "64", "--gpu", "h100-80", "--seq", "512", "--engines", "zero3")
        self.assertEqual(j["nodes"], 8)
        self.assertLessEqual(max(p["tp"] for p in j["plans"]), 8)
        self.assertTrue(any("a node holds 8 h100-80 GPUs" in a for a in j["assumptions"]), j["assumptions"])
        text = run("recommend", llama, "--gpus", "64", "--gpu", "h100-80", "--seq", "512", "--engines", "zero3")
        self.assertIn("64 x h100-80 (8 nodes", text.stdout)
        self.assertIn("a node holds 8 h100-80 GPUs", text.stdout)
        # An explicit --nodes wins: one node of 16.
        j = recommend_json(llama, "--gpus", "16", "--nodes", "1", "--gpu", "h100-80", "--seq", "512",
                           "--engines", "zero3")
        self.assertEqual(j["nodes"], 1)
        self.assertEqual(max(p["tp"] for p in j["plans"]), 16)
        self.assertFalse(any("a node holds" in a for a in j["assumptions"]))
        self.assertTrue(any("16 GPUs per node, more than the usual 8" in a for a in j["assumptions"]))

    def test_partial_nodes_need_the_node_count(self):
        llama = os.path.join(BUNDLED, "llama-2-7b.meta.pt")
        self.assert_one_line_error(run("recommend", llama, "--gpus", "12", "--gpu", "a100-80"), 2,
                                   "12 GPUs do not fill whole nodes of 8", "--nodes")
        self.assert_one_line_error(run("recommend", llama, "--gpus", "16", "--tp", "16", "--gpu", "a100-80"), 2,
                                   "exceeds the 8 GPUs of a node")
        self.assert_one_line_error(run("recommend", llama, "--gpus", "8", "--nodes", "0", "--gpu", "a100-80"), 2,
                                   "node count must be at least 1")

    def test_fp32_that_fits_nowhere_names_the_smallest_gpu_count(self):
        proc = run("recommend", os.path.join(BUNDLED, "llama-2-7b.meta.pt"), "--gpus", "1", "--gpu", "a100-80",
                   "--seq", "512", "--precision", "fp32", "--json")
        self.assertEqual(proc.returncode, 3, proc.stderr)
        j = json.loads(proc.stdout)
        self.assertIsNone(j["recommended"])
        self.assertGreater(j["smallest_gpu_count_that_fits"], 1)

    def test_nccl_buffer_assumption_comes_with_every_parallel_table(self):
        opt = os.path.join(BUNDLED, "opt-1.3b.meta.pt")
        common = ["--gpu", "l4-24", "--seq", "512"]
        needles = ("NCCL buffers outside PyTorch's allocator", "4 channels x 2 ring connections", "NCCL_BUFFSIZE")

        def nccl_lines(lines):
            return [a for a in lines if all(n in a for n in needles)]

        j = recommend_json(opt, "--gpus", "4", *common)
        self.assertEqual(len(nccl_lines(j["assumptions"])), 1, j["assumptions"])
        self.assertEqual(len(nccl_lines(run("recommend", opt, "--gpus", "4", *common).stdout.splitlines())), 1)
        self.assertEqual(nccl_lines(recommend_json(opt, "--gpus", "1", *common)["assumptions"]), [])
        # estimate of one rank: this rank's communicators and their bytes, as counted in the fixed overhead.
        for layout, communicators in ((("--dp", "2"), 1), (("--tp", "2"), 1), (("--dp", "2", "--tp", "2"), 2)):
            est = ["estimate", opt, "-b", "1", *common, *layout]
            proc = run(*est, "--json")
            self.assertIn(proc.returncode, (0, 3), proc.stderr)
            e = json.loads(proc.stdout)
            lines = nccl_lines(e["assumptions"])
            self.assertEqual(len(lines), 1, e["assumptions"])
            self.assertTrue(lines[0].startswith(f"{communicators} NCCL communicator"), lines[0])
            self.assertEqual(len(nccl_lines(run(*est).stdout.splitlines())), 1)
        one = json.loads(run("estimate", opt, "-b", "1", *common, "--json").stdout)
        self.assertNotIn("assumptions", one)

    def assert_smallest_count_fits(self, *request):
        """Nothing fits on 2 GPUs, a larger count is named, and recommend at that count finds a layout."""
        llama = os.path.join(BUNDLED, "llama-2-7b.meta.pt")
        common = ["--gpu", "a100-40", "--seq", "4096", "--precision", "fp32", *request]
        j = recommend_json(llama, "--gpus", "2", *common)
        self.assertIsNone(j["recommended"])
        smallest = j["smallest_gpu_count_that_fits"]
        self.assertGreater(smallest, 2, j["why"])
        at = recommend_json(llama, "--gpus", str(smallest), *common)
        self.assertIsNotNone(at["recommended"], at["why"])

    def test_fp32_global_batch_names_a_count_it_splits_over(self):
        # The largest count searched (4096) cannot split a global batch of 8; smaller counts can.
        self.assert_smallest_count_fits("--global-batch", "8")

    def test_fp32_with_the_chunk_engine_asked_searches_the_engines_that_run(self):
        # Chunk-based ZeRO needs 16-bit training: the search falls back to DDP and to tensor parallelism alone.
        self.assert_smallest_count_fits("--batch", "1", "--engines", "gemini,ddp")
        self.assert_smallest_count_fits("--global-batch", "8", "--engines", "gemini,ddp")

    def test_every_fsdp2_row_takes_the_mixed_precision_policy(self):
        # Each FSDP2 row, with tensor parallelism too, is the estimate of its layout under the policy; the rows of
        # the other engines cannot train this 16-bit export in fp32 and say so.
        model = os.path.join(TINY, "llama-tiny-bf16.pt")
        common = ["--gpu", "a100-80", "--seq", "64", "--batch", "1", "-p", "fp32", "--fsdp-param-dtype", "bf16",
                  "--fsdp-reduce-dtype", "fp32"]
        j = recommend_json(model, "--gpus", "4", *common)
        fsdp2 = [p for p in j["plans"] if p["engine"] in ("ZeRO-2 (FSDP2)", "ZeRO-3 (FSDP2)")]
        self.assertEqual({(p["dp"], p["tp"]) for p in fsdp2}, {(4, 1), (2, 2)})
        for p in fsdp2:
            self.assertNotIn("skipped", p, p)
            proc = run("estimate", model, "--dp", str(p["dp"]), "--tp", str(p["tp"]), "--engine",
                       ENGINE_FLAGS[p["engine"]], "--json", *common)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(p["peak_allocated_bytes"], json.loads(proc.stdout)["peak_allocated_bytes"], p)
        for p in j["plans"]:
            if p["engine"] in ("DDP", "ZeRO-1"):
                self.assertIn("fp32", p["skipped"])
        self.assertIn("tensor parallelism too", " ".join(j["assumptions"]))


if __name__ == "__main__":
    unittest.main()
