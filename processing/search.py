"""Chat-based search over a user's own gallery: a gallery index file and a search session.

The gallery is encoded once into a safetensors file (:class:`GalleryIndex`) that records which
model and which processor made it, so an index is never silently searched with embeddings from
another model. A :class:`ChatSearchSession` then takes a witness's description and follow-up
question/answer rounds and returns the top-k after every round. Each round runs the dialogue
tower on that round's tokens only: the Llama tower is causal, so the key/value cache of the ids
the new dialogue shares with the previous one is exactly what a from-scratch pass would
recompute. With the processor's round-by-round tokenisation that is all of the previous ids;
with its official tokenisation the cache is cut back to where the ids part (a round's final
punctuation merges with the next round's newline) and those few tokens run again.

Search is exact by default (chunked matrix products, ties broken by gallery index as in the
evaluation protocol); FAISS (``faiss-cpu``) is an optional back end for very large galleries and
returns the same ranking on its exact ``Flat`` index.

This file imports only torch, numpy, PIL, safetensors, tqdm, the standard library (faiss and
matplotlib lazily) and its sibling ``image_loading`` (the loader every image path shares), so
that the two can be copied flat next to the Space app (``hub_cards/space``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

try:  # inside the project ...
    from .image_loading import ImageInputError, load_rgb_image, load_rgb_pil
except ImportError:  # ... or copied flat next to the Space app
    from image_loading import ImageInputError, load_rgb_image, load_rgb_pil

INDEX_FORMAT = "diana-gallery-index"
INDEX_FORMAT_VERSION = "1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SCORE_MODES = ("global", "attribute", "fused")

# Config keys that change when the same model is saved, reloaded or cast, without changing what it
# computes; the fingerprint must survive save_pretrained -> from_pretrained and a dtype change.
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
    "pad_token_id", "bos_token_id", "eos_token_id",
})
# A fixed dialogue and a fixed picture whose processed form identifies a processor by behaviour
# (resize, normalisation statistics, template, vocabulary) rather than by its config key names.
_PROBE_DIALOGUE = [
    ("Please describe the person you saw.", "A woman in a red coat with a black backpack."),
    ("Is she wearing glasses?", "No, but she has long brown hair."),
]


class IndexMismatchError(ValueError):
    """An index was made by another model or processor than the one searching it."""


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Exact and FAISS top-k
# --------------------------------------------------------------------------------------------


def _topk_ties_by_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, equal scores ordered by column index (the evaluation protocol's rule).

    ``torch.topk`` picks arbitrarily among values tied at the k-th place, so rows where such a
    tie reaches outside the selection fall back to a stable sort.
    """
    k = min(k, scores.shape[1])
    values, indices = torch.topk(scores, k, dim=1)  # (Q, k)
    kth = values[:, -1:]
    ties_outside = (scores == kth).sum(1) > (values == kth).sum(1)
    values, indices = _stable_order(values, indices)
    if ties_outside.any():
        rows = ties_outside.nonzero().squeeze(1)
        sorted_values, sorted_indices = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], indices[rows] = sorted_values[:, :k], sorted_indices[:, :k]
    return values, indices


def _stable_order(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort candidates by score descending, then by gallery index ascending."""
    by_index = torch.argsort(indices, dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), indices.gather(1, by_score)


@torch.no_grad()
def exact_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    chunk_size: int = 65536,
    score_fn: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over a gallery, one matrix product per gallery chunk.

    Args:
        queries: (Q, D) query embeddings.
        gallery: (N, D) gallery embeddings.
        k: how many results per query (capped at N).
        chunk_size: gallery rows scored at once; bounds memory at Q x chunk_size scores.
        score_fn: optional ``(queries, rows) -> (Q, len(rows))`` scorer replacing the inner
            product (used for the attribute / fused score modes).

    Returns:
        ``(scores (Q, k), indices (Q, k))``, best first, ties by gallery index.
    """
    num_gallery = gallery.shape[0]
    if num_gallery == 0:
        raise ValueError("cannot search an empty gallery")
    k = min(k, num_gallery)
    best_values: torch.Tensor | None = None
    best_indices: torch.Tensor | None = None
    for start in range(0, num_gallery, chunk_size):
        rows = slice(start, min(start + chunk_size, num_gallery))
        if score_fn is None:
            # The gallery stays on the host; one chunk at a time visits the queries' device.
            scores = queries.float() @ gallery[rows].to(queries.device, torch.float32).T  # (Q, n_chunk)
        else:
            scores = score_fn(queries, rows).float()
        values, indices = _topk_ties_by_index(scores, k)
        indices = indices + start
        if best_values is None:
            best_values, best_indices = values, indices
        else:
            # Candidates of earlier chunks have lower gallery indices; _stable_order keeps the rule.
            merged_values, merged_indices = _stable_order(
                torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
            )
            best_values, best_indices = merged_values[:, :k], merged_indices[:, :k]
    return best_values.cpu(), best_indices.cpu()


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaissSearcher:
    """Inner-product FAISS index over normalised embeddings.

    ``factory="Flat"`` is exact (same ranking as :func:`exact_topk` up to float summation order);
    other factory strings (e.g. ``"IVF4096,Flat"``, ``"HNSW32"``) trade exactness for speed on
    galleries of millions and are trained on the gallery itself.
    """

    def __init__(self, embeds: torch.Tensor, factory: str = "Flat", nprobe: int | None = None) -> None:
        try:
            import faiss
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("the FAISS back end needs `pip install faiss-cpu`") from error
        data = np.ascontiguousarray(embeds.detach().float().cpu().numpy())
        self.index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            self.index.train(data)
        if nprobe is not None:
            faiss.extract_index_ivf(self.index).nprobe = nprobe
        self.index.add(data)
        self.factory, self.nprobe = factory, nprobe

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (Q, k), indices (Q, k))`` best first."""
        k = min(k, self.index.ntotal)
        scores, indices = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(indices).long()


# --------------------------------------------------------------------------------------------
# Gallery index
# --------------------------------------------------------------------------------------------


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
        if on_bad_image not in ("error", "skip"):
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
                except ImageInputError as error:
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
                f"(python -m diana.processing.search_cli index --model ... --images ... --output ...) "
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
        if mode not in SCORE_MODES:
            raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
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


# --------------------------------------------------------------------------------------------
# Chat search session
# --------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """The ranking after one round of a search session."""

    round_index: int  # 1-based
    question: str
    answer: str
    indices: list[int]
    scores: list[float]
    paths: list[str]
    ids: list[int]
    new_tokens: int  # tokens run through the dialogue tower for this round
    truncated: bool  # the dialogue hit the processor's max_length in this round


class ChatSearchSession:
    """An interactive search: a description, then question/answer rounds, top-k after each.

    Each round runs only its own new tokens through the Llama tower, reusing the key/value cache
    of the earlier rounds (``model.text_model(..., cache=DynamicCache, use_cache=True)``), and
    pools the cached token states with ``model.encode_text_tokens`` (the model's own pooling, as
    ``config.text_pooling`` says); the encodings after round k equal ``model.encode_dialogues`` of
    the whole k-round dialogue, in every score mode and either processor tokenisation.

    Args:
        model: a ``DiaNAModel`` (eval mode is set).
        processor: its ``DiaNAProcessor``.
        index: the gallery to search; refused if another model / processor made it.
        k: results per round.
        mode: score mode (default ``model.config.score_mode``).
        backend: ``"exact"`` or ``"faiss"``.
        faiss_factory: FAISS index factory string (``"Flat"`` is exact; e.g. ``"IVF4096,Flat"`` or
            ``"HNSW32"`` for galleries of millions).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        index: GalleryIndex,
        *,
        k: int = 10,
        mode: str | None = None,
        backend: str = "exact",
        faiss_factory: str = "Flat",
        check_index: bool = True,
    ) -> None:
        if check_index:
            index.check_compatible(model, processor)
        self.model = model.eval()
        self.processor = processor
        self.index = index
        self.k = k
        self.mode = mode or getattr(model.config, "score_mode", "global")
        if self.mode not in SCORE_MODES:
            raise ValueError(f"mode must be one of {SCORE_MODES}, got {self.mode!r}")
        self.backend = backend
        self.faiss_factory = faiss_factory
        self.reset()

    def reset(self) -> None:
        """Forget the dialogue (and the cache) to start a new search."""
        self.rounds: list[tuple[str, str]] = []
        self.results: list[RoundResult] = []
        self._ids: list[int] = []
        self._cache: Any = None
        self._token_states: torch.Tensor | None = None  # (1, L, D) projected tower tokens
        self.text_embeds: torch.Tensor | None = None  # (1, D) after the latest round
        self.text_attribute_embeds: torch.Tensor | None = None  # (1, K, D)

    @property
    def first_question(self) -> str:
        """The fixed question of round 1 (as in the paper)."""
        return "Please describe the person you saw."

    def start(self, description: str) -> RoundResult:
        """Begin a new search with the witness's description (round 1)."""
        self.reset()
        return self.add_round(self.first_question, description)

    @torch.no_grad()
    def add_round(self, question: str, answer: str) -> RoundResult:
        """Add one question/answer round and return the new top-k."""
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError(f"round {len(self.rounds) + 1}: question and answer must be strings")
        if not answer.strip():
            raise ValueError(f"round {len(self.rounds) + 1}: the answer is empty")
        rounds = [*self.rounds, (question, answer)]
        ids, truncated = self._dialogue_ids(rounds)
        new_tokens = self._run_tower(ids)
        encoding = self.model.encode_text_tokens(
            self._token_states, torch.ones(self._token_states.shape[:2], dtype=torch.bool, device=self._token_states.device),
            with_attributes=self.mode != "global",
        )
        self.text_embeds = encoding.text_embeds.float()  # (1, D)
        if encoding.text_attribute_embeds is not None:
            self.text_attribute_embeds = encoding.text_attribute_embeds.float()  # (1, K, D)
        self.rounds = rounds
        scores, indices = self.index.search(
            self.text_embeds, self.k, text_attribute_embeds=self.text_attribute_embeds, mode=self.mode,
            model=self.model, backend=self.backend, faiss_factory=self.faiss_factory,
        )
        picked = indices[0].tolist()
        result = RoundResult(
            round_index=len(rounds), question=question, answer=answer, indices=picked,
            scores=scores[0].tolist(), paths=[self.index.paths[i] for i in picked],
            ids=[int(self.index.ids[i]) for i in picked], new_tokens=new_tokens, truncated=truncated,
        )
        self.results.append(result)
        return result

    def _dialogue_ids(self, rounds: list[tuple[str, str]]) -> tuple[list[int], bool]:
        """The processor's ids of the dialogue so far (what `encode_dialogues` of it reads) and whether
        its last round was cut by the processor's max_length."""
        batch = self.processor(dialogues=[rounds], return_tensors=None, padding=False)
        ids = list(batch["input_ids"][0])
        full = self.processor(dialogues=[rounds], return_tensors=None, padding=False, truncation=False)
        return ids, len(full["input_ids"][0]) > len(ids)

    def _run_tower(self, ids: list[int]) -> int:
        """Brings the cached tower states to `ids`; returns how many tokens went through the tower.

        The cache keeps the states of the longest common prefix of the cached ids and `ids` (the tower is
        causal: those states are what a fresh pass computes) and the rest runs on top of it. With round-by-
        round tokenisation that is the new round's tokens; with the official tokenisation also the few
        tokens at the previous round's end that merge differently once a round follows.
        """
        from transformers import DynamicCache

        keep = 0
        for cached, new in zip(self._ids, ids):
            if cached != new:
                break
            keep += 1
        if self._cache is None or keep == 0:
            self._cache, self._token_states = DynamicCache(config=self.model.text_model.config), None
        elif keep < len(self._ids):
            self._cache.crop(keep - len(self._ids))  # negative: drop that many cached tokens
            self._token_states = self._token_states[:, :keep]
        self._ids = list(ids)
        if keep == len(ids):
            return 0
        model = self.model
        device = next(model.parameters()).device
        hidden = model.text_model(
            input_ids=torch.tensor([ids[keep:]], device=device), cache=self._cache, use_cache=True,
        ).last_hidden_state  # (1, n_new, H)
        states = model.text_projection(hidden)  # (1, n_new, D)
        self._token_states = states if self._token_states is None else torch.cat([self._token_states, states], 1)
        return len(ids) - keep

    @torch.no_grad()
    def encode_from_scratch(self) -> torch.Tensor:
        """(R, D) embeddings of every round prefix by one full pass (to check the cached path)."""
        batch = self.processor(dialogues=[self.rounds], return_round_ends=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        encoding = self.model.encode_dialogues(
            batch["input_ids"].to(device), batch["attention_mask"].to(device),
            round_end_positions=batch["round_end_positions"].to(device),
            round_token_mask=batch["round_token_mask"].to(device) if "round_token_mask" in batch else None,
        )
        return encoding.text_embeds[0].float()


# --------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------


def save_contact_sheet(
    results: Sequence[RoundResult],
    output: str | os.PathLike,
    *,
    title: str | None = None,
    thumb_width: float = 1.1,
) -> Path:
    """Save a PNG grid: one row per round (its answer on the left), its top-k photos labelled
    with rank, score and person id (when known)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no rounds to draw")
    columns = max(len(r.paths) for r in results)
    text_width = 1.7
    row_height = thumb_width * 2 + 0.55  # pedestrian photos are 2:1 (H:W), plus the labels
    figure, axes = plt.subplots(
        len(results), columns + 1, squeeze=False,
        figsize=(text_width + columns * thumb_width, 0.5 * bool(title) + len(results) * row_height),
        gridspec_kw={"width_ratios": [text_width / thumb_width] + [1] * columns},
    )
    for row, result in enumerate(results):
        label_axis = axes[row][0]
        label_axis.axis("off")
        answer = "\n".join(textwrap.wrap(result.answer, 24)[:6])
        label_axis.text(0.0, 0.5, f"round {result.round_index}\n{answer}", fontsize=7, va="center", ha="left",
                        transform=label_axis.transAxes)
        for column in range(columns):
            axis = axes[row][column + 1]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(result.paths):
                axis.axis("off")
                continue
            axis.imshow(load_rgb_pil(result.paths[column]))
            label = f"#{column + 1}  {result.scores[column]:.3f}"
            if result.ids[column] >= 0:
                label += f"\nid {result.ids[column]}"
            axis.set_title(label, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


__all__ = [
    "AddReport", "ChatSearchSession", "FaissSearcher", "GalleryIndex", "IndexMismatchError",
    "RoundResult", "config_hash", "exact_topk", "faiss_available", "list_images", "model_fingerprint",
    "processor_fingerprint", "save_contact_sheet", "weights_checksum",
]
