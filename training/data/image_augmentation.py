"""The paper's training image augmentation (IRRA's recipe) with `torchvision.transforms.v2`: RGB,
resize, horizontal flip, pad 10 + random crop, scale to [0, 1], normalise, random erasing; built from
the processor's image processor so it shares its size, interpolation and statistics, and driven by an
explicit `torch.Generator`.

The collator (`collator.py`) runs it only for training; evaluation uses the processor's own path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def _interpolation(resample: Any) -> v2.InterpolationMode:
    """Maps an image processor's `resample` (PIL enum / int / InterpolationMode) to torchvision's."""
    if isinstance(resample, v2.InterpolationMode):
        return resample
    names = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
    name = names.get(int(resample)) if resample is not None else "BILINEAR"
    if name is None or not hasattr(v2.InterpolationMode, name):
        raise ValueError(f"unsupported resample {resample!r} for the augmentation pipeline")
    return getattr(v2.InterpolationMode, name)


def build_train_image_transform(
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    flip_probability: float = 0.5,
    padding: int | None = None,
    erasing_probability: float = 0.5,
    erasing_scale: tuple[float, float] = (0.02, 0.4),
) -> v2.Compose:
    """The training image pipeline of the paper as a `torchvision.transforms.v2.Compose`.

    Order (IRRA's): RGB → resize (H, W) → horizontal flip → pad `padding` (black) → random crop
    back to (H, W) → float in [0, 1] → normalise → random erasing. The erased rectangle is filled
    with 0 *after* normalisation, i.e. with the dataset's mean colour, which is what "filled with
    the mean" means (IRRA's code passes the mean *values* to RandomErasing after Normalize, which
    fills with a grey 0.35–0.39 std above the mean instead; a slip we do not copy).

    Resizing works on the uint8 image with antialiasing exactly as `ViTImageProcessor`'s torchvision
    backend does, so with every random step off (`flip_probability=0, padding=0,
    erasing_probability=0`) the output equals the processor's `pixel_values` up to float rounding.

    Args:
        size: (H, W) output size.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        interpolation: Resize interpolation (the processor's `resample`).
        flip_probability: Horizontal flip probability (0 disables the step).
        padding: Pixels padded on each side before the random crop (0 disables pad and crop).
            Default: the paper's 10 pixels at 384x192, scaled to this width (10 px on a 32-px-wide
            image would shift the person by a third of its width).
        erasing_probability: Random erasing probability (0 disables the step; IRRA uses 0.5).
        erasing_scale: Range of the erased area as a fraction of the image.

    Returns:
        The pipeline; it takes a PIL image or a (3, h, w) uint8 tensor and returns a (3, H, W)
        float32 `tv_tensors.Image`.
    """
    height, width = int(size[0]), int(size[1])
    if not 0.0 <= float(erasing_probability) <= 1.0:
        raise ValueError(f"the random erasing probability must be in [0, 1], got {erasing_probability}")
    if padding is None:
        padding = max(1, round(10 * width / 192))
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RGB(),
        v2.Resize((height, width), interpolation=interpolation, antialias=True),
    ]
    if flip_probability > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_probability))
    if padding > 0:
        steps += [v2.Pad(padding, fill=0), v2.RandomCrop((height, width))]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if erasing_probability > 0:
        steps.append(v2.RandomErasing(p=erasing_probability, scale=erasing_scale, ratio=(0.3, 3.3), value=0.0))
    return v2.Compose(steps)


def image_processor_geometry(image_processor: Any) -> tuple[tuple[int, int], list[float], list[float], Any]:
    """Reads (size (H, W), mean, std, resample) from a ViT-style image processor.

    Raises:
        ValueError: If the processor's size is not an explicit height/width.
    """
    size = image_processor.size
    height = size.get("height") if isinstance(size, Mapping) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, Mapping) else getattr(size, "width", None)
    if not height or not width:
        raise ValueError(f"image augmentation needs an image processor with size height/width, got {size!r}")
    return (int(height), int(width)), list(image_processor.image_mean), list(image_processor.image_std), getattr(
        image_processor, "resample", None
    )


class PedestrianImageAugmentation:
    """The training image pipeline, built from an image processor so it shares the processor's
    size, interpolation and normalisation statistics, and run under an explicit generator.

    torchvision's random transforms draw from torch's global CPU generator; `__call__` re-seeds that
    generator from `generator` for the duration of the call and then restores it, so augmentation
    is reproducible and leaves the caller's global random state untouched.

    Args:
        image_processor: A `ViTImageProcessor`(-like) with `size`, `image_mean`, `image_std`,
            `resample`.
        **kwargs: Passed to `build_train_image_transform` (flip_probability, padding, …).
    """

    def __init__(self, image_processor: Any, **kwargs: Any) -> None:
        size, mean, std, resample = image_processor_geometry(image_processor)
        self.size, self.mean, self.std = size, mean, std
        self.transform = build_train_image_transform(size, mean, std, interpolation=_interpolation(resample), **kwargs)
        # The pipeline's deterministic head (ToImage, RGB, Resize: no random draw) and its random tail, so that
        # a resized image can be kept (`DiaNACollator(image_cache=True)`) and only the tail run every epoch;
        # tail(head(image)) is the whole pipeline, bit for bit.
        steps = list(self.transform.transforms)
        if [type(step) for step in steps[:3]] != [v2.ToImage, v2.RGB, v2.Resize]:
            raise RuntimeError(f"unexpected head of the training image pipeline: {steps[:3]}")
        self.head, self.tail = v2.Compose(steps[:3]), v2.Compose(steps[3:])

    def prepare(self, image: PIL.Image.Image) -> torch.Tensor:
        """The deterministic head of the pipeline: a (3, H, W) uint8 tensor at the output size."""
        return self.head(image).as_subclass(torch.Tensor).contiguous()

    def __call__(self, images: Sequence[PIL.Image.Image | torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Augments a list of images independently.

        Args:
            images: RGB PIL images (any sizes), or what `prepare` returned for them (the same output).
            generator: The random source.

        Returns:
            (B, 3, H, W) float32 pixel values.
        """
        seed = int(torch.randint(2**62, (1,), generator=generator))
        # fork_rng(devices=[]) saves/restores only the CPU generator; default_generator.manual_seed
        # (not torch.manual_seed) leaves CUDA generators alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            outputs = [
                self.tail(tv_tensors.Image(image) if isinstance(image, torch.Tensor) else self.head(image))
                .as_subclass(torch.Tensor)
                for image in images
            ]
        return torch.stack(outputs)  # (B, 3, H, W)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


__all__ = ["PedestrianImageAugmentation", "build_train_image_transform", "image_processor_geometry"]
