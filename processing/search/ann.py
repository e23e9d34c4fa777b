"""Approximate nearest-neighbour search for galleries of millions: a FAISS inverted-file index over
the float16 vectors whose candidates are re-scored with the exact float32 vectors, and recall@k
against the exact ranking (the figure that says how approximate it is).

FAISS is optional (``pip install faiss-cpu``) and imported only here, when an ANN is built or read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .topk import rescore_exact

# Below this many images the exact search answers one query in ~50 ms on a 2-core CPU
# (BENCHMARKS.md: ~0.2 s per million) and an ANN would buy little speed for its approximation; from
# here on `backend="auto"` searches the ANN.
ANN_MIN_IMAGES = 250_000
# Candidates an ANN query hands to the exact re-score.
ANN_CANDIDATES = 100


# k-means of an inverted file wants at least this many training rows per list (FAISS warns below 39).
TRAIN_ROWS_PER_LIST = 40


def default_ann_factory(num_images: int) -> str:
    """The FAISS factory string for a gallery of ``num_images``: an inverted file with ~4 sqrt(N) lists
    (a power of two; FAISS's guideline is 4-16 sqrt(N): k-means training and assignment cost grow with
    the list count, a query's scan shrinks with it) storing float16 codes, half the memory of float32.
    Galleries too small to train 16 lists get a float16 flat scan.

    Why not sqrt(N): on a million clustered vectors (groups of look-alike persons), 1,024 lists mix
    several groups each, and a query's look-alikes spread over many of them (recall@10 0.80 with 64
    lists probed, 5.4 ms); with 4,096 lists, 32 probed give 0.99 in 1.3 ms (BENCHMARKS.md)."""
    lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(num_images, 1)))))
    while lists >= 16 and lists * TRAIN_ROWS_PER_LIST > num_images:
        lists //= 2
    return f"IVF{min(lists, 65536)},SQfp16" if lists >= 16 else "SQfp16"


def default_nprobe(factory: str) -> int:
    """Lists visited per query: 1/128 of an inverted file's lists, at least 16 (all of a small one). On
    a million clustered vectors (4,096 lists) 32 lists give recall@10 0.99 in ~1.3 ms (BENCHMARKS.md)."""
    if not factory.startswith("IVF"):
        return 0
    lists = int(factory[3:].split(",")[0].split("_")[0])
    return min(lists, max(16, lists // 128))


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the ANN back end needs FAISS: pip install faiss-cpu") from error
    return faiss


class AnnIndex:
    """A FAISS index over a gallery's vectors (global score only), ids = gallery row numbers.

    Args:
        index: the FAISS index.
        factory: its factory string (kept in the gallery manifest).
        nprobe: inverted-file lists visited per query (0: not an inverted file).
    """

    def __init__(self, index, factory: str, nprobe: int) -> None:
        self.index, self.factory, self.nprobe = index, factory, nprobe
        self._apply_nprobe()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _apply_nprobe(self) -> None:
        if self.nprobe:
            _faiss().extract_index_ivf(self.index).nprobe = self.nprobe

    @classmethod
    def build(cls, blocks: Sequence[torch.Tensor], factory: str | None = None, nprobe: int | None = None,
              *, seed: int = 0) -> AnnIndex:
        """Train on an even sample of the rows (k-means of an inverted file needs ~40-256 per list),
        then add every row, one block at a time (float16 blocks are widened chunk by chunk)."""
        faiss = _faiss()
        total = sum(block.shape[0] for block in blocks)
        factory = factory or default_ann_factory(total)
        dim = blocks[0].shape[1]
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            try:
                lists = faiss.extract_index_ivf(index).nlist  # trained by spherical k-means (FAISS, inner product)
            except RuntimeError:  # not an inverted file (e.g. a product quantiser)
                lists = 1024
            picked = np.sort(np.random.default_rng(seed).choice(total, min(TRAIN_ROWS_PER_LIST * lists, total), replace=False))
            index.train(_rows_as_float32(blocks, torch.from_numpy(picked)))
        ann = cls(index, factory, default_nprobe(factory) if nprobe is None else nprobe)
        ann.add(blocks)
        return ann

    def add(self, blocks: Sequence[torch.Tensor], chunk_size: int = 65536) -> None:
        """Append rows (numbered after those already in the index)."""
        for block in blocks:
            for start in range(0, block.shape[0], chunk_size):
                self.index.add(np.ascontiguousarray(block[start:start + chunk_size].float().numpy()))

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """(Q, count) gallery rows the ANN ranks first (-1 where it found fewer)."""
        _, rows = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), min(count, len(self)))
        return torch.from_numpy(rows).long()

    def search(self, queries: torch.Tensor, exact_rows: Callable[[torch.Tensor], torch.Tensor], k: int,
               candidates: int = ANN_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by exact float32 score among the ANN's candidates: ``(scores (Q, k), indices (Q, k))``."""
        found = self.candidates(queries, max(candidates, k))
        results = []
        for q in range(queries.shape[0]):
            rows = found[q][found[q] >= 0]
            results.append(rescore_exact(queries[q:q + 1], rows, exact_rows, min(k, rows.numel())))
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

    def save(self, path: str) -> None:
        _faiss().write_index(self.index, path)

    @classmethod
    def load(cls, path: str, factory: str, nprobe: int) -> AnnIndex:
        return cls(_faiss().read_index(path), factory, nprobe)


def _rows_as_float32(blocks: Sequence[torch.Tensor], rows: torch.Tensor) -> np.ndarray:
    """The given sorted global rows of consecutive blocks, as one float32 array."""
    parts, offset = [], 0
    for block in blocks:
        inside = rows[(rows >= offset) & (rows < offset + block.shape[0])] - offset
        if inside.numel():
            parts.append(block[inside].float())
        offset += block.shape[0]
    return np.ascontiguousarray(torch.cat(parts).numpy())


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of (Q, k) gallery indices; -1 = none)."""
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"recall needs as many result rows as truth rows, got {found.shape[0]} and {truth.shape[0]}")
    hits = [len(set(f.tolist()) & set(t.tolist())) / t.numel() for f, t in zip(found, truth)]
    return float(sum(hits) / len(hits))
