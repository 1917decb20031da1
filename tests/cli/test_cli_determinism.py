#!/usr/bin/env python3
"""The same command gives byte-identical output, run to run and whatever the number of threads recommend's sweep
runs on (LLMEM_THREADS): estimate, recommend and infer, as text, JSON and files (trace, memory snapshot, plot).
Needs LLMEM_BIN, LLMEM_TINY_MODELS and LLMEM_MODELS_DIR."""
import os
import subprocess
import sys
import tempfile
import unittest

LLMEM = os.environ["LLMEM_BIN"]
TINY = os.environ["LLMEM_TINY_MODELS"]
MODELS = os.environ["LLMEM_MODELS_DIR"]

COMMANDS = {
    "estimate": ["estimate", os.path.join(TINY, "llama-tiny.pt"), "-b", "2", "-s", "128", "--gpu", "a100-80"],
    "estimate-zero3-lora": ["estimate", os.path.join(MODELS, "llama-2-7b.meta.pt"), "-b", "2", "-s", "1024",
                            "--dp", "4", "--engine", "zero3", "--lora", "r=8,alpha=16,targets=q_proj,v_proj",
                            "--checkpointing", "full"],
    "estimate-moe": ["estimate", os.path.join(TINY, "mixtral-tiny.pt"), "-b", "2", "-s", "64", "--tp", "2"],
    "recommend": ["recommend", os.path.join(MODELS, "llama-2-7b.meta.pt"), "--gpus", "8", "--seq", "2048"],
    "recommend-global-batch": ["recommend", os.path.join(TINY, "gpt2-tiny.pt"), "--gpus", "4", "--gpu", "a100-40",
                               "--global-batch", "32", "--seq", "256"],
    "infer": ["infer", os.path.join(MODELS, "llama-2-7b-bf16.meta.pt"), "-b", "4", "--prompt", "512",
              "--new-tokens", "64", "--max-batch"],
    "infer-gpus": ["infer", os.path.join(MODELS, "llama-2-7b-bf16.meta.pt"), "--gpus", "4", "--prompt", "1024",
                   "--new-tokens", "32"],
}


class DeterminismTest(unittest.TestCase):
    def outputs(self, args, threads, files=()):
        """stdout, and the bytes of every file the command wrote."""
        with tempfile.TemporaryDirectory() as tmp:
            paths = [os.path.join(tmp, name) for name in files]
            extra = [a for flag, p in zip(("--trace", "--snapshot", "--plot"), paths) for a in (flag, p)]
            proc = subprocess.run([LLMEM, *args, *extra], capture_output=True, timeout=600,
                                  env=dict(os.environ, LLMEM_THREADS=str(threads)))
            self.assertIn(proc.returncode, (0, 3), proc.stderr.decode())
            written = []
            for p in paths:
                with open(p, "rb") as f:
                    written.append(f.read())
            return proc.stdout, written

    def test_every_command_repeats_its_text_and_json_byte_for_byte_on_any_thread_count(self):
        for name, args in COMMANDS.items():
            for form in ([], ["--json"]):
                with self.subTest(command=name, json=bool(form)):
                    first = self.outputs(args + form, threads=1)
                    self.assertTrue(first[0])
                    self.assertEqual(self.outputs(args + form, threads=1), first)
                    self.assertEqual(self.outputs(args + form, threads=3), first)

    def test_the_trace_snapshot_and_plot_files_repeat_byte_for_byte(self):
        files = ("step.tsv", "step.pickle", "step.svg")
        first = self.outputs(COMMANDS["estimate"], 1, files)
        for written in first[1]:
            self.assertGreater(len(written), 100)
        self.assertEqual(self.outputs(COMMANDS["estimate"], 2, files), first)

    def test_a_bad_thread_count_is_one_line(self):
        proc = subprocess.run([LLMEM, *COMMANDS["recommend"]], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, LLMEM_THREADS="many"))
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.strip().splitlines(), ["llmem: error: LLMEM_THREADS must be a whole number of "
                                                            "threads from 1 to 4096, not 'many'"])


if __name__ == "__main__":
    sys.argv[1:1] = ["-v"]
    unittest.main()
