#!/usr/bin/env bash
# Creates .venv with everything DiaNA needs on a fresh machine (CPU; the same steps work on GPUs),
# and converts Meta's Llama-3.2 tokenizer once into .cache/diana/ (outside git: its licence
# forbids committing it). Idempotent: a second run only checks.
#   scripts/setup.sh          runtime + tests
#   scripts/setup.sh --browser   also Debian's chromium + chromium-driver (Space test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade "pip<26.2"
# torch + torchvision as a pair: PyPI's torchvision does not import beside the local CPU torch 2.13
# wheel; 2.14.1/0.29.1 (a CUDA build that runs on the CPU) does.
python -c "import torch, torchvision" 2>/dev/null || pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e ".[test]"
python -m diana.processing.tokenizer_setup
if [ "${1:-}" = "--browser" ] && ! command -v chromedriver >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "setup: could not install chromium/chromium-driver; the Space browser test will fail" >&2
fi
echo "setup: ok ($(python -c 'import torch, transformers, datasets; print("torch", torch.__version__, "transformers", transformers.__version__, "datasets", datasets.__version__)'))"
