"""Pictures of evaluation results (matplotlib's object API with the Agg canvas: no display, no
global pyplot state, safe inside a training process)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MODE_STYLE = {"global": "tab:blue", "attribute": "tab:orange", "fused": "tab:green"}


def _curve(per_mode: Mapping[str, Any], metric: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rounds that report `metric` (a reference may report only some)."""
    rounds = sorted(
        int(k.split("_")[1])
        for k, v in per_mode.items()
        if k.startswith("round_") and isinstance(v, Mapping) and metric in v
    )
    return rounds, [per_mode[f"round_{r}"][metric] for r in rounds]


def plot_round_curves(
    results: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("R@1", "R@5", "R@10", "mAP"),
    reference: Mapping[str, Any] | None = None,
    reference_label: str = "oracle",
) -> None:
    """One panel per metric: the metric after the first k rounds, one line per score mode, plus
    the cumulative Hits@10 and an optional reference curve (dashed).

    Args:
        results: `evaluate_retrieval`'s result ({mode: {"round_k": {metric: value}, ...}}).
        path: the PNG to write.
        metrics: the panels.
        reference: another ranker's curve (e.g. the SynthPedes oracle), in any layout
            `evaluation.reference_rounds` accepts.
        reference_label: its legend entry.
    """
    from .evaluation import reference_rounds

    reference = reference_rounds(reference) if reference is not None else None
    modes = [m for m in _MODE_STYLE if m in results]
    panels = list(metrics) + ["Hits@10 (cumulative)"]
    fig = Figure(figsize=(3.6 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        for mode in modes:
            if metric in metrics:
                rounds, values = _curve(results[mode], metric)
            else:
                values = results[mode].get("cumulative_hits@10", [])
                rounds = list(range(1, len(values) + 1))
            ax.plot(rounds, values, marker="o", color=_MODE_STYLE[mode], label=mode)
        if reference is not None and metric in metrics:
            rounds, values = _curve(reference, metric)
            if rounds:
                ax.plot(rounds, values, linestyle="--", marker="x", color="black", label=reference_label)
        ax.set_title(metric)
        ax.set_xlabel("dialogue rounds")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(loc="best", fontsize="small")
    meta = results.get("meta", {})
    if meta:
        fig.suptitle(f"text -> image retrieval per round ({meta.get('num_queries')} dialogues, "
                     f"{meta.get('num_gallery')} images)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
