#!/usr/bin/env bash
# Installs everything llmem needs on a fresh Debian machine, then configures and builds.
# Idempotent: re-running skips what is already in place.
#   LLMEM_BUILD_DIR   build folder (default: build)
#   LLMEM_BUILD_TYPE  CMake build type (default: RelWithDebInfo)
#   LLMEM_SANITIZE    1 = build with AddressSanitizer + UBSan
#   LLMEM_FUZZ_BUILD_DIR  the clang build of the fuzz targets (default: build-fuzz; "" skips it)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# torch 2.11.0 is what the GPU machines carry; transformers 4.57.6 is the last 4.x release
# (5.x dropped TorchScript tracing). python3-dev: the distributed validation builds a small allocator extension.
# chromium: the test of `estimate --plot` renders the picture headless and looks at its pixels.
# clang and libclang-rt-14-dev (libFuzzer): the fuzz targets of tests/fuzz. zlib: inflating the pickles of an archive
# to check them before LibTorch reads them.
TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=4.57.6
DEBS=(build-essential cmake ninja-build python3-venv python3-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev
      libcli11-dev nlohmann-json3-dev libbenchmark-dev libmimalloc-dev zlib1g-dev chromium clang libclang-rt-14-dev)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python - <<PY 2>/dev/null
import importlib.metadata as m, sys
ok = m.version("torch").startswith("$TORCH_VERSION") and m.version("transformers") == "$TRANSFORMERS_VERSION"
sys.exit(0 if ok else 1)
PY
then
  echo "setup: installing torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION"
fi
# matplotlib draws the plots of scripts/compare.py (docs/COMPARISON.md).
MATPLOTLIB_VERSION=3.11.2
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('matplotlib') != '$MATPLOTLIB_VERSION')" 2>/dev/null; then
  .venv/bin/pip install -q "matplotlib==$MATPLOTLIB_VERSION"
fi
# The real-run harness measures 8-bit AdamW with both libraries HF Trainer offers (adamw_bnb_8bit,
# adamw_torch_8bit); both run on CPU. --no-deps: they must not move the pinned torch.
TORCHAO_VERSION=0.18.0
BITSANDBYTES_VERSION=0.50.2
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('torchao') != '$TORCHAO_VERSION' or m.version('bitsandbytes') != '$BITSANDBYTES_VERSION')" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps "torchao==$TORCHAO_VERSION" "bitsandbytes==$BITSANDBYTES_VERSION"
fi
# The real-run harness trains PEFT LoRA / QLoRA adapters (scripts/training_recipe.py, lora-* keys). peft imports
# accelerate, which imports psutil; their other requirements are already here. --no-deps: torch stays pinned.
PEFT_VERSION=0.21.2
ACCELERATE_VERSION=1.16.0
PSUTIL_VERSION=7.2.2
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('peft') != '$PEFT_VERSION' or m.version('accelerate') != '$ACCELERATE_VERSION' or m.version('psutil') != '$PSUTIL_VERSION')" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps "peft==$PEFT_VERSION" "accelerate==$ACCELERATE_VERSION" "psutil==$PSUTIL_VERSION"
fi

# atheris fuzzes the exporter's reading of a config.json (tests/fuzz/config_json_fuzzer.py).
ATHERIS_VERSION=2.3.0
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('atheris') != '$ATHERIS_VERSION')" 2>/dev/null; then
  .venv/bin/pip install -q "atheris==$ATHERIS_VERSION"
fi

build_dir="${LLMEM_BUILD_DIR:-build}"
torch_prefix="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE="${LLMEM_BUILD_TYPE:-RelWithDebInfo}" \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DLLMEM_PYTHON="$repo/.venv/bin/python" \
  -DLLMEM_SANITIZE="${LLMEM_SANITIZE:-0}" >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
# The fuzz targets, built with clang, libFuzzer, ASan and UBSan; the suite runs each briefly (tests/fuzz).
fuzz_dir="${LLMEM_FUZZ_BUILD_DIR-build-fuzz}"
if [ -n "$fuzz_dir" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$fuzz_dir" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DLLMEM_PYTHON="$repo/.venv/bin/python" \
    -DLLMEM_FUZZ=ON >/dev/null
  cmake --build "$fuzz_dir" -j "$(nproc)" --target llmem_fuzzers
fi
