"""Fingerprints that tie a gallery index to the model and processor that made it.

A fingerprint identifies by behaviour, not by file names: a model by its config (without the keys
that change on save / reload / cast) and a sample of its weights; a processor by what it makes of
a fixed dialogue and picture.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..processing_diana import DEFAULT_FIRST_QUESTION

# Config keys that change when the same model is saved, reloaded or cast, without changing what it
# computes; the fingerprint must survive save_pretrained -> from_pretrained and a dtype change.
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
    "pad_token_id", "bos_token_id", "eos_token_id",
    # Search settings that change no embedding: an index stays valid when they change.
    "rejection_weight",
})
# A fixed dialogue and a fixed picture whose processed form identifies a processor by behaviour
# (resize, normalisation statistics, template, vocabulary) rather than by its config key names.
_PROBE_DIALOGUE = [
    (DEFAULT_FIRST_QUESTION, "A woman in a red coat with a black backpack."),
    ("Is she wearing glasses?", "No, but she has long brown hair."),
]



def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _strip_volatile(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))
            if str(k) not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_strip_volatile(v) for v in value]
    return value


def config_hash(config: Any) -> str:
    """SHA-256 (first 16 hex digits) of a model config with save/load-volatile keys removed."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(_strip_volatile(data), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_checksum(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A sampled checksum of a model's weights (first 16 hex digits of a SHA-256).

    Hashing every byte of a 1.2B-parameter model takes longer than encoding a small gallery, so
    each tensor contributes its name, its shape and up to ``samples_per_tensor`` evenly strided
    values. Values are rounded to bfloat16 first so the same weights loaded in fp32 or bf16 give
    the same checksum; any training step changes (nearly) every sampled value.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).to(torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """``"<config hash>-<weights checksum>"``; see :func:`config_hash`, :func:`weights_checksum`."""
    return f"{config_hash(model.config)}-{weights_checksum(model)}"


def processor_fingerprint(processor: Any) -> str:
    """SHA-256 (16 hex digits) of what the processor makes of a fixed dialogue and picture."""
    yy, xx = np.mgrid[0:40, 0:24]
    probe = np.stack([yy * 6, xx * 10, (yy + xx) * 4], axis=-1).astype(np.uint8)  # (40, 24, 3)
    batch = processor(images=[Image.fromarray(probe)], dialogues=[_PROBE_DIALOGUE], return_tensors="pt")
    digest = hashlib.sha256()
    digest.update(batch["input_ids"][batch["attention_mask"].bool()].numpy().astype(np.int64).tobytes())
    pixels = batch["pixel_values"].float()
    digest.update(str(tuple(pixels.shape)).encode())
    # Rounded so that two equivalent image back ends (PIL vs torchvision) hash alike.
    digest.update(np.round(pixels.numpy(), 2).astype(np.float32).tobytes())
    digest.update(str(getattr(processor, "max_length", None)).encode())
    return digest.hexdigest()[:16]
