#!/usr/bin/env python3
"""End-to-end tests of torch.export programs (.pt2) as llmem's model input: the answer of estimate, recommend and
inspect does not depend on the format of the file (the tiny exports of models/export_hf.py in both formats), and
archives that are not programs llmem reads get one line and exit 2. Needs LLMEM_BIN and LLMEM_TINY_MODELS."""
import json
import os
import subprocess
import sys
import tempfile
import unittest
import zipfile

LLMEM = os.environ["LLMEM_BIN"]
TINY = os.environ["LLMEM_TINY_MODELS"]


def run(*args):
    return subprocess.run([LLMEM, *args], capture_output=True, text=True, timeout=600)


def without_model(report):
    """The JSON report less the fields that name the file and how long the run took."""
    report.pop("model", None)
    report.pop("seconds", None)
    return report


class ProgramInputTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def same_answer(self, *args, archs=("llama", "gpt2", "mixtral")):
        for arch in archs:
            with self.subTest(arch=arch, args=args):
                answers = []
                for suffix in (".pt", ".pt2"):
                    proc = run(args[0], os.path.join(TINY, f"{arch}-tiny{suffix}"), *args[1:], "--json")
                    self.assertIn(proc.returncode, (0, 3), proc.stderr)
                    answers.append(without_model(json.loads(proc.stdout)))
                self.assertEqual(answers[0], answers[1])

    def test_estimate_does_not_depend_on_the_format(self):
        self.same_answer("estimate", "-b", "2", "-s", "128")
        self.same_answer("estimate", "-b", "1", "-s", "96", "-p", "fp32", "--checkpointing", "full")

    def test_recommend_does_not_depend_on_the_format(self):
        self.same_answer("recommend", "--gpus", "4", "--gpu", "a100-40", "-s", "256", archs=("llama", "gpt2"))

    def test_inspect_does_not_depend_on_the_format(self):
        a = run("inspect", os.path.join(TINY, "qwen2-tiny.pt"), "-s", "64", "--ir")
        b = run("inspect", os.path.join(TINY, "qwen2-tiny.pt2"), "-s", "64", "--ir")
        self.assertEqual(a.returncode, 0, a.stderr)
        self.assertEqual(b.returncode, 0, b.stderr)

        def canonical(text):  # value numbers are each importer's own
            import re
            return re.sub(r"%\d+", "%", re.sub(r"const%\d+", "C", text))

        self.assertEqual(canonical(a.stdout), canonical(b.stdout))

    def refused(self, path, *words):
        proc = run("estimate", path, "-b", "1", "-s", "16")
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        self.assertEqual(len(lines), 1, proc.stderr)
        for w in words:
            self.assertIn(w, lines[0])
        self.assertNotIn("Traceback", proc.stderr)
        return lines[0]

    def rewritten(self, name, change):
        """A copy of the tiny llama program whose records `change(name, bytes)` rewrites (None drops a record)."""
        src = os.path.join(TINY, "llama-tiny.pt2")
        out = self.path(name)
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
            for info in zin.infolist():
                data = change(info.filename, zin.read(info))
                if data is not None:
                    zout.writestr(info, data)
        return out

    def test_archive_without_a_program(self):
        path = self.rewritten("no_program.pt2", lambda n, d: None if n.endswith("models/model.json") else d)
        self.refused(path, "no models/<name>.json")

    def test_truncated_program_json(self):
        path = self.rewritten("cut_json.pt2", lambda n, d: d[:len(d) // 2] if n.endswith("models/model.json") else d)
        self.refused(path, "not valid JSON")

    def test_newer_schema_version(self):
        def newer(name, data):
            if not name.endswith("models/model.json"):
                return data
            program = json.loads(data)
            program["schema_version"] = {"major": 99, "minor": 0}
            return json.dumps(program).encode()
        self.refused(self.rewritten("newer.pt2", newer), "schema version 99.0", "newer than supported")

    def test_malformed_member(self):
        def renamed(name, data):
            if not name.endswith("models/model.json"):
                return data
            program = json.loads(data)
            program["graph_module"]["signature"]["input_specs"][0]["parameter"]["parameter_name"] = 5
            return json.dumps(program).encode()
        self.refused(self.rewritten("malformed.pt2", renamed), "malformed")

    def test_truncated_archive(self):
        with open(os.path.join(TINY, "llama-tiny.pt2"), "rb") as f:
            head = f.read(5000)
        path = self.path("truncated.pt2")
        with open(path, "wb") as f:
            f.write(head)
        self.refused(path, "truncated or damaged")

    def test_program_that_returns_no_loss(self):
        # forward(input_ids, labels) -> the hidden states: not a training loss.
        script = (
            "import sys, torch\n"
            "class M(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.emb = torch.nn.Embedding(64, 8)\n"
            "    def forward(self, input_ids, labels):\n"
            "        return self.emb(input_ids)\n"
            "ids = torch.zeros(2, 4, dtype=torch.long)\n"
            "d = torch.export.Dim.DYNAMIC\n"
            "ep = torch.export.export(M(), (ids, ids), dynamic_shapes=({0: d, 1: d}, {0: d, 1: d}))\n"
            "torch.export.save(ep, sys.argv[1])\n")
        path = self.path("hidden.pt2")
        proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.refused(path, "not a decoder LM", "scalar")


if __name__ == "__main__":
    unittest.main()
