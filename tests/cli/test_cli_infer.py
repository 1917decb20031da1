#!/usr/bin/env python3
"""`llmem infer`: its refusals (one line, exit 2), the cache it reports, and its prefill / decode peaks against real
Hugging Face generate() runs on this CPU (scripts/inference_runs.py through the counting allocator). The decode step
is modelled op by op with the generate loop's tensors; the prefill keeps each module call's result until its
caller returns (Note [Eager lifetimes]), where CPython frees the temporaries of an expression at once: a bounded
over-estimate, asserted as such. Needs LLMEM_BIN, LLMEM_TINY_MODELS and LLMEM_BUILD_DIR."""
import json
import os
import sys
import unittest

from cli_assertions import OneLineErrorAssertions, run

TINY = os.environ["LLMEM_TINY_MODELS"]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))


def infer_json(*args):
    proc = run("infer", *args, "--json")
    if proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return json.loads(proc.stdout)


class InferInputsTest(OneLineErrorAssertions, unittest.TestCase):
    def test_bad_input_is_one_line(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        base = ("infer", llama, "--gpu", "cpu", "-p", "fp32")
        self.assert_one_line_error(run(*base, "--prompt", "0", "--new-tokens", "4"), 2, "--prompt must be positive")
        self.assert_one_line_error(run(*base, "--prompt", "8", "--new-tokens", "0"), 2, "--new-tokens must be positive")
        self.assert_one_line_error(run(*base, "--prompt", "8", "--new-tokens", "4", "-b", "0"), 2,
                                   "--batch must be positive")
        self.assert_one_line_error(run("infer", llama, "--prompt", "8", "--new-tokens", "4", "-p", "fp16"), 2,
                                   "unknown --precision 'fp16'")
        self.assert_one_line_error(run(*base, "--new-tokens", "4"), 2, "--prompt")
        # positions: a learned table bounds the context, a RoPE config limit can be lifted
        opt = os.path.join(TINY, "opt-tiny.pt")
        self.assert_one_line_error(run("infer", opt, "--gpu", "cpu", "-p", "fp32", "--prompt", "1000",
                                       "--new-tokens", "100"), 2, "needs 1099 positions", "1024")
        self.assert_one_line_error(run(*base, "--prompt", "4000", "--new-tokens", "200"), 2, "4096")
        self.assertEqual(run(*base, "--prompt", "4000", "--new-tokens", "200", "--max-positions", "8192").returncode, 0)
        self.assert_one_line_error(run("infer", os.path.join(TINY, "mistral-tiny.pt"), "--gpu", "cpu", "-p", "fp32",
                                       "--prompt", "8", "--new-tokens", "4"), 2, "sliding window of 24")

    def test_the_cache_holds_every_token_but_the_last(self):
        j = infer_json(os.path.join(TINY, "llama-tiny.pt"), "--gpu", "cpu", "-p", "fp32", "-b", "3", "--prompt", "20",
                       "--new-tokens", "5")
        # 4 layers x (keys, values) x [3 sequences, 2 key/value heads, 24 tokens, 64] fp32
        self.assertEqual(j["cache_bytes"], 4 * 2 * 3 * 2 * 24 * 64 * 4)
        self.assertIn(j["peak_phase"], ("prefill", "decode"))
        self.assertGreater(j["decode"]["at_peak_bytes"]["KV cache"], 0)
        one = infer_json(os.path.join(TINY, "llama-tiny.pt"), "--gpu", "cpu", "-p", "fp32", "--prompt", "20",
                         "--new-tokens", "1")
        self.assertNotIn("decode", one)
        self.assertEqual(one["peak_phase"], "prefill")

    def test_a_gpu_target_says_whether_it_fits(self):
        j = infer_json(os.path.join(TINY, "llama-tiny.pt"), "--gpu", "a100-80", "-p", "fp32", "--prompt", "64",
                       "--new-tokens", "16")
        self.assertTrue(j["fits"])
        self.assertGreaterEqual(j["peak_reserved_bytes"], j["peak_allocated_bytes"])
        small = run("infer", os.path.join(TINY, "llama-tiny.pt"), "--gpu", "a100-80", "--gpu-memory", "600MiB",
                    "-p", "fp32", "-b", "64", "--prompt", "2048", "--new-tokens", "64")
        self.assertEqual(small.returncode, 3, small.stderr)


class InferSearchTest(OneLineErrorAssertions, unittest.TestCase):
    def test_the_largest_batch_and_prompt_fit_and_one_more_does_not(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        gpu = ("--gpu", "a100-80", "--gpu-memory", "700MiB", "-p", "fp32")
        j = infer_json(llama, *gpu, "-b", "4", "--prompt", "512", "--new-tokens", "32", "--max-batch", "--max-context")
        batch, prompt = j["max_batch"], j["max_prompt"]
        self.assertGreater(batch, 4)
        self.assertGreater(prompt, 512)
        for b, p, fits in ((batch, 512, True), (batch + 1, 512, False), (4, prompt, True), (4, prompt + 1, False)):
            proc = run("infer", llama, *gpu, "-b", str(b), "--prompt", str(p), "--new-tokens", "32", "--json")
            self.assertEqual(json.loads(proc.stdout)["fits"], fits, f"batch {b}, prompt {p}")
        self.assert_one_line_error(run("infer", llama, "--gpu", "cpu", "--prompt", "8", "--new-tokens", "4",
                                       "--max-batch"), 2, "name one with --gpu")


class InferAccuracyTest(unittest.TestCase):
    def compare(self, arch, precision, batch, prompt, new_tokens):
        import inference_runs

        model = f"{arch}-tiny{'-bf16' if precision == 'bf16' else ''}.pt"
        est = infer_json(os.path.join(TINY, model), "--gpu", "cpu", "-p", precision, "-b", str(batch), "--prompt",
                         str(prompt), "--new-tokens", str(new_tokens))
        real = inference_runs.run_case(arch, precision, batch, prompt, new_tokens)
        self.assertEqual(est["cache_bytes"], real["cache_bytes"])
        total = real["weights_bytes"] + real["peak_bytes"]
        decode = est["decode"]["peak_allocated_bytes"] - (real["weights_bytes"] + real["forward_peak_bytes"][-1])
        prefill = est["prefill"]["peak_allocated_bytes"] - (real["weights_bytes"] + real["forward_peak_bytes"][0])
        label = f"{arch} {precision} {batch}x{prompt}+{new_tokens}"
        self.assertLess(abs(decode) / total, 0.005, f"{label}: decode off by {decode} B")
        self.assertGreaterEqual(prefill / total, -0.005, f"{label}: prefill under by {-prefill} B")
        self.assertLess(prefill / total, 0.05, f"{label}: prefill over by {prefill} B")

    def test_llama_fp32(self):
        self.compare("llama", "fp32", 2, 32, 8)

    def test_llama_bf16(self):
        self.compare("llama", "bf16", 2, 64, 8)


if __name__ == "__main__":
    unittest.main()
