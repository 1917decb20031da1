#!/usr/bin/env python3
"""End-to-end tests of what llmem accepts as a model file: scripted TorchScript runs like a trace, and files
that are not a decoder-LM export (a FIFO, a torch.save checkpoint, a truncated archive, an encoder), options
that contradict the export (its dtype, its position table) and sizes that overflow are one line on stderr and
exit 2. Needs LLMEM_BIN, LLMEM_TINY_MODELS and LLMEM_MODELS_DIR, like test_cli.py."""
import json
import os
import subprocess
import sys
import unittest

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cli  # noqa: E402  (the module, not its classes, so that its tests do not run twice)

LLMEM = os.environ["LLMEM_BIN"]
TINY = os.environ["LLMEM_TINY_MODELS"]
BUNDLED = os.environ["LLMEM_MODELS_DIR"]
VOCAB = 64
HIDDEN = 16


def run(*args, timeout=600):
    return subprocess.run([LLMEM, *args], capture_output=True, text=True, timeout=timeout)


class Attention(nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.causal = causal
        self.hidden = HIDDEN

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, self.hidden // 2).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal)
        return x + self.out(y.transpose(1, 2).reshape(b, t, self.hidden))


class TinyLM(nn.Module):
    """A decoder LM written so that torch.jit.script keeps control flow: a loop over layers, None checks and
    size tests (prim::If), a range loop (prim::Loop) and the Function constants of inlined calls."""

    def __init__(self, causal=True, positions=0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(max(positions, 1), HIDDEN)
        self.use_pos = positions > 0
        self.layers = nn.ModuleList([Attention(causal), Attention(causal)])
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.vocab = VOCAB

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        if self.use_pos:
            x = x + self.pos(torch.arange(input_ids.size(1), device=input_ids.device))
        for layer in self.layers:
            x = layer(x)
        for _ in range(2):
            x = x * 1.0
        if x.dim() == 3:
            x = x + 0
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))


class ModelFileTest(unittest.TestCase):
    # The fixtures (a scratch directory, the tiny GPT-2) and the one-line error check of test_cli.py.
    setUpClass = test_cli.CliTest.__dict__["setUpClass"]
    tearDownClass = test_cli.CliTest.__dict__["tearDownClass"]
    assert_one_line_error = test_cli.CliTest.assert_one_line_error

    def path(self, name):
        return os.path.join(self.dir, name)

    def peaks(self, *args):
        proc = run(*args, "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)

    # --- scripted modules ---------------------------------------------------------------------------------------

    def test_scripted_module_estimates_what_a_cpu_step_measures(self):
        path = self.path("scripted.pt")
        torch.manual_seed(0)
        torch.jit.script(TinyLM()).save(path)
        shape = ("-b", "2", "-s", "16", "-p", "fp32")
        estimate = self.peaks("estimate", path, *shape, "--gpu", "cpu", "--drop-outputs")  # measure's loop
        measured = self.peaks("measure", path, *shape, "--steps", "2")
        self.assertEqual(estimate["peak_allocated_bytes"], measured["peak_allocated_bytes"])
        proc = run("inspect", path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("layers      2", proc.stdout)

    def test_scripted_control_flow_on_tensor_data_is_refused(self):
        class DataDependent(TinyLM):
            def forward(self, input_ids, labels):
                x = self.embed(input_ids)
                if bool(x.sum() > 0):
                    x = x * 2
                return F.cross_entropy(self.head(x).view(-1, self.vocab), labels.view(-1))

        path = self.path("data_dependent.pt")
        torch.jit.script(DataDependent()).save(path)
        self.assert_one_line_error(run("estimate", path, "-b", "1", "-s", "8"), 2, "aten::Bool")

    # --- files that are not TorchScript exports -------------------------------------------------------------------

    def test_fifo_is_refused_without_blocking(self):
        path = self.path("fifo.pt")
        os.mkfifo(path)
        for command in ("inspect", "estimate"):
            self.assert_one_line_error(run(command, path, timeout=30), 2, "FIFO", "not a regular file", path)

    def test_state_dict_is_named_not_corrupted(self):
        path = self.path("state_dict.pt")
        torch.save(TinyLM().state_dict(), path)
        proc = run("estimate", path)
        self.assert_one_line_error(proc, 2, "state dict", "torch.save", "not a TorchScript export",
                                   "torch.jit.trace")
        self.assertNotIn("corrupted", proc.stderr)
        self.assertNotIn("miniz", proc.stderr)

    def test_pickled_module_is_named(self):
        path = self.path("pickled.pt")
        torch.save(nn.Linear(2, 2), path)
        proc = run("inspect", path)
        self.assert_one_line_error(proc, 2, "pickled torch.nn.modules.linear.Linear", "not a TorchScript export")
        self.assertNotIn("corrupted", proc.stderr)

    def test_truncated_archive_says_so(self):
        path = self.path("truncated.pt")
        with open(self.gpt2, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read(4096))
        proc = run("estimate", path)
        self.assert_one_line_error(proc, 2, "truncated or damaged zip archive")
        self.assertNotIn("internal miniz error", proc.stderr)

    def test_a_record_claiming_more_than_deflate_can_expand_to_is_refused_before_it_is_read(self):
        # A zip bomb's directory: constants.pkl deflated to a few bytes but claiming 2^40 (LibTorch's reader would
        # allocate the claim). DEFLATE expands at most 1032:1.
        import struct
        import zipfile
        path = self.path("claims.pt")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("archive/constants.pkl", b"\x80\x02)." * 4)
            z.writestr("archive/version", b"3\n")
        data = bytearray(open(path, "rb").read())
        header = data.index(b"PK\x01\x02")  # the first central directory entry: constants.pkl
        struct.pack_into("<I", data, header + 24, 0xFFFFFFFF - 1)  # its uncompressed size
        with open(path, "wb") as f:
            f.write(data)
        proc = run("inspect", path)
        self.assert_one_line_error(proc, 2, "archive/constants.pkl", "claims 4294967294 bytes", "damaged")
        # A directory that points past the end of the file.
        data = bytearray(open(path, "rb").read())
        end = data.rindex(b"PK\x05\x06")
        struct.pack_into("<I", data, end + 16, len(data) + 100)
        with open(path, "wb") as f:
            f.write(data)
        self.assert_one_line_error(run("inspect", path), 2, "truncated or damaged zip archive",
                                   "zip directory runs past its end")

    def test_text_file_is_not_a_zip_archive(self):
        path = self.path("text.pt")
        with open(path, "w") as f:
            f.write("hello\n")
        self.assert_one_line_error(run("inspect", path), 2, "not a zip archive")

    def test_missing_code_gives_a_reason(self):
        import zipfile
        good, bad = self.path("good_code.pt"), self.path("missing_code.pt")
        torch.jit.script(TinyLM()).save(good)
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
            for item in src.infolist():
                if "modules/linear" not in item.filename:
                    dst.writestr(item, src.read(item.filename))
        proc = run("inspect", bad)
        self.assert_one_line_error(proc, 2, "not a readable TorchScript file", "Linear")
        self.assertNotIn("()", proc.stderr)

    # --- options that contradict the export ----------------------------------------------------------------------

    def test_precision_contradicting_a_bf16_export_is_refused(self):
        bf16 = os.path.join(TINY, "llama-tiny-bf16.pt")
        for precision in ("fp32", "bf16-autocast"):
            self.assert_one_line_error(run("estimate", bf16, "-b", "1", "-s", "32", "-p", precision), 2,
                                       "bf16 weights", precision, "--precision bf16")
            self.assert_one_line_error(run("recommend", bf16, "--gpus", "2", "--seq", "32", "-p", precision), 2,
                                       "bf16 weights")
        self.assertEqual(run("estimate", bf16, "-b", "1", "-s", "32", "-p", "bf16").returncode, 0)

    # --- position limits -------------------------------------------------------------------------------------------

    def test_sequence_past_a_learned_position_table_is_refused(self):
        opt = os.path.join(BUNDLED, "opt-1.3b.meta.pt")  # 2050 rows, positions offset by 2: 2048 tokens
        self.assertEqual(run("estimate", opt, "-b", "1", "-s", "2048").returncode, 0)
        self.assert_one_line_error(run("estimate", opt, "-b", "1", "-s", "2049"), 2, "2048 positions",
                                   "embed_positions")
        self.assert_one_line_error(run("recommend", opt, "--gpus", "8", "--seq", "16384"), 2, "2048 positions")
        # An override cannot lift a learned table: the real step would index past it.
        self.assert_one_line_error(run("estimate", opt, "-b", "1", "-s", "8192", "--max-positions", "8192"), 2,
                                   "2048 positions")
        proc = run("inspect", opt)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("positions   2048", proc.stdout)

    def test_loop_that_keeps_the_outputs_of_a_model_returning_only_its_loss_keeps_the_loss(self):
        # TinyLM's head is not an lm_head module and its forward returns the loss alone: what the loop keeps bound
        # is what each phase's peak grows by in a real step of the file in Python, both loops.
        path = self.path("loss_only.pt")
        torch.manual_seed(0)
        torch.jit.script(TinyLM()).save(path)
        shape = ("-b", "2", "-s", "16", "-p", "fp32", "--gpu", "cpu")
        helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eager_step_of_a_file.py")
        real, est = {}, {}
        for loop in ("keep", "drop"):
            proc = subprocess.run([sys.executable, helper, path, "--batch", "2", "--seq", "16", "--loop", loop],
                                  capture_output=True, text=True, timeout=600)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            real[loop] = json.loads(proc.stdout.splitlines()[-1])
            est[loop] = self.peaks("estimate", path, *shape, f"--{loop}-outputs")["phase_peak_bytes"]
        for phase in ("forward", "backward", "optimizer"):
            self.assertEqual(est["keep"][phase] - est["drop"][phase], real["keep"][phase] - real["drop"][phase],
                             phase)
        self.assertEqual(self.peaks("estimate", path, *shape)["recipe"]["keep_outputs"], True)  # the default

    def test_scripted_position_table_is_found_in_the_graph(self):
        path = self.path("scripted_positions.pt")
        torch.jit.script(TinyLM(positions=32)).save(path)
        self.assertEqual(run("estimate", path, "-b", "1", "-s", "32").returncode, 0)
        self.assert_one_line_error(run("estimate", path, "-b", "1", "-s", "33"), 2, "32 positions")

    def test_rope_limit_comes_from_the_exported_config(self):
        llama = os.path.join(BUNDLED, "llama-2-7b.meta.pt")  # max_position_embeddings 4096
        self.assertIn(run("estimate", llama, "-b", "1", "-s", "4096").returncode, (0, 3))  # accepted
        self.assert_one_line_error(run("estimate", llama, "-b", "1", "-s", "4097"), 2, "4096 positions",
                                   "max_position_embeddings", "--max-positions")
        self.assert_one_line_error(run("recommend", llama, "--gpus", "8", "--seq", "8192"), 2, "4096 positions")
        # Scaled RoPE: the override replaces the config's limit.
        proc = run("estimate", llama, "-b", "1", "-s", "8192", "--max-positions", "16384", "--json")
        self.assertIn(proc.returncode, (0, 3), proc.stderr)
        self.assert_one_line_error(run("inspect", llama, "--max-positions", "0"), 2, "--max-positions")
        proc = run("inspect", llama, "--json")
        self.assertEqual(json.loads(proc.stdout)["max_positions"], 4096)

    def without_extra_file(self, export, extra, name):
        """A copy of a tiny export without one of the extra files export_hf.py writes."""
        import zipfile
        path = self.path(name)
        with zipfile.ZipFile(os.path.join(TINY, export)) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                if not item.filename.endswith("extra/" + extra):
                    dst.writestr(item, src.read(item.filename))
        return path

    def test_export_without_config_says_no_rope_limit_is_known(self):
        path = self.without_extra_file("llama-tiny.pt", "hf_config.json", "llama-no-config.pt")
        proc = run("inspect", path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("positions   no limit known", proc.stdout)
        self.assertEqual(run("estimate", path, "-b", "1", "-s", "8192").returncode, 0)

    def test_cast_to_an_autocast_tensors_dtype_is_16_bit_in_the_eager_program_only(self):
        # CodeGen's attention casts its weights with `.to(value.dtype)`; the graph bakes the trace-time fp32, the
        # export's autocast record says that under autocast value is bf16. The eager step then holds a bf16 cast
        # and no autocast copy where the baked fp32 cast needs one; the TorchScript step really casts to fp32.
        with_record = os.path.join(TINY, "codegen-tiny.pt")
        without = self.without_extra_file("codegen-tiny.pt", "autocast_casts.json", "codegen-no-casts.pt")
        step = ["estimate", "--gpu", "cpu", "-b", "2", "-s", "64"]

        def forward_peak(path, *extra):
            return self.peaks(*step, path, *extra)["phase_peak_bytes"]["forward"]

        eager = ["--precision", "bf16-autocast"]
        self.assertLess(forward_peak(with_record, *eager), forward_peak(without, *eager))
        ts = eager + ["--lifetimes", "torchscript"]
        self.assertEqual(forward_peak(with_record, *ts), forward_peak(without, *ts))
        fp32 = ["--precision", "fp32"]  # no autocast
        self.assertEqual(forward_peak(with_record, *fp32), forward_peak(without, *fp32))

    def test_expression_temporaries_die_at_once_in_generation_and_change_no_training_step(self):
        # LlamaMLP nests gate_proj, act_fn and up_proj in one expression: the export records them, and without the
        # record their results are held until the MLP returns. Training saves them for backward anyway.
        import zipfile
        with zipfile.ZipFile(os.path.join(TINY, "llama-tiny.pt")) as z:
            name = next(n for n in z.namelist() if n.endswith("extra/expression_calls.json"))
            record = json.loads(z.read(name))
        self.assertEqual(record["LlamaMLP"], ["act_fn", "gate_proj", "up_proj"])
        self.assertEqual(record["LlamaDecoderLayer"], [])  # every child's result is bound to a name
        without = self.without_extra_file("llama-tiny.pt", "expression_calls.json", "llama-no-expressions.pt")
        infer = ["infer", "--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "32", "--new-tokens", "2", "--json"]

        def prefill(path):
            proc = run(*infer[:1], path, *infer[1:])
            self.assertEqual(proc.returncode, 0, proc.stderr)
            return json.loads(proc.stdout)["prefill"]["peak_allocated_bytes"]

        self.assertLess(prefill(os.path.join(TINY, "llama-tiny.pt")), prefill(without))
        train = ["estimate", "--gpu", "cpu", "-b", "2", "-s", "64"]
        self.assertEqual(self.peaks(*train, os.path.join(TINY, "llama-tiny.pt"))["phase_peak_bytes"],
                         self.peaks(*train, without)["phase_peak_bytes"])

    def test_names_a_frame_rebinds_drop_their_tensors_in_generation_and_change_no_training_step(self):
        # OPTDecoderLayer: `hidden_states = self.fc1(h)`, then `= self.activation_fn(hidden_states)`, then `= self.fc2(...)`:
        # each [tokens, 4 x hidden] result dies when the next call returns, not when the layer does.
        import zipfile
        with zipfile.ZipFile(os.path.join(TINY, "opt-tiny.pt")) as z:
            name = next(n for n in z.namelist() if n.endswith("extra/rebound_names.json"))
            record = json.loads(z.read(name))
        layer = record["OPTDecoderLayer"]
        self.assertEqual(layer["fc1"], {"between": [], "rebinder": ["activation_fn"], "one_of_several": False,
                                        "own_rebindings": 0})
        # `hidden_states = self.fc2(h)`, then the layer's own `= dropout(hidden_states, ...)` and `= residual + ...`
        self.assertEqual(layer["fc2"]["rebinder"], [])
        self.assertEqual(layer["fc2"]["own_rebindings"], 2)
        self.assertEqual(layer["self_attn"]["one_of_several"], True)  # hidden_states, self_attn_weights = ...
        self.assertNotIn("final_layer_norm", layer)  # its last call's result is returned in a tuple
        # LlamaDecoderLayer: the norms' results die when self_attn and mlp return, self_attn's before the second norm.
        with zipfile.ZipFile(os.path.join(TINY, "llama-tiny.pt")) as z:
            name = next(n for n in z.namelist() if n.endswith("extra/rebound_names.json"))
            self.assertEqual(json.loads(z.read(name))["LlamaDecoderLayer"]["input_layernorm"]["rebinder"], ["self_attn"])
        for arch in ("llama", "opt"):
            export = os.path.join(TINY, f"{arch}-tiny.pt")
            without = self.without_extra_file(f"{arch}-tiny.pt", "rebound_names.json", f"{arch}-no-rebinding.pt")
            infer = ["infer", "--gpu", "cpu", "-p", "fp32", "-b", "2", "--prompt", "64", "--new-tokens", "2"]
            if arch == "llama":  # its prefill peaks in the last MLP (OPT's at its every-position logits)
                self.assertLess(self.peaks(*infer, export)["prefill"]["peak_allocated_bytes"],
                                self.peaks(*infer, without)["prefill"]["peak_allocated_bytes"])
            train = ["estimate", "--gpu", "cpu", "-b", "2", "-s", "64"]
            for precision in ("fp32", "bf16-autocast"):
                self.assertEqual(self.peaks(*train, "-p", precision, export)["phase_peak_bytes"],
                                 self.peaks(*train, "-p", precision, without)["phase_peak_bytes"], arch)

    def test_autocast_record_that_does_not_fit_the_graph_is_one_line(self):
        import zipfile
        src_path = self.without_extra_file("codegen-tiny.pt", "autocast_casts.json", "codegen-bad-casts.pt")
        with zipfile.ZipFile(src_path, "a") as z:
            prefix = next(n for n in z.namelist() if n.endswith("extra/hf_config.json"))[:-len("hf_config.json")]
            z.writestr(prefix + "autocast_casts.json", '{"to_autocast_dtype": [true]}')
        self.assert_one_line_error(run("estimate", src_path), 2, "autocast_casts.json", "describes 1 casts")

    def test_a_malformed_rebinding_record_is_one_line(self):
        import zipfile
        for i, (record, needle) in enumerate((('[1]', "is not an object"),
                                              ('{"OPTDecoderLayer": {"fc1": {"between": 3, "rebinder": []}}}',
                                               'no "between" list'),
                                              ('{"OPTDecoderLayer": {"fc1": {"between": [], "rebinder": [7]}}}',
                                               "non-string"))):
            path = self.without_extra_file("opt-tiny.pt", "rebound_names.json", f"opt-bad-rebinding-{i}.pt")
            with zipfile.ZipFile(path, "a") as z:
                prefix = next(n for n in z.namelist() if n.endswith("extra/hf_config.json"))[:-len("hf_config.json")]
                z.writestr(prefix + "rebound_names.json", record)
            self.assert_one_line_error(run("estimate", path), 2, "rebound_names.json", needle)

    # --- encoders -----------------------------------------------------------------------------------------------

    def test_masked_lm_is_not_a_decoder_lm(self):
        import warnings
        from transformers import BertConfig, BertForMaskedLM

        class Loss(nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, labels):
                return self.model(input_ids=input_ids, labels=labels).loss

        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64, attn_implementation="sdpa")
        ids = torch.zeros(2, 8, dtype=torch.long)
        path = self.path("bert.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(Loss(BertForMaskedLM(config)).train(), (ids, ids), check_trace=False,
                            strict=False).save(path)
        self.assert_one_line_error(run("estimate", path, "-b", "1", "-s", "8"), 2, "not a decoder LM",
                                   "BertSdpaSelfAttention", "bidirectional")

    def test_scripted_encoder_without_mask_is_not_a_decoder_lm(self):
        path = self.path("encoder.pt")
        torch.jit.script(TinyLM(causal=False)).save(path)
        self.assert_one_line_error(run("inspect", path), 2, "not a decoder LM", "bidirectional")

    # --- sizes whose byte counts overflow -------------------------------------------------------------------------

    def test_step_memory_past_64_bits_is_a_config_error(self):
        huge = ("-b", str(2**40), "-s", "64")
        for extra in ((), ("--gpu", "cpu"), ("--tp", "2"), ("--dp", "2", "--engine", "zero3")):
            self.assert_one_line_error(run("estimate", self.gpt2, *huge, *extra), 2, "overflows a 64-bit")
        self.assert_one_line_error(run("recommend", self.gpt2, "--gpus", "2", "--seq", "64", "--batch", str(2**40)),
                                   2, "overflows a 64-bit")


if __name__ == "__main__":
    unittest.main()
