"""The exporter's reading of a Hugging Face config.json (what `llmem --hf-config` runs) on arbitrary bytes, under
atheris: models/export_hf.py's resolve_config (JSON, model_type, decoder-only, MoE kinds) and make_config
(transformers' config class built from the keys, the layer and expert budget). An ExportError, or another
exception whose one line (export_hf.error_line) the exporter would print, are the outcomes; a hang past the
timeout, a crash or running out of memory is a finding.

  .venv/bin/python tests/fuzz/config_json_fuzzer.py CORPUS_DIR -atheris_runs=1000000 -timeout=10
  .venv/bin/python tests/fuzz/config_json_fuzzer.py FILE ...      # replays inputs (the suite does)
"""
import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
with atheris.instrument_imports(include=["export_hf"]):
    import export_hf

_FILE = os.path.join(tempfile.mkdtemp(prefix="llmem-config-fuzz-"), "config.json")


def one_input(data):
    with open(_FILE, "wb") as f:
        f.write(data)
    try:
        _arch, model_type, kwargs, _label = export_hf.resolve_config(_FILE)
        export_hf.make_config(model_type, kwargs)
    except export_hf.ExportError:
        pass
    except Exception as exc:  # noqa: BLE001 - what the exporter's main turns into its one line
        line = export_hf.error_line(exc)
        if not line or "\n" in line:
            raise


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
