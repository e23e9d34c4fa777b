"""The retrieval evaluation protocol (README, Evaluate).

Text -> image over one split: the gallery is every distinct image of the split, the queries are
every dialogue, a hit is any gallery image of the query's person. Metrics for the first k rounds
of every dialogue (k = 1..R, independent, as the paper), for the full dialogue, and the ChatIR
cumulative Hits@10, for each score mode (global / attribute / fused).

Cost model (as ChatIR's `eval.py`): the gallery is encoded once; every dialogue is
tokenised once and encoded once: the dialogue tower is causal and pools one position, so the
vector of "the first k rounds" is read at the end of round k of the full dialogue
(`round_end_positions`). With the processor's official tokenisation a prefix's ids are not a
prefix of the dialogue's, so each row packs the dialogue with the few last tokens where each
prefix's ids differ, and `round_token_mask` tells the model which tokens make each prefix (still
one tower pass). Dialogue batches are grouped by length so padding stays small.

Several processes (an `accelerate.Accelerator`): the gallery and the queries are sharded by a
prepared `DataLoader`, every batch's encodings are gathered with `gather_for_metrics` together with
their row indices and put back in place, so every process holds the same full encodings and
computes the same numbers; only the main process writes files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diana.hub_cards.evaluation_report import CUMULATIVE_K, CUMULATIVE_KEY, flatten_results, write_results
from diana.modeling_diana.configuration_diana import SCORE_MODES
from diana.processing.image_loading import BAD_IMAGE_POLICIES, ImageInputError, load_rgb_pil

from .metrics import cumulative_hits_at_k, retrieval_metrics_and_first_hit_ranks

logger = logging.getLogger(__name__)


# Entries of one (query chunk, gallery) score block: bounds the refiner's (T, G, K) intermediate.
_SCORE_BLOCK_ELEMENTS = 1 << 24
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


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
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
    device, dtype = _model_device_dtype(model)

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
    device, _ = _model_device_dtype(model)
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


def score(
    model: Any,
    text: dict[str, torch.Tensor],
    images: dict[str, torch.Tensor],
    mode: str,
    device: torch.device,
) -> torch.Tensor:
    """(Q, G) float32 scores of `model.similarity` for one mode, computed in query chunks.

    Args:
        text: {"embeds": (Q, D), "attributes": (Q, K, D) or absent}.
        images: {"embeds": (G, D), "attributes": (G, K, D) or absent}, already on `device`.
    """
    num_queries, num_gallery = text["embeds"].shape[0], images["embeds"].shape[0]
    slots = images["attributes"].shape[1] if mode != "global" else 1
    chunk = max(1, _SCORE_BLOCK_ELEMENTS // (num_gallery * slots))
    blocks = []
    for start in range(0, num_queries, chunk):
        part = slice(start, start + chunk)
        blocks.append(
            model.similarity(
                text["embeds"][part].to(device),
                images["embeds"],
                text_attribute_embeds=text["attributes"][part].to(device) if mode != "global" else None,
                image_attribute_embeds=images["attributes"] if mode != "global" else None,
                mode=mode,
            ).float()
        )
    return torch.cat(blocks)  # (Q, G)


def evaluate_retrieval(
    model: Any,
    processor: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    score_modes: Sequence[str] = SCORE_MODES,
    max_rounds: int | None = None,
    accelerator: Any = None,
    output_dir: str | os.PathLike | None = None,
    reference: Mapping[str, Any] | None = None,
    reference_label: str = "oracle",
    num_workers: int = 0,
    desc: str = "eval",
    on_bad_image: str = "error",
) -> dict[str, Any]:
    """Text -> image retrieval on one split, per round, for every score mode.

    Args:
        model: a `DiaNAModel` (or anything with `encode_images`, `encode_dialogues`, `similarity`);
            wrapped models are unwrapped through `accelerator`.
        processor: a `DiaNAProcessor` (images and dialogues; `return_round_ends=True`).
        dataset: a `datasets.Dataset` split with columns image, file_path, person_id, dialogue.
        batch_size: images / dialogues per encoder call (per process).
        score_modes: subset of ("global", "attribute", "fused").
        max_rounds: report rounds 1..max_rounds only (default: every round of the split); "full"
            is always the whole dialogue.
        accelerator: shards the encoding over its processes; None = this process, the model's
            device.
        output_dir: where the main process writes `eval_results.json` and `per_round_curves.png`.
        reference: optional per-round curve of another ranker (e.g. the SynthPedes attribute
            oracle), in one mode's layout ({"round_1": {"R@1": ...}, ..., "full": {...}}) or the
            oracle's ({"rounds": [{"round": 1, ...}], "full": {...}}); drawn beside the model's.
        reference_label: its name in the picture.
        num_workers: DataLoader workers decoding gallery images.
        desc: prefix of the progress bars.
        on_bad_image: "error" raises on a gallery image that cannot be loaded (naming the file);
            "skip" leaves it out of the gallery, and the queries of a person left without any
            gallery image out of the queries; both are counted in ``meta`` (`skipped_gallery_images`,
            the files; `skipped_queries`) and logged.

    Returns:
        {"global": {"round_1": {"R@1", "R@5", "R@10", "mAP", "mINP", "mFR"}, ..., "full": {...},
        "cumulative_hits@10": [per round]}, ... per mode, "meta": {sizes, round counts,
        truncation counts, timings}, "flat": {"global/full/R@1": ..., "global/round_1/R@1": ...,
        "global/cumulative_hits@10/round_1": ...}}.

    Raises:
        ValueError: unknown score mode, missing column, an image with two person ids, a query
            whose person has no gallery image.
    """
    unknown = [m for m in score_modes if m not in SCORE_MODES]
    if unknown or not score_modes:
        raise ValueError(f"score_modes must be a non-empty subset of {SCORE_MODES}, got {list(score_modes)}")
    missing = [c for c in ("image", "file_path", "person_id", "dialogue") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the evaluation split lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("the evaluation split is empty")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    is_main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else _model_device_dtype(model)[0]
    keep_attributes = any(m != "global" for m in score_modes)
    timings: dict[str, float] = {}
    file_paths = list(dataset["file_path"])
    person_ids = [int(p) for p in dataset["person_id"]]
    gallery_rows, gallery_ids = build_gallery(file_paths, person_ids)
    query_ids = torch.tensor(person_ids, dtype=torch.long)

    was_training = model.training
    model.eval()
    try:
        # 1. Gallery: every distinct image once.
        start = time.perf_counter()
        images = encode_gallery(model, processor, dataset, gallery_rows, batch_size=batch_size,
                                keep_attributes=keep_attributes, accelerator=accelerator, num_workers=num_workers,
                                desc=f"{desc}: gallery", on_bad_image=on_bad_image)
        timings["encode_gallery_s"] = time.perf_counter() - start

        # 2. Queries: every dialogue, tokenised once and encoded once for all its rounds.
        start = time.perf_counter()
        tokens = tokenize_dialogues(processor, list(dataset["dialogue"]), desc=f"{desc}: tokenise")
        pad_token_id = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None) or 0
        text = encode_queries(model, tokens, batch_size=batch_size, pad_token_id=pad_token_id,
                              keep_attributes=keep_attributes, accelerator=accelerator, desc=f"{desc}: dialogues")
        timings["encode_dialogues_s"] = time.perf_counter() - start
    finally:
        model.train(was_training)

    # Images that could not be loaded (on_bad_image="skip") leave the gallery, and queries left
    # without a positive leave the queries: counted in meta, never dropped silently.
    loaded = images.pop("loaded").bool()
    skipped_files = [file_paths[gallery_rows[g]] for g in (~loaded).nonzero().flatten().tolist()]
    images = {name: value[loaded] for name, value in images.items()}
    gallery_ids = gallery_ids[loaded]
    answerable = torch.isin(query_ids, gallery_ids)
    if not answerable.any():
        raise ImageInputError(f"no gallery image of the evaluation split could be loaded ({len(skipped_files)} skipped)")
    if not answerable.all():
        query_ids = query_ids[answerable]
        text = {name: value[answerable] for name, value in text.items()}
        tokens = TokenizedDialogues(
            input_ids=[ids for ids, keep in zip(tokens.input_ids, answerable.tolist()) if keep],
            round_end_positions=tokens.round_end_positions[answerable],
            round_truncated=tokens.round_truncated[answerable],
            num_rounds=tokens.num_rounds[answerable],
        )
    if skipped_files:
        logger.warning("evaluation: %d gallery image(s) skipped, %d dialogue(s) left without a gallery image "
                       "skipped", len(skipped_files), int((~answerable).sum()))

    # 3. Metrics per mode and round: the same numbers on every process (same gathered inputs).
    total_rounds = tokens.round_end_positions.shape[1]
    report_rounds = total_rounds if max_rounds is None else max(1, min(max_rounds, total_rounds))
    images = {k: v.to(device) for k, v in images.items()}
    query_ids_on, gallery_ids_on = query_ids.to(device), gallery_ids.to(device)

    def rank(similarity: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        return retrieval_metrics_and_first_hit_ranks(similarity, query_ids_on, gallery_ids_on)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for mode in score_modes:
        per_mode: dict[str, Any] = {}
        first_hits = []
        for k in range(1, report_rounds + 1):
            at_k = {name: value[:, k - 1] for name, value in text.items()}  # (Q, D) / (Q, K, D)
            metrics, ranks = rank(score(model, at_k, images, mode, device))
            per_mode[f"round_{k}"] = metrics
            first_hits.append(ranks.cpu())
        if report_rounds == total_rounds:
            # The last column is every dialogue's own last round: the full dialogue.
            per_mode["full"] = dict(per_mode[f"round_{total_rounds}"])
        else:
            full = {name: value[:, -1] for name, value in text.items()}
            per_mode["full"] = rank(score(model, full, images, mode, device))[0]
        per_mode[CUMULATIVE_KEY] = cumulative_hits_at_k(torch.stack(first_hits), k=CUMULATIVE_K)  # (R, Q) -> R
        results[mode] = per_mode
    timings["metrics_s"] = time.perf_counter() - start

    results["meta"] = {
        "num_queries": len(query_ids),
        "num_gallery": len(gallery_ids),
        "num_persons": int(gallery_ids.unique().numel()),
        "num_rounds": total_rounds,
        "reported_rounds": report_rounds,
        # Queries with at least k rounds; shorter dialogues are evaluated with all their rounds.
        "queries_with_round": [int((tokens.num_rounds >= k).sum()) for k in range(1, total_rounds + 1)],
        # Dialogues whose round k was cut by the processor's max_length (counted, not dropped).
        "truncated_per_round": [int(tokens.round_truncated[:, k - 1].sum()) for k in range(1, total_rounds + 1)],
        "score_modes": list(score_modes),
        "num_processes": 1 if accelerator is None else accelerator.num_processes,
        "skipped_gallery_images": skipped_files,
        "skipped_queries": int((~answerable).sum()),
        **{name: round(value, 3) for name, value in timings.items()},
    }
    results["flat"] = flatten_results(results)

    if output_dir is not None and is_main:
        write_results(results, output_dir, reference=reference, reference_label=reference_label)
    return results


__all__ = [
    "TokenizedDialogues",
    "build_gallery",
    "encode_gallery",
    "encode_queries",
    "evaluate_retrieval",
    "score",
    "tokenize_dialogues",
]
