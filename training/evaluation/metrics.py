"""Text-to-image retrieval metrics as pure tensor functions.

Identity-level ranking in the IRRA style (`utils/metrics.py::rank`): a query's positives are every
gallery item of the same person. Rankings sort each similarity row in descending order with a
*stable* sort, so equal scores are ranked by gallery index (the lower index first); IRRA's
`argsort` leaves ties to the backend, which makes R@k depend on the device.

Everything is computed over chunks of queries so that a (Q, G) problem never materialises more
than about `max_elements` ranked entries at once (the sort indices and cumulative hit counts are
int64, 8 bytes each).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "best_log_rank_integral",
    "cumulative_hits_at_k",
    "first_hit_ranks",
    "interactive_metrics",
    "metric_keys",
    "retrieval_metrics",
    "retrieval_metrics_and_first_hit_ranks",
]

# Default budget of ranked (query, gallery) entries per chunk: 2**22 entries ~ 32 MiB per int64
# buffer, several of which are alive at once.
_DEFAULT_MAX_ELEMENTS = 1 << 22


def metric_keys(ks: Sequence[int] = (1, 5, 10)) -> list[str]:
    """The keys `retrieval_metrics` returns for the given `ks`, in report order."""
    return [f"R@{k}" for k in ks] + ["mAP", "mINP", "mFR"]


def _check_inputs(
    similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (num_queries, num_gallery), got shape {tuple(similarity.shape)}")
    query_ids = torch.as_tensor(query_ids, device=similarity.device).reshape(-1)
    gallery_ids = torch.as_tensor(gallery_ids, device=similarity.device).reshape(-1)
    num_queries, num_gallery = similarity.shape
    if query_ids.numel() != num_queries:
        raise ValueError(f"query_ids has {query_ids.numel()} entries but similarity has {num_queries} rows")
    if gallery_ids.numel() != num_gallery:
        raise ValueError(f"gallery_ids has {gallery_ids.numel()} entries but similarity has {num_gallery} columns")
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"empty retrieval problem: {num_queries} queries, {num_gallery} gallery items")
    if similarity.is_floating_point():
        bad = torch.isnan(similarity).any(dim=1).nonzero()
        if bad.numel():
            raise ValueError(f"similarity row of query {int(bad[0])} contains NaN; a ranking is undefined")
    return similarity, query_ids, gallery_ids


def _rankable(scores: torch.Tensor) -> torch.Tensor:
    """`scores` in a dtype whose sort ranks them exactly as given: float32 and float64 stay as they are
    (casting float64 down would turn scores closer than float32's resolution into ties), half-precision
    floats go to float32 and integers or bools to float64, both exact."""
    if scores.dtype in (torch.float32, torch.float64):
        return scores
    return scores.float() if scores.is_floating_point() else scores.double()


def _ranked_matches(
    similarity: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    max_elements: int,
) -> Iterator[torch.Tensor]:
    """Yields, per chunk of queries, the (C, G) bool matrix `matches[q, r]`: is the gallery item
    at 0-based rank r a positive of query q. Raises on a query without positive."""
    num_queries, num_gallery = similarity.shape
    chunk = max(1, max_elements // num_gallery)
    for start in range(0, num_queries, chunk):
        sims = _rankable(similarity[start : start + chunk])  # (C, G)
        # Stable sort of -s: ties keep gallery order, i.e. the lower gallery index ranks first.
        order = torch.sort(-sims, dim=1, stable=True).indices  # (C, G) gallery indices by rank
        matches = gallery_ids[order] == query_ids[start : start + chunk, None]  # (C, G)
        missing = (~matches.any(dim=1)).nonzero()
        if missing.numel():
            q = start + int(missing[0])
            raise ValueError(
                f"query {q} (person id {int(query_ids[q])}) has no positive in the gallery: every query's "
                "person must have at least one gallery image"
            )
        yield matches


def first_hit_ranks(
    similarity: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    *,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """0-based rank of the first positive of every query.

    Args:
        similarity: (Q, G) scores, higher is better.
        query_ids: (Q,) person id of every query.
        gallery_ids: (G,) person id of every gallery item.
        max_elements: at most this many ranked entries are held at once (queries are chunked).

    Returns:
        (Q,) int64 ranks, on `similarity`'s device.

    Raises:
        ValueError: on bad shapes, NaN scores, or a query with no positive in the gallery.
    """
    similarity, query_ids, gallery_ids = _check_inputs(similarity, query_ids, gallery_ids)
    # argmax of a bool row returns the first True (torch documents the first maximal index).
    return torch.cat(
        [m.to(torch.uint8).argmax(dim=1) for m in _ranked_matches(similarity, query_ids, gallery_ids, max_elements)]
    )


def retrieval_metrics(
    similarity: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> dict[str, float]:
    """Identity-level text-to-image retrieval metrics.

    Definitions (per query, then averaged over queries; rank r is 1-based here):
    - R@k: 100 if a positive is among the top k, else 0;
    - AP: mean over the positives of precision at the positive's rank; mAP = 100 * mean AP;
    - INP (IRRA): number of positives / rank of the last positive; mINP = 100 * mean INP;
    - mFR: mean 0-based rank of the first positive (0 = the top item is correct).

    Args:
        similarity: (Q, G) scores, higher is better. Ties are ranked by gallery index.
        query_ids: (Q,) person id of every query.
        gallery_ids: (G,) person id of every gallery item.
        ks: the cut-offs of R@k.
        max_elements: at most this many ranked entries are held at once (queries are chunked).

    Returns:
        `{"R@1": ..., "R@5": ..., "R@10": ..., "mAP": ..., "mINP": ..., "mFR": ...}` as floats,
        all but mFR in percent.

    Raises:
        ValueError: on bad shapes, NaN scores, or a query with no positive in the gallery (the
            error names the query's index).
    """
    return retrieval_metrics_and_first_hit_ranks(similarity, query_ids, gallery_ids, ks, max_elements=max_elements)[0]


def retrieval_metrics_and_first_hit_ranks(
    similarity: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> tuple[dict[str, float], torch.Tensor]:
    """`retrieval_metrics` and `first_hit_ranks` from one ranking (the sort dominates the cost);
    the per-round evaluation needs both."""
    similarity, query_ids, gallery_ids = _check_inputs(similarity, query_ids, gallery_ids)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k of R@k must be >= 1, got {ks}")
    num_gallery = similarity.shape[1]
    device = similarity.device
    # Sums in float64 so that averages over many queries do not drift.
    hits_at = torch.zeros(len(ks), dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    first_rank_sum = torch.zeros((), dtype=torch.float64, device=device)
    first_hits = []
    ranks_1based = torch.arange(1, num_gallery + 1, device=device, dtype=torch.float64)  # (G,)
    k_tensor = torch.tensor(ks, device=device)  # (len(ks),)

    for matches in _ranked_matches(similarity, query_ids, gallery_ids, max_elements):
        hits_so_far = matches.cumsum(dim=1)  # (C, G) positives within the top r
        num_pos = hits_so_far[:, -1].double()  # (C,)
        first = matches.to(torch.uint8).argmax(dim=1)  # (C,) 0-based
        # Last positive: first True of the reversed row, counted from the end.
        last = num_gallery - 1 - matches.flip(dims=[1]).to(torch.uint8).argmax(dim=1)  # (C,)
        hits_at += (first[:, None] < k_tensor[None, :]).sum(dim=0)  # (len(ks),)
        precision = hits_so_far.double() / ranks_1based  # (C, G)
        ap_sum += ((precision * matches).sum(dim=1) / num_pos).sum()
        inp_sum += (num_pos / (last + 1).double()).sum()
        first_rank_sum += first.double().sum()
        first_hits.append(first)

    num_queries = similarity.shape[0]
    out = {f"R@{k}": float(100.0 * hits_at[i] / num_queries) for i, k in enumerate(ks)}
    out["mAP"] = float(100.0 * ap_sum / num_queries)
    out["mINP"] = float(100.0 * inp_sum / num_queries)
    out["mFR"] = float(first_rank_sum / num_queries)
    return out, torch.cat(first_hits)


def cumulative_hits_at_k(per_round_first_hit_ranks: torch.Tensor, k: int = 10) -> list[float]:
    """ChatIR-style cumulative Hits@k over dialogue rounds.

    A query counts as a hit at round r if its first positive was within the top k at ANY round
    <= r (ChatIR, Levy et al. 2023: the user stops at the first successful round), so the curve
    never decreases.

    Args:
        per_round_first_hit_ranks: (R, Q) 0-based rank of the first positive of each query after
            each round (see `first_hit_ranks`).
        k: the cut-off.

    Returns:
        R floats, the percentage of queries hit at or before each round.
    """
    ranks = torch.as_tensor(per_round_first_hit_ranks)
    if ranks.ndim != 2 or ranks.shape[0] == 0 or ranks.shape[1] == 0:
        raise ValueError(
            f"per_round_first_hit_ranks must be a non-empty (rounds, queries) matrix, got {tuple(ranks.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    best_so_far = torch.cummin(ranks, dim=0).values  # (R, Q) best rank over rounds <= r
    return [float(x) for x in (best_so_far < k).double().mean(dim=1) * 100.0]


def best_log_rank_integral(ranks: torch.Tensor) -> torch.Tensor:
    """PlugIR's BRI after each round (see the module docstring), averaged over targets.

    Args:
        ranks: (R, T) 1-based rank of each target's first hit after each round.

    Returns:
        (R,) float64: entry r-1 is BRI over rounds 1..r.
    """
    best = torch.cummin(torch.as_tensor(ranks).double(), dim=0).values.log()  # (R, T) log b_t
    trapezoids = (best[1:] + best[:-1]) / 2  # (R-1, T)
    areas = torch.cat([best[:1], trapezoids.cumsum(0) / torch.arange(1, best.shape[0], dtype=torch.float64)[:, None]])
    return areas.mean(dim=1)


def interactive_metrics(first_hits: torch.Tensor) -> list[dict[str, float]]:
    """Per-round metrics from (R, T) 0-based ranks of the first hit (R@1, R@10, Hits@10, mean_rank, BRI)."""
    first_hits = torch.as_tensor(first_hits)
    hits10 = cumulative_hits_at_k(first_hits, k=10)
    bri = best_log_rank_integral(first_hits + 1)
    rows = []
    for r in range(first_hits.shape[0]):
        ranks = first_hits[r].double()
        rows.append({
            "round": r + 1,
            "R@1": float((ranks < 1).double().mean() * 100), "R@10": float((ranks < 10).double().mean() * 100),
            "Hits@10": hits10[r], "mean_rank": float((ranks + 1).mean()), "BRI": float(bri[r]),
        })
    return rows
