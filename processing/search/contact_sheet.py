"""The ranked photos of every round of a search, drawn as one picture (a contact sheet)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from ..image_loading import load_rgb_pil
from .session import RoundResult


def save_contact_sheet(
    results: Sequence[RoundResult],
    output: str | os.PathLike,
    *,
    title: str | None = None,
    thumb_width: float = 1.1,
) -> Path:
    """Save a PNG grid: one row per ranking (the round's answer, or the photos a "not this person"
    step rejected, on the left), its top-k photos labelled with rank, score and person id (when known)."""
    matplotlib.use("Agg")  # draw without a display
    import matplotlib.pyplot as plt  # after use(): pyplot picks its back end on import

    if not results:
        raise ValueError("no rounds to draw")
    columns = max(len(r.paths) for r in results)
    text_width = 1.7
    row_height = thumb_width * 2 + 0.55  # pedestrian photos are 2:1 (H:W), plus the labels
    figure, axes = plt.subplots(
        len(results), columns + 1, squeeze=False,
        figsize=(text_width + columns * thumb_width, 0.5 * bool(title) + len(results) * row_height),
        gridspec_kw={"width_ratios": [text_width / thumb_width] + [1] * columns},
    )
    for row, result in enumerate(results):
        label_axis = axes[row][0]
        label_axis.axis("off")
        if result.is_rejection:
            names = ", ".join(Path(path).name for path in result.rejected_paths)
            label = f"round {result.round_index}\nnot this person:\n" + "\n".join(textwrap.wrap(names, 24)[:5])
        else:
            label = f"round {result.round_index}\n" + "\n".join(textwrap.wrap(result.answer, 24)[:6])
        label_axis.text(0.0, 0.5, label, fontsize=7, va="center", ha="left", transform=label_axis.transAxes)
        for column in range(columns):
            axis = axes[row][column + 1]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(result.paths):
                axis.axis("off")
                continue
            axis.imshow(load_rgb_pil(result.paths[column]))
            label = f"#{column + 1}  {result.scores[column]:.3f}"
            if result.ids[column] >= 0:
                label += f"\nid {result.ids[column]}"
            axis.set_title(label, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
