#!/usr/bin/env python3
"""The training-recipe field of a real-run case (scripts/training_recipe.py, scripts/eager_runs.py): bad keys and
values get one error line and exit 2 before anything runs, defaults give the plain case, the recipe turns into
llmem's flags, the checkpointing options wrap the decoder layers torchtitan's rules name, and real steps show
what the loop variants keep alive (counting allocator: the extension is built under $LLMEM_BUILD_DIR)."""
import os
import subprocess
import sys
import unittest

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts")
sys.path.insert(0, SCRIPTS)
sys.path.insert(0, os.path.join(SCRIPTS, "..", "models"))

import training_recipe  # noqa: E402
from training_recipe import RecipeError, parse_recipe  # noqa: E402


def eager_runs(*cases):
    argv = [sys.executable, os.path.join(SCRIPTS, "eager_runs.py")]
    for c in cases:
        argv += ["--case", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


class ParallelRecipeTest(unittest.TestCase):
    """What distributed_worker.py's parallel methods take of a recipe, checked before any rank starts."""

    def assert_refused(self, recipe, method, *needles):
        import distributed_worker

        with self.assertRaises(RuntimeError) as caught:
            distributed_worker.check_parallel_recipe(parse_recipe(recipe), method)
        for n in needles:
            self.assertIn(n, str(caught.exception))

    def test_parallel_methods_take_the_loop_options_only(self):
        import distributed_worker

        for method in ("ddp", "zero1", "fsdp2", "zero2", "tp"):
            distributed_worker.check_parallel_recipe(parse_recipe("grad-accum=2"), method)
        for method in ("fsdp2", "zero2", "tp"):
            distributed_worker.check_parallel_recipe(parse_recipe("optimizer-in-backward=1"), method)
        # the loss and checkpointing change the model's forward, which the data-parallel engines wrap
        for method in ("ddp", "zero1", "fsdp2", "zero2"):
            distributed_worker.check_parallel_recipe(
                parse_recipe("loss=chunked-4,checkpointing=full,checkpointing-impl=non-reentrant"), method)
        self.assert_refused("loss=chunked-4", "tp", "loss", "tp")
        self.assert_refused("checkpointing=full", "fsdp2_tp", "checkpointing")
        self.assert_refused("keep-outputs=1", "ddp", "keep-outputs")
        # DDP's reducer runs after the post-accumulate-grad hooks: the step would see an unreduced gradient
        self.assert_refused("optimizer-in-backward=1", "ddp", "before the gradient is reduced")
        self.assert_refused("optimizer-in-backward=1", "zero1", "zero1")
        # the FSDP2 loop choice: FSDP2 methods only, with accumulation only
        distributed_worker.check_parallel_recipe(parse_recipe("grad-accum=2,fsdp-reduce-every-micro-batch=1"),
                                                 "fsdp2")
        self.assert_refused("grad-accum=2,fsdp-reduce-every-micro-batch=1", "ddp", "ddp")
        # PEFT LoRA runs under the engines llmem models with a frozen base; tensor parallelism is not one of them
        for method in ("ddp", "zero1", "fsdp2", "zero2"):
            distributed_worker.check_parallel_recipe(parse_recipe("lora-r=8,lora-targets=q_proj"), method)
        self.assert_refused("lora-r=8", "tp", "lora-r", "only single, ddp, zero1, fsdp2, zero2")
        with self.assertRaises(RecipeError):
            parse_recipe("fsdp-reduce-every-micro-batch=1")


class RecipeParserTest(unittest.TestCase):
    def assert_refused(self, text, *needles):
        with self.assertRaises(RecipeError) as caught:
            parse_recipe(text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for n in needles:
            self.assertIn(n, message)

    def test_defaults_are_the_plain_case(self):
        self.assertEqual(parse_recipe(""), {})
        self.assertEqual(parse_recipe("checkpointing=none,grad-accum=1,keep-outputs=0,loss=standard"), {})

    def test_values(self):
        recipe = parse_recipe("keep-outputs=1,checkpointing=every-2,checkpointing-impl=non-reentrant,grad-accum=4,"
                              "loss=chunked-8,grad-clip=0.5")
        self.assertEqual(recipe, {"keep-outputs": True, "checkpointing": "every-2",
                                  "checkpointing-impl": "non-reentrant", "grad-accum": 4, "loss": "chunked-8",
                                  "grad-clip": 0.5})
        self.assertEqual(training_recipe.recipe_text(recipe), "checkpointing=every-2,checkpointing-impl=non-reentrant,"
                         "grad-accum=4,loss=chunked-8,keep-outputs=1,grad-clip=0.5")

    def test_llmem_flags(self):
        self.assertEqual(training_recipe.llmem_flags(parse_recipe("optimizer-in-backward=1,checkpointing=full")),
                         ["--checkpointing", "full", "--optimizer-in-backward", "--drop-outputs"])
        self.assertEqual(training_recipe.llmem_flags(parse_recipe("keep-outputs=1")), ["--keep-outputs"])

    def test_bad_keys_and_values(self):
        self.assert_refused("checkpint=full", "unknown recipe key", "checkpint")
        self.assert_refused("checkpointing", "not key=value")
        self.assert_refused("checkpointing=partial", "checkpointing", "partial")
        self.assert_refused("checkpointing=every-0", "every-K", "'0'")
        self.assert_refused("checkpointing=full,checkpointing-impl=fast", "checkpointing-impl", "fast")
        self.assert_refused("grad-accum=0", "grad-accum", "positive integer")
        self.assert_refused("grad-accum=two", "grad-accum")
        self.assert_refused("loss=chunked-x", "chunked-N")
        self.assert_refused("keep-outputs=yes", "keep-outputs", "0 or 1")
        self.assert_refused("grad-clip=-1", "grad-clip", "positive")
        self.assert_refused("grad-clip=inf", "grad-clip")
        self.assert_refused("grad-accum=2,grad-accum=2", "twice")

    def test_lora_values(self):
        recipe = parse_recipe("quant=nf4,lora-r=8,lora-alpha=16,lora-dropout=0.05,lora-targets=q_proj+v_proj,"
                              "lora-modules-to-save=lm_head")
        self.assertEqual(recipe, {"lora-r": 8, "lora-alpha": 16.0, "lora-dropout": 0.05,
                                  "lora-targets": "q_proj+v_proj", "lora-modules-to-save": "lm_head",
                                  "quant": "nf4"})
        self.assertEqual(training_recipe.recipe_text(recipe), "lora-r=8,lora-alpha=16,lora-dropout=0.05,"
                         "lora-targets=q_proj+v_proj,lora-modules-to-save=lm_head,quant=nf4")
        self.assertEqual(training_recipe.llmem_flags(recipe),
                         ["--lora", "r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj",
                          "--lora-modules-to-save", "lm_head", "--quant", "nf4", "--drop-outputs"])
        # PEFT's defaults (lora_alpha 8, lora_dropout 0, no quantization) are dropped; targets all-linear is a value
        self.assertEqual(parse_recipe("lora-r=4,lora-alpha=8,lora-dropout=0,quant=none,lora-targets=all-linear"),
                         {"lora-r": 4, "lora-targets": "all-linear"})
        self.assertEqual(training_recipe.llmem_flags(parse_recipe("lora-r=4")),
                         ["--lora", "r=4,alpha=8,dropout=0", "--drop-outputs"])

    def test_lora_refusals(self):
        self.assert_refused("lora-alpha=16", "lora-alpha needs lora-r")
        self.assert_refused("quant=nf4", "quant needs lora-r", "frozen")
        self.assert_refused("lora-r=0", "lora-r", "positive integer")
        self.assert_refused("lora-r=8,lora-dropout=1", "lora-dropout", "[0, 1)")
        self.assert_refused("lora-r=8,lora-targets=q_proj+q_proj", "twice")
        self.assert_refused("lora-r=8,lora-targets=q_proj,v_proj", "not key=value")  # lists are joined by '+'
        self.assert_refused("lora-r=8,lora-modules-to-save=all-linear", "lora-modules-to-save")
        self.assert_refused("lora-r=8,quant=int4", "nf4, fp4, nf4-dq, fp4-dq, int8")

    def test_what_the_harness_cannot_run(self):
        self.assert_refused("loss=fused-linear", "fused-linear", "Triton")
        self.assert_refused("fsdp-param-dtype=bf16", "FSDP2")
        self.assert_refused("optimizer-impl=foreach", "optimizer-impl")

    def test_combinations_torchtune_refuses(self):
        self.assert_refused("optimizer-in-backward=1,grad-accum=2", "grad-accum")
        self.assert_refused("optimizer-in-backward=1,grad-clip=1", "grad-clip")
        self.assert_refused("checkpointing-impl=non-reentrant", "needs checkpointing")
        self.assert_refused("checkpointing=selective,checkpointing-impl=reentrant", "non-reentrant only")

    def test_eager_runs_refuses_in_one_line_before_running(self):
        for case, needle in [("llama:fp32:adamw:2x128:grad-accum=0", "grad-accum"),
                             ("llama:fp32:adamw:2x128:checkpointing=full:x", "ARCH:PRECISION:OPTIMIZER:BxS[:RECIPE]"),
                             ("llama:fp32:adamw:2x128:bogus=1", "bogus")]:
            # the good first case must not run: every case is checked first
            proc = eager_runs("llama:fp32:adamw:2x128", case)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertEqual(proc.stdout, "")
            lines = proc.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, proc.stderr)
            self.assertTrue(lines[0].startswith("eager_runs: error: "), lines[0])
            self.assertIn(needle, lines[0])


class CheckpointingLayersTest(unittest.TestCase):
    """Which decoder layers the checkpointing options wrap, on the tiny HF models (no step is run)."""

    @staticmethod
    def model(arch):
        import distributed_worker

        _, model, _, _ = distributed_worker.build_eager_model(arch, "tiny")
        return model, distributed_worker.decoder_layers(model)[1]

    def test_full_wraps_every_layer(self):
        model, layers = self.model("llama")
        self.assertEqual(training_recipe.apply_checkpointing(model, layers, parse_recipe("checkpointing=full")),
                         list(range(len(layers))))
        self.assertTrue(all(layer.gradient_checkpointing for layer in layers))

    def test_every_k_is_torchtitans_rule(self):
        model, layers = self.model("gpt2")
        self.assertEqual(len(layers), 4)
        wrapped = training_recipe.apply_checkpointing(model, layers, parse_recipe("checkpointing=every-2"))
        self.assertEqual(wrapped, [1, 3])  # torchtitan counts blocks from 1 and wraps count % K == 0
        self.assertEqual([layer.gradient_checkpointing for layer in layers], [False, True, False, True])

    def test_every_k_above_the_layers_is_refused(self):
        model, layers = self.model("gpt2")
        with self.assertRaises(RecipeError) as caught:
            training_recipe.apply_checkpointing(model, layers, parse_recipe("checkpointing=every-5"))
        self.assertIn("4 decoder layers", str(caught.exception))

    def test_a_model_hf_does_not_checkpoint_is_refused(self):
        model, layers = self.model("gpt_bigcode")  # transformers 4.57: plain nn.Module blocks
        with self.assertRaises(RecipeError) as caught:
            training_recipe.apply_checkpointing(model, layers, parse_recipe("checkpointing=full"))
        self.assertIn("GPTBigCodeBlock", str(caught.exception))


class EagerRecipeRunsTest(unittest.TestCase):
    """Real steps of the tiny Llama through the counting allocator: what the loop variants keep alive."""

    @classmethod
    def setUpClass(cls):
        import eager_runs

        cls.run_case = staticmethod(eager_runs.run_case)
        cls.plain = eager_runs.run_case("llama", "fp32", "adamw", 1, 64)

    def recipe_run(self, text):
        return self.run_case("llama", "fp32", "adamw", 1, 64, parse_recipe(text))

    def test_kept_outputs_hold_the_logits_into_the_next_forward(self):
        kept = self.recipe_run("keep-outputs=1")
        import distributed_worker

        _, model, _, _ = distributed_worker.build_eager_model("llama", "tiny")
        logits_bytes = 1 * 64 * model.config.vocab_size * 4  # fp32 logits of the previous step
        loss_bytes = 4  # and its fp32 loss, outputs.loss
        self.assertEqual(kept["start_bytes"] - self.plain["start_bytes"], logits_bytes + loss_bytes)
        self.assertEqual(kept["phase_peak_bytes"]["forward"] - self.plain["phase_peak_bytes"]["forward"],
                         logits_bytes + loss_bytes)
        self.assertEqual(kept["recipe"], {"keep-outputs": True})

    def test_accumulation_keeps_the_gradients_across_micro_batches(self):
        accum = self.recipe_run("grad-accum=2")
        first, second = accum["micro_batch_phase_peak_bytes"]
        self.assertEqual(first["forward"], self.plain["phase_peak_bytes"]["forward"])  # no gradient yet
        self.assertEqual(second["forward"] - first["forward"], accum["grad_bytes"])
        self.assertEqual(accum["grad_bytes"], accum["param_bytes"])
        self.assertEqual(accum["phase_peak_bytes"]["forward"], second["forward"])
        self.assertEqual(len(accum["losses"]), 2 * 2)

    def test_checkpointing_keeps_less_and_computes_the_same(self):
        full = self.recipe_run("checkpointing=full")
        every_2 = self.recipe_run("checkpointing=every-2")
        self.assertLess(full["phase_peak_bytes"]["forward"], every_2["phase_peak_bytes"]["forward"])
        self.assertLess(every_2["phase_peak_bytes"]["forward"], self.plain["phase_peak_bytes"]["forward"])
        self.assertEqual(full["losses"], self.plain["losses"])
        self.assertEqual(every_2["checkpointed_layers"], [1, 3])

    def test_optimizer_in_backward_leaves_no_gradients_for_the_step(self):
        in_backward = self.recipe_run("optimizer-in-backward=1")
        self.assertEqual(in_backward["grad_bytes"], 0)
        self.assertEqual(in_backward["optimizer_state_bytes"], self.plain["optimizer_state_bytes"])
        self.assertEqual(in_backward["losses"], self.plain["losses"])  # the same updates, one parameter at a time
        self.assertLess(in_backward["phase_peak_bytes"]["optimizer"], self.plain["phase_peak_bytes"]["optimizer"])


class LoraRunsTest(unittest.TestCase):
    """Real PEFT LoRA / QLoRA steps of the tiny Llama: only the adapters get gradients and optimizer states."""

    @staticmethod
    def lora_run(text):
        import eager_runs

        return eager_runs.run_case("llama", "fp32", "adamw", 1, 64, parse_recipe(text))

    def assert_only_adapters_train(self, rec):
        self.assertEqual(rec["grad_bytes"], rec["trainable_bytes"])
        self.assertEqual(rec["trainable_bytes"], 4 * rec["trainable_parameters"])  # fp32 adapters
        tensors = len(rec["optimizer_state_layout"])
        self.assertTrue(all(".lora_" in e["param"] for e in rec["optimizer_state_layout"]))
        self.assertEqual(rec["optimizer_state_bytes"], 2 * rec["trainable_bytes"] + 4 * tensors)  # + the steps

    def test_lora_on_the_attention_projections(self):
        rec = self.lora_run("lora-r=8,lora-alpha=16,lora-targets=q_proj+v_proj")
        # 4 layers, hidden 256, 2 key/value heads of 64: q 256 -> 256, v 256 -> 128; A is [r, in], B [out, r]
        self.assertEqual(rec["trainable_parameters"], 4 * 8 * ((256 + 256) + (256 + 128)))
        self.assertEqual(rec["frozen_parameters"], rec["num_parameters"])
        self.assert_only_adapters_train(rec)
        self.assertEqual(rec["lora"]["adapted_modules"], 8)
        self.assertFalse(rec["lora"]["input_require_grads_hook"])

    def test_checkpointing_gets_the_input_hook_and_trains_the_same(self):
        plain = self.lora_run("lora-r=8,lora-alpha=16")
        full = self.lora_run("lora-r=8,lora-alpha=16,checkpointing=full")
        self.assertTrue(full["lora"]["input_require_grads_hook"])  # PEFT's enable_input_require_grads()
        self.assertEqual(full["losses"], plain["losses"])  # the adapters were trained through the checkpoints
        self.assertLess(full["phase_peak_bytes"]["forward"], plain["phase_peak_bytes"]["forward"])

    def test_qlora_nf4_stores_the_linear_weights_packed(self):
        rec = self.lora_run("lora-r=8,lora-targets=all-linear,quant=nf4-dq")
        linear = 4 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688)  # q, o, k, v, gate, up, down
        self.assertEqual(rec["frozen_bytes_by_format"]["nf4-packed-uint8"], linear // 2)
        # embed_tokens, lm_head and the norms stay unquantized, fp32 after prepare_model_for_kbit_training
        self.assertEqual(rec["frozen_bytes_by_format"]["float32"], 4 * (rec["num_parameters"] - linear))
        self.assertEqual(rec["quant"]["state_bytes_by_part"]["absmax"], linear // 64)  # uint8: double quant
        self.assertEqual(rec["lora"]["adapted_modules"], 28)  # every Linear4bit, not lm_head
        self.assert_only_adapters_train(rec)


    def test_int8_stores_the_linear_weights_row_wise(self):
        rec = self.lora_run("lora-r=8,lora-targets=all-linear,quant=int8")
        linear = 4 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688)  # q, o, k, v, gate, up, down
        self.assertEqual(rec["frozen_bytes_by_format"]["int8-rowwise"], linear)
        self.assertEqual(rec["frozen_bytes_by_format"]["float32"], 4 * (rec["num_parameters"] - linear))
        # SCB: one fp32 absmax per output row (q 256, k 128, v 128, o 256, gate 688, up 688, down 256)
        self.assertEqual(rec["quant"]["state_bytes_by_part"]["SCB"], 4 * 4 * (2 * 256 + 2 * 128 + 2 * 688 + 256))
        self.assertEqual(rec["lora"]["adapted_modules"], 28)
        self.assert_only_adapters_train(rec)


class ProcessWideStateTest(unittest.TestCase):
    """Many cases share one eager_runs.py process: what a library singleton holds of one case's model must be
    gone before the next case's baseline, or the next case measures that memory too small."""

    def test_the_8bit_optimizer_manager_lets_go_of_the_previous_model(self):
        import gc
        import weakref

        import bitsandbytes
        import torch

        import eager_runs

        embedding = torch.nn.Embedding(16, 4)
        bitsandbytes.optim.GlobalOptimManager.get_instance().register_module_override(
            embedding, "weight", {"optim_bits": 32})
        alive = weakref.ref(embedding.weight)
        del embedding
        gc.collect()
        self.assertIsNotNone(alive(), "the manager holds the module it was given")
        eager_runs.release_process_wide_state()
        gc.collect()
        self.assertIsNone(alive())


if __name__ == "__main__":
    unittest.main()
