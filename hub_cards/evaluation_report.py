"""The evaluation report: `eval_results.json`, the per-round curves, the flat keys the Trainer
logs and the per-round table the commands print. The evaluation writes it; the model card reads it.
Pictures use matplotlib's object API with the Agg canvas: no display, no global pyplot state, safe
inside a training process."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diana.modeling_diana.configuration_diana import SCORE_MODES

logger = logging.getLogger(__name__)

TABLE_METRICS = ("R@1", "R@5", "R@10", "mAP", "mINP", "mFR")
CUMULATIVE_K = 10  # ChatIR's cumulative Hits@10: found in the top 10 at any round so far
CUMULATIVE_KEY = f"cumulative_hits@{CUMULATIVE_K}"
RESULTS_FILE = "eval_results.json"
CURVES_FILE = "per_round_curves.png"


def flatten_results(results: Mapping[str, Any]) -> dict[str, float]:
    """Slash-joined keys for logging: "global/full/R@1", "global/round_2/mAP",
    "global/cumulative_hits@10/round_3"."""
    flat: dict[str, float] = {}
    for mode in SCORE_MODES:
        if mode not in results:
            continue
        for key, value in results[mode].items():
            if key == CUMULATIVE_KEY:
                flat.update({f"{mode}/{key}/round_{r + 1}": v for r, v in enumerate(value)})
            else:
                flat.update({f"{mode}/{key}/{name}": v for name, v in value.items()})
    return flat


def write_results(
    results: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    reference: Mapping[str, Any] | None = None,
    reference_label: str = "oracle",
) -> None:
    """Writes `eval_results.json` (the results, their flat copy, the reference if any) and
    `per_round_curves.png`."""
    os.makedirs(output_dir, exist_ok=True)
    payload = dict(results)
    if reference is not None:
        payload["reference"] = {"label": reference_label, **reference}
    with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
        json.dump(payload, f, indent=2)
    plot_round_curves(
        results, os.path.join(output_dir, CURVES_FILE),
        reference=reference_rounds(reference) if reference is not None else None, reference_label=reference_label
    )
    logger.info("wrote %s and %s to %s", RESULTS_FILE, CURVES_FILE, output_dir)


def reference_rounds(reference: Mapping[str, Any]) -> dict[str, Any]:
    """A reference curve in one mode's layout ({"round_k": {...}, "full": {...}}).

    Accepts that layout itself or the SynthPedes oracle's ({"rounds": [{"round": k, "R@1": ...}],
    "full": {...}}, `diana.processing.data.synthpedes.attribute_oracle`).
    """
    out = {k: v for k, v in reference.items() if (k.startswith("round_") or k == "full") and isinstance(v, Mapping)}
    for row in reference.get("rounds", []) or []:
        out.setdefault(f"round_{int(row['round'])}", {k: v for k, v in row.items() if k != "round"})
    return out


def _round_keys(per_mode: Mapping[str, Any]) -> list[str]:
    rounds = sorted((k for k in per_mode if k.startswith("round_")), key=lambda k: int(k.split("_")[1]))
    return rounds + (["full"] if "full" in per_mode else [])


def format_round_table(
    results: Mapping[str, Any],
    reference: Mapping[str, Any] | None = None,
    *,
    metrics: Sequence[str] = TABLE_METRICS,
    reference_metrics: Sequence[str] = ("R@1", "R@10", "mAP"),
    reference_label: str = "oracle",
) -> str:
    """Markdown table per score mode: one row per round count and the full dialogue, the
    cumulative Hits@10, and (with `reference`) the reference's numbers side by side."""
    lines: list[str] = []
    meta = results.get("meta", {})
    reference = reference_rounds(reference) if reference is not None else None
    for mode in SCORE_MODES:
        if mode not in results:
            continue
        per_mode = results[mode]
        header = ["rounds", *metrics, "Hits@10 (cum.)"]
        if reference is not None:
            header += [f"{reference_label} {m}" for m in reference_metrics]
        title = f"**{mode}**"
        if meta:
            title += (f" ({meta.get('num_queries')} dialogues, {meta.get('num_gallery')} images, "
                      f"{meta.get('num_persons')} persons)")
        lines += [title, "", "| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        cumulative = per_mode.get(CUMULATIVE_KEY, [])
        for key in _round_keys(per_mode):
            row = [key.replace("round_", "")]
            row += [f"{per_mode[key][m]:.2f}" if m in per_mode[key] else "" for m in metrics]
            r = int(key.split("_")[1]) - 1 if key != "full" else None
            row.append(f"{cumulative[r]:.2f}" if r is not None and r < len(cumulative) else "")
            if reference is not None:
                ref = reference.get(key, {})
                row += [f"{ref[m]:.2f}" if m in ref else "" for m in reference_metrics]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_MODE_STYLE = dict(zip(SCORE_MODES, ("tab:blue", "tab:orange", "tab:green"), strict=True))


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
        reference: another ranker's curve (e.g. the SynthPedes oracle) in one mode's layout
            ({"round_k": {metric: value}, ...}; `results.reference_rounds` makes it).
        reference_label: its legend entry.
    """
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
                values = results[mode].get(CUMULATIVE_KEY, [])
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


__all__ = [
    "CUMULATIVE_K", "CUMULATIVE_KEY", "CURVES_FILE", "RESULTS_FILE", "TABLE_METRICS", "flatten_results", "plot_round_curves", "format_round_table", "reference_rounds",
    "write_results",
]
