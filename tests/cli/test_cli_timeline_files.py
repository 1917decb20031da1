#!/usr/bin/env python3
"""End-to-end tests of the files llmem draws: `estimate --snapshot` (a PyTorch memory snapshot that PyTorch's own
viewer reads: `python -m torch.cuda._memory_viz`), `estimate --plot` and `recommend --plot` (SVG / HTML pictures,
rendered in headless Chromium and looked at pixel by pixel). Needs LLMEM_BIN and LLMEM_TINY_MODELS."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

LLMEM = os.environ["LLMEM_BIN"]
TINY = os.environ["LLMEM_TINY_MODELS"]
MODEL = os.path.join(TINY, "llama-tiny.pt")


def run(*args):
    return subprocess.run([LLMEM, *args], capture_output=True, text=True, timeout=600)


def memory_viz(*args):
    return subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", *args], capture_output=True, text=True,
                          timeout=600)


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class TimelineFilesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def estimate(self, *args):
        proc = run("estimate", MODEL, "-b", "2", "-s", "128", "--json", *args)
        self.assertIn(proc.returncode, (0, 3), proc.stderr)
        return json.loads(proc.stdout)

    def test_snapshot_replays_the_estimates_allocator_and_pytorchs_viewer_reads_it(self):
        snapshot = self.path("h100.pickle")
        est = self.estimate("--gpu", "h100-80", "--snapshot", snapshot)
        with open(snapshot, "rb") as f:
            raw = f.read()
        self.assertLessEqual(raw[1], 4)  # pickle protocol <= 4, as the viewer's loader takes
        data = pickle.loads(raw)
        trace = data["device_traces"][0]
        # The caching allocator never releases a segment in a step that fits: what it holds at the end is the
        # estimate's peak reserved, in as many segments as it cudaMalloc'ed.
        self.assertEqual(sum(s["total_size"] for s in data["segments"]), est["peak_reserved_bytes"])
        self.assertEqual(sum(e["action"] == "segment_alloc" for e in trace), len(data["segments"]))
        # Every alloc is freed once (requested, then completed) at the same address, or live at the end of the step
        # in a block of a segment.
        live = {}
        peak = allocated = 0
        for e in trace:
            if e["action"] == "alloc":
                self.assertNotIn(e["addr"], live)
                live[e["addr"]] = e["size"]
                allocated += (e["size"] + 511) // 512 * 512  # the small pool's rounding; large requests here too
                peak = max(peak, allocated)
            elif e["action"] == "free_completed":
                allocated -= (live.pop(e["addr"]) + 511) // 512 * 512
        ends = {b["address"] for s in data["segments"] for b in s["blocks"] if b["state"] == "active_allocated"}
        self.assertEqual(set(live), ends)
        self.assertLessEqual(peak, est["peak_allocated_bytes"])
        self.assertTrue(all(e["frames"] and e["category"] for e in trace if e["action"] == "alloc"))
        # PyTorch's own readers: the segment summary's accounting, the trace's replay, and the HTML viewer.
        stats = memory_viz("stats", snapshot)
        self.assertEqual(stats.returncode, 0, stats.stderr)
        self.assertIn(f"segments: {len(data['segments'])}", stats.stdout)
        printed = memory_viz("trace", snapshot)
        self.assertEqual(printed.returncode, 0, printed.stderr)
        self.assertIn(f"{len(trace)} entries", printed.stdout)
        self.assertIn("cudaMalloc", printed.stdout)
        html = self.path("trace.html")
        plot = memory_viz("trace_plot", snapshot, "-o", html)
        self.assertEqual(plot.returncode, 0, plot.stderr)
        with open(html) as f:
            self.assertIn("snapshot.pickle", f.read())

    def test_a_step_that_does_not_fit_ends_in_an_out_of_memory_event(self):
        snapshot = self.path("oom.pickle")
        est = self.estimate("--gpu", "h100-80", "--gpu-memory", "500MiB", "--snapshot", snapshot)
        self.assertFalse(est["fits"])
        with open(snapshot, "rb") as f:
            data = pickle.load(f)
        trace = data["device_traces"][0]
        self.assertEqual(trace[-1]["action"], "oom")
        self.assertEqual([e["action"] for e in trace].count("oom"), 1)
        # What the device had left beside the reserved segments, which the failed request (its segment) passes.
        self.assertEqual(trace[-1]["device_free"] + sum(s["total_size"] for s in data["segments"]),
                         500 * 2**20 - est["fixed_overhead_bytes"])
        printed = memory_viz("trace", snapshot)
        self.assertEqual(printed.returncode, 0, printed.stderr)
        self.assertIn("raise OutOfMemoryError", printed.stdout)

    def test_the_cpu_targets_snapshot_peaks_at_the_estimate(self):
        snapshot = self.path("cpu.pickle")
        est = self.estimate("--gpu", "cpu", "--snapshot", snapshot)
        with open(snapshot, "rb") as f:
            trace = pickle.load(f)["device_traces"][0]
        live = peak = 0
        for e in trace:
            live += e["size"] if e["action"] == "alloc" else -e["size"] if e["action"] == "free_completed" else 0
            peak = max(peak, live)
        self.assertEqual(peak, est["peak_allocated_bytes"])  # exact sizes on the cpu target

    def test_plot_marks_the_peak_and_capacity_and_renders_in_a_browser(self):
        svg_path = self.path("step.svg")
        est = self.estimate("--gpu", "h100-80", "--gpu-memory", "700MiB", "--plot", svg_path)
        root = ET.parse(svg_path).getroot()
        texts = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
        for word in ("forward", "backward", "optimizer", "peak", "weights", "optimizer states", "for the allocator"):
            self.assertIn(word, texts)
        paths = [p for p in root.iter("{http://www.w3.org/2000/svg}path")]
        self.assertGreaterEqual(len(paths), 4)  # one area per category that holds bytes
        html_path = self.path("step.html")
        self.estimate("--gpu", "h100-80", "--gpu-memory", "700MiB", "--plot", html_path)
        browser = chromium()
        self.assertIsNotNone(browser, "chromium is installed by scripts/setup.sh")
        png = self.path("step.png")
        shot = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--screenshot={png}", "--window-size=1000,560", "file://" + html_path],
                              capture_output=True, text=True, timeout=300)
        self.assertTrue(os.path.exists(png), shot.stderr[-2000:])
        from PIL import Image
        image = Image.open(png).convert("RGB")
        self.assertEqual(image.size, (1000, 560))
        colours = {c for _, c in image.getcolors(1 << 20)}
        # The weights' and optimizer states' fills are on the screen, and the capacity line's red (antialiased).
        for fill in ((0x4e, 0x79, 0xa7), (0xe1, 0x57, 0x59)):
            self.assertIn(fill, colours)
        self.assertTrue(any(r > 180 and g < 60 and b < 60 for r, g, b in colours))
        if os.environ.get("LLMEM_KEEP_PLOT"):  # the README picture: LLMEM_KEEP_PLOT=docs/step.png
            shutil.copy(png, os.environ["LLMEM_KEEP_PLOT"])
        self.assertGreater(est["peak_allocated_bytes"], 0)

    def test_recommend_plot_draws_every_layout_and_marks_the_recommended_one(self):
        args = ["recommend", MODEL, "--gpus", "4", "--gpu", "a100-80", "--seq", "256"]
        proc = run(*args, "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        rec = json.loads(proc.stdout)
        svg_path, html_path = self.path("layouts.svg"), self.path("layouts.html")
        for path in (svg_path, html_path):
            drawn = run(*args, "--plot", path)
            self.assertEqual(drawn.returncode, 0, drawn.stderr)
        texts = ["".join(t.itertext()) for t in ET.parse(svg_path).getroot().iter("{http://www.w3.org/2000/svg}text")]
        recommended = [t for t in texts if t.endswith("(recommended)")]
        self.assertEqual(len(recommended), 1)
        self.assertTrue(recommended[0].startswith(rec["recommended"]), (recommended, rec["recommended"]))
        fitting = [p for p in rec["plans"] if p.get("fits")]
        self.assertEqual(sum(t.endswith("tokens/s") for t in texts), len(fitting))
        self.assertTrue(any(t.startswith("capacity") for t in texts))
        png = self.path("layouts.png")
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={png}", "--window-size=1000,600", "file://" + html_path],
                       capture_output=True, timeout=300)
        from PIL import Image
        colours = {c for _, c in Image.open(png).convert("RGB").getcolors(1 << 20)}
        for fill in ((0x4e, 0x79, 0xa7), (0x59, 0xa1, 0x4f), (0xff, 0xf3, 0xc4)):  # memory, throughput, the pick
            self.assertIn(fill, colours)

    def test_bad_timeline_paths_are_one_line_and_exit_2(self):
        for flag, path, phrase in (("--snapshot", "/nonexistent/dir/x.pickle", "cannot write the snapshot"),
                                   ("--plot", self.path("x.png"), ".svg or .html"),
                                   ("--plot", "/nonexistent/dir/x.svg", "cannot write the plot")):
            proc = run("estimate", MODEL, "--gpu", "cpu", flag, path)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            self.assertIn(phrase, proc.stderr)
        proc = run("recommend", MODEL, "--gpus", "2", "--seq", "64", "--plot", self.path("layouts.pdf"))
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn(".svg or .html", proc.stderr)


if __name__ == "__main__":
    unittest.main()
