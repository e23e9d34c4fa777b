"""The one way a file or an in-memory image becomes the RGB picture DiaNA sees.

Every path that feeds images to the model (the processor, the training collator and its image
cache, evaluation's gallery encoding, the gallery index and the demo Space) calls
`load_rgb_image`, so a photo gives the same pixels wherever it enters. The conventions:

- EXIF orientation is applied (a phone photo stored sideways with orientation 6 is turned
  upright, as `datasets.Image()` decoding and image viewers do);
- transparency ("RGBA", "LA", "PA", "P" or "L" with a transparent colour) is composited onto
  WHITE, as `transformers`' `convert_to_rgb` does; PIL's plain `convert("RGB")` would drop the
  alpha channel and show whatever colour the transparent pixels happen to store (often black);
- 16-bit data ("I;16" PNGs, uint16 arrays, "I" images with values above 255) is scaled by
  255/65535 (v -> round(v / 257)), never clipped; float data in [0, 1] is scaled by 255;
- "P", "CMYK", "YCbCr", "1" and "L" convert to RGB with PIL; an animated image gives its first
  frame;
- decompression bombs (more pixels than `PIL.Image.MAX_IMAGE_PIXELS`) and corrupt or truncated
  files are refused with an `ImageInputError` naming the file, or the batch index for
  in-memory inputs.

This file imports only numpy, PIL, torch and the standard library, and none of its siblings: it
ships with the processor as remote code and is copied flat next to the Space app.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from PIL import ExifTags

BACKGROUND = 255  # the grey level transparent pixels are composited onto (white)
# What a loader may do with an image it cannot read: raise naming it, or leave it out and count it.
BAD_IMAGE_POLICIES = ("error", "skip")


class ImageInputError(ValueError):
    """An image that cannot be used; the message names the file or its index in the batch."""


def _label(index: int | None, details: list[str]) -> str:
    head = f"image {index}" if index is not None else "image"
    details = [d for d in details if d]
    return head + (f" ({', '.join(details)})" if details else "")


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Scale an integer / float / bool image array to uint8 without guessing silently."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(f"{what} contains NaN or infinite values")
        if low >= 0.0 and high <= 1.0:  # float images in [0, 1] (torchvision / matplotlib convention)
            return np.round(array * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.round(array).astype(np.uint8)
        raise ImageInputError(f"{what}: float values must lie in [0, 1] or [0, 255], got [{low}, {high}]")
    if low < 0:
        raise ImageInputError(f"{what}: negative pixel values ({low})")
    # 16-bit data uses the full 0..65535 range: 65535 / 257 = 255 maps it onto 8 bits exactly.
    if array.dtype == np.uint16 or high > 255:
        if high > 65535:
            raise ImageInputError(f"{what}: integer values above 16 bits ({high})")
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    return array.astype(np.uint8)


def composite_on_background(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8, alpha-blended onto white (`BACKGROUND`)."""
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.round(rgb * alpha + float(BACKGROUND) * (1.0 - alpha)).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, what: str, channels_first: bool) -> np.ndarray:
    if array.dtype.kind not in "biuf":  # object arrays (ragged lists, None), strings, complex...
        raise ImageInputError(
            f"{what}: unsupported array dtype {array.dtype} (pixels must be bool, integer or float numbers)"
        )
    if array.ndim == 3:
        leading, trailing = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        # Tensors default to (C, H, W), arrays to (H, W, C); the other layout only when unambiguous.
        if leading and (channels_first or not trailing):
            array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ImageInputError(
            f"{what}: expected an (H, W), (H, W, C) or (C, H, W) array with C in 1..4, got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageInputError(f"{what} has zero size ({array.shape[1]}x{array.shape[0]})")
    array = _to_uint8(array, what)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 2:  # grey + alpha
        return composite_on_background(np.concatenate([np.repeat(array[..., :1], 3, axis=-1), array[..., 1:]], axis=-1))
    if channels == 4:
        return composite_on_background(array)
    return np.ascontiguousarray(array)


def exceeds_pixel_limit(width: int, height: int) -> bool:
    """Whether an image of this size is refused as a possible decompression bomb: PIL raises only
    above twice `PIL.Image.MAX_IMAGE_PIXELS` and merely warns in between; DiaNA refuses at the limit."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    return limit is not None and width * height > limit


def _check_pixel_count(image: PIL.Image.Image, what: str) -> None:
    if exceeds_pixel_limit(image.width, image.height):
        raise ImageInputError(
            f"{what} is refused as a possible decompression bomb: {image.width}x{image.height} = "
            f"{image.width * image.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = {PIL.Image.MAX_IMAGE_PIXELS}"
        )


def _pil_to_rgb(image: PIL.Image.Image, what: str) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"{what} has zero size ({image.width}x{image.height})")
    _check_pixel_count(image, what)
    try:
        image.load()  # lazily opened files fail here when truncated or corrupt
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        if orientation not in (None, 1):
            image = PIL.ImageOps.exif_transpose(image)  # the result carries no orientation tag any more
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error... for broken files
        raise ImageInputError(f"{what} could not be decoded: {err}") from err
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grey: PIL's convert("RGB") clips instead of scaling, turning most photos white.
        array = np.asarray(image)
        if mode.startswith("I;16"):
            array = array.astype(np.uint16)
        return _array_to_rgb(array, what, channels_first=False)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        return composite_on_background(np.asarray(image.convert("RGBA")))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as err:
        raise ImageInputError(f"{what}: cannot convert PIL mode {mode!r} to RGB: {err}") from err


def _open_and_convert(source: str | os.PathLike | io.BytesIO, what: str) -> np.ndarray:
    try:
        with PIL.Image.open(source) as opened:
            return _pil_to_rgb(opened, what)
    except ImageInputError:
        raise
    except PIL.Image.DecompressionBombError as err:
        raise ImageInputError(f"{what} is refused as a possible decompression bomb: {err}") from err
    except Exception as err:
        raise ImageInputError(f"{what} could not be opened as an image: {err}") from err


def load_rgb_image(image: Any, index: int | None = None, *, where: str | None = None) -> np.ndarray:
    """Any supported image input to the (H, W, 3) uint8 RGB array the model sees.

    Accepts file paths, undecoded `datasets.Image()` cells ({"bytes", "path"}), PIL images of any
    mode ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"...), numpy
    arrays ((H, W), (H, W, C), (C, H, W); uint8, uint16, bool, float in [0, 1] or [0, 255]) and
    torch tensors ((C, H, W) or (H, W, C)). EXIF orientation is applied; transparency is
    composited onto white; 16-bit data is scaled by 1/257; an animated image gives its first
    frame (see the module docstring).

    Args:
        image: The image.
        index: Its index in the batch, named in error messages.
        where: More context for error messages (e.g. the dataset row).

    Raises:
        ImageInputError: Missing, corrupt, truncated, oversized (decompression bomb), zero-size or
            unsupported images; the message names the file, or the index for in-memory inputs.
    """
    details = [where or ""]
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):
        # An undecoded `datasets.Image()` cell: {"bytes": ... or None, "path": ... or None}.
        if image.get("bytes"):
            details.insert(0, f"bytes of {image.get('path') or 'an unnamed file'}")
            return _open_and_convert(io.BytesIO(image["bytes"]), _label(index, details))
        if not image.get("path"):
            raise ImageInputError(f"{_label(index, details)}: image dict without bytes or path")
        image = image["path"]
    if isinstance(image, (str, os.PathLike)):
        return _open_and_convert(image, _label(index, [os.fspath(image), *details]))
    if isinstance(image, io.BytesIO):
        return _open_and_convert(image, _label(index, details))
    if isinstance(image, PIL.Image.Image):
        filename = getattr(image, "filename", None)
        return _pil_to_rgb(image, _label(index, [filename if isinstance(filename, str) else "", *details]))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, _label(index, details), channels_first=False)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        return _array_to_rgb(tensor.numpy(), _label(index, details), channels_first=True)
    if image is None:
        raise ImageInputError(f"{_label(index, details)} is missing (None)")
    raise ImageInputError(
        f"{_label(index, details)}: unsupported type {type(image).__name__} (PIL image, numpy array, tensor, path "
        "or {'bytes', 'path'} dict; dialogues go in `dialogues=`)"
    )


def load_rgb_pil(image: Any, index: int | None = None, *, where: str | None = None) -> PIL.Image.Image:
    """`load_rgb_image` as an RGB PIL image (for torchvision pipelines and displays)."""
    return PIL.Image.fromarray(load_rgb_image(image, index, where=where))


__all__ = [
    "BACKGROUND", "BAD_IMAGE_POLICIES", "ImageInputError", "composite_on_background", "exceeds_pixel_limit",
    "load_rgb_image", "load_rgb_pil",
]
