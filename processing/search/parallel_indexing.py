"""Indexing across processes: under ``accelerate launch`` each process encodes a contiguous share of
the images not indexed yet and writes it as a part file; the main process then appends the parts in
rank order, so the index equals the one a single process builds (same rows, same order).

    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 -m diana.processing.search.cli index \\
        --model_name_or_path MODEL_DIR --images_dir photos/ --index_path gallery_index

Without ``accelerate launch`` the same code runs as one process (rank 0 of 1).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .index import AddReport, GalleryIndex, encode_image_files


@dataclass
class ProcessGroup:
    """Where this process stands among those indexing together (accelerate's ``PartialState``
    gives these; a test passes them by hand)."""

    rank: int
    world_size: int
    wait_for_everyone: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def share_of(count: int, rank: int, world_size: int) -> range:
    """The contiguous rows ``rank`` encodes out of ``count`` (shares differ by at most one row)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def parts_folder(index_path: str | Path) -> Path:
    """Where the processes leave their parts, next to the index."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".parts")


def encode_share(
    index: GalleryIndex, paths: Sequence[str], ids: Sequence[int], model: Any, processor: Any, group: ProcessGroup,
    parts: Path, **encode_kwargs: Any,
) -> None:
    """Encode this process's share of ``paths`` (not yet indexed) and write it as a part file."""
    share = share_of(len(paths), group.rank, group.world_size)
    share_paths = [paths[i] for i in share]
    share_ids = [ids[i] for i in share]
    progress = encode_kwargs.pop("progress", True) and group.is_main  # one bar, the main process's
    encoded = encode_image_files(share_paths, model, processor, with_attributes=index.with_attributes,
                                 progress=progress, **encode_kwargs)
    part = GalleryIndex.empty(model, processor, with_attributes=index.with_attributes)
    part.append_encoded(encoded, share_paths, share_ids)
    parts.mkdir(parents=True, exist_ok=True)
    part.save(parts / f"part-{group.rank:05d}.safetensors")
    (parts / f"part-{group.rank:05d}.json").write_text(json.dumps([share_paths[p] for p, _ in encoded.unreadable]))


def merge_parts(index: GalleryIndex, parts: Path, world_size: int) -> tuple[int, list[str]]:
    """Append every process's part in rank order; returns ``(images added, unreadable paths)``."""
    added, unreadable = 0, []
    for rank in range(world_size):
        part_file = parts / f"part-{rank:05d}.safetensors"
        if not part_file.is_file():
            raise FileNotFoundError(f"process {rank} left no part {part_file}: did it fail? (see its log)")
        part = GalleryIndex.load(part_file)
        index.extend(part)
        added += len(part)
        unreadable += json.loads((parts / f"part-{rank:05d}.json").read_text())
    return added, unreadable


def index_images(
    index: GalleryIndex, paths: Sequence[str], model: Any, processor: Any, group: ProcessGroup, index_path: str | Path,
    *, ids: Sequence[int] | None = None, **encode_kwargs: Any,
) -> AddReport | None:
    """Add ``paths`` to ``index`` with every process of ``group`` encoding a share, and save it.

    Every process must hold the same ``index`` (read from the same file) so that all skip the same
    already-indexed paths. Returns the report on the main process (None on the others), after the
    index is saved to ``index_path``.
    """
    index.check_compatible(model, processor)
    todo_paths, todo_ids, duplicates = index.pending_images(paths, ids)
    parts = parts_folder(index_path)
    encode_share(index, todo_paths, todo_ids, model, processor, group, parts, **encode_kwargs)
    group.wait_for_everyone()
    report = None
    if group.is_main:
        added, unreadable = merge_parts(index, parts, group.world_size)
        index.save(index_path)
        shutil.rmtree(parts)
        report = AddReport(added, duplicates, unreadable)
    group.wait_for_everyone()
    return report
