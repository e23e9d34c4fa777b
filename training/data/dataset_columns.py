"""Dataset columns prepared before collation: each row's token length (for the Trainer's
``group_by_length`` sampling) and images left undecoded (so the collator's loader names a bad file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .augmentation import caption_to_dialogue


def _length_dialogue(row: Mapping[str, Any]) -> Any:
    # Captions are measured with the first question (deterministic): lengths are
    # a grouping key, a few tokens of question-pool variation do not matter.
    if row.get("dialogue") is not None:
        return row["dialogue"]
    if row.get("caption") is not None:
        return caption_to_dialogue(row["caption"])
    raise KeyError("a row needs a 'dialogue' or a 'caption' column to measure its length")


def _token_lengths(dialogues: list[Any], processor: Any, max_length: int | None) -> list[int]:
    encoded = processor(dialogues=dialogues, padding="longest", max_length=max_length, truncation=True,
                        return_tensors="pt")
    return encoded["attention_mask"].sum(dim=1).tolist()


def dialogue_length(row: Mapping[str, Any], processor: Any, max_length: int | None = None) -> int:
    """Token count (BOS included, after truncation) of a row's full dialogue or wrapped caption.

    Args:
        row: A ChatPedes row (``dialogue``) or MALS row (``caption``).
        processor: The `DiaNAProcessor`.
        max_length: Truncation limit; None uses the processor's.
    """
    return _token_lengths([_length_dialogue(row)], processor, max_length)[0]


def add_length_column(
    dataset: Any,
    processor: Any,
    *,
    column: str = "length",
    max_length: int | None = None,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> Any:
    """Adds the token count of every row's full dialogue (or wrapped caption) as `column`.

    The Trainer's ``train_sampling_strategy="group_by_length"`` reads it (``length_column_name``)
    instead of tokenising on start-up, so batches are padded to similar lengths.
    With R3 the drawn dialogue is a prefix, so the column is an upper bound of the collated length.
    Only the text column is read: images are not decoded.

    Args:
        dataset: A `datasets.Dataset` or `DatasetDict` with a ``dialogue`` or ``caption`` column.
        processor: The `DiaNAProcessor`.
        column: Name of the new column.
        max_length: Truncation limit; None uses the processor's.
        batch_size: Rows tokenised per call.
        num_proc: Processes for `Dataset.map`.

    Returns:
        The dataset with the extra column.
    """
    names = dataset.column_names
    names = next(iter(names.values())) if isinstance(names, Mapping) else names
    text_column = "dialogue" if "dialogue" in names else "caption" if "caption" in names else None
    if text_column is None:
        raise KeyError(f"add_length_column needs a 'dialogue' or 'caption' column, got {names}")

    def lengths(values: list[Any]) -> dict[str, list[int]]:
        return {column: _token_lengths([_length_dialogue({text_column: v}) for v in values], processor, max_length)}

    return dataset.map(lengths, batched=True, batch_size=batch_size, input_columns=[text_column],
                       num_proc=num_proc, desc="Token lengths")


def with_undecoded_images(dataset: Any, column: str = "image") -> Any:
    """Casts the image column to ``Image(decode=False)`` so rows carry ``{"path", "bytes"}``.

    Decoding then happens in the collator (`image_loading.load_rgb_image`), whose error names the file;
    `datasets` decodes on row access, where a truncated file fails without saying which one.
    """
    import datasets

    return dataset.cast_column(column, datasets.Image(decode=False))


__all__ = ["add_length_column", "dialogue_length", "with_undecoded_images"]
