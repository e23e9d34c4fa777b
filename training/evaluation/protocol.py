"""The retrieval evaluation protocol (README, Evaluate).

Text -> image over one split: the gallery is every distinct image of the split, the queries are
every dialogue, a hit is any gallery image of the query's person. Metrics for the first k rounds
of every dialogue (k = 1..R, independent, as the paper), for the full dialogue, and the ChatIR
cumulative Hits@10, for each score mode (global / attribute / fused).

The split is encoded once (`encoding`: the gallery once, every dialogue once for all its rounds,
sharded over the processes of an `accelerate.Accelerator` and gathered back), so every process
holds the same encodings and computes the same numbers; only the main process writes files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diana.hub_cards.evaluation_report import CUMULATIVE_K, CUMULATIVE_KEY, flatten_results, write_results
from diana.modeling_diana.configuration_diana import SCORE_MODES
from diana.processing.image_loading import BAD_IMAGE_POLICIES, ImageInputError

from .encoding import (
    TokenizedDialogues,
    build_gallery,
    encode_gallery,
    encode_queries,
    model_device_dtype,
    tokenize_dialogues,
)
from .metrics import cumulative_hits_at_k, retrieval_metrics_and_first_hit_ranks

logger = logging.getLogger(__name__)


# Entries of one (query chunk, gallery) score block: bounds the refiner's (T, G, K) intermediate.
_SCORE_BLOCK_ELEMENTS = 1 << 24
_REQUIRED_COLUMNS = ("image", "file_path", "person_id", "dialogue")


@dataclass
class _EncodedSplit:
    """A split's encodings (on the CPU), without the gallery images that could not be loaded and the
    queries those left without a gallery image of their person."""

    images: dict[str, torch.Tensor]  # {"embeds": (G, D), "attributes": (G, K, D) when kept}
    gallery_ids: torch.Tensor  # (G,)
    text: dict[str, torch.Tensor]  # {"embeds": (Q, R, D), "attributes": (Q, R, K, D) when kept}
    query_ids: torch.Tensor  # (Q,)
    tokens: TokenizedDialogues  # the kept queries' tokens (round counts, truncation flags)
    skipped_files: list[str]
    skipped_queries: int


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
    _check_arguments(dataset, score_modes, on_bad_image)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    is_main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else model_device_dtype(model)[0]
    timings: dict[str, float] = {}
    split = _encode_split(
        model, processor, dataset, keep_attributes=any(m != "global" for m in score_modes), batch_size=batch_size,
        accelerator=accelerator, num_workers=num_workers, desc=desc, on_bad_image=on_bad_image, timings=timings,
    )

    # Metrics per mode and round: the same numbers on every process (same gathered inputs).
    total_rounds = split.tokens.round_end_positions.shape[1]
    report_rounds = total_rounds if max_rounds is None else max(1, min(max_rounds, total_rounds))
    images = {k: v.to(device) for k, v in split.images.items()}
    query_ids, gallery_ids = split.query_ids.to(device), split.gallery_ids.to(device)
    start = time.perf_counter()
    results: dict[str, Any] = {
        mode: _mode_metrics(model, split.text, images, query_ids, gallery_ids, mode, report_rounds, device)
        for mode in score_modes
    }
    timings["metrics_s"] = time.perf_counter() - start

    results["meta"] = _meta(split, report_rounds, score_modes, accelerator, timings)
    results["flat"] = flatten_results(results)

    if output_dir is not None and is_main:
        write_results(results, output_dir, reference=reference, reference_label=reference_label)
    return results


def _check_arguments(dataset: Any, score_modes: Sequence[str], on_bad_image: str) -> None:
    """A ValueError for an unknown score mode or bad-image policy, a missing column or an empty split."""
    unknown = [m for m in score_modes if m not in SCORE_MODES]
    if unknown or not score_modes:
        raise ValueError(f"score_modes must be a non-empty subset of {SCORE_MODES}, got {list(score_modes)}")
    missing = [c for c in _REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the evaluation split lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("the evaluation split is empty")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")


def _encode_split(
    model: Any,
    processor: Any,
    dataset: Any,
    *,
    keep_attributes: bool,
    batch_size: int,
    accelerator: Any,
    num_workers: int,
    desc: str,
    on_bad_image: str,
    timings: dict[str, float],
) -> _EncodedSplit:
    """Encodes the split's gallery (every distinct image once) and queries (every dialogue once, all
    its rounds), in eval mode; adds their times to `timings`."""
    file_paths = list(dataset["file_path"])
    person_ids = [int(p) for p in dataset["person_id"]]
    gallery_rows, gallery_ids = build_gallery(file_paths, person_ids)

    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        images = encode_gallery(model, processor, dataset, gallery_rows, batch_size=batch_size,
                                keep_attributes=keep_attributes, accelerator=accelerator, num_workers=num_workers,
                                desc=f"{desc}: gallery", on_bad_image=on_bad_image)
        timings["encode_gallery_s"] = time.perf_counter() - start

        start = time.perf_counter()
        tokens = tokenize_dialogues(processor, list(dataset["dialogue"]), desc=f"{desc}: tokenise")
        pad_token_id = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None) or 0
        text = encode_queries(model, tokens, batch_size=batch_size, pad_token_id=pad_token_id,
                              keep_attributes=keep_attributes, accelerator=accelerator, desc=f"{desc}: dialogues")
        timings["encode_dialogues_s"] = time.perf_counter() - start
    finally:
        model.train(was_training)
    return _without_unloaded_images(
        images, gallery_ids, [file_paths[r] for r in gallery_rows], text, torch.tensor(person_ids, dtype=torch.long),
        tokens,
    )


def _without_unloaded_images(
    images: dict[str, torch.Tensor],
    gallery_ids: torch.Tensor,
    gallery_files: list[str],
    text: dict[str, torch.Tensor],
    query_ids: torch.Tensor,
    tokens: TokenizedDialogues,
) -> _EncodedSplit:
    """Images that could not be loaded (on_bad_image="skip") leave the gallery, and queries left
    without a positive leave the queries: counted, never dropped silently.

    Raises:
        ImageInputError: no gallery image could be loaded.
    """
    loaded = images.pop("loaded").bool()
    skipped_files = [gallery_files[g] for g in (~loaded).nonzero().flatten().tolist()]
    images = {name: value[loaded] for name, value in images.items()}
    gallery_ids = gallery_ids[loaded]
    answerable = torch.isin(query_ids, gallery_ids)
    if not answerable.any():
        raise ImageInputError(
            f"no gallery image of the evaluation split could be loaded ({len(skipped_files)} skipped)"
        )
    if not answerable.all():
        query_ids = query_ids[answerable]
        text = {name: value[answerable] for name, value in text.items()}
        tokens = TokenizedDialogues(
            input_ids=[ids for ids, keep in zip(tokens.input_ids, answerable.tolist()) if keep],
            round_end_positions=tokens.round_end_positions[answerable],
            round_truncated=tokens.round_truncated[answerable],
            num_rounds=tokens.num_rounds[answerable],
        )
    skipped_queries = int((~answerable).sum())
    if skipped_files:
        logger.warning("evaluation: %d gallery image(s) skipped, %d dialogue(s) left without a gallery image "
                       "skipped", len(skipped_files), skipped_queries)
    return _EncodedSplit(images, gallery_ids, text, query_ids, tokens, skipped_files, skipped_queries)


def _mode_metrics(
    model: Any,
    text: dict[str, torch.Tensor],
    images: dict[str, torch.Tensor],
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    mode: str,
    report_rounds: int,
    device: torch.device,
) -> dict[str, Any]:
    """One score mode's metrics: {"round_k": {...} for k = 1..report_rounds, "full": {...},
    "cumulative_hits@10": [per round]}.

    Args:
        text: the queries' per-round encodings (Q, R, ...) on the CPU.
        images, query_ids, gallery_ids: the gallery's encodings and the person ids, on `device`.
    """

    def rank(at: dict[str, torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
        return retrieval_metrics_and_first_hit_ranks(score(model, at, images, mode, device), query_ids, gallery_ids)

    per_mode: dict[str, Any] = {}
    first_hits = []
    for k in range(1, report_rounds + 1):
        metrics, ranks = rank({name: value[:, k - 1] for name, value in text.items()})  # (Q, D) / (Q, K, D)
        per_mode[f"round_{k}"] = metrics
        first_hits.append(ranks.cpu())
    total_rounds = text["embeds"].shape[1]
    if report_rounds == total_rounds:
        # The last column is every dialogue's own last round: the full dialogue.
        per_mode["full"] = dict(per_mode[f"round_{total_rounds}"])
    else:
        per_mode["full"] = rank({name: value[:, -1] for name, value in text.items()})[0]
    per_mode[CUMULATIVE_KEY] = cumulative_hits_at_k(torch.stack(first_hits), k=CUMULATIVE_K)  # (R, Q) -> R
    return per_mode


def _meta(
    split: _EncodedSplit, report_rounds: int, score_modes: Sequence[str], accelerator: Any, timings: dict[str, float]
) -> dict[str, Any]:
    """The report's "meta" entry: sizes, round counts, truncation and skip counts, timings."""
    tokens = split.tokens
    total_rounds = tokens.round_end_positions.shape[1]
    return {
        "num_queries": len(split.query_ids),
        "num_gallery": len(split.gallery_ids),
        "num_persons": int(split.gallery_ids.unique().numel()),
        "num_rounds": total_rounds,
        "reported_rounds": report_rounds,
        # Queries with at least k rounds; shorter dialogues are evaluated with all their rounds.
        "queries_with_round": [int((tokens.num_rounds >= k).sum()) for k in range(1, total_rounds + 1)],
        # Dialogues whose round k was cut by the processor's max_length (counted, not dropped).
        "truncated_per_round": [int(tokens.round_truncated[:, k - 1].sum()) for k in range(1, total_rounds + 1)],
        "score_modes": list(score_modes),
        "num_processes": 1 if accelerator is None else accelerator.num_processes,
        "skipped_gallery_images": split.skipped_files,
        "skipped_queries": split.skipped_queries,
        **{name: round(value, 3) for name, value in timings.items()},
    }


__all__ = [
    "TokenizedDialogues",
    "build_gallery",
    "encode_gallery",
    "encode_queries",
    "evaluate_retrieval",
    "score",
    "tokenize_dialogues",
]
