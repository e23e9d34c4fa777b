"""Top-k over a gallery: exact (chunked matrix products, ties by gallery index as in the
evaluation protocol) and the optional FAISS back end."""

from __future__ import annotations

from collections.abc import Callable

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
