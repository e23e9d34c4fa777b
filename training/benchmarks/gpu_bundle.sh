#!/usr/bin/env bash
# Packs the GPU benchmark into one self-contained folder that runs on a machine without network.
#
#   bash training/benchmarks/gpu_bundle.sh [BUNDLE_DIR]      (default: outputs/gpu_bundle, git-ignored)
#
# The folder holds:
#   wheels/     this project's wheel (built from the working tree, benchmarks included) and the
#               pure-Python / manylinux wheels for CPython 3.12 x86-64 of transformers 5.24 and its
#               requirements, huggingface_hub, tokenizers, datasets, evaluate, accelerate, peft,
#               at the versions of this machine's venv. Not numpy / torch: the GPU image has them.
#   tokenizer/  the converted Llama-3.2 tokenizer (fetched at set-up time from PyPI; its licence
#               forbids committing it, so it travels in the bundle, never in git).
#   run_gpu_bench.sh  installs the wheels offline into a private folder (shadowing the image's
#               older transformers 5.17 / huggingface_hub 1.x), runs the GPU suite and writes
#               bench_gpu.json, bench_gpu.log, nvidia-smi.txt, versions.txt to $OUT (or BUNDLE/results).
#
# On the device machine (repo root; the bundle travels as a carried, ignored path):
#   bash outputs/gpu_bundle/run_gpu_bench.sh                 # full GPU suite, < 8 min on one H100
#   bash outputs/gpu_bundle/run_gpu_bench.sh --no_ablations  # any run.py switch passes through
# Checked here on the CPU with:  bash outputs/gpu_bundle/run_gpu_bench.sh --tiny --device cpu
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="${1:-$REPO/outputs/gpu_bundle}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PY_VERSION="${BUNDLE_PY_VERSION:-3.12}"  # the GPU image's python3 (KINDS.md: Python 3.12.3, torch 2.11, transformers 5.17)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)

version_of() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/wheels" "$BUNDLE/tokenizer"

# 1. The project's wheel. setup.cfg lists its packages explicitly; the benchmarks sub-package is added in a
#    scratch copy when missing so that `python -m diana.training.benchmarks.run` exists in the wheel.
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
(cd "$REPO" && tar cf - --exclude='__pycache__' --exclude='*.pyc' \
    setup.cfg pyproject.toml modeling_diana processing training hub_cards $(ls README.md 2>/dev/null)) | (cd "$SRC" && tar xf -)
[ -f "$SRC/README.md" ] || echo "DiaNA" > "$SRC/README.md"  # setup.cfg reads it as the long description
"$PY" - "$SRC/setup.cfg" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
if "diana.training.benchmarks" not in text:
    text = text.replace("    diana.training\n", "    diana.training\n    diana.training.benchmarks\n", 1)
    text = text.replace("diana.training = configs/*.yaml", "diana.training.benchmarks = *.sh\ndiana.training = configs/*.yaml", 1)
open(path, "w").write(text)
EOF
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUNDLE/wheels" "$SRC"

# 2. Third-party wheels for the device's CPython, at this venv's versions (what the tests ran with).
PINS=()
for pkg in transformers huggingface_hub tokenizers safetensors; do PINS+=("$pkg==$(version_of "$pkg")"); done
"$PY" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${PLATFORMS[@]}" \
    -d "$BUNDLE/wheels" "${PINS[@]}"
# Without their requirements: torch, numpy, pandas, pyarrow, xxhash, psutil come with the image.
NODEPS=()
# faiss-cpu: the search figures' ANN (its numpy comes with the GPU image)
for pkg in datasets evaluate accelerate peft dill multiprocess faiss-cpu; do NODEPS+=("$pkg==$(version_of "$pkg")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d "$BUNDLE/wheels" "${NODEPS[@]}"
rm -f "$BUNDLE"/wheels/numpy-*.whl

# 3. The tokenizer folder.
TOK="$("$PY" -c "from diana.processing.tokenizer_setup import default_tokenizer_dir; print(default_tokenizer_dir())")"
if [ ! -f "$TOK/tokenizer.json" ]; then
    "$PY" -m diana.processing.tokenizer_setup
fi
cp "$TOK"/*.json "$BUNDLE/tokenizer/"

# 4. The runner.
cat > "$BUNDLE/run_gpu_bench.sh" <<'EOF'
#!/usr/bin/env bash
# Installs the carried wheels offline and runs the DiaNA GPU benchmark suite. Arguments go to run.py.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$HERE/results}"
SITE="${DIANA_BENCH_SITE:-/tmp/diana_bench_site}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$HERE"/wheels/*.whl \
    || { echo "wheel install failed" >&2; exit 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Run from a neutral folder so a `diana` source tree in the working directory cannot shadow the wheel.
cd "$SITE/.." || exit 2
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PYEOF'
import platform, torch, transformers, huggingface_hub, tokenizers
import diana.training.benchmarks.run as run
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "huggingface_hub", huggingface_hub.__version__,
      "tokenizers", tokenizers.__version__)
print("benchmarks from", run.__file__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PYEOF
status=$?
cat "$OUT/versions.txt"
[ $status -eq 0 ] || exit 2
(command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1) || true
# The suite caps itself (~7 min); the timeout is a last resort. JSON is rewritten after every stage.
timeout "${DIANA_BENCH_TIMEOUT:-560}" "$PY" -m diana.training.benchmarks.run --suite gpu \
    --tokenizer_dir "$HERE/tokenizer" --output_file "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
exit "${PIPESTATUS[0]}"
EOF
chmod +x "$BUNDLE/run_gpu_bench.sh"
du -sh "$BUNDLE" "$BUNDLE/wheels" "$BUNDLE/tokenizer"
echo "bundle ready: $BUNDLE (carry it, then: bash ${BUNDLE#$REPO/}/run_gpu_bench.sh)"
