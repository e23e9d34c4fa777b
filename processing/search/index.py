"""The gallery index: normalised image embeddings of a user's photos in one safetensors file,
with the paths, person ids and the fingerprints of the model and processor that made them, so an
index is never silently searched with embeddings from another model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..image_loading import BAD_IMAGE_POLICIES, ImageInputError, load_rgb_image
from .fingerprints import model_fingerprint, processor_fingerprint
from .topk import FaissSearcher, exact_topk

INDEX_FORMAT = "diana-gallery-index"
INDEX_FORMAT_VERSION = "1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class IndexMismatchError(ValueError):
    """An index was made by another model or processor than the one searching it."""


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image file under ``folder`` (recursive, sorted), as absolute paths."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    return sorted(
        str(p.resolve()) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


@dataclass
class AddReport:
    """What :meth:`GalleryIndex.add_images` did."""

    added: int
    skipped_duplicates: int
    skipped_unreadable: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"added {self.added} image(s), skipped {self.skipped_duplicates} already indexed (or repeated)"
        if self.skipped_unreadable:
            text += f", skipped {len(self.skipped_unreadable)} unreadable"
        return text


class GalleryIndex:
    """Normalised image embeddings of a gallery plus the paths and the model that made them.

    File layout (safetensors): ``image_embeds`` (N, D) float32, optionally
    ``image_attribute_embeds`` (N, K, D) float32, ``ids`` (N,) int64 (person ids, -1 unknown),
    ``paths_utf8`` (bytes of a JSON list of N paths; a tensor rather than header metadata because
    the header is size-limited); header metadata ``format``, ``format_version``,
    ``model_fingerprint``, ``processor_fingerprint``, ``num_images``, ``projection_dim``.
    """

    def __init__(
        self,
        image_embeds: torch.Tensor,
        paths: Sequence[str],
        model_fingerprint: str,
        processor_fingerprint: str,
        image_attribute_embeds: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> None:
        if image_embeds.ndim != 2 or image_embeds.shape[0] != len(paths):
            raise ValueError(
                f"image_embeds must be (N, D) with N = {len(paths)} paths, got {tuple(image_embeds.shape)}"
            )
        self.image_embeds = image_embeds.float().contiguous()
        self.image_attribute_embeds = (
            None if image_attribute_embeds is None else image_attribute_embeds.float().contiguous()
        )
        self.paths = list(paths)
        self.ids = torch.full((len(paths),), -1, dtype=torch.long) if ids is None else ids.long()
        self.model_fingerprint = model_fingerprint
        self.processor_fingerprint = processor_fingerprint
        self._faiss: FaissSearcher | None = None

    def __len__(self) -> int:
        return len(self.paths)

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def empty(cls, model: Any, processor: Any, with_attributes: bool = False) -> GalleryIndex:
        """An index with no images yet, stamped with ``model``'s and ``processor``'s fingerprints."""
        dim = model.config.projection_dim
        slots = model.config.num_attribute_queries
        return cls(
            torch.zeros(0, dim), [], model_fingerprint(model), processor_fingerprint(processor),
            image_attribute_embeds=torch.zeros(0, slots, dim) if with_attributes else None,
        )

    @classmethod
    def build(
        cls,
        paths: Sequence[str] | str | os.PathLike,
        model: Any,
        processor: Any,
        *,
        with_attributes: bool = False,
        batch_size: int = 32,
        on_bad_image: str = "error",
        ids: Sequence[int] | None = None,
        progress: bool = True,
    ) -> GalleryIndex:
        """Encode a folder (or a list of image paths) into a new index; see :meth:`add_images`."""
        index = cls.empty(model, processor, with_attributes=with_attributes)
        index.add_images(
            paths, model, processor, batch_size=batch_size, on_bad_image=on_bad_image, ids=ids,
            progress=progress,
        )
        return index

    @classmethod
    def build_from_dataset(cls, dataset: Any, model: Any, processor: Any, *, with_attributes: bool = False,
                           **kwargs: Any) -> GalleryIndex:
        """Encode a dataset split's images into a new index; see :meth:`add_dataset`."""
        index = cls.empty(model, processor, with_attributes=with_attributes)
        index.add_dataset(dataset, model, processor, **kwargs)
        return index

    def add_dataset(
        self,
        dataset: Any,
        model: Any,
        processor: Any,
        *,
        image_column: str = "image",
        id_column: str | None = "person_id",
        **kwargs: Any,
    ) -> AddReport:
        """Add a dataset split's images (an ``Image()`` column holding paths) with their person ids.

        Rows sharing an image (ChatPedes has one row per dialogue) are indexed once; they are
        counted as duplicates in the report. Other keyword arguments go to :meth:`add_images`.
        """
        from datasets import Image as ImageFeature

        if image_column not in dataset.column_names:
            raise KeyError(f"dataset has no column {image_column!r} (columns: {dataset.column_names})")
        with_ids = bool(id_column) and id_column in dataset.column_names
        columns = [image_column] + ([id_column] if with_ids else [])
        table = dataset.select_columns(columns).cast_column(image_column, ImageFeature(decode=False))
        paths: list[str] = []
        ids: list[int] = []
        for row_index, row in enumerate(table):
            path = (row[image_column] or {}).get("path")
            if not path:
                raise ValueError(f"dataset row {row_index}: column {image_column!r} holds no file path")
            paths.append(path)
            ids.append(int(row[id_column]) if with_ids else -1)
        return self.add_images(paths, model, processor, ids=ids, **kwargs)

    @torch.no_grad()
    def add_images(
        self,
        paths: Sequence[str] | str | os.PathLike,
        model: Any,
        processor: Any,
        *,
        batch_size: int = 32,
        on_bad_image: str = "error",
        ids: Sequence[int] | None = None,
        progress: bool = True,
    ) -> AddReport:
        """Encode images not yet in the index and append them.

        Args:
            paths: a folder (searched recursively) or a list of image files.
            model: the DiaNA model; must be the one that made the index.
            processor: its processor; must be the one that made the index.
            batch_size: images per forward pass.
            on_bad_image: what to do with an image `load_rgb_image` refuses (missing, corrupt,
                truncated, a decompression bomb): ``"error"`` raises `ImageInputError` naming the
                file; ``"skip"`` leaves it out and lists it in the returned report.
            ids: optional person id per path (default -1, unknown).
            progress: show a tqdm bar.

        Returns:
            How many images were added and how many were skipped (already indexed by path,
            duplicates within ``paths`` included, or unreadable).
        """
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.check_compatible(model, processor)
        if isinstance(paths, (str, os.PathLike)):
            paths = list_images(paths)
        if ids is not None and len(ids) != len(paths):
            raise ValueError(f"got {len(ids)} ids for {len(paths)} paths")
        seen = set(self.paths)
        todo: list[tuple[str, int]] = []
        duplicates = 0
        for position, path in enumerate(paths):
            key = str(path)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            todo.append((key, -1 if ids is None else int(ids[position])))

        device = next(model.parameters()).device
        new_paths: list[str] = []
        new_ids: list[int] = []
        embeds: list[torch.Tensor] = []
        attribute_embeds: list[torch.Tensor] = []
        unreadable: list[str] = []
        model.eval()
        bar = tqdm(total=len(todo), desc="encoding gallery", unit="img", disable=not progress)
        for start in range(0, len(todo), batch_size):
            images, batch_paths, batch_ids = [], [], []
            for path, person in todo[start:start + batch_size]:
                try:
                    images.append(load_rgb_image(path))
                except ImageInputError:
                    if on_bad_image == "error":
                        raise
                    unreadable.append(path)
                    continue
                batch_paths.append(path)
                batch_ids.append(person)
            bar.update(len(todo[start:start + batch_size]))
            if not images:
                continue
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
            encoding = model.encode_images(pixel_values.to(device=device, dtype=model.dtype))
            embeds.append(encoding.image_embeds.float().cpu())
            if self.image_attribute_embeds is not None:
                attribute_embeds.append(encoding.image_attribute_embeds.float().cpu())
            new_paths += batch_paths
            new_ids += batch_ids
        bar.close()
        if embeds:
            self.image_embeds = torch.cat([self.image_embeds, *embeds])
            if self.image_attribute_embeds is not None:
                self.image_attribute_embeds = torch.cat([self.image_attribute_embeds, *attribute_embeds])
            self.paths += new_paths
            self.ids = torch.cat([self.ids, torch.tensor(new_ids, dtype=torch.long)])
            self._faiss = None
        return AddReport(len(new_paths), duplicates, unreadable)

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as one safetensors file."""
        tensors = {
            "image_embeds": self.image_embeds,
            "ids": self.ids,
            "paths_utf8": torch.frombuffer(bytearray(json.dumps(self.paths).encode()), dtype=torch.uint8),
        }
        if self.image_attribute_embeds is not None:
            tensors["image_attribute_embeds"] = self.image_attribute_embeds
        metadata = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "processor_fingerprint": self.processor_fingerprint,
            "num_images": str(len(self)),
            "projection_dim": str(self.image_embeds.shape[1]),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, processor: Any = None) -> GalleryIndex:
        """Read an index; with ``model`` (and ``processor``) refuse one made by another model."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"gallery index {str(path)!r} does not exist")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != INDEX_FORMAT:
                raise ValueError(f"{str(path)!r} is not a DiaNA gallery index (metadata format={metadata.get('format')!r})")
            if metadata.get("format_version") != INDEX_FORMAT_VERSION:
                raise ValueError(
                    f"{str(path)!r}: index format version {metadata.get('format_version')!r} is not "
                    f"supported (this code reads version {INDEX_FORMAT_VERSION})"
                )
            keys = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in keys}
        paths = json.loads(bytes(tensors["paths_utf8"].numpy()).decode()) if tensors["paths_utf8"].numel() else []
        index = cls(
            tensors["image_embeds"], paths, metadata["model_fingerprint"], metadata["processor_fingerprint"],
            image_attribute_embeds=tensors.get("image_attribute_embeds"), ids=tensors["ids"],
        )
        index.source = str(path)
        if model is not None:
            index.check_compatible(model, processor)
        return index

    def check_compatible(self, model: Any, processor: Any = None) -> None:
        """Raise :class:`IndexMismatchError` if another model / processor made this index."""
        source = getattr(self, "source", "the gallery index")
        found = model_fingerprint(model)
        if found != self.model_fingerprint:
            ours_config, ours_weights = self.model_fingerprint.split("-")
            theirs_config, theirs_weights = found.split("-")
            what = "config" if ours_config != theirs_config else "weights"
            raise IndexMismatchError(
                f"{source} was built with another model (its {what} differ): index model fingerprint "
                f"{self.model_fingerprint}, this model {found}. Rebuild the index with this model "
                f"(python -m diana.processing.search.cli index --model ... --images ... --output ...) "
                f"or search it with the model that built it."
            )
        if processor is not None:
            found = processor_fingerprint(processor)
            if found != self.processor_fingerprint:
                raise IndexMismatchError(
                    f"{source} was built with another processor (image size / normalisation / "
                    f"tokenizer differ): index processor fingerprint {self.processor_fingerprint}, "
                    f"this processor {found}. Use the processor saved with the model."
                )

    # ---- search ------------------------------------------------------------------------------

    def search(
        self,
        text_embeds: torch.Tensor,
        k: int = 10,
        *,
        text_attribute_embeds: torch.Tensor | None = None,
        mode: str = "global",
        model: Any = None,
        backend: str = "exact",
        chunk_size: int = 65536,
        faiss_factory: str = "Flat",
        faiss_nprobe: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k gallery images for normalised dialogue embeddings.

        Args:
            text_embeds: (Q, D) normalised dialogue embeddings.
            k: results per query.
            text_attribute_embeds: (Q, K, D), needed by the attribute / fused modes.
            mode: ``"global"`` (cosine), ``"attribute"`` or ``"fused"`` (scored by
                ``model.similarity``, which applies the config's attribute reduction).
            model: the model, needed by the attribute / fused modes.
            backend: ``"exact"`` (chunked matrix products) or ``"faiss"`` (global mode only).
            chunk_size: gallery rows scored at once by the exact back end.
            faiss_factory: FAISS index factory string; ``"Flat"`` is exact.
            faiss_nprobe: IVF lists visited per query (IVF factories; more = slower, closer to exact).

        Returns:
            ``(scores (Q, k), indices (Q, k))``.
        """
        if len(self) == 0:
            raise ValueError("the gallery index holds no images; add some first")
        if backend == "faiss":
            if mode != "global":
                raise ValueError(f"the FAISS back end scores the global embeddings only, not mode {mode!r}")
            if self._faiss is None or (self._faiss.factory, self._faiss.nprobe) != (faiss_factory, faiss_nprobe):
                self._faiss = FaissSearcher(self.image_embeds, faiss_factory, faiss_nprobe)
            return self._faiss.search(text_embeds, k)
        if backend != "exact":
            raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        if mode == "global":
            return exact_topk(text_embeds, self.image_embeds, k, chunk_size)
        if model is None or text_attribute_embeds is None or self.image_attribute_embeds is None:
            raise ValueError(
                f"mode {mode!r} needs the model, text_attribute_embeds and an index built with "
                "attribute embeddings (with_attributes=True / --with-attributes)"
            )
        device = text_embeds.device
        attribute_gallery = self.image_attribute_embeds

        def score(queries: torch.Tensor, rows: slice) -> torch.Tensor:
            return model.similarity(
                queries, self.image_embeds[rows].to(device, queries.dtype),
                text_attribute_embeds=text_attribute_embeds,
                image_attribute_embeds=attribute_gallery[rows].to(device, queries.dtype), mode=mode,
            )

        return exact_topk(text_embeds, self.image_embeds, k, chunk_size, score_fn=score)
