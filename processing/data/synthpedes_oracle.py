"""The SynthPedes attribute oracle: the per-round ceiling a model can reach on a SynthPedes split,
ranking the gallery by the number of stated attributes each image's person matches."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .synthpedes_attributes import ATTRIBUTE_NAMES, ATTRIBUTES


def _expected_hit_at_k(n_tie: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """P(a positive within the first k) when n_pos positives lie in a tie block of n_tie at the
    top, in uniformly random order: 1 - C(n_tie - n_pos, k) / C(n_tie, k)."""
    miss = np.ones_like(n_tie, dtype=np.float64)
    for i in range(k):
        miss *= np.clip((n_tie - n_pos - i) / np.maximum(n_tie - i, 1), 0, None)
    return 1.0 - miss


def _expected_ap(n_tie: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """E[AP] for n_pos positives uniformly placed among the first n_tie ranks.

    A positive at rank r has E[precision] = (1 + (r-1)(R-1)/(n-1)) / r (the others spread
    hypergeometrically), so E[AP] = (1/n) [H_n (n-R)/(n-1) + n (R-1)/(n-1)], and 1 when n = 1.
    """
    n, R = n_tie.astype(np.float64), n_pos.astype(np.float64)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(n.max()) + 1))])[n_tie]  # H_n
    denom = np.maximum(n - 1, 1)
    ap = (harmonic * (n - R) / denom + n * (R - 1) / denom) / n
    return np.where(n <= 1, 1.0, ap)


def attribute_oracle(chatpedes_dir: str | os.PathLike, split: str = "test", ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Per-round retrieval metrics of the attribute oracle on a SynthPedes ChatPedes folder.

    Gallery = every image of the split; queries = every dialogue (text -> image). For the first k
    rounds of a query, an image's score is the number of stated attributes its person matches.
    The query's own person matches all of them, so its images always sit in the top tie block
    (every image whose person matches every stated attribute); the metrics are the exact
    expectations under a uniformly random order inside that block (ties carry no information,
    so any fixed tie rule would favour or penalise the oracle arbitrarily).

    Args:
        chatpedes_dir: folder with `{split}_reid.json` written by `generate`.
        split: "test" (the protocol's gallery) or "train".
        ks: recall cut-offs.

    Returns:
        {"rounds": [{"round": k, "R@1": ..., "mAP": ...}, ...] (percent), "full": the last round,
        "num_queries", "num_gallery", "num_persons", "chance_R@1", "tie_rule"}.
    """
    with open(os.path.join(chatpedes_dir, f"{split}_reid.json"), encoding="utf-8") as f:
        entries = json.load(f)
    if not entries or "synthpedes" not in entries[0]:
        raise ValueError(f"{chatpedes_dir}/{split}_reid.json has no 'synthpedes' ground truth (not written by SynthPedes)")
    codes = {a: {val: i for i, val in enumerate(vals)} for a, vals in ATTRIBUTES.items()}

    def encode(attrs: dict[str, str | None]) -> np.ndarray:
        return np.array([codes[a][attrs[a]] if attrs[a] is not None else -1 for a in ATTRIBUTE_NAMES])

    gallery = np.stack([encode(e["synthpedes"]["attributes"]) for e in entries])  # (G, A)
    gallery_pid = np.array([e["id"] for e in entries])
    queries = [(e["id"], encode(e["synthpedes"]["attributes"]), rev) for e in entries for rev in e["synthpedes"]["revealed"]]
    num_rounds = max(len(rev) for _, _, rev in queries)
    index = {a: i for i, a in enumerate(ATTRIBUTE_NAMES)}
    rounds = []
    for k in range(1, num_rounds + 1):
        n_tie, n_pos = [], []
        for pid, attrs, rev in queries:
            cols = [index[a] for r in rev[:k] for a in r]
            score = (gallery[:, cols] == attrs[cols]).sum(axis=1)  # (G,) matched stated attributes
            pos = gallery_pid == pid
            assert (score[pos] == len(cols)).all()
            n_tie.append(int((score == len(cols)).sum()))
            n_pos.append(int(pos.sum()))
        t, p = np.array(n_tie), np.array(n_pos)
        row: dict[str, Any] = {"round": k}
        for kk in ks:
            row[f"R@{kk}"] = round(100 * float(_expected_hit_at_k(t, p, kk).mean()), 2)
        row["mAP"] = round(100 * float(_expected_ap(t, p).mean()), 2)
        row["mean_tied"] = round(float(t.mean()), 2)
        rounds.append(row)
    return {
        "split": split,
        "rounds": rounds,
        "full": rounds[-1],
        "num_queries": len(queries),
        "num_gallery": len(entries),
        "num_persons": int(len(np.unique(gallery_pid))),
        "chance_R@1": round(100 * float(np.mean([np.mean(gallery_pid == pid) for pid, _, _ in queries])), 2),
        "tie_rule": "expected value under a uniformly random order of tied gallery images",
    }


def format_oracle_table(oracle: dict[str, Any]) -> str:
    """A markdown table of the per-round oracle metrics."""
    keys = [k for k in oracle["rounds"][0] if k != "round"]
    lines = ["| round | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in oracle["rounds"]:
        lines.append(f"| {row['round']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)
