"""What the command-line tests share: running the llmem binary (LLMEM_BIN) and the one-line error contract
(exit code, a single stderr line starting with "llmem: error: ")."""
import os
import subprocess

LLMEM = os.environ["LLMEM_BIN"]


def run(*args, preexec_fn=None):
    return subprocess.run([LLMEM, *args], capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


class OneLineErrorAssertions:
    """Mixin for unittest.TestCase."""

    def assert_one_line_error(self, proc, code, *needles):
        self.assertEqual(proc.returncode, code, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertTrue(lines[0].startswith("llmem: error: "), lines[0])
        for n in needles:
            self.assertIn(n, lines[0])
