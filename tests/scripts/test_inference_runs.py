#!/usr/bin/env python3
"""The inference harness (scripts/inference_runs.py): its case syntax and one-line refusals, and real tiny
generations through the counting allocator whose cache and forward count follow from the case."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))

import inference_runs  # noqa: E402
from inference_runs import CaseError, parse_case  # noqa: E402


class ParseTest(unittest.TestCase):
    def test_cases(self):
        self.assertEqual(parse_case("llama:fp32:2x32+8"), ("llama", "fp32", 2, 32, 8, "dynamic", 1, None))
        self.assertEqual(parse_case("mistral:bf16:1x64+16:static"),
                         ("mistral", "bf16", 1, 64, 16, "static", 1, None))
        self.assertEqual(parse_case("qwen2:fp32:2x32+8:dynamic:tp2"), ("qwen2", "fp32", 2, 32, 8, "dynamic", 2, None))
        self.assertEqual(parse_case("llama:bf16:2x32+8:static:nf4-dq"),
                         ("llama", "bf16", 2, 32, 8, "static", 1, "nf4-dq"))

    def test_refusals(self):
        for text, needle in (("llama:fp32", "ARCH:PRECISION:BxP+N"), ("llama:fp32:2x32", "BxP+N"),
                             ("llama:fp32:0x32+8", "positive"), ("llama:fp16:2x32+8", "precision"),
                             ("llama:fp32:2x32+8:paged", "cache"), ("llama:fp32:2x32+8:dynamic:tpx", "tpT"),
                             ("llama:fp32:2x32+8:dynamic:tp0", "positive"),
                             ("llama:fp32:2x32+8:dynamic:tp2:nf4", "one process")):
            with self.assertRaises(CaseError) as ctx:
                parse_case(text)
            self.assertIn(needle, str(ctx.exception))


class GenerateTest(unittest.TestCase):
    def test_dynamic_cache_holds_every_token_but_the_last(self):
        rec = inference_runs.run_case("llama", "fp32", 2, 16, 4)
        # one prefill and three decode forwards; the cache holds P + N - 1 tokens: 4 layers x (key, value) of
        # [2 sequences, 2 key/value heads, 19 tokens, 64] fp32
        self.assertEqual(len(rec["forward_peak_bytes"]), 4)
        self.assertEqual(rec["cache_layers"][0]["key"], [2, 2, 19, 64])
        self.assertEqual(rec["cache_bytes"], 4 * 2 * 2 * 2 * 19 * 64 * 4)
        self.assertEqual(rec["sequences"], [2, 20])
        self.assertEqual(rec["peak_bytes"], max(rec["forward_peak_bytes"]))
        # each decode step starts with one more token cached (2 x 2 x 64 x 4 B per layer and tensor), and
        # generate's input_ids and attention_mask one int64 longer per sequence
        starts = rec["forward_start_bytes"]
        self.assertEqual(starts[3] - starts[2], 4 * 2 * 2 * 2 * 64 * 4 + 2 * 2 * 8)

    def test_4bit_linears_are_loaded_quantized(self):
        full = inference_runs.run_case("llama", "fp32", 1, 8, 2)
        nf4 = inference_runs.run_case("llama", "fp32", 1, 8, 2, quant="nf4")
        self.assertEqual(nf4["quant"], "nf4")
        self.assertEqual(nf4["cache_bytes"], full["cache_bytes"])
        # the decoder linears' 2,899,968 fp32 weights become 4-bit codes, one fp32 absmax per 64 and a 16-entry code
        # per linear (llama tiny); the rest stays fp32 and is counted (copied off the checkpoint's memory map)
        self.assertAlmostEqual(full["weights_bytes"] - nf4["weights_bytes"],
                               2_899_968 * 4 - 2_899_968 // 2 - 2_899_968 // 64 * 4 - 28 * 64, delta=512)

    def test_static_cache_is_allocated_for_the_whole_length(self):
        rec = inference_runs.run_case("llama", "bf16", 1, 8, 4, cache="static")
        self.assertEqual(rec["cache_layers"][0]["key"], [1, 2, 11, 64])
        # the static cache is allocated for all P + N - 1 tokens: a decode step adds only generate's longer
        # input_ids and attention_mask (one int64 each)
        starts = rec["forward_start_bytes"]
        self.assertEqual(starts[3] - starts[2], 2 * 8)


if __name__ == "__main__":
    unittest.main()
