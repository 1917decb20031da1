#!/usr/bin/env python3
"""End-to-end tests of `--hf-config`: a user's Hugging Face config.json as the model of estimate, recommend, inspect
and infer. The config is traced on the meta device by models/export_hf.py once and cached; the answers must equal
those for the exporter's own export of the same architecture, and every config that is not a decoder LM (or that
the exporter cannot trace) is one line on stderr and exit 2. Needs LLMEM_BIN and LLMEM_TINY_MODELS."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
import export_hf  # noqa: E402  (the presets: the config of each tiny export)

LLMEM = os.environ["LLMEM_BIN"]
TINY = os.environ["LLMEM_TINY_MODELS"]


def preset_config(arch):
    """The config.json a user would have for the tiny preset of `arch`."""
    return dict(export_hf.PRESETS[arch]["tiny"], model_type=export_hf.ARCH_TYPES[arch],
                architectures=["ForCausalLM"], torch_dtype="float32", transformers_version="4.57.6")


class HfConfigTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.env = dict(os.environ, LLMEM_CACHE_DIR=os.path.join(cls.tmp.name, "cache"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_llmem(self, *args):
        return subprocess.run([LLMEM, *args], capture_output=True, text=True, timeout=600, env=self.env)

    def write_config(self, name, config):
        directory = os.path.join(self.tmp.name, name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
        return directory

    def cached_exports(self):
        directory = os.path.join(self.tmp.name, "cache", "exports")
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []

    def assert_refused(self, proc, *phrases):
        self.assertEqual(proc.returncode, 2, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith("llmem: error: "), lines[0])
        for phrase in phrases:
            self.assertIn(phrase, lines[0])

    def test_a_config_gives_the_estimate_of_its_architectures_export_and_is_traced_once(self):
        # The default precision is bf16 autocast: Qwen3's q/k norms, GPT-Neo's mask value and CodeGen's attention
        # cast to autocast's dtype, which a meta trace learns from a forward on fake CPU tensors (OPT's branches on
        # a random draw there); CodeGen's forward casts its logits (infer below).
        archs = ("llama", "gpt2", "qwen3", "gpt_neo", "codegen", "opt", "mixtral")  # Mixtral: balanced routing
        for arch in archs:
            directory = self.write_config(f"{arch}-model", preset_config(arch))
            step = ["estimate", "--gpu", "cpu", "-b", "2", "-s", "64", "--json"]
            from_config = self.run_llmem(*step, "--hf-config", directory)
            self.assertEqual(from_config.returncode, 0, from_config.stderr)
            self.assertEqual(from_config.stderr, "")  # no progress line when stderr is not a terminal
            from_export = self.run_llmem(*step, os.path.join(TINY, f"{arch}-tiny.pt"))
            self.assertEqual(from_export.returncode, 0, from_export.stderr)
            got, want = json.loads(from_config.stdout), json.loads(from_export.stdout)
            self.assertTrue(got.pop("model").endswith(".meta.pt"))
            want.pop("model")
            self.assertEqual(got, want, arch)
        exports = self.cached_exports()
        self.assertEqual(len(exports), len(archs), exports)
        # The file itself (and the model directory holding it) hit the cache: nothing is traced again.
        again = self.run_llmem("estimate", "--gpu", "cpu", "-b", "1", "-s", "32",
                               "--hf-config", os.path.join(self.tmp.name, "llama-model", "config.json"))
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(self.cached_exports(), exports)

    def test_recommend_inspect_and_infer_take_a_config(self):
        directory = self.write_config("llama-model", preset_config("llama"))
        export = os.path.join(TINY, "llama-tiny.pt")
        generate = ["infer", "--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "32", "--new-tokens", "4", "--json"]
        codegen = self.run_llmem(*generate, "--hf-config", self.write_config("codegen-model", preset_config("codegen")))
        self.assertEqual(codegen.returncode, 0, codegen.stderr)
        want = self.run_llmem(*generate, os.path.join(TINY, "codegen-tiny.pt"))
        self.assertEqual(want.returncode, 0, want.stderr)
        self.assertEqual(json.loads(codegen.stdout)["prefill"], json.loads(want.stdout)["prefill"])
        for command in (["inspect", "--json"],
                        ["recommend", "--gpus", "4", "--gpu", "a100-80", "--seq", "256", "--json"],
                        ["infer", "--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "32", "--new-tokens", "4",
                         "--json"]):
            from_config = self.run_llmem(*command, "--hf-config", directory)
            self.assertEqual(from_config.returncode, 0, from_config.stderr)
            from_export = self.run_llmem(*command, export)
            self.assertEqual(from_export.returncode, 0, from_export.stderr)
            got, want = json.loads(from_config.stdout), json.loads(from_export.stdout)
            for answer in (got, want):
                answer.pop("model", None)
                answer.pop("seconds", None)  # inspect's own time
            self.assertEqual(got, want, command[0])

    def test_a_pure_bf16_step_traces_the_config_in_bf16(self):
        directory = self.write_config("llama-bf16", preset_config("llama"))
        proc = self.run_llmem("estimate", "--gpu", "cpu", "-p", "bf16", "-b", "2", "-s", "64", "--json",
                              "--hf-config", directory)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("-bfloat16-", os.path.basename(json.loads(proc.stdout)["model"]))
        want = self.run_llmem("estimate", "--gpu", "cpu", "-p", "bf16", "-b", "2", "-s", "64", "--json",
                              os.path.join(TINY, "llama-tiny-bf16.pt"))
        self.assertEqual(want.returncode, 0, want.stderr)
        self.assertEqual(json.loads(proc.stdout)["phase_peak_bytes"], json.loads(want.stdout)["phase_peak_bytes"])

    def test_a_terminal_sees_a_progress_line_unless_json(self):
        import pty
        directory = self.write_config("gpt2-progress", preset_config("gpt2"))
        for extra, expected in (([], True), (["--json"], False)):
            master, slave = pty.openpty()
            env = dict(self.env, LLMEM_CACHE_DIR=os.path.join(self.tmp.name, "progress-cache" + "".join(extra)))
            proc = subprocess.run([LLMEM, "estimate", "--gpu", "cpu", *extra, "--hf-config", directory],
                                  stdout=subprocess.PIPE, stderr=slave, env=env, timeout=600)
            os.close(slave)
            err = b""
            try:
                while chunk := os.read(master, 4096):
                    err += chunk
            except OSError:  # the terminal's other end is closed: all was read
                pass
            os.close(master)
            self.assertEqual(proc.returncode, 0, err)
            self.assertEqual(b"llmem: tracing " in err, expected, err)
            self.assertEqual(b"llmem: traced in " in err, expected, err)

    def test_configs_that_are_not_a_decoder_lm_are_one_line_and_exit_2(self):
        cases = {
            "t5": ({"model_type": "t5"}, ["encoder-decoder"]),
            "bert": ({"model_type": "bert"}, ["encoder-only"]),
            "vit": ({"model_type": "vit"}, ["no causal language model"]),
            "unknown": ({"model_type": "frobnicator"}, ["unknown model_type 'frobnicator'"]),
            "no-type": ({"hidden_size": 64}, ["has no model_type"]),
            "a-list": ("[1, 2]", ["not a Hugging Face config"]),
            "truncated": ('{"model_type": "llama", ', ["not a JSON config"]),
            "remote-code": ({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "m.M"}}, ["trust_remote_code"]),
            "moe": (dict(preset_config("olmo"), model_type="olmoe", num_experts=4), ["mixture-of-experts",
                                                                                 "modelled: mixtral, qwen2_moe"]),
            # Builds, but the trace cannot: the reason comes through as one line.
            "bad-heads": (dict(preset_config("llama"), num_attention_heads=3, num_key_value_heads=3), []),
        }
        for name, (config, phrases) in cases.items():
            with self.subTest(name):
                proc = self.run_llmem("estimate", "--gpu", "cpu", "--hf-config", self.write_config(name, config))
                self.assert_refused(proc, "cannot export", *phrases)
        self.assertEqual([e for e in self.cached_exports() if not e.endswith(".meta.pt")], [])  # no partial file

    def test_model_sources_that_cannot_be_read(self):
        empty = os.path.join(self.tmp.name, "empty-dir")
        os.makedirs(empty, exist_ok=True)
        self.assert_refused(self.run_llmem("estimate", "--hf-config", empty), "no config file", "config.json")
        self.assert_refused(self.run_llmem("estimate", "--hf-config", os.path.join(self.tmp.name, "nope.json")),
                            "no config file")
        directory = self.write_config("llama-model", preset_config("llama"))
        self.assert_refused(self.run_llmem("estimate", os.path.join(TINY, "llama-tiny.pt"), "--hf-config", directory),
                            "not both")
        self.assert_refused(self.run_llmem("estimate", "--gpu", "cpu"), "give the model")
        self.assert_refused(self.run_llmem("measure", "--hf-config", directory), "export with weights")
        env = dict(self.env, LLMEM_PYTHON=os.path.join(self.tmp.name, "no-python"),
                   LLMEM_CACHE_DIR=os.path.join(self.tmp.name, "other-cache"))
        proc = subprocess.run([LLMEM, "estimate", "--hf-config", directory], capture_output=True, text=True, env=env)
        self.assert_refused(proc, "Python", "LLMEM_PYTHON")

    def test_a_mixture_of_experts_export_says_its_routing_and_runs_steps_with_idle_experts(self):
        export = os.path.join(TINY, "mixtral-tiny.pt")
        proc = self.run_llmem("estimate", "--gpu", "cpu", "-b", "2", "-s", "64", "--json", export)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(any("routing taken as balanced, each of the 8 experts" in a
                            for a in json.loads(proc.stdout)["assumptions"]))
        # 1 x 2 tokens x top-2 = 4 slots for 8 experts, and a decode step of 2 sequences: experts without rows.
        for command in (["estimate", "--gpu", "cpu", "-b", "1", "-s", "2"],
                        ["infer", "--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "16", "--new-tokens", "3"]):
            proc = self.run_llmem(*command, export)
            self.assertEqual(proc.returncode, 0, proc.stderr)
        # Routing blocks llmem does not model are refused by name.
        olmoe = dict(preset_config("olmo"), model_type="olmoe", num_experts=4, num_experts_per_tok=2)
        self.assert_refused(self.run_llmem("estimate", "--hf-config", self.write_config("olmoe", olmoe)),
                            "olmoe", "modelled: mixtral, qwen2_moe")

    def test_moe_imbalance_traces_the_busiest_expert_and_is_checked_against_an_export(self):
        mixtral = self.write_config("mixtral", preset_config("mixtral"))
        args = ["estimate", "-b", "2", "-s", "256", "--json"]
        balanced = self.run_llmem(*args, "--hf-config", mixtral)
        busy = self.run_llmem(*args, "--hf-config", mixtral, "--moe-imbalance", "3")
        self.assertEqual(balanced.returncode, 0, balanced.stderr)
        self.assertEqual(busy.returncode, 0, busy.stderr)
        balanced, busy = json.loads(balanced.stdout), json.loads(busy.stdout)
        self.assertTrue(any("the busiest of the 8 experts of a layer gets 3 x" in a for a in busy["assumptions"]))
        # The busiest expert's transient rows: 3 x 128 rows of the MLP instead of 128, over the same saved tensors.
        self.assertGreater(busy["peak_allocated_bytes"], balanced["peak_allocated_bytes"])
        # An export traced balanced is not silently taken as imbalanced; a dense model has no experts.
        self.assert_refused(self.run_llmem("estimate", os.path.join(TINY, "mixtral-tiny.pt"), "--moe-imbalance", "3"),
                            "traced with its busiest expert at 1x", "--moe-imbalance 3")
        self.assert_refused(self.run_llmem("estimate", os.path.join(TINY, "llama-tiny.pt"), "--moe-imbalance", "2"),
                            "mixture-of-experts")
        self.assert_refused(self.run_llmem("estimate", "--hf-config", mixtral, "--moe-imbalance", "9"),
                            "between 1 (balanced) and 8")

    def test_a_multi_query_model_on_the_math_attention_is_refused_not_underestimated(self):
        # Falcon-7B's layout: one key/value head that SDPA broadcasts; no fused kernel takes it.
        falcon = {"model_type": "falcon", "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "vocab_size": 512, "multi_query": True, "parallel_attn": True, "bias": False, "alibi": False,
                  "new_decoder_architecture": False}
        proc = self.run_llmem("estimate", "--gpu", "h100-80", "-b", "1", "-s", "128",
                              "--hf-config", self.write_config("falcon", falcon))
        self.assert_refused(proc, "math attention", "1 key/value head(s) over 4 query heads")


if __name__ == "__main__":
    unittest.main()
