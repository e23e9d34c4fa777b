"""The gallery index: normalised image embeddings of a user's photos with the paths, person ids and
the fingerprints of the model and processor that made them, so an index is never silently searched
with embeddings from another model. Stored as a folder of shards (float32 exact vectors, float16
scan copies; see `storage`) or, for small galleries and older files, one safetensors file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..image_loading import BAD_IMAGE_POLICIES, ImageInputError, load_rgb_image
from . import storage
from .ann import ANN_CANDIDATES, ANN_MIN_IMAGES, AnnIndex
from .fingerprints import model_fingerprint, processor_fingerprint
from .storage import Block, block_from_embeds
from .topk import FaissSearcher, exact_topk, rescored_topk

ANN_FILE = "ann.faiss"
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


class _ImageFiles(Dataset):
    """Decodes and preprocesses one image per item (in DataLoader workers): ``(position, pixels or
    None, error message or None)``; an unreadable image is reported, never dropped."""

    def __init__(self, paths: Sequence[str], processor: Any) -> None:
        self.paths, self.processor = list(paths), processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_rgb_image(self.paths[position])
        except ImageInputError as error:
            return position, None, str(error)
        return position, self.processor(images=[image], return_tensors="pt")["pixel_values"][0], None


def _as_list(batch: list) -> list:
    return batch


@dataclass
class EncodedImages:
    """What `encode_image_files` made: vectors of the readable images in input order, and the rest."""

    embeds: torch.Tensor  # (n, D) float32
    attributes: torch.Tensor | None  # (n, K, D) float32
    positions: list[int]  # positions in the input list of the encoded images
    unreadable: list[tuple[int, str]]  # (position, error message)


@torch.no_grad()
def encode_image_files(
    paths: Sequence[str], model: Any, processor: Any, *, with_attributes: bool = False, batch_size: int = 32,
    num_workers: int = 0, on_bad_image: str = "error", progress: bool = True,
) -> EncodedImages:
    """Encode image files with ``model``; DataLoader workers decode (`load_rgb_image`) and preprocess.

    Raises:
        ImageInputError: an image is unreadable and ``on_bad_image == "error"`` (it names the file).
    """
    device = next(model.parameters()).device
    loader = DataLoader(_ImageFiles(paths, processor), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_list)
    embeds: list[torch.Tensor] = []
    attributes: list[torch.Tensor] = []
    positions: list[int] = []
    unreadable: list[tuple[int, str]] = []
    model.eval()
    bar = tqdm(total=len(paths), desc="encoding gallery", unit="img", disable=not progress)
    for batch in loader:
        bar.update(len(batch))
        for position, _, message in batch:
            if message is not None:
                if on_bad_image == "error":
                    raise ImageInputError(message)
                unreadable.append((position, message))
        good = [(position, pixels) for position, pixels, message in batch if message is None]
        if not good:
            continue
        pixel_values = torch.stack([pixels for _, pixels in good])
        encoding = model.encode_images(pixel_values.to(device=device, dtype=model.dtype))
        embeds.append(encoding.image_embeds.float().cpu())
        if with_attributes:
            attributes.append(encoding.image_attribute_embeds.float().cpu())
        positions += [position for position, _ in good]
    bar.close()
    dim = model.config.projection_dim
    return EncodedImages(
        torch.cat(embeds) if embeds else torch.zeros(0, dim),
        (torch.cat(attributes) if attributes else torch.zeros(0, model.config.num_attribute_queries, dim))
        if with_attributes else None,
        positions, unreadable,
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

    The vectors are held as consecutive blocks of rows (`storage.Block`): exact float32 vectors
    and a float16 copy that every query scans; blocks read from a folder index are memory-mapped,
    so a search pages in the float16 vectors and only the shortlisted float32 rows. Search back
    ends: ``"exact"`` (float16 scan + float32 re-score: the float32 exact ranking, ties by gallery
    index), ``"ann"`` (a FAISS inverted file, built once and saved beside the shards, its candidates
    re-scored in float32), ``"auto"`` (``"ann"`` from `ann.ANN_MIN_IMAGES` images, else ``"exact"``)
    and ``"faiss"`` (any FAISS factory over the float32 vectors, built in memory).

    Layouts on disk: see `storage` (a folder of shards with a manifest; one safetensors file when
    the path ends in ``.safetensors``).
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
        self.blocks: list[Block] = [block_from_embeds(image_embeds, image_attribute_embeds)]
        self.paths = list(paths)
        self.ids = torch.full((len(paths),), -1, dtype=torch.long) if ids is None else ids.long()
        self.model_fingerprint = model_fingerprint
        self.processor_fingerprint = processor_fingerprint
        self.ann: AnnIndex | None = None
        self._faiss: FaissSearcher | None = None
        self._max_norm: float | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return self.blocks[0].embeds.shape[1]

    @property
    def with_attributes(self) -> bool:
        return self.blocks[0].attributes is not None

    @property
    def image_embeds(self) -> torch.Tensor:
        """(N, D) float32 exact vectors (concatenates the blocks: reads them all)."""
        return self.blocks[0].embeds if len(self.blocks) == 1 else torch.cat([b.embeds for b in self.blocks])

    @property
    def image_attribute_embeds(self) -> torch.Tensor | None:
        """(N, K, D) float32 attribute vectors, or None when the index was built without them."""
        if not self.with_attributes:
            return None
        return self.blocks[0].attributes if len(self.blocks) == 1 else torch.cat([b.attributes for b in self.blocks])

    def exact_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) float32 vectors of the sorted gallery ``rows``, read from their blocks only."""
        # NumPy indexing: a few rows, single-threaded (torch would split it over busy cores).
        parts, offset, rows = [], 0, rows.cpu().numpy()
        for block in self.blocks:
            inside = rows[(rows >= offset) & (rows < offset + len(block))] - offset
            if inside.size:
                parts.append(block.embeds.numpy()[inside])
            offset += len(block)
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, self.dim)

    def _append(self, block: Block, paths: list[str], ids: list[int]) -> None:
        if not len(block):
            return
        if len(self) == 0:
            self.blocks = [block]
        else:
            self.blocks.append(block)
        self.paths += paths
        self.ids = torch.cat([self.ids, torch.tensor(ids, dtype=torch.long)])
        self._faiss, self._max_norm = None, None
        if self.ann is not None:
            self.ann.add([block.scan])  # an inverted file takes new rows without retraining

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
        **kwargs: Any,
    ) -> GalleryIndex:
        """Encode a folder (or a list of image paths) into a new index; see :meth:`add_images`."""
        index = cls.empty(model, processor, with_attributes=with_attributes)
        index.add_images(paths, model, processor, **kwargs)
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
        paths, ids = dataset_paths_and_ids(dataset, image_column, id_column)
        return self.add_images(paths, model, processor, ids=ids, **kwargs)

    def pending_images(
        self, paths: Sequence[str] | str | os.PathLike, ids: Sequence[int] | None = None,
    ) -> tuple[list[str], list[int], int]:
        """``(paths, ids, duplicates)``: the images not indexed yet (first occurrence of each path),
        their person ids (-1 unknown), and how many were left out as already indexed or repeated."""
        if isinstance(paths, (str, os.PathLike)):
            paths = list_images(paths)
        if ids is not None and len(ids) != len(paths):
            raise ValueError(f"got {len(ids)} ids for {len(paths)} paths")
        seen = set(self.paths)
        todo_paths, todo_ids, duplicates = [], [], 0
        for position, path in enumerate(paths):
            key = str(path)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            todo_paths.append(key)
            todo_ids.append(-1 if ids is None else int(ids[position]))
        return todo_paths, todo_ids, duplicates

    def add_images(
        self,
        paths: Sequence[str] | str | os.PathLike,
        model: Any,
        processor: Any,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
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
            num_workers: DataLoader worker processes decoding images (0: in this process).
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
        todo_paths, todo_ids, duplicates = self.pending_images(paths, ids)
        encoded = encode_image_files(
            todo_paths, model, processor, with_attributes=self.with_attributes, batch_size=batch_size,
            num_workers=num_workers, on_bad_image=on_bad_image, progress=progress,
        )
        self.append_encoded(encoded, todo_paths, todo_ids)
        return AddReport(len(encoded.positions), duplicates, [todo_paths[p] for p, _ in encoded.unreadable])

    def append_encoded(self, encoded: EncodedImages, paths: Sequence[str], ids: Sequence[int]) -> None:
        """Append what `encode_image_files` made of ``paths`` (with their ``ids``)."""
        self._append(block_from_embeds(encoded.embeds, encoded.attributes),
                     [paths[p] for p in encoded.positions], [int(ids[p]) for p in encoded.positions])

    def extend(self, other: GalleryIndex) -> None:
        """Append another index's rows (same model and processor), e.g. shards encoded by other processes."""
        if (other.model_fingerprint, other.processor_fingerprint) != (self.model_fingerprint, self.processor_fingerprint):
            raise IndexMismatchError("cannot merge gallery indexes made by different models or processors")
        for block, start in zip(other.blocks, other._block_starts()):
            self._append(block, other.paths[start:start + len(block)], other.ids[start:start + len(block)].tolist())

    def _block_starts(self) -> list[int]:
        starts, offset = [], 0
        for block in self.blocks:
            starts.append(offset)
            offset += len(block)
        return starts

    # ---- persistence -------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.model_fingerprint,
            "processor_fingerprint": self.processor_fingerprint,
            "num_images": str(len(self)),
            "projection_dim": str(self.dim),
        }

    def save(self, path: str | os.PathLike, shard_size: int = storage.DEFAULT_SHARD_SIZE) -> None:
        """Write the index: a folder of shards and a manifest, or one file if ``path`` ends in
        ``.safetensors`` (the single-file layout, float32 only; for small galleries).

        In a folder, shards already there (the index was read from it) are kept as they are; new
        rows go to new shards; the ANN structure, if built, is written beside them.
        """
        target = Path(path)
        if target.suffix == ".safetensors":
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.write_single_file(target, self.image_embeds, self.image_attribute_embeds, self.ids, self.paths,
                                      self._metadata())
            return
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{target} is a file; a folder index needs a folder path (or end it in .safetensors)")
        target.mkdir(parents=True, exist_ok=True)
        shards, row = [], 0
        for block in self.blocks:
            if block.file is not None and Path(block.file).parent.resolve() == target.resolve():
                shards.append({"file": Path(block.file).name, "num_images": len(block)})
                row += len(block)
                continue
            for start in range(0, len(block), shard_size):
                part = Block(block.embeds[start:start + shard_size], block.scan[start:start + shard_size],
                             None if block.attributes is None else block.attributes[start:start + shard_size])
                name = _free_shard_name(target, shards)
                storage.write_shard(target / name, part, self.ids[row:row + len(part)], self.paths[row:row + len(part)])
                shards.append({"file": name, "num_images": len(part)})
                row += len(part)
        ann = None
        if self.ann is not None and len(self.ann) == len(self):
            self.ann.save(str(target / ANN_FILE))
            ann = {"file": ANN_FILE, "factory": self.ann.factory, "nprobe": self.ann.nprobe, "num_images": len(self)}
        manifest = {"format": storage.INDEX_FORMAT, "format_version": storage.FOLDER_VERSION, **self._metadata(),
                    "num_images": len(self), "projection_dim": self.dim, "scan_dtype": "float16",
                    "with_attributes": self.with_attributes, "shards": shards, "ann": ann}
        storage.write_manifest(target, manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, processor: Any = None) -> GalleryIndex:
        """Read an index (a folder or a single file); with ``model`` (and ``processor``) refuse one
        made by another model. The vectors are memory-mapped."""
        source = Path(path)
        if source.is_dir():
            index = cls._load_folder(source)
        elif source.is_file():
            index = cls._load_single_file(source)
        else:
            raise FileNotFoundError(f"gallery index {str(path)!r} does not exist")
        index.source = str(path)
        if model is not None:
            index.check_compatible(model, processor)
        return index

    @classmethod
    def _load_single_file(cls, path: Path) -> GalleryIndex:
        tensors, metadata = storage.map_tensors(path)
        storage.check_format(metadata, repr(str(path)), storage.SINGLE_FILE_VERSION)
        return cls(tensors["image_embeds"], storage.decode_paths(tensors["paths_utf8"]), metadata["model_fingerprint"],
                   metadata["processor_fingerprint"], image_attribute_embeds=tensors.get("image_attribute_embeds"),
                   ids=tensors["ids"])

    @classmethod
    def _load_folder(cls, folder: Path) -> GalleryIndex:
        manifest = storage.read_manifest(folder)
        dim = int(manifest["projection_dim"])
        index = cls(torch.zeros(0, dim), [], manifest["model_fingerprint"], manifest["processor_fingerprint"])
        blocks, paths, ids = [], [], []
        for entry in manifest["shards"]:
            block, shard_ids, shard_paths = storage.read_shard(folder / entry["file"])
            if len(block) != entry["num_images"] or len(shard_paths) != len(block):
                raise ValueError(f"{folder / entry['file']}: holds {len(block)} vectors and {len(shard_paths)} paths, "
                                 f"the manifest says {entry['num_images']}")
            blocks.append(block)
            paths += shard_paths
            ids.append(shard_ids)
        if blocks:
            index.blocks, index.paths, index.ids = blocks, paths, torch.cat(ids).long()
        if len(index) != int(manifest["num_images"]):
            raise ValueError(f"{folder}: the shards hold {len(index)} images, the manifest says {manifest['num_images']}")
        ann = manifest.get("ann")
        if ann and int(ann["num_images"]) == len(index) and (folder / ann["file"]).is_file():
            index.ann = AnnIndex.load(str(folder / ann["file"]), ann["factory"], int(ann["nprobe"]))
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
                f"(python -m diana.processing.search.cli index --model_name_or_path ... --images_dir ... --index_path ...) "
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

    def max_norm(self) -> float:
        """The largest gallery row norm (1 for model embeddings), bounding the float16 score error."""
        if self._max_norm is None:
            self._max_norm = max((float(block.scan.float().norm(dim=-1).max()) for block in self.blocks if len(block)),
                                 default=1.0)
        return self._max_norm

    def build_ann(self, factory: str | None = None, nprobe: int | None = None) -> AnnIndex:
        """Build the ANN structure (global score) over the float16 vectors; `save` keeps it beside the shards.

        Args:
            factory: FAISS factory string (default `ann.default_ann_factory`: an inverted file with
                ~4 sqrt(N) lists over float16 codes).
            nprobe: inverted-file lists visited per query (default `ann.default_nprobe`).
        """
        if len(self) == 0:
            raise ValueError("the gallery index holds no images; add some first")
        self.ann = AnnIndex.build([block.scan for block in self.blocks], factory, nprobe)
        return self.ann

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
        ann_candidates: int = ANN_CANDIDATES,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k gallery images for normalised dialogue embeddings.

        Args:
            text_embeds: (Q, D) normalised dialogue embeddings.
            k: results per query.
            text_attribute_embeds: (Q, K, D), needed by the attribute / fused modes.
            mode: ``"global"`` (cosine), ``"attribute"`` or ``"fused"`` (scored by
                ``model.similarity``, which applies the config's attribute reduction).
            model: the model, needed by the attribute / fused modes.
            backend: ``"exact"`` (float16 scan, float32 re-score: the exact ranking), ``"ann"``
                (approximate, global mode only; built on first use unless saved with the index),
                ``"auto"`` (``"ann"`` for galleries of `ann.ANN_MIN_IMAGES` or more in global mode),
                or ``"faiss"`` (a FAISS index of ``faiss_factory`` over the float32 vectors).
            chunk_size: gallery rows scored at once by the exact back end.
            faiss_factory: FAISS index factory string for ``"faiss"``; ``"Flat"`` is exact.
            faiss_nprobe: IVF lists visited per query (IVF factories of ``"faiss"``).
            ann_candidates: candidates of the ANN re-scored exactly.

        Returns:
            ``(scores (Q, k), indices (Q, k))``.
        """
        if len(self) == 0:
            raise ValueError("the gallery index holds no images; add some first")
        if backend == "auto":
            backend = "ann" if mode == "global" and len(self) >= ANN_MIN_IMAGES else "exact"
        if backend not in ("exact", "ann", "faiss"):
            raise ValueError(f"backend must be 'exact', 'ann', 'auto' or 'faiss', got {backend!r}")
        if backend != "exact" and mode != "global":
            raise ValueError(f"the {backend} back end scores the global embeddings only, not mode {mode!r}")
        if backend == "faiss":
            if self._faiss is None or (self._faiss.factory, self._faiss.nprobe) != (faiss_factory, faiss_nprobe):
                self._faiss = FaissSearcher(self.image_embeds, faiss_factory, faiss_nprobe)
            return self._faiss.search(text_embeds, k)
        if backend == "ann":
            if self.ann is None or len(self.ann) != len(self):
                self.build_ann()
            return self.ann.search(text_embeds, self.exact_rows, k, ann_candidates)
        if mode == "global":
            return rescored_topk(text_embeds, [block.scan for block in self.blocks], self.exact_rows, k,
                                 max_gallery_norm=self.max_norm(), chunk_size=chunk_size)
        return self._search_attributes(text_embeds, text_attribute_embeds, k, mode, model, chunk_size)

    def _search_attributes(self, text_embeds: torch.Tensor, text_attribute_embeds: torch.Tensor | None, k: int,
                           mode: str, model: Any, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of the attribute / fused score (``model.similarity``) over the float32 vectors."""
        if model is None or text_attribute_embeds is None or not self.with_attributes:
            raise ValueError(
                f"mode {mode!r} needs the model, text_attribute_embeds and an index built with "
                "attribute embeddings (with_attributes=True / --with_attributes)"
            )
        device = text_embeds.device
        gallery, attribute_gallery = self.image_embeds, self.image_attribute_embeds

        def score(queries: torch.Tensor, rows: slice) -> torch.Tensor:
            return model.similarity(
                queries, gallery[rows].to(device, queries.dtype),
                text_attribute_embeds=text_attribute_embeds,
                image_attribute_embeds=attribute_gallery[rows].to(device, queries.dtype), mode=mode,
            )

        return exact_topk(text_embeds, gallery, k, chunk_size, score_fn=score)


def dataset_paths_and_ids(dataset: Any, image_column: str = "image",
                          id_column: str | None = "person_id") -> tuple[list[str], list[int]]:
    """The image paths of a dataset split (an ``Image()`` column holding paths) and the person ids (-1 without)."""
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
    return paths, ids


def _free_shard_name(folder: Path, taken: list[dict]) -> str:
    """The first shard file name neither listed in ``taken`` nor on disk (shards are never overwritten)."""
    names = {entry["file"] for entry in taken}
    number = 0
    while storage.SHARD_PATTERN.format(number) in names or (folder / storage.SHARD_PATTERN.format(number)).exists():
        number += 1
    return storage.SHARD_PATTERN.format(number)
