"""Shared helpers of the ChatPedes and MALS builders: annotation loading with located errors,
image checks, the skip report, and the cache fingerprint of the annotation files.

Every error raised here names the file, and where there is one the entry index and field, so a
user with 37k (ChatPedes) or 1.5M (MALS) records can find the bad one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from ..image_loading import BAD_IMAGE_POLICIES, ImageInputError, exceeds_pixel_limit, load_rgb_image

logger = logging.getLogger(__name__)

REPORT_FILENAME = "diana_report.json"
IMAGE_CHECKS = ("exists", "header", "full")
MISSING_IMAGE_POLICIES = BAD_IMAGE_POLICIES  # a missing file is handled like an unreadable one


class AnnotationError(ValueError):
    """A malformed annotation file or entry; the message names the file, entry index and field."""


class MissingImageError(FileNotFoundError):
    """An image an annotation refers to is missing or unreadable."""


def load_json_list(path: str) -> list[Any]:
    """Reads a JSON file whose top level must be a list of entries.

    Args:
        path: the annotation file.

    Returns:
        The list of entries.

    Raises:
        AnnotationError: the file is missing, is not valid JSON (line and column given) or its top
            level is not a list.
    """
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: top level must be a list of entries, got {type(data).__name__}")
    return data


def require(entry: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """Returns `entry[key]` after checking that it exists and has one of `types`.

    `bool` is rejected where `int` is expected (JSON `true` is not a person id).

    Args:
        entry: the decoded JSON entry.
        key: the field.
        types: the accepted Python types.
        where: "file: entry i" prefix for the message.

    Raises:
        AnnotationError: the entry is not an object, the field is missing or has the wrong type.
    """
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: entry must be a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise AnnotationError(f"{where}: missing field '{key}'")
    value = entry[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise AnnotationError(f"{where}: field '{key}' must be {names}, got {type(value).__name__} ({value!r:.60})")
    return value


def _lacks_end_marker(path: str, image_format: str | None) -> bool:
    """Whether a JPEG / PNG file does not end with its end marker (EOI / IEND), the sign of a file
    cut short: one small read instead of a decode. Other formats are not checked here."""
    if image_format not in ("JPEG", "PNG"):
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        tail = f.read().rstrip(b"\0")  # some writers pad the file with zeros after the end marker
    if image_format == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    return b"IEND" not in tail[-12:]


def _decode_reason(path: str) -> str | None:
    try:
        load_rgb_image(path)
    except ImageInputError as e:
        return f"unreadable: {e}"
    return None


def check_image(path: str, mode: str) -> str | None:
    """Checks that an image can be used, as thoroughly as the mode asks.

    Modes, by cost (2,000 photo-like 384x128 JPEGs of ~18 KB, one core of a busy 2-core machine,
    warm page cache: ~0.007 / 0.2 / 1.7-2.9 ms per image, i.e. 0.3 s / 8 s / 1-2 min for
    ChatPedes' 37,128; `training/benchmarks/cpu.py` measures it):
      - "exists": one stat; refuses missing and zero-byte files;
      - "header": PIL reads the header and the end of the file: also refuses non-image files,
        decompression bombs and JPEG / PNG files cut short (a file without its end marker is
        decoded to tell a cut file from one with trailing data); a file corrupted in its middle
        still passes;
      - "full": decodes every pixel with `image_loading.load_rgb_image`, the loader training,
        evaluation and the processor use: whatever passes, they can load.

    Args:
        path: absolute image path.
        mode: one of IMAGE_CHECKS.

    Returns:
        None when usable, else the reason.
    """
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "missing"
    if info.st_size == 0:
        return "unreadable: empty file (0 bytes)"
    if mode == "exists":
        return None
    if mode == "full":
        return _decode_reason(path)
    try:
        with Image.open(path) as im:
            if im.width <= 0 or im.height <= 0:
                return "unreadable: empty image"
            if exceeds_pixel_limit(im.width, im.height):
                return f"unreadable: possible decompression bomb ({im.width}x{im.height} pixels)"
            image_format = im.format
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, OSError, SyntaxError...
        return f"unreadable: {type(e).__name__}: {e}"
    # A file without its end marker is decoded to be sure: some cameras append data after it.
    return _decode_reason(path) if _lacks_end_marker(path, image_format) else None


@dataclass
class SkipReport:
    """Images skipped under on_missing_image="skip": never a silent drop.

    Attributes:
        on_missing_image: the policy that was in force.
        image_check: the check mode.
        skipped: split -> list of {"file", "entry_index", "file_path", "reason"}.
        notes: other counted policies (e.g. persons found in both train and test).
    """

    on_missing_image: str
    image_check: str
    skipped: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.skipped.items()}

    @property
    def total_skipped(self) -> int:
        return sum(len(items) for items in self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "on_missing_image": self.on_missing_image,
            "image_check": self.image_check,
            "num_skipped": self.num_skipped,
            "total_skipped": self.total_skipped,
            "skipped": self.skipped,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SkipReport":
        return cls(d["on_missing_image"], d["image_check"], d.get("skipped", {}), d.get("notes", []))

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, REPORT_FILENAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, directory: str) -> "SkipReport | None":
        path = os.path.join(directory, REPORT_FILENAME)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def resolve_image(
    images_root: str,
    rel_path: str,
    *,
    where: str,
    split: str,
    entry_index: int,
    annotation_file: str,
    image_check: str,
    on_missing_image: str,
    report: SkipReport,
) -> str | None:
    """Absolute path of a usable image, or None when it was skipped (and recorded in `report`).

    Raises:
        MissingImageError: the image is missing/unreadable and the policy is "error".
    """
    path = os.path.abspath(os.path.join(images_root, rel_path))
    reason = check_image(path, image_check)
    if reason is None:
        return path
    if on_missing_image == "error":
        raise MissingImageError(
            f"{where}: image {rel_path!r} ({path}) is {reason}; pass on_missing_image='skip' to skip "
            "such images (they are counted in the builder's report)"
        )
    report.skipped.setdefault(split, []).append(
        {"file": annotation_file, "entry_index": entry_index, "file_path": rel_path, "reason": reason}
    )
    return None


def fingerprint(paths: Iterable[str], contents: bool) -> str:
    """A cache key of annotation files (the datasets cache ignores file contents).

    Args:
        paths: the annotation files.
        contents: hash the bytes (robust to edits that keep size and mtime, e.g. `cp -p`) or only
            the names, sizes and mtimes (for MALS's ~1 GB of JSON, where reading costs seconds).

    Returns:
        A 16-hex-digit digest.
    """
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(paths):
        h.update(os.path.basename(path).encode())
        st = os.stat(path)
        h.update(f"{st.st_size}".encode())
        if contents:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{st.st_mtime_ns}".encode())
    return h.hexdigest()


def unwrap_generation_error(error: BaseException) -> BaseException:
    """datasets wraps errors raised inside `_generate_examples` in DatasetGenerationError; our
    located errors are what the user needs, so they are re-raised as they are."""
    cause = error.__cause__
    if isinstance(cause, (AnnotationError, MissingImageError)):
        return cause.with_traceback(cause.__traceback__)
    return error


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def log_report(report: SkipReport, dataset: str) -> None:
    if report.total_skipped:
        logger.warning(
            "%s: skipped %d missing/unreadable images (%s); see the builder's report",
            dataset, report.total_skipped, report.num_skipped,
        )


class ReportingBuilder(datasets.GeneratorBasedBuilder):
    """What the ChatPedes and MALS builders share: the `on_missing_image` / `image_check` checks,
    generation errors re-raised as the located error that caused them, and the skip report kept
    next to the cached arrow files (so a cached load still has it)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._report: SkipReport | None = None
        super().__init__(*args, **kwargs)
        check_choice("on_missing_image", self.config.on_missing_image, MISSING_IMAGE_POLICIES)
        check_choice("image_check", self.config.image_check, IMAGE_CHECKS)

    @property
    def report(self) -> SkipReport | None:
        """What `on_missing_image="skip"` skipped (None before `download_and_prepare`)."""
        return self._report

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        self._report = None
        try:
            super().download_and_prepare(*args, **kwargs)
        except datasets.exceptions.DatasetGenerationError as e:
            raise unwrap_generation_error(e) from None
        if self._report is not None:
            self._report.save(self._output_dir)
        else:
            self._report = SkipReport.load(self._output_dir)

    def prepared_splits(
        self, return_report: bool = False
    ) -> datasets.DatasetDict | tuple[datasets.DatasetDict, SkipReport | None]:
        """Builds (or reads from the cache) the splits; with `return_report` also the skip report."""
        self.download_and_prepare()
        splits = self.as_dataset()
        return (splits, self.report) if return_report else splits
