"""The vectorised retrieval metrics against a slow, obviously-correct Python reference (open_clip
`test_retrieval_metrics.py` style), hand-made cases, and the `evaluate` metric module."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import pytest
import torch

from diana.training.evaluation.metrics import (
    cumulative_hits_at_k,
    first_hit_ranks,
    metric_keys,
    retrieval_metrics,
    retrieval_metrics_and_first_hit_ranks,
)

METRIC_DIR = Path(__file__).resolve().parents[1] / "training" / "retrieval_metric"


def reference_metrics(similarity, query_ids, gallery_ids, ks=(1, 5, 10)):
    """One query at a time, in plain Python: rank by (-score, gallery index), then count."""
    sims = similarity.tolist()
    qids, gids = query_ids.tolist(), gallery_ids.tolist()
    per_query = {key: [] for key in metric_keys(ks)}
    for q, row in enumerate(sims):
        ranking = sorted(range(len(row)), key=lambda g: (-row[g], g))
        relevant = [gids[g] == qids[q] for g in ranking]
        positions = [r + 1 for r, is_pos in enumerate(relevant) if is_pos]  # 1-based
        assert positions, "reference called on a query without positive"
        for k in ks:
            per_query[f"R@{k}"].append(100.0 if positions[0] <= k else 0.0)
        precisions = [(i + 1) / pos for i, pos in enumerate(positions)]
        per_query["mAP"].append(100.0 * sum(precisions) / len(positions))
        per_query["mINP"].append(100.0 * len(positions) / positions[-1])
        per_query["mFR"].append(positions[0] - 1)
    return {key: sum(v) / len(v) for key, v in per_query.items()}


def reference_first_hits(similarity, query_ids, gallery_ids):
    out = []
    for q, row in enumerate(similarity.tolist()):
        ranking = sorted(range(len(row)), key=lambda g: (-row[g], g))
        out.append(next(r for r, g in enumerate(ranking) if gallery_ids[g] == query_ids[q]))
    return out


def random_problem(num_queries, num_gallery, num_persons, levels, seed):
    """Quantised scores (`levels` distinct values) so ties are frequent; every query's person
    appears in the gallery, usually several times."""
    g = torch.Generator().manual_seed(seed)
    gallery_ids = torch.randint(0, num_persons, (num_gallery,), generator=g)
    gallery_ids[:num_persons] = torch.randperm(num_persons, generator=g)[: min(num_persons, num_gallery)]
    present = gallery_ids.unique()
    query_ids = present[torch.randint(0, present.numel(), (num_queries,), generator=g)]
    similarity = torch.randint(0, levels, (num_queries, num_gallery), generator=g).float() / levels
    return similarity, query_ids, gallery_ids


@pytest.mark.parametrize(
    "num_queries,num_gallery,num_persons,levels",
    [(1, 1, 1, 3), (7, 5, 2, 2), (20, 33, 6, 4), (50, 17, 17, 5), (64, 120, 10, 1000), (31, 64, 40, 3)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_slow_reference(num_queries, num_gallery, num_persons, levels, seed):
    sim, qids, gids = random_problem(num_queries, num_gallery, num_persons, levels, seed)
    ks = (1, 3, 5, 10)
    want = reference_metrics(sim, qids, gids, ks)
    # A tiny max_elements forces one query per chunk, a large one a single chunk: same answer.
    for max_elements in (1, 7 * num_gallery, 1 << 24):
        got = retrieval_metrics(sim, qids, gids, ks=ks, max_elements=max_elements)
        assert list(got) == metric_keys(ks)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (key, max_elements)
        ranks = first_hit_ranks(sim, qids, gids, max_elements=max_elements)
        assert ranks.tolist() == reference_first_hits(sim, qids, gids)
        both = retrieval_metrics_and_first_hit_ranks(sim, qids, gids, ks=ks, max_elements=max_elements)
        assert both[0] == got and torch.equal(both[1], ranks)


def test_ties_are_broken_by_gallery_index():
    # All scores equal: the ranking is the gallery order, whatever the backend's sort does.
    sim = torch.zeros(2, 4)
    gids = torch.tensor([5, 6, 7, 6])
    got = retrieval_metrics(sim, torch.tensor([6, 7]), gids, ks=(1, 2, 3))
    # query person 6: ranks 2 and 4 (1-based); person 7: rank 3.
    assert got["R@1"] == 0.0
    assert got["R@2"] == 50.0
    assert got["R@3"] == 100.0
    assert got["mFR"] == pytest.approx((1 + 2) / 2)
    assert got["mAP"] == pytest.approx(100 * ((1 / 2 + 2 / 4) / 2 + 1 / 3) / 2)
    assert got["mINP"] == pytest.approx(100 * (2 / 4 + 1 / 3) / 2)
    assert first_hit_ranks(sim, torch.tensor([6, 7]), gids).tolist() == [1, 2]


def test_hand_made_case():
    # Query 0 (person 1): ranking g2(p1) g0(p0) g1(p1) g3(p2) -> positives at ranks 1 and 3.
    # Query 1 (person 2): ranking g0 g1 g2 g3 -> its only positive last (rank 4).
    sim = torch.tensor([[0.5, 0.2, 0.9, 0.1], [0.9, 0.8, 0.7, 0.6]])
    qids = torch.tensor([1, 2])
    gids = torch.tensor([0, 1, 1, 2])
    got = retrieval_metrics(sim, qids, gids, ks=(1, 5))
    assert got["R@1"] == 50.0
    assert got["R@5"] == 100.0
    assert got["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 4) / 2)
    assert got["mINP"] == pytest.approx(100 * (2 / 3 + 1 / 4) / 2)
    assert got["mFR"] == pytest.approx((0 + 3) / 2)


def test_perfect_and_reversed_rankings():
    ids = torch.arange(6)
    perfect = retrieval_metrics(torch.eye(6), ids, ids)
    assert perfect == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "mAP": 100.0, "mINP": 100.0, "mFR": 0.0}
    worst = retrieval_metrics(-torch.eye(6), ids, ids)
    assert worst["R@1"] == 0.0 and worst["R@5"] == 0.0 and worst["R@10"] == 100.0
    assert worst["mFR"] == 5.0
    assert worst["mAP"] == pytest.approx(100 / 6)


def test_bf16_similarity_is_ranked_like_its_float_value():
    sim, qids, gids = random_problem(12, 20, 5, 8, seed=3)  # k/8 values are exact in bf16
    assert retrieval_metrics(sim.bfloat16(), qids, gids) == retrieval_metrics(sim, qids, gids)


def test_float64_scores_closer_than_float32_resolution_are_ranked_not_tied():
    # 1 + 1e-12 and 1 + 2e-12 both round to 1.0 in float32: a cast ranks them as a tie (gallery order,
    # the negative first); in their own precision the positive, gallery item 2, ranks first.
    sim = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 + 2e-12]], dtype=torch.float64)
    assert sim.float().unique().numel() == 1  # the premise: float32 cannot tell them apart
    qids, gids = torch.tensor([7]), torch.tensor([3, 5, 7])
    got = retrieval_metrics(sim, qids, gids, ks=(1, 2))
    assert got["R@1"] == 100.0 and got["mFR"] == 0.0 and got["mAP"] == 100.0
    assert first_hit_ranks(sim, qids, gids).tolist() == [0]
    # The evaluate module keeps the precision of the Python floats it is given too.
    metric = evaluate.load(str(METRIC_DIR))
    assert metric.compute(predictions=sim.tolist(), references=qids.tolist(), gallery_ids=gids.tolist(),
                          ks=[1])["R@1"] == 100.0


def test_integer_scores_are_ranked_exactly():
    # 2**24 + 1 is not a float32: a float32 cast would tie it with 2**24.
    sim = torch.tensor([[2**24, 2**24 + 1]], dtype=torch.int64)
    assert retrieval_metrics(sim, torch.tensor([1]), torch.tensor([0, 1]), ks=(1,))["R@1"] == 100.0


def test_query_without_positive_is_an_error_naming_it():
    sim = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"query 2 \(person id 9\) has no positive"):
        retrieval_metrics(sim, torch.tensor([0, 1, 9]), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="query 2"):
        first_hit_ranks(sim, torch.tensor([0, 1, 9]), torch.tensor([0, 1, 1, 0]), max_elements=4)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="3 entries but similarity has 2 rows"):
        retrieval_metrics(torch.rand(2, 4), torch.tensor([0, 1, 2]), torch.arange(4))
    with pytest.raises(ValueError, match="gallery_ids has 3 entries"):
        retrieval_metrics(torch.rand(2, 4), torch.tensor([0, 1]), torch.arange(3))
    sim = torch.rand(3, 4)
    sim[1, 2] = math.nan
    with pytest.raises(ValueError, match="query 1 contains NaN"):
        retrieval_metrics(sim, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="k of R@k"):
        retrieval_metrics(torch.rand(2, 2), torch.arange(2), torch.arange(2), ks=(0,))


def test_cumulative_hits_count_a_query_from_its_first_hit_on():
    # 3 rounds x 4 queries; k = 10.
    ranks = torch.tensor(
        [
            [0, 12, 30, 11],  # hits: q0
            [15, 9, 40, 11],  # q1 hits now; q0 lost the hit but still counts
            [20, 50, 3, 10],  # q2 hits; q3 at 10 is outside the top 10 (0-based rank 10 = 11th)
        ]
    )
    assert cumulative_hits_at_k(ranks, k=10) == [25.0, 50.0, 75.0]
    assert cumulative_hits_at_k(ranks, k=11) == [25.0, 50.0, 100.0]
    # Non-cumulative Hits@10 at round 2 would be 25%: the cumulative curve never falls.
    assert cumulative_hits_at_k(ranks[1:2], k=10) == [25.0]


def test_cumulative_hits_match_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(0, 30, (6, 50), generator=g)
    got = cumulative_hits_at_k(ranks, k=5)
    for r in range(6):
        want = 100.0 * sum(any(ranks[s, q] < 5 for s in range(r + 1)) for q in range(50)) / 50
        assert got[r] == pytest.approx(want)


def test_evaluate_metric_module_loads_offline_and_agrees():
    metric = evaluate.load(str(METRIC_DIR))
    sim, qids, gids = random_problem(9, 14, 4, 3, seed=5)
    # Streaming the queries in two batches must give the same result as one call.
    metric.add_batch(predictions=sim[:4].tolist(), references=qids[:4].tolist())
    metric.add_batch(predictions=sim[4:].tolist(), references=qids[4:].tolist())
    got = metric.compute(gallery_ids=gids.tolist(), ks=[1, 2, 5])
    want = reference_metrics(sim, qids, gids, ks=(1, 2, 5))
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    with pytest.raises(ValueError, match="gallery_ids"):
        metric.compute(predictions=sim.tolist(), references=qids.tolist())
