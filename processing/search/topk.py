"""Top-k over a gallery: exact (chunked matrix products, ties by gallery index as in the
evaluation protocol), the same exact ranking from a float16 scan and a float32 re-score of a
certified shortlist, and the optional FAISS back end."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


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
    """Exact top-k over a gallery, ties by gallery index.

    The inner-product score is `exact_scores` (each score a function of the two vectors alone, so
    equal rows tie wherever they sit); a float32 scan finds a shortlist that `rescored_topk` proves
    holds the top-k.

    Args:
        queries: (Q, D) query embeddings.
        gallery: (N, D) gallery embeddings.
        k: how many results per query (capped at N).
        chunk_size: gallery rows scored at once; bounds memory at Q x chunk_size scores.
        score_fn: optional ``(queries, rows) -> (Q, len(rows))`` scorer replacing the inner
            product (used for the attribute / fused score modes), ranked as it scores.

    Returns:
        ``(scores (Q, k), indices (Q, k))``, best first, ties by gallery index.
    """
    if gallery.shape[0] == 0:
        raise ValueError("cannot search an empty gallery")
    if score_fn is None:
        norm = float(gallery.float().norm(dim=-1).max())
        return rescored_topk(queries, [gallery], lambda rows: gallery[rows], k, max_gallery_norm=norm,
                             chunk_size=chunk_size)
    return chunked_topk(queries, gallery.shape[0], k, chunk_size, score_fn)


@torch.no_grad()
def chunked_topk(queries: torch.Tensor, num_gallery: int, k: int, chunk_size: int,
                 score_fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``score_fn(queries, rows)`` over the gallery, one chunk of rows at a time, ties by index."""
    k = min(k, num_gallery)
    best_values: torch.Tensor | None = None
    best_indices: torch.Tensor | None = None
    for start in range(0, num_gallery, chunk_size):
        rows = slice(start, min(start + chunk_size, num_gallery))
        values, indices = _topk_ties_by_index(score_fn(queries, rows).float(), k)
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


def exact_scores(query: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(1, n) float32 inner products of one query (1, D) with ``vectors`` (n, D), accumulated in float64.

    Each product of two float32 numbers is exact in float64 and the sum's error (~1e-16) is far below
    float32's resolution, so the score depends on the two vectors only, not on where the row sits in
    a matrix product (BLAS blocking changes float32 sums in the last bit): equal rows tie exactly.
    Computed with NumPy on the host: a shortlist is small, and torch would split these small
    products over threads, which on a busy CPU costs more than the arithmetic.
    """
    query64 = query.detach().float().cpu().numpy().astype(np.float64)[0]
    vectors64 = vectors.detach().float().cpu().numpy().astype(np.float64)
    return torch.from_numpy((vectors64 @ query64).astype(np.float32))[None]


# |float16 score - exact score| <= FP16_SCORE_ERROR * |q| * |g|: the query and the gallery rounded
# to float16 (relative error 2^-11 each, products accumulated in float32) and the score rounded to
# float16 (2^-11 of |score| <= |q||g|) give 3 * 2^-11 plus the float32 summation (768 * 2^-24) and
# float16 subnormals (below 1e-4 here); 2^-8 leaves a margin of more than 2x.
FP16_SCORE_ERROR = 2.0 ** -8


def scan_error(dtype: torch.dtype, dim: int) -> float:
    """Bound on |scan score - exact score| / (|q| |g|) of a scan in ``dtype`` over ``dim`` components."""
    if dtype == torch.float16:
        return FP16_SCORE_ERROR
    return 4 * (dim + 2) * 2.0 ** -24  # float32 sum of dim products: gamma_dim = dim * 2^-24, 4x margin


@torch.no_grad()
def scan_blocks(
    queries: torch.Tensor, blocks: Sequence[torch.Tensor], count: int, chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``count`` of gallery blocks (float16 or float32; one after the other, global rows).

    On the CPU a float16 product runs in float16 storage with float32 accumulation (torch's CPU
    kernels do; it reads 2 bytes per value); on a GPU each chunk is widened to float32 first (cuBLAS
    may reduce float16 products in float16). Returns ``(scores (Q, count), rows (Q, count))`` best first.
    """
    device = queries.device
    query16 = queries.to(torch.float16)
    best_values, best_rows, offset = None, None, 0
    for block in blocks:
        for start in range(0, block.shape[0], chunk_size):
            chunk = block[start:start + chunk_size]
            if device.type == "cpu" and chunk.dtype == torch.float16:
                scores = (query16 @ chunk.T).float()  # (Q, n)
            else:
                scores = queries.float() @ chunk.to(device, non_blocking=True).float().T
            if best_values is not None and best_values.shape[1] == count:
                # Once the pool is full only rows above some query's lowest pooled score can enter it: a
                # comparison instead of a top-k over the whole chunk (most chunks have few such rows).
                columns = (scores > best_values[:, -1:]).any(0).nonzero().squeeze(1)
                if columns.numel() == 0:
                    continue
                values, rows = scores[:, columns], (columns + offset + start).expand(scores.shape[0], -1)
            else:
                values, rows = torch.topk(scores, min(count, chunk.shape[0]), dim=1)
                rows = rows + offset + start
            if best_values is not None:
                values, rows = torch.cat([best_values, values], 1), torch.cat([best_rows, rows], 1)
                values, order = torch.topk(values, min(count, values.shape[1]), dim=1)
                rows = rows.gather(1, order)
            best_values, best_rows = values, rows
        offset += block.shape[0]
    if best_values is None:
        raise ValueError("cannot search an empty gallery")
    return best_values.cpu(), best_rows.cpu()


def rescore_exact(
    query: torch.Tensor, rows: torch.Tensor, exact_rows: Callable[[torch.Tensor], torch.Tensor], k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 top-k of one query (1, D) among candidate gallery ``rows``, ties by gallery index.

    The score is `exact_scores`; the candidates are put in gallery order first, so
    `_topk_ties_by_index`'s column order is the gallery order.
    """
    rows = torch.unique(rows.cpu())  # sorted ascending
    values, columns = _topk_ties_by_index(exact_scores(query, exact_rows(rows)), k)
    return values[0], rows[columns[0]]


@torch.no_grad()
def rescored_topk(
    queries: torch.Tensor,
    blocks: Sequence[torch.Tensor],
    exact_rows: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    *,
    max_gallery_norm: float = 1.0,
    shortlist: int = 64,
    pool: int = 1024,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k (`exact_scores`, ties by gallery index) from a cheap scan and an exact re-score.

    The scan (float16 copies, or the float32 vectors themselves) keeps a pool of the best ``pool``
    rows per query; the best ``shortlist`` of them are re-scored exactly. That is provably the exact
    top-k when the k-th exact score beats the best scan score left out by more than the scan's error
    bound (`scan_error` x |q| x ``max_gallery_norm``): no row outside can then reach it, not even as
    a tie. Otherwise the shortlist grows 4x, up to the pool, then the pool grows 4x with a rescan
    (rare: many near-equal scores).

    Args:
        queries: (Q, D) query embeddings.
        blocks: the gallery's vectors to scan (float16 or float32), as consecutive blocks of rows.
        exact_rows: maps sorted gallery row numbers (n,) to their float32 vectors (n, D); reads only them.
        k: results per query.
        max_gallery_norm: an upper bound of the gallery rows' norms (1 for normalised embeddings).
        shortlist: rows re-scored first.
        pool: rows kept by the float16 scan.
        chunk_size: rows scored at once by the scan.

    Returns:
        ``(scores (Q, k), indices (Q, k))``, best first, ties by gallery index.
    """
    total = sum(block.shape[0] for block in blocks)
    if total == 0:
        raise ValueError("cannot search an empty gallery")
    k = min(k, total)
    pool = min(max(pool, shortlist, k), total)
    pooled = scan_blocks(queries, blocks, pool, chunk_size)
    relative_error = max(scan_error(block.dtype, block.shape[1]) for block in blocks)
    results = [_certified_topk(queries[q:q + 1], pooled[0][q], pooled[1][q], blocks, exact_rows, k,
                               max(shortlist, k), chunk_size, relative_error * float(queries[q].norm()) * max_gallery_norm)
               for q in range(queries.shape[0])]
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def _certified_topk(
    query: torch.Tensor, pool_values: torch.Tensor, pool_rows: torch.Tensor, blocks: Sequence[torch.Tensor],
    exact_rows: Callable[[torch.Tensor], torch.Tensor], k: int, shortlist: int, chunk_size: int, error: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query of `rescored_topk`: grow the re-scored shortlist until the result is provably exact."""
    total = sum(block.shape[0] for block in blocks)
    while True:
        size = min(shortlist, pool_values.shape[0])
        values, rows = rescore_exact(query, pool_rows[:size], exact_rows, k)
        if size == total:
            return values, rows
        # Rows outside the shortlist score at most the next pool score (or the pool's last, outside it).
        best_left_out = float(pool_values[size] if size < pool_values.shape[0] else pool_values[-1])
        if float(values[-1]) > best_left_out + error:
            return values, rows
        if size < pool_values.shape[0]:
            shortlist = size * 4
        else:
            grown = min(pool_values.shape[0] * 4, total)
            fresh = scan_blocks(query, blocks, grown, chunk_size)
            pool_values, pool_rows = fresh[0][0], fresh[1][0]
            shortlist = grown


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
