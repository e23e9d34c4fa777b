"""Load a DiaNA model and its processor for inference, from a local folder or a Hub repository id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diana.modeling_diana import DiaNAModel

from . import build_processor
from .cli_errors import looks_like_hub_id, require_model_folder
from .processing_diana import DiaNAProcessor


def load_model_and_processor(model_dir: str, tokenizer_dir: str | None = None, device: str | None = None,
                             dtype: str = "float32", revision: str | None = None) -> tuple[Any, Any]:
    """A DiaNA model (eval mode) and processor from a local folder or a Hub repository id.

    A folder without processor files (e.g. a converted official checkpoint) gets the default
    fine-tuning processor at the model's image size.
    """
    folder = Path(model_dir)
    require_model_folder("--model", model_dir, allow_hub_id=True)
    is_hub_id = looks_like_hub_id(model_dir)
    model = DiaNAModel.from_pretrained(model_dir, dtype=getattr(torch, dtype), revision=revision).eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if is_hub_id or (folder / "processor_config.json").is_file():
        processor = DiaNAProcessor.from_pretrained(model_dir, revision=revision)
    else:
        size = model.config.vision_config.image_size
        processor = build_processor(tokenizer_dir=tokenizer_dir, image_size=tuple(size) if isinstance(size, (list, tuple)) else (size, size))
    return model, processor


__all__ = ["load_model_and_processor"]
