#!/usr/bin/env python3
"""Property tests of the llmem binary at the edges of what it may be asked: a model of a trillion parameters, a
million tokens, 4096 GPUs, a batch of 2^31. Every answer is either a clean refusal (exit 2, one line) or numbers
that hold against bounds computed here exactly (Python integers do not wrap): no byte count may wrap, go negative
or fall below the tensors it must hold. Run under the ASan/UBSan build, a signed overflow anywhere is a crash.
Needs LLMEM_BIN, LLMEM_MODELS_DIR (the bundled weight-free exports)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

from cli_assertions import OneLineErrorAssertions, run

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODELS = os.environ["LLMEM_MODELS_DIR"]
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
LLAMA_7B = os.path.join(MODELS, "llama-2-7b.meta.pt")
LLAMA_7B_BF16 = os.path.join(MODELS, "llama-2-7b-bf16.meta.pt")
LLAMA_70B = os.path.join(MODELS, "llama-3-70b.meta.pt")
# Llama-2-7B's config (its bundled export): layers, KV heads x head dim, vocabulary.
L7B_LAYERS, L7B_KV_WIDTH, L7B_VOCAB = 32, 4096, 32000
INT64_MAX = 2**63 - 1

# One Llama layer with a 2^25-token vocabulary, embeddings untied: 1.10e12 parameters, traced in seconds.
TRILLION_CONFIG = dict(model_type="llama", num_hidden_layers=1, hidden_size=16384, num_attention_heads=128,
                       num_key_value_heads=8, intermediate_size=53248, vocab_size=2**25, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def integers(tree):
    """Every integer of a JSON answer (booleans aside)."""
    if isinstance(tree, bool):
        return
    if isinstance(tree, int):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from integers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from integers(v)


class ExtremeShapesTest(unittest.TestCase, OneLineErrorAssertions):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        config = os.path.join(cls.tmp.name, "config.json")
        with open(config, "w") as f:
            json.dump(TRILLION_CONFIG, f)
        cls.trillion = os.path.join(cls.tmp.name, "trillion.meta.pt")
        subprocess.run([PYTHON, os.path.join(REPO, "models", "export_hf.py"), "--config", config, "--device", "meta",
                        "--no-verify", "--out", cls.trillion], check=True, capture_output=True, timeout=600)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def answer(self, *args):
        """The JSON answer (exit 0, or 3: does not fit), checked for wrapped integers; None for a clean refusal."""
        proc = run(*args, "--json")
        if proc.returncode == 2:
            self.assert_one_line_error(proc, 2)
            return None
        self.assertIn(proc.returncode, (0, 3), proc.stderr)
        j = json.loads(proc.stdout)
        for n in integers(j):
            self.assertGreaterEqual(n, 0, f"a negative figure in {args}")
            self.assertLessEqual(n, INT64_MAX)
        return j

    def test_a_trillion_parameters_hold_their_weights_gradients_and_adamw_states_exactly(self):
        params = json.loads(run("inspect", self.trillion, "--json").stdout)["parameters"]
        self.assertGreater(params, 10**12)
        for gpus in ("1", "4096"):
            with self.subTest(dp=gpus):
                args = ["--dp", gpus, "--engine", "zero3"] if gpus != "1" else []
                j = self.answer("estimate", self.trillion, "-b", "1", "-s", "1024", "--gpu", "h100-80", *args)
                self.assertIsNotNone(j)
                shards = int(gpus)
                if shards == 1:
                    self.assertFalse(j["fits"])
                # fp32 master weights and gradients (autocast), AdamW's exp_avg and exp_avg_sq in fp32: 4 + 4 + 8
                # bytes a parameter, sharded over the ranks by ZeRO-3 (each rank's shard rounded up).
                self.assertGreaterEqual(j["gradients_bytes"], 4 * params // shards)
                self.assertGreaterEqual(j["optimizer_state_bytes"], 8 * params // shards)
                self.assertGreaterEqual(j["peak_allocated_bytes"], 16 * params // shards)
                if shards == 1:
                    self.assertEqual(j["gradients_bytes"], 4 * params)
                    self.assertEqual(j["optimizer_state_bytes"], 8 * params)

    def test_a_batch_of_2_to_the_31_is_refused_or_holds_its_logits(self):
        for seq in (1, 4096):
            with self.subTest(seq=seq):
                j = self.answer("estimate", LLAMA_7B, "-b", str(2**31), "-s", str(seq), "--gpu", "h100-80")
                if j is not None:  # the step's logits (bf16 under autocast) alone
                    self.assertGreaterEqual(j["peak_allocated_bytes"], 2**31 * seq * L7B_VOCAB * 2)

    def test_a_million_tokens_are_refused_or_hold_their_logits(self):
        j = self.answer("estimate", LLAMA_7B, "-b", "1", "-s", str(2**20), "--max-positions", str(2**20))
        self.assertIsNotNone(j)
        self.assertGreaterEqual(j["peak_allocated_bytes"], 2**20 * L7B_VOCAB * 2)
        self.assertIsNone(self.answer("estimate", LLAMA_7B, "-b", "1", "-s", str(2**20)))  # past its 4096 positions

    def test_generation_at_extreme_batches_holds_its_kv_cache_exactly_or_is_refused(self):
        for batch, prompt in ((2**20, 2**16), (2**31, 2**20)):
            with self.subTest(batch=batch, prompt=prompt):
                j = self.answer("infer", LLAMA_7B_BF16, "-b", str(batch), "--prompt", str(prompt), "--new-tokens", "2",
                                "--max-positions", str(2 * prompt))
                if j is None:
                    continue
                # Keys and values of every layer for the prompt and the first new token (the last one is not fed
                # back), in bf16.
                self.assertEqual(j["cache_bytes"], 2 * L7B_LAYERS * batch * (prompt + 1) * L7B_KV_WIDTH * 2)
                self.assertGreaterEqual(j["peak_allocated_bytes"], j["cache_bytes"] + j["weights_bytes"])

    def test_4096_gpus_rank_every_layout_with_sound_figures(self):
        j = self.answer("recommend", LLAMA_70B, "--gpus", "4096", "--seq", "4096", "--gpu", "h100-80")
        self.assertIsNotNone(j)
        self.assertEqual(j["gpus"], 4096)
        self.assertTrue(j["plans"])

    def test_sizes_past_64_bits_are_refused(self):
        for args in (("estimate", LLAMA_7B, "-b", str(INT64_MAX), "-s", "2"),
                     ("estimate", LLAMA_7B, "-b", str(2**40), "-s", str(2**30), "--max-positions", str(2**30)),
                     ("infer", LLAMA_7B_BF16, "-b", str(2**62), "--prompt", "8", "--new-tokens", "8"),
                     ("recommend", LLAMA_7B, "--gpus", str(2**31), "--seq", "512"),
                     ("estimate", self.trillion, "-b", str(2**30), "-s", "4096")):
            with self.subTest(args=args[0] + " " + " ".join(args[2:])):
                self.assertIsNone(self.answer(*args))


if __name__ == "__main__":
    sys.argv[1:1] = ["-v"]
    unittest.main()
