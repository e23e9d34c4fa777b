"""The split encoded once: every distinct gallery image and every dialogue, all its rounds at a time.

Cost model (as ChatIR's `eval.py`): the gallery is encoded once; every dialogue is
tokenised once and encoded once: the dialogue tower is causal and pools one position, so the
vector of "the first k rounds" is read at the end of round k of the full dialogue
(`round_end_positions`). With the processor's official tokenisation a prefix's ids are not a
prefix of the dialogue's, so each row packs the dialogue with the few last tokens where each
prefix's ids differ, and `round_token_mask` tells the model which tokens make each prefix (still
one tower pass). Dialogue batches are grouped by length so padding stays small.

Several processes (an `accelerate.Accelerator`): the gallery and the queries are sharded by a
prepared `DataLoader`, every batch's encodings are gathered with `gather_for_metrics` together with
their row indices and put back in place, so every process holds the same full encodings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diana.processing.image_loading import ImageInputError, load_rgb_pil

logger = logging.getLogger(__name__)

# Dialogues per processor call when tokenising the whole split.
_TOKENIZE_CHUNK = 1024


@dataclass
class TokenizedDialogues:
    """Every dialogue of a split, tokenised once (right-padded rows trimmed to their length).

    Attributes:
        input_ids: one 1-D LongTensor per dialogue, BOS first, no padding.
        round_end_positions: (N, R) index of the last token of the first min(k, n) rounds;
            R = the largest round count of the split.
        round_truncated: (N, R) bool, round k was cut by the processor's max_length.
        num_rounds: (N,) rounds per dialogue.
        round_token_masks: with the processor's official tokenisation, one (R, n) bool tensor per
            dialogue: which of its n tokens make each round prefix (the row packs the dialogue with the
            differing last tokens of its prefixes); None for round-by-round ids, whose prefixes end at
            `round_end_positions`.
    """

    input_ids: list[torch.Tensor]
    round_end_positions: torch.Tensor
    round_truncated: torch.Tensor
    num_rounds: torch.Tensor
    round_token_masks: list[torch.Tensor] | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([ids.numel() for ids in self.input_ids], dtype=torch.long)


def _pad_rounds(x: torch.Tensor, num_rounds: int) -> torch.Tensor:
    """(B, r) -> (B, num_rounds) by repeating the last column: past a dialogue's own round count
    the processor already repeats its last round, so this extends the same rule."""
    if x.shape[1] == num_rounds:
        return x
    return torch.cat([x, x[:, -1:].expand(-1, num_rounds - x.shape[1])], dim=1)


def tokenize_dialogues(
    processor: Any, dialogues: Sequence[Any], *, chunk_size: int = _TOKENIZE_CHUNK, desc: str = "tokenise"
) -> TokenizedDialogues:
    """Tokenise every dialogue once with `return_round_ends=True` (see `TokenizedDialogues`).

    Raises:
        ValueError: if the processor pads on the left (last-position pooling would read padding
            once rows are re-batched) or returns round ends outside a dialogue.
    """
    ids: list[torch.Tensor] = []
    round_ends, truncated, num_rounds, token_masks = [], [], [], []
    chunks = range(0, len(dialogues), chunk_size)
    for start in tqdm(chunks, desc=desc, leave=False, disable=len(chunks) <= 1):
        try:
            batch = processor(dialogues=list(dialogues[start : start + chunk_size]), return_round_ends=True)
        except ValueError as err:
            # The processor numbers dialogues within its call; say where that call starts.
            end = min(start + chunk_size, len(dialogues)) - 1
            raise ValueError(f"split rows {start}-{end} (the processor numbers them from 0): {err}") from err
        mask = batch["attention_mask"].bool()  # (B, L)
        lengths = mask.sum(dim=1)  # (B,)
        positions = torch.arange(mask.shape[1])  # (L,)
        if not torch.equal(mask, positions[None, :] < lengths[:, None]):
            bad = int((mask != (positions[None, :] < lengths[:, None])).any(dim=1).nonzero()[0])
            raise ValueError(
                f"dialogue {start + bad}: the processor's attention mask is not right padding (ones then zeros)"
            )
        ends = batch["round_end_positions"].long()  # (B, r)
        if (ends < 0).any() or (ends >= lengths[:, None]).any():
            bad = int(((ends < 0) | (ends >= lengths[:, None])).any(dim=1).nonzero()[0])
            raise ValueError(
                f"dialogue {start + bad}: round_end_positions {ends[bad].tolist()} fall outside its "
                f"{int(lengths[bad])} tokens"
            )
        ids.extend(row[:n].clone() for row, n in zip(batch["input_ids"], lengths.tolist()))
        round_ends.append(ends)
        truncated.append(batch["round_truncated"].bool())  # (B, r)
        num_rounds.append(batch["num_rounds"].long())  # (B,)
        if "round_token_mask" in batch:  # (B, r, L) packed rows of the official tokenisation
            token_masks.extend(m[:, :n].clone() for m, n in zip(batch["round_token_mask"].bool(), lengths.tolist()))
    max_rounds = max(e.shape[1] for e in round_ends)
    return TokenizedDialogues(
        input_ids=ids,
        round_end_positions=torch.cat([_pad_rounds(e, max_rounds) for e in round_ends]),
        round_truncated=torch.cat([_pad_rounds(t, max_rounds) for t in truncated]),
        num_rounds=torch.cat(num_rounds),
        round_token_masks=[_pad_rounds(m.t(), max_rounds).t() for m in token_masks] if token_masks else None,
    )


def build_gallery(file_paths: Sequence[str], person_ids: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """Distinct images of a split, in first-appearance order.

    Returns:
        (row index of each gallery image's first row, (G,) person ids).

    Raises:
        ValueError: if one file appears with two different person ids.
    """
    first_row: dict[str, int] = {}
    rows: list[int] = []
    for row, (path, pid) in enumerate(zip(file_paths, person_ids)):
        seen = first_row.get(path)
        if seen is None:
            first_row[path] = row
            rows.append(row)
        elif person_ids[seen] != pid:
            raise ValueError(
                f"image {path!r} is person {person_ids[seen]} in row {seen} but person {pid} in row {row}"
            )
    return rows, torch.tensor([int(person_ids[r]) for r in rows], dtype=torch.long)


class _GalleryRows(torch.utils.data.Dataset):
    """(position, undecoded image cell, dataset row) of each gallery image.

    The image column is read undecoded: `datasets` would decode on access, where a truncated file
    fails without naming itself; `load_rgb_image` names it (and converts as every other path does).
    """

    def __init__(self, dataset, rows: list[int]):
        import datasets

        images = dataset.select_columns(["image"]).select(rows)
        if isinstance(images.features["image"], datasets.Image):
            images = images.cast_column("image", datasets.Image(decode=False))
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return i, self.images[i]["image"], self.rows[i]


class _DialogueOrder(torch.utils.data.Dataset):
    """Positions in length order, so that consecutive batches hold similar lengths."""

    def __init__(self, order: torch.Tensor):
        self.order = order.tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return self.order[i]


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's parameters are and their dtype (the inputs are sent there)."""
    param = next(model.parameters())
    return param.device, param.dtype


def _encode_all(
    loader: DataLoader,
    encode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    total: int,
    *,
    accelerator: Any,
    device: torch.device,
    desc: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """Runs `encode` over every batch and returns its outputs in row order, on the CPU.

    Each batch carries an `index` (row positions). Under several processes the outputs and the
    indices are gathered together; a row encoded twice (accelerate pads the last batches with
    repeats) is written twice with the same value, and a row never encoded is an error.
    """
    storage: dict[str, torch.Tensor] = {}
    seen = torch.zeros(total, dtype=torch.bool)
    show = accelerator is None or accelerator.is_main_process
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    with torch.inference_mode(), autocast:
        for batch in tqdm(loader, desc=desc, disable=not show):
            index = batch.pop("index").to(device)
            out = encode({k: v.to(device) for k, v in batch.items()})
            if accelerator is not None and accelerator.num_processes > 1:
                out, index = accelerator.gather_for_metrics((out, index))
            index = index.cpu()
            for name, value in out.items():
                if name not in storage:
                    storage[name] = torch.empty((total, *value.shape[1:]), dtype=value.dtype)
                storage[name][index] = value.cpu()
            seen[index] = True
    if not seen.all():
        missing = (~seen).nonzero().flatten()
        raise RuntimeError(f"{len(missing)} {what} were never encoded (first: {missing[:5].tolist()})")
    return storage


def encode_gallery(
    model: Any,
    processor: Any,
    dataset: Any,
    rows: list[int],
    *,
    batch_size: int,
    keep_attributes: bool,
    accelerator: Any = None,
    num_workers: int = 0,
    desc: str = "gallery",
    on_bad_image: str = "error",
) -> dict[str, torch.Tensor]:
    """Encodes the images at `rows` of `dataset` once.

    Returns:
        {"embeds": (G, D), "attributes": (G, K, D) when kept, "loaded": (G,) bool}; an image that
        could not be loaded under ``on_bad_image="skip"`` has ``loaded`` False (and a placeholder
        embedding), and is logged with its file.

    Raises:
        ImageInputError: an image cannot be loaded and ``on_bad_image`` is "error"; the message
            names the file and the dataset row.
    """
    device, dtype = model_device_dtype(model)

    def load(cell: Any, row: int) -> PIL.Image.Image | None:
        try:
            return load_rgb_pil(cell, where=f"evaluation row {row}")
        except ImageInputError as error:
            if on_bad_image == "error":
                raise
            logger.warning("gallery image skipped (on_bad_image='skip'): %s", error)
            return None

    def collate(items):
        index, cells, dataset_rows = zip(*items)
        images = [load(cell, row) for cell, row in zip(cells, dataset_rows)]
        loaded = torch.tensor([image is not None for image in images])
        placeholder = PIL.Image.new("RGB", (1, 1))  # encoded and then dropped: keeps the batch shape
        pixel_values = processor(images=[placeholder if im is None else im for im in images])["pixel_values"]
        return {"pixel_values": pixel_values, "index": torch.tensor(index, dtype=torch.long), "loaded": loaded}

    def encode(batch):
        enc = model.encode_images(pixel_values=batch["pixel_values"].to(dtype))
        out = {"embeds": enc.image_embeds, "loaded": batch["loaded"]}
        if keep_attributes:
            out["attributes"] = enc.image_attribute_embeds
        return out

    loader = DataLoader(_GalleryRows(dataset, rows), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        device = accelerator.device
    return _encode_all(
        loader, encode, len(rows), accelerator=accelerator, device=device, desc=desc, what="gallery images"
    )


def encode_queries(
    model: Any,
    tokens: TokenizedDialogues,
    *,
    batch_size: int,
    pad_token_id: int,
    keep_attributes: bool,
    accelerator: Any = None,
    desc: str = "dialogues",
) -> dict[str, torch.Tensor]:
    """Encodes every dialogue once, all rounds at a time:
    {"embeds": (N, R, D), "attributes": (N, R, K, D)}, rows in dataset order."""
    device, _ = model_device_dtype(model)
    lengths = tokens.lengths
    # Longest first: a batch that does not fit shows up at the first step, not the last.
    order = torch.sort(-lengths, stable=True).indices  # (N,) dataset rows in length order

    def collate(rows: list[int]):
        index = torch.tensor(rows, dtype=torch.long)
        longest = int(lengths[index].max())
        input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)  # (B, L) right-padded
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = tokens.input_ids[r].numel()
            input_ids[i, :n] = tokens.input_ids[r]
            attention_mask[i, :n] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "round_end_positions": tokens.round_end_positions[index],  # (B, R) same R on every process
            "index": index,
        }
        if tokens.round_token_masks is not None:
            masks = torch.zeros((len(rows), tokens.round_end_positions.shape[1], longest), dtype=torch.bool)
            for i, r in enumerate(rows):
                masks[i, :, : tokens.round_token_masks[r].shape[1]] = tokens.round_token_masks[r]
            batch["round_token_mask"] = masks  # (B, R, L)
        return batch

    def encode(batch):
        # Only official-tokenisation rows carry a round_token_mask (see TokenizedDialogues).
        packed = {"round_token_mask": batch["round_token_mask"]} if "round_token_mask" in batch else {}
        enc = model.encode_dialogues(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            round_end_positions=batch["round_end_positions"],
            **packed,
        )
        out = {"embeds": enc.text_embeds}  # (B, R, D)
        if keep_attributes:
            out["attributes"] = enc.text_attribute_embeds  # (B, R, K, D)
        return out

    loader = DataLoader(_DialogueOrder(order), batch_size=batch_size, collate_fn=collate)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        device = accelerator.device
    return _encode_all(
        loader, encode, len(lengths), accelerator=accelerator, device=device, desc=desc, what="dialogues"
    )


__all__ = [
    "TokenizedDialogues", "build_gallery", "encode_gallery", "encode_queries", "model_device_dtype",
    "tokenize_dialogues",
]
