"""What the collator did, counted: rounds kept by R3, truncation, token noise, augmented and skipped images."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass
class CollatorStatistics:
    """Running counts of what the collator did, for logging (reset with `DiaNACollator.reset_statistics`).

    Counts are per process: with DataLoader workers each worker holds its own copy, so use
    ``return_statistics=True`` to receive per-batch counts in the batch instead.

    Attributes:
        batches: Batches collated.
        samples: Rows collated.
        rounds_available: Rounds in the drawn dialogues before R3.
        rounds_kept: Rounds after R3 (equal to `rounds_available` when R3 is off).
        dialogues_truncated: Dialogues whose tokens were cut at `max_length` (right truncation:
            the tail of the last kept round is lost; the paper's policy).
        rounds_truncated: Rounds (of kept dialogues) cut, wholly or in part, by `max_length`.
        captions: MALS captions wrapped as dialogues.
        captions_cut: Captions longer than 56 words, cut to 56 (APTM's policy).
        tokens_eligible: Attended, non-special token positions seen by token masking.
        tokens_selected: Positions selected for noise.
        tokens_masked: Selected positions set to the mask token.
        tokens_randomized: Selected positions set to a random id.
        images_augmented: Images that went through the training image pipeline.
        images_skipped: Rows left out of their batch because their image could not be loaded
            (``on_bad_image="skip"``; each one is also logged with its file).
    """

    batches: int = 0
    samples: int = 0
    rounds_available: int = 0
    rounds_kept: int = 0
    dialogues_truncated: int = 0
    rounds_truncated: int = 0
    captions: int = 0
    captions_cut: int = 0
    tokens_eligible: int = 0
    tokens_selected: int = 0
    tokens_masked: int = 0
    tokens_randomized: int = 0
    images_augmented: int = 0
    images_skipped: int = 0

    def update(self, other: Mapping[str, int]) -> None:
        """Adds per-batch counts."""
        for key, value in other.items():
            setattr(self, key, getattr(self, key) + int(value))

    def as_dict(self) -> dict[str, float]:
        """The counts plus derived rates (NaN-free: a rate with an empty denominator is 0)."""
        counts: dict[str, float] = dict(asdict(self))

        def rate(num: int, den: int) -> float:
            return num / den if den else 0.0

        counts["truncated_fraction"] = rate(self.dialogues_truncated, self.samples)
        counts["rounds_kept_fraction"] = rate(self.rounds_kept, self.rounds_available)
        counts["token_selection_rate"] = rate(self.tokens_selected, self.tokens_eligible)
        return counts


__all__ = ["CollatorStatistics"]
