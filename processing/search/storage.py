"""On-disk layouts of a gallery index, read memory-mapped so that a gallery larger than memory can
be searched: only the rows a search touches are paged in.

Two layouts:

- a folder (format version 2): ``index.json`` (the manifest: format, fingerprints, dimensions, the
  shard list, the optional ANN structure) and shard files ``shard-00000.safetensors``, ... each
  holding ``image_embeds`` (n, D) float32 (the exact vectors, read only for re-scoring),
  ``image_embeds_fp16`` (n, D) float16 (the vectors every query scans), optionally
  ``image_attribute_embeds`` (n, K, D) float32, ``ids`` (n,) int64 and ``paths_utf8`` (a JSON list).
  Shards are immutable: adding images writes new shards and a new manifest.
- one safetensors file (format version 1, what earlier versions wrote): the same tensors without
  the float16 copy, metadata in the header. Still read, and written when the index path ends in
  ``.safetensors``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

INDEX_FORMAT = "diana-gallery-index"
SINGLE_FILE_VERSION = "1"
FOLDER_VERSION = "2"
MANIFEST_NAME = "index.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
# 262,144 x 768 x (4 + 2) bytes = 1.2 GB per shard: few files for a million images, small enough
# that one shard's exact vectors fit in memory when it is rewritten.
DEFAULT_SHARD_SIZE = 262_144

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}


@dataclass
class Block:
    """A run of consecutive gallery rows: exact float32 vectors, their float16 scan copy, and the
    optional attribute vectors. ``file`` is the shard that holds it (None: not written yet)."""

    embeds: torch.Tensor  # (n, D) float32, possibly memory-mapped
    scan: torch.Tensor  # (n, D) float16, possibly memory-mapped
    attributes: torch.Tensor | None  # (n, K, D) float32
    file: str | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]


def block_from_embeds(embeds: torch.Tensor, attributes: torch.Tensor | None) -> Block:
    """An in-memory block of normalised float32 vectors with its float16 scan copy."""
    embeds = embeds.float().contiguous()
    return Block(embeds, embeds.half(), None if attributes is None else attributes.float().contiguous())


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file (the JSON header and where the data begins)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{str(path)!r} is not a safetensors file ({error})") from error
    return header, 8 + length


def map_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file memory-mapped (copy-on-write, so never written back),
    and the header metadata."""
    header, start = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        dtype = _NUMPY_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        shape = tuple(entry["shape"])
        begin, _ = entry["data_offsets"]
        if int(np.prod(shape)) == 0:
            tensors[name] = torch.from_numpy(np.zeros(shape, dtype))
        else:
            tensors[name] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=start + begin, shape=shape))
    return tensors, metadata


def decode_paths(tensor: torch.Tensor) -> list[str]:
    """The JSON list of paths stored as UTF-8 bytes."""
    return json.loads(bytes(tensor.numpy()).decode()) if tensor.numel() else []


def encode_paths(paths: list[str]) -> torch.Tensor:
    """Paths as a uint8 tensor of JSON (a tensor, not header metadata: the header is size-limited)."""
    return torch.frombuffer(bytearray(json.dumps(paths).encode()), dtype=torch.uint8)


def write_shard(path: Path, block: Block, ids: torch.Tensor, paths: list[str]) -> None:
    """One shard file of the folder layout."""
    tensors = {"image_embeds": block.embeds.contiguous(), "image_embeds_fp16": block.scan.contiguous(),
               "ids": ids.long().contiguous(), "paths_utf8": encode_paths(paths)}
    if block.attributes is not None:
        tensors["image_attribute_embeds"] = block.attributes.contiguous()
    save_file(tensors, str(path), metadata={"format": INDEX_FORMAT, "format_version": FOLDER_VERSION})


def read_shard(path: Path) -> tuple[Block, torch.Tensor, list[str]]:
    """``(block, ids, paths)`` of one shard file, the vectors memory-mapped."""
    tensors, _ = map_tensors(path)
    missing = {"image_embeds", "image_embeds_fp16", "ids", "paths_utf8"} - set(tensors)
    if missing:
        raise ValueError(f"gallery shard {str(path)!r} lacks {sorted(missing)}")
    block = Block(tensors["image_embeds"], tensors["image_embeds_fp16"], tensors.get("image_attribute_embeds"),
                  file=str(path))
    return block, tensors["ids"], decode_paths(tensors["paths_utf8"])


def check_format(metadata: dict, where: str, version: str) -> None:
    """Refuse a file or manifest that is not a DiaNA gallery index of the expected version."""
    if metadata.get("format") != INDEX_FORMAT:
        raise ValueError(f"{where} is not a DiaNA gallery index (format={metadata.get('format')!r})")
    if str(metadata.get("format_version")) != version:
        raise ValueError(
            f"{where}: index format version {metadata.get('format_version')!r} is not supported here "
            f"(a {'folder' if version == FOLDER_VERSION else 'single-file'} index is version {version})"
        )


def read_manifest(folder: Path) -> dict:
    """The manifest of a folder index, checked."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is a folder but holds no {MANIFEST_NAME}: not a gallery index")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path}: not valid JSON ({error})") from error
    check_format(manifest, str(manifest_path), FOLDER_VERSION)
    for field_name in ("model_fingerprint", "processor_fingerprint", "shards", "num_images"):
        if field_name not in manifest:
            raise ValueError(f"{manifest_path}: missing field {field_name!r}")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest last and atomically: a crash mid-save leaves the previous index readable."""
    temporary = folder / (MANIFEST_NAME + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, folder / MANIFEST_NAME)


def write_single_file(path: Path, embeds: torch.Tensor, attributes: torch.Tensor | None, ids: torch.Tensor,
                      paths: list[str], metadata: dict[str, str]) -> None:
    """The version-1 single-file layout (float32 only)."""
    tensors = {"image_embeds": embeds.contiguous(), "ids": ids.long().contiguous(), "paths_utf8": encode_paths(paths)}
    if attributes is not None:
        tensors["image_attribute_embeds"] = attributes.contiguous()
    save_file(tensors, str(path), metadata={"format": INDEX_FORMAT, "format_version": SINGLE_FILE_VERSION, **metadata})
