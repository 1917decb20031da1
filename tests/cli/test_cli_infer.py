#!/usr/bin/env python3
"""`llmem infer`: its refusals (one line, exit 2), the cache it reports, what it reads from the export's config
record about the generate loop (logits_to_keep, eos_token_id), and its prefill / decode peaks against real Hugging
Face generate() runs on this CPU (scripts/inference_runs.py through the counting allocator). Needs LLMEM_BIN,
LLMEM_TINY_MODELS and LLMEM_BUILD_DIR."""
import json
import os
import sys
import tempfile
import unittest
import zipfile

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
        opt = os.path.join(TINY, "opt-tiny.pt")
        self.assert_one_line_error(run(*base, "--prompt", "0", "--new-tokens", "4"), 2, "--prompt must be positive")
        self.assert_one_line_error(run(*base, "--prompt", "8", "--new-tokens", "0"), 2, "--new-tokens must be positive")
        self.assert_one_line_error(run(*base, "--prompt", "8", "--new-tokens", "4", "-b", "0"), 2,
                                   "--batch must be positive")
        self.assert_one_line_error(run("infer", llama, "--prompt", "8", "--new-tokens", "4", "-p", "fp16"), 2,
                                   "unknown --precision 'fp16'")
        self.assert_one_line_error(run(*base, "--new-tokens", "4"), 2, "--prompt")
        self.assert_one_line_error(run(*base, "--prompt", "8", "--new-tokens", "4", "--cache", "ring"), 2,
                                   "unknown --cache 'ring'")
        self.assert_one_line_error(run(*base, "--prompt", "8", "--new-tokens", "4", "--kv-dtype", "fp8"), 2,
                                   "DynamicCache keeps keys and values in the weights' dtype", "--cache paged")
        self.assert_one_line_error(run("infer", opt, "--gpu", "cpu", "-p", "fp32", "--prompt", "8", "--new-tokens", "4",
                                       "--cache", "static"), 2, "create_causal_mask")
        # positions: a learned table bounds the context, a RoPE config limit can be lifted
        self.assert_one_line_error(run("infer", opt, "--gpu", "cpu", "-p", "fp32", "--prompt", "1000",
                                       "--new-tokens", "100"), 2, "needs 1099 positions", "1024")
        self.assert_one_line_error(run(*base, "--prompt", "4000", "--new-tokens", "200"), 2, "4096")
        self.assertEqual(run(*base, "--prompt", "4000", "--new-tokens", "200", "--max-positions", "8192").returncode, 0)
        self.assert_one_line_error(run("infer", os.path.join(TINY, "mistral-tiny.pt"), "--gpu", "cpu", "-p", "fp32",
                                       "--prompt", "8", "--new-tokens", "4", "--cache", "static"), 2,
                                   "sliding window of 24")
        # eager attention with a cache it cannot trace; an fp32 trace that cannot run in bf16; no tp_plan
        bloom = os.path.join(TINY, "bloom-tiny.pt")
        self.assert_one_line_error(run("infer", bloom, "--gpu", "cpu", "-p", "fp32", "--prompt", "8", "--new-tokens",
                                       "4", "--cache", "static"), 2, "create_causal_mask")
        self.assert_one_line_error(run("infer", bloom, "--gpu", "h100-80", "--prompt", "8", "--new-tokens", "4"), 2,
                                   "cannot run with bf16 weights", "--dtype bfloat16")
        self.assert_one_line_error(run("infer", os.path.join(TINY, "gpt2-tiny.pt"), "--gpu", "cpu", "-p", "fp32",
                                       "--prompt", "8", "--new-tokens", "4", "--tp", "2"), 2, "base_model_tp_plan")

    def test_a_static_cache_is_whole_from_the_prefill(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "20", "--new-tokens", "5")
        dynamic, static = infer_json(llama, *args), infer_json(llama, *args, "--cache", "static")
        self.assertEqual(static["cache_bytes"], dynamic["cache_bytes"])  # 24 tokens either way after the last step
        self.assertEqual(static["prefill"]["at_peak_bytes"]["KV cache"], static["cache_bytes"])
        self.assertLess(dynamic["prefill"]["at_peak_bytes"]["KV cache"], dynamic["cache_bytes"])  # 20 of 24 tokens
        self.assertIn("StaticCache", static["loop"])

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
        # The allocator keeps the prefill's segments through the decode steps: the run reserves the larger phase's.
        self.assertEqual(j["peak_reserved_bytes"], max(j["prefill"]["peak_reserved_bytes"],
                                                       j["decode"]["peak_reserved_bytes"]))
        self.assertGreater(j["nvidia_smi_bytes"], j["peak_reserved_bytes"])  # the CUDA context
        small = run("infer", os.path.join(TINY, "llama-tiny.pt"), "--gpu", "a100-80", "--gpu-memory", "600MiB",
                    "-p", "fp32", "-b", "64", "--prompt", "2048", "--new-tokens", "64")
        self.assertEqual(small.returncode, 3, small.stderr)


class InferTimeTest(unittest.TestCase):
    def test_a_gpu_target_estimates_tokens_per_second_as_a_roofline(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "a100-80", "-p", "fp32", "--prompt", "512", "--new-tokens", "16")
        one, many = infer_json(llama, *args, "-b", "1"), infer_json(llama, *args, "-b", "32")
        for j in (one, many):
            t = j["time"]
            self.assertGreater(t["prefill_s"], 0)
            self.assertAlmostEqual(t["decode_tokens_per_s"] * t["decode_step_s"], j["batch"], places=6)
            self.assertAlmostEqual(t["generate_s"], t["prefill_s"] + 15 * t["decode_step_s"], places=9)
            self.assertTrue(any("roofline" in a for a in t["assumptions"]))
            self.assertFalse(any(a.startswith("optimizer") for a in t["assumptions"]))
        # A decode step reads every weight once whatever the batch: 32 sequences take less than 32 times as long.
        self.assertLess(many["time"]["decode_step_s"], 32 * one["time"]["decode_step_s"])
        self.assertGreater(many["time"]["decode_tokens_per_s"], one["time"]["decode_tokens_per_s"])
        cpu = infer_json(llama, "--gpu", "cpu", "-p", "fp32", "--prompt", "16", "--new-tokens", "2")
        self.assertNotIn("time", cpu)  # no GPU, no roofline


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


REMOVE = object()


def with_config(export, directory, **changes):
    """A copy of a tiny export whose hf_config.json record has `changes` applied (REMOVE removes the key)."""
    path = os.path.join(directory, os.path.basename(export))
    with zipfile.ZipFile(export) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("extra/hf_config.json"):
                record = json.loads(data)
                for key, value in changes.items():
                    if value is REMOVE:
                        record.pop(key, None)
                    else:
                        record[key] = value
                data = json.dumps(record)
            dst.writestr(item, data)
    return path


class InferLoopTest(unittest.TestCase):
    ARGS = ("--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "32", "--new-tokens", "4")

    def test_a_forward_without_logits_to_keep_computes_the_prompts_logits_at_every_position(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        last = infer_json(llama, *self.ARGS)
        self.assertIn("last position only", last["loop"])
        with tempfile.TemporaryDirectory() as tmp:
            every = infer_json(with_config(llama, tmp, logits_to_keep=False), *self.ARGS)
            self.assertIn("every position (the forward takes no logits_to_keep)", every["loop"])
            unknown = infer_json(with_config(llama, tmp, logits_to_keep=REMOVE), *self.ARGS)
            self.assertIn("the export does not say", unknown["loop"])
        # At the LM head: the weights, the prompt's cache (4 layers x keys and values x [2, 2, 32, 64] fp32) and the
        # [2, 32, 8192] fp32 logits, which outgrow the last position's everywhere else.
        held = every["weights_bytes"] + 4 * 2 * (2 * 2 * 32 * 64 * 4) + 2 * 32 * 8192 * 4
        self.assertGreater(every["prefill"]["peak_allocated_bytes"], held)
        self.assertLess(last["prefill"]["peak_allocated_bytes"], held)
        self.assertEqual(unknown["prefill"], every["prefill"])
        self.assertEqual(every["decode"], last["decode"])  # a decode step feeds one token either way

    def test_without_an_eos_token_the_loop_has_no_min_length_processors(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        with tempfile.TemporaryDirectory() as tmp:
            no_eos = infer_json(with_config(llama, tmp, eos_token_id=None), *self.ARGS)
        eos = infer_json(llama, *self.ARGS)
        # The decode step carries one [2, 8192] fp32 tensor of the previous step, not two, and clones no scores.
        self.assertGreaterEqual(eos["decode"]["peak_allocated_bytes"] - no_eos["decode"]["peak_allocated_bytes"],
                                2 * 8192 * 4)


class InferAccuracyTest(unittest.TestCase):
    def compare(self, arch, precision, batch, prompt, new_tokens, cache="dynamic", tp=1, quant=None):
        import inference_runs

        model = f"{arch}-tiny{'-bf16' if precision == 'bf16' else ''}.pt"
        est = infer_json(os.path.join(TINY, model), "--gpu", "cpu", "-p", precision, "-b", str(batch), "--prompt",
                         str(prompt), "--new-tokens", str(new_tokens), "--cache", cache, "--tp", str(tp),
                         *(("--quant", quant) if quant else ()))
        if tp == 1:
            real = inference_runs.run_case(arch, precision, batch, prompt, new_tokens, cache=cache, quant=quant)
        else:
            real = inference_runs.run_tensor_parallel(f"{arch}:{precision}:{batch}x{prompt}+{new_tokens}:{cache}:tp{tp}",
                                                      tp, "tiny")
        # the run counts a few hundred bytes besides the model's storages (bf16: 128 B; a tensor-parallel rank: 8 B
        # more; double-quantized 4-bit states: 1,404 B over 28 linears), which llmem does not count
        extra = real["weights_bytes"] - est["weights_bytes"]
        self.assertTrue(0 <= extra <= max(256, real["weights_bytes"] // 5000), f"weights: {extra} B more measured")
        self.assertEqual(est["cache_bytes"], real["cache_bytes"])
        total = real["weights_bytes"] + real["peak_bytes"]
        label = f"{arch} {precision} {batch}x{prompt}+{new_tokens} {cache} tp{tp}"
        # Ranks: gloo's worker threads free a row-parallel partial sum (or a buffer of their own) sooner or later
        # from run to run, more so on a loaded machine. The rank that peaks lowest follows the program's order; every
        # rank stays within a few such tensors of it.
        ranks = real.get("rank_forward_peak_bytes", [real["forward_peak_bytes"]])
        for pick, tolerance in ((min, 0.005), (max, 0.02 if tp > 1 else 0.005)):
            decode = est["decode"]["peak_allocated_bytes"] - (real["weights_bytes"] + pick(p[-1] for p in ranks))
            prefill = est["prefill"]["peak_allocated_bytes"] - (real["weights_bytes"] + pick(p[0] for p in ranks))
            self.assertLess(abs(decode) / total, tolerance, f"{label}: decode off by {decode} B ({pick.__name__})")
            self.assertLess(abs(prefill) / total, tolerance, f"{label}: prefill off by {prefill} B ({pick.__name__})")

    def test_llama_fp32(self):
        self.compare("llama", "fp32", 2, 32, 8)

    def test_llama_bf16(self):
        self.compare("llama", "bf16", 2, 64, 8)

    def test_opt_computes_every_prompt_logit(self):  # no logits_to_keep; fc1 -> activation_fn -> fc2 rebinds
        self.compare("opt", "fp32", 2, 32, 8)

    def test_gpt2_bf16(self):
        self.compare("gpt2", "bf16", 3, 20, 5)

    def test_qwen2_has_no_eos_token(self):
        self.compare("qwen2", "fp32", 2, 24, 6)

    def test_a_static_cache_with_grouped_heads_copies_them_for_its_mask(self):  # repeat_kv of the whole length
        self.compare("qwen2", "fp32", 4, 128, 4, cache="static")

    def test_a_sliding_window_keeps_the_last_window_of_the_previous_forward(self):  # W = 24 < P: mask and repeat
        self.compare("mistral", "fp32", 2, 32, 8)

    def test_a_sliding_window_longer_than_the_context_is_a_dynamic_cache(self):
        self.compare("mistral", "fp32", 2, 16, 4)

    def test_gpt2_static_cache(self):
        self.compare("gpt2", "fp32", 2, 32, 8, cache="static")

    def test_tensor_parallel_ranks_hold_their_heads(self):  # 2 gloo ranks, transformers' tp_plan
        self.compare("qwen2", "fp32", 2, 32, 8, tp=2)

    def test_tensor_parallel_static_cache(self):
        self.compare("llama", "fp32", 2, 48, 8, cache="static", tp=2)

    def test_4bit_linears_dequantize_their_weight_in_every_forward(self):  # bitsandbytes nf4, double quantization
        self.compare("llama", "fp32", 2, 32, 8, quant="nf4-dq")

    # Eager attention: the export run again with each layer's cache update and generate()'s attention mask
    def test_bloom_builds_its_alibi_from_the_attention_mask(self):
        self.compare("bloom", "fp32", 2, 32, 8)

    def test_gpt_neo_local_layers_mask_within_the_full_cache(self):
        self.compare("gpt_neo", "fp32", 1, 128, 4)

    def test_codegen_casts_its_logits_to_fp32(self):  # `self.lm_head(h).to(torch.float32)`: a copy of 16-bit logits
        self.compare("codegen", "bf16", 2, 64, 4)


class InferQuantTest(OneLineErrorAssertions, unittest.TestCase):
    def test_4bit_weights_and_what_is_refused(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "20", "--new-tokens", "5")
        full, nf4 = infer_json(llama, *args), infer_json(llama, *args, "--quant", "nf4")
        self.assertEqual(nf4["quant"], "nf4")
        self.assertEqual(nf4["cache_bytes"], full["cache_bytes"])
        # llama tiny: the decoder linears' 2,899,968 fp32 weights (11,599,872 B) become 4-bit codes (1,449,984 B),
        # one fp32 absmax per 64 (181,248 B) and a 16-entry code per linear (28 x 64 B); embedding, norms and LM head
        # stay fp32
        self.assertEqual(full["weights_bytes"] - nf4["weights_bytes"], 11_599_872 - 1_449_984 - 181_248 - 28 * 64)
        self.assertIn("bitsandbytes", nf4["loop"])
        base = ("infer", llama, *args)
        self.assert_one_line_error(run(*base, "--quant", "int8"), 2, "--quant int8 is not modelled for generation")
        self.assert_one_line_error(run(*base, "--quant", "nf5"), 2, "unknown --quant 'nf5'")
        self.assert_one_line_error(run(*base, "--quant", "nf4", "--tp", "2"), 2, "--quant with --tp")
        self.assert_one_line_error(run(*base, "--quant-group", "64"), 2, "--quant-group needs --quant")
        self.assert_one_line_error(run(*base, "--quant", "nf4", "--quant-group", "64"), 2, "--quant-group applies")


class InferPagedTest(OneLineErrorAssertions, unittest.TestCase):
    """--cache paged: vLLM's pool sizing wired to the export (the formulas are unit-tested by hand in C++)."""

    def test_the_pool_is_whole_blocks_of_every_layer(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "a100-80", "-p", "fp32", "-b", "4", "--prompt", "100", "--new-tokens", "20", "--cache", "paged")
        j = infer_json(llama, *args)
        p = j["paged"]
        # llama tiny: 4 layers of 2 key/value heads of 64, fp32 ("auto" keeps the weights' dtype)
        self.assertEqual(p["page_bytes"], 2 * 16 * 2 * 64 * 4)
        self.assertEqual(p["block_bytes"], p["page_bytes"] * 4)
        self.assertEqual(p["requested_bytes"], int(j["capacity_bytes"] * 0.9))
        self.assertEqual(p["num_blocks"], p["available_bytes"] // p["block_bytes"])
        self.assertEqual(p["available_bytes"], p["requested_bytes"] - j["weights_bytes"] - p["profile_activation_bytes"])
        self.assertEqual(p["profile_tokens"], 8192)  # 256 requests x 32 tokens
        self.assertEqual(p["blocks_per_sequence"], 8)  # 119 fed tokens
        self.assertEqual(p["max_model_len"], 4096)
        self.assertTrue(j["fits"])
        fp8 = infer_json(llama, *args, "--kv-dtype", "fp8", "--block-size", "32")["paged"]
        self.assertEqual(fp8["page_bytes"], 2 * 32 * 2 * 64 * 1)
        # the searches follow from the pool: 4 sequences share it, or 119-token sequences fill it
        s = infer_json(llama, *args, "--max-batch", "--max-context", "--max-num-seqs", "1000000")
        self.assertEqual(s["max_batch"], s["paged"]["num_blocks"] // 8)
        self.assertEqual(s["max_prompt"], 4096 - 1 - 20 + 1)  # max_model_len caps it
        # on 2 ranks each holds 1 of the 2 key/value heads
        two = infer_json(llama, *args, "--tp", "2")
        self.assertEqual(two["paged"]["page_bytes"], p["page_bytes"] // 2)
        # on 4 ranks vLLM replicates each key/value head on 2: the same page, and every other split parameter halves
        # again: per layer q, o (2 x 65,536) and the MLP (3 x 176,128) fp32 weights / 4 less, x 4 layers (2,637,824 B),
        # and the vocabulary-parallel embedding and LM head (8192 x 256 fp32 each) / 4 less (4,194,304 B)
        four = infer_json(llama, *args, "--tp", "4")
        self.assertEqual(four["paged"]["page_bytes"], two["paged"]["page_bytes"])
        self.assertEqual(two["weights_bytes"] - four["weights_bytes"], 2_637_824 + 4_194_304)
        self.assertTrue(any("replication" in a for a in four["assumptions"]))

    def test_gpus_compares_engines_per_layout(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "a100-80", "--gpu-memory", "4GiB", "--gpu-memory-utilization", "0.5", "-p", "fp32", "-b", "4",
                "--prompt", "100", "--new-tokens", "20", "--cache", "paged", "--max-num-seqs", "100000")
        layouts = {r["tp"]: r for r in infer_json(llama, *args, "--gpus", "4")["layouts"]}
        self.assertEqual(sorted(layouts), [1, 2, 4])  # 4: each key/value head on 2 ranks
        for tp, copies in ((1, 4), (2, 2), (4, 1)):
            alone = infer_json(llama, *args, "--tp", str(tp), "--max-batch")
            self.assertEqual(layouts[tp]["engines"], copies)
            self.assertEqual(layouts[tp]["num_blocks"], alone["paged"]["num_blocks"])
            self.assertEqual(layouts[tp]["concurrent_sequences"], copies * alone["max_batch"])

    def test_an_engine_that_cannot_start_says_why(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("infer", llama, "--gpu", "a100-80", "-p", "fp32", "--prompt", "100", "--new-tokens", "20",
                "--cache", "paged")
        small = run(*args, "--gpu-memory", "560MiB")
        self.assertEqual(small.returncode, 3)
        self.assertIn("vLLM does not start", small.stdout)
        no_room = run(*args, "--gpu-memory", "2GiB", "--gpu-memory-utilization", "0.07", "--json")
        self.assertEqual(no_room.returncode, 3, no_room.stderr)
        # 0.07 x 2 GiB leaves the pool about 6 MB once the weights and activations are in: fewer than the 256 blocks
        # of one 4,096-token request
        p = json.loads(no_room.stdout)["paged"]
        self.assertTrue(p["requested_is_free"])
        self.assertFalse(p["engine_starts"])
        self.assertLess(p["num_blocks"], 256)

    def test_bad_input_is_one_line(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        base = ("infer", llama, "--gpu", "a100-80", "-p", "fp32", "--prompt", "100", "--new-tokens", "20",
                "--cache", "paged")
        self.assert_one_line_error(run(*base, "--block-size", "24"), 2, "--block-size must be one of")
        self.assert_one_line_error(run(*base, "--max-num-batched-tokens", "2000000"), 2, "7812 tokens each",
                                   "4096 positions")
        self.assert_one_line_error(run(*base, "--gpu-memory-utilization", "1.5"), 2, "--gpu-memory-utilization")
        self.assert_one_line_error(run(*base, "--kv-dtype", "fp4"), 2, "unknown --kv-dtype 'fp4'")
        self.assert_one_line_error(run(*base, "--max-model-len", "100"), 2, "exceeds max_model_len 100")
        self.assert_one_line_error(run(*base, "--max-model-len", "100000"), 2, "exceeds the model's 4096 positions")
        self.assert_one_line_error(run(*base, "--tp", "3"), 2, "does not divide the 4 attention heads")
        self.assert_one_line_error(run("infer", llama, "--gpu", "cpu", "-p", "fp32", "--prompt", "8", "--new-tokens",
                                       "4", "--cache", "paged"), 2, "on a GPU")
        self.assert_one_line_error(run("infer", os.path.join(TINY, "mistral-tiny.pt"), "--gpu", "a100-80", "-p",
                                       "fp32", "--prompt", "8", "--new-tokens", "4", "--cache", "paged"), 2,
                                   "sliding window")


class InferTensorParallelTest(OneLineErrorAssertions, unittest.TestCase):
    def test_each_rank_holds_its_share_and_a_degree_must_divide_the_heads(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "20", "--new-tokens", "5")
        one, two = infer_json(llama, *args), infer_json(llama, *args, "--tp", "2")
        self.assertEqual(two["tp"], 2)
        self.assertEqual(two["cache_bytes"] * 2, one["cache_bytes"])  # 1 of the 2 key/value heads per rank
        # the decoder layers' linears halve; embedding, LM head and norms stay whole
        self.assertLess(two["weights_bytes"], one["weights_bytes"])
        self.assertIn("tensor-parallel ranks", two["loop"])
        base = ("infer", llama, *args)
        self.assert_one_line_error(run(*base, "--tp", "4"), 2, "does not divide the 2 key/value heads", "vLLM")
        self.assert_one_line_error(run(*base, "--tp", "3"), 2, "does not divide the 4 attention heads")
        self.assert_one_line_error(run(*base, "--tp", "0"), 2, "--tp must be at least 1")
        # GPT-2 has no transformers tp_plan; vLLM splits it, its fused c_attn cut into q, k, v as Megatron's layout
        gpt2 = os.path.join(TINY, "gpt2-tiny.pt")
        self.assert_one_line_error(run("infer", gpt2, *args, "--tp", "2"), 2, "base_model_tp_plan")
        whole = infer_json(gpt2, "--gpu", "h100-80", "-p", "fp32", "--prompt", "20", "--new-tokens", "5",
                           "--cache", "paged")
        split = infer_json(gpt2, "--gpu", "h100-80", "-p", "fp32", "--prompt", "20", "--new-tokens", "5",
                           "--cache", "paged", "--tp", "2")
        self.assertEqual(split["tp"], 2)
        self.assertLess(split["weights_bytes"], whole["weights_bytes"])

    def test_gpus_compares_the_layouts_fitting_ones_first(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        j = infer_json(llama, "--gpu", "a100-80", "-p", "fp32", "-b", "2", "--prompt", "64", "--new-tokens", "8",
                       "--gpus", "4")
        layouts = {r["tp"]: r for r in j["layouts"]}
        self.assertEqual(sorted(layouts), [1, 2, 4])
        self.assertIn("does not divide the 2 key/value heads", layouts[4]["skipped"])
        self.assertEqual((layouts[1]["replicas"], layouts[2]["replicas"]), (4, 2))
        # the same per-GPU figures as --tp 2 alone
        two = infer_json(llama, "--gpu", "a100-80", "-p", "fp32", "-b", "2", "--prompt", "64", "--new-tokens", "8",
                         "--tp", "2")
        self.assertEqual(layouts[2]["nvidia_smi_bytes"], two["nvidia_smi_bytes"])
        self.assertAlmostEqual(layouts[2]["decode_tokens_per_s"], 2 * two["time"]["decode_tokens_per_s"], places=6)
        ranked = [r for r in j["layouts"] if "skipped" not in r]
        self.assertTrue(all(r["fits"] for r in ranked))
        rates = [r["decode_tokens_per_s"] for r in ranked]
        self.assertEqual(rates, sorted(rates, reverse=True))
        self.assert_one_line_error(run("infer", llama, "--gpu", "a100-80", "--prompt", "8", "--new-tokens", "4",
                                       "-p", "fp32", "--gpus", "4", "--tp", "2"), 2, "--gpus compares")
        # --max-batch: per layout, the batch --tp alone finds
        small = ("--gpu", "a100-80", "--gpu-memory", "2GiB", "-p", "fp32", "-b", "2", "--prompt", "512",
                 "--new-tokens", "8", "--max-batch")
        by_tp = {r["tp"]: r for r in infer_json(llama, *small, "--gpus", "2")["layouts"]}
        for tp in (1, 2):
            self.assertEqual(by_tp[tp]["max_batch"], infer_json(llama, *small, "--tp", str(tp))["max_batch"])
        self.assertGreater(by_tp[1]["max_batch"], 2)

    def test_a_gpu_rank_counts_its_nccl_buffers_and_its_all_reduces_time(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "a100-80", "-p", "fp32", "-b", "2", "--prompt", "64", "--new-tokens", "8")
        one, two = infer_json(llama, *args), infer_json(llama, *args, "--tp", "2")
        # the communicator's buffers sit outside the allocator: nvidia-smi sees them, the allocated peak does not
        self.assertGreater(two["nvidia_smi_bytes"] - two["peak_reserved_bytes"],
                           one["nvidia_smi_bytes"] - one["peak_reserved_bytes"])
        self.assertGreater(two["time"]["decode_step_s"], 0)


class InferDeviceMapTest(OneLineErrorAssertions, unittest.TestCase):
    """--device-map auto: accelerate's placement (compared with accelerate itself on every architecture) and each
    GPU's share of the weights and cache."""

    # an H100-class GPU a few MiB above its CUDA context: the tiny presets split over the GPUs
    SPLIT = ("--gpu", "h100-80", "--gpu-memory", "530MiB", "-p", "fp32")

    def test_the_placement_is_accelerates(self):
        import device_map_check

        cases = [f"{arch}:2:530MiB" for arch in ("llama", "gpt2", "opt", "bloom", "gpt_neo", "codegen", "gpt_bigcode",
                                                 "qwen2", "mistral")]
        cases += ["llama:3:524MiB", "gpt2:4:520MiB", "qwen2:4:520MiB"]
        for case in cases:
            line, same = device_map_check.check(os.environ["LLMEM_BIN"], TINY, case)
            self.assertTrue(same, line)

    def test_each_gpu_holds_its_layers_weights_and_cache(self):
        args = ("-b", "2", "--prompt", "32", "--new-tokens", "8")
        for arch in ("llama", "gpt2", "bloom"):
            model = os.path.join(TINY, f"{arch}-tiny.pt")
            whole = infer_json(model, *self.SPLIT, *args)
            split = infer_json(model, *self.SPLIT, *args, "--device-map", "auto", "--gpus", "3")
            gpus = split["devices"]
            self.assertEqual(len(gpus), 3)
            self.assertEqual(sum(g["weights_bytes"] for g in gpus), whole["weights_bytes"], arch)
            self.assertEqual(sum(g["cache_bytes"] for g in gpus), whole["cache_bytes"], arch)
            self.assertEqual(split["cache_bytes"], whole["cache_bytes"])
            self.assertGreater(sum(1 for g in gpus if g["weights_bytes"] > 0), 1, arch)

    def test_one_gpu_holding_the_whole_model_is_the_plain_estimate(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = ("--gpu", "h100-80", "-p", "fp32", "-b", "2", "--prompt", "32", "--new-tokens", "8")
        plain = infer_json(llama, *args)
        mapped = infer_json(llama, *args, "--device-map", "auto", "--gpus", "1")
        self.assertEqual({a["device"] for a in mapped["device_map"]}, {0})  # clean_device_map: {"": 0}
        gpu = mapped["devices"][0]
        self.assertEqual(gpu["prefill_peak_allocated_bytes"], plain["prefill"]["peak_allocated_bytes"])
        self.assertEqual(gpu["decode_peak_allocated_bytes"], plain["decode"]["peak_allocated_bytes"])

    def test_the_largest_batch_fits_every_gpu_and_one_more_does_not(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        args = (llama, "--gpu", "h100-80", "--gpu-memory", "470MiB", "-p", "fp32", "--prompt", "64", "--new-tokens",
                "8", "--device-map", "auto", "--gpus", "2")
        batch = infer_json(*args, "-b", "2", "--max-batch")["max_batch"]
        self.assertGreater(batch, 2)
        self.assertTrue(infer_json(*args, "-b", str(batch))["fits"])
        proc = run("infer", *args, "-b", str(batch + 1), "--json")
        self.assertEqual(proc.returncode, 3, proc.stderr)
        over = json.loads(proc.stdout)
        self.assertFalse(over["fits"])
        self.assertFalse(all(g["fits"] for g in over["devices"]))

    def test_bad_input_is_one_line(self):
        llama = os.path.join(TINY, "llama-tiny.pt")
        base = ("infer", llama, "--prompt", "8", "--new-tokens", "4", "-p", "fp32")
        self.assert_one_line_error(run(*base, "--gpu", "h100-80", "--gpu-memory", "410MiB", "--device-map", "auto",
                                       "--gpus", "2"), 2, "offloads", "not modelled")
        self.assert_one_line_error(run(*base, "--gpu", "h100-80", "--device-map", "auto"), 2, "--gpus")
        self.assert_one_line_error(run(*base, "--gpu", "cpu", "--device-map", "auto", "--gpus", "2"), 2, "--gpu")
        self.assert_one_line_error(run(*base, "--gpu", "h100-80", "--device-map", "balanced_low_0", "--gpus", "2"), 2,
                                   "unknown --device-map")
        self.assert_one_line_error(run(*base, "--gpu", "h100-80", "--device-map", "auto", "--gpus", "2", "--tp", "2"),
                                   2, "--device-map auto is modelled alone")


if __name__ == "__main__":
    unittest.main()
