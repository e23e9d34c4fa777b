"""Session fixtures shared by the whole suite: the real Llama-3.2 tokenizer and DiaNA processors.

The suite runs offline: nothing may reach the Hugging Face Hub.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub / datasets: they read these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# `tests.helpers` must import however pytest was started (`pytest`, `python -m pytest`, xdist).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on a 2-core machine: one intra-op thread each, or every tiny step pays for
    # oversubscription (measured 0.88 s vs 0.03 s CPU for a tiny training step under load).
    import torch  # noqa: E402

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The converted Llama-3.2 tokenizer folder (converted on first use if set-up was skipped)."""
    from diana.processing.tokenizer_setup import default_tokenizer_dir, setup_tokenizer

    path = default_tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        # Same step as scripts/setup.sh; needs PyPI once, never the Hub.
        setup_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def processor(tokenizer_dir):
    """The default fine-tuning processor: 384x192 images, CUHK-PEDES statistics, 400 tokens."""
    from diana.processing import build_processor

    return build_processor(tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_processor(tokenizer_dir):
    """The fine-tuning processor at the tiny test image size `tests.helpers.TINY_IMAGE_SIZE`."""
    from diana.processing import build_processor
    from tests.helpers import TINY_IMAGE_SIZE

    return build_processor(tokenizer_dir=tokenizer_dir, image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def meta_tokenizer(tmp_path_factory, tokenizer_dir):
    """Meta's own reference tokenizer (`llama_models.llama3.tokenizer.Tokenizer`, tiktoken), imported
    from the same verified `llama-models` wheel the HF files were converted from."""
    import importlib
    import zipfile

    from diana.processing.tokenizer_setup import download_wheel, extract_verified_sources

    wheel = download_wheel()
    extract_verified_sources(wheel)  # sha256 check of the very files the reference is built from
    root = tmp_path_factory.mktemp("llama_models_src")
    members = ["llama_models/__init__.py", "llama_models/tokenizer_utils.py", "llama_models/llama3/__init__.py",
               "llama_models/llama3/tokenizer.py", "llama_models/llama3/tokenizer.model"]
    with zipfile.ZipFile(wheel) as zf:
        for member in members:
            zf.extract(member, root)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("llama_models.llama3.tokenizer")
    finally:
        sys.path.remove(str(root))
    return module.Tokenizer(root / "llama_models/llama3/tokenizer.model")
