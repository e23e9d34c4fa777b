"""Load a DiaNA model and its processor for inference, from a local folder or a Hub repository id.

Every command that loads a trained model (evaluation, the attribute probe, export, index, search,
benchmarks) goes through `load_model_and_processor`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoProcessor

from diana.modeling_diana import DiaNAModel

from . import build_processor
from .cli_errors import looks_like_hub_id, require_model_folder
from .processing_diana import DiaNAProcessor

logger = logging.getLogger(__name__)

# Either file means the folder carries its own processor (the second is an image processor's alone).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def has_processor_files(model_name_or_path: str | os.PathLike) -> bool:
    """Whether a model folder (or, for a Hub id, its repository) holds processor files."""
    if looks_like_hub_id(str(model_name_or_path)):
        return True  # an exported Hub repository always carries its processor
    return any((Path(model_name_or_path) / name).is_file() for name in PROCESSOR_FILES)


def default_processor_for(config: Any, tokenizer_dir: str | os.PathLike | None = None) -> DiaNAProcessor:
    """The fine-tuning processor at the model's own image size, for a folder saved without one."""
    size = config.vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else (int(v) for v in size)
    return build_processor(tokenizer_dir=tokenizer_dir, image_size=(height, width))


def load_model_and_processor(model_name_or_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                             device: str | torch.device | None = None, dtype: str = "float32",
                             revision: str | None = None, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A DiaNA model (eval mode, on `device`) and its processor.

    Args:
        model_name_or_path: a folder written by `save_pretrained` (training output, checkpoint,
            converted official checkpoint, Hub export) or a Hub repository id.
        tokenizer_dir: the Llama-3.2 tokenizer folder, used only when the folder has no processor
            files (then the fine-tuning processor is built at the model's image size).
        device: default cuda when available, else cpu.
        dtype: "auto" (as saved), "float32", "bfloat16" or "float16".
        revision: the Hub revision (branch, tag or commit) of a repository id.
        trust_remote_code: load through `AutoModel` / `AutoProcessor` with the code saved in the
            folder instead of the installed diana classes.

    Raises:
        UserInputError: the folder does not exist or holds no config.json (named as --model_name_or_path).
    """
    name = str(model_name_or_path)
    require_model_folder("--model_name_or_path", name, allow_hub_id=True)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    kwargs: dict[str, Any] = {"revision": revision}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    if trust_remote_code:
        model = AutoModel.from_pretrained(name, trust_remote_code=True, **kwargs)
    else:
        model = DiaNAModel.from_pretrained(name, **kwargs)
    model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))).eval()
    return model, load_processor(name, model.config, tokenizer_dir, revision, trust_remote_code=trust_remote_code)


def load_processor(model_name_or_path: str | os.PathLike, config: Any, tokenizer_dir: str | os.PathLike | None = None,
                   revision: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The processor saved with a model, or, for a folder saved without one (e.g. a bare converted
    checkpoint), the fine-tuning processor at the model's image size (`config`: the model's config)."""
    name = str(model_name_or_path)
    if not has_processor_files(name):
        logger.warning("%s has no processor files: building the fine-tuning processor at its image size", name)
        return default_processor_for(config, tokenizer_dir)
    if trust_remote_code:
        return AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=True)
    return DiaNAProcessor.from_pretrained(name, revision=revision)


__all__ = ["DTYPES", "default_processor_for", "has_processor_files", "load_model_and_processor", "load_processor"]
