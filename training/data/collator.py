"""Turns ChatPedes / MALS dataset rows into DiaNA model inputs, with the training-time augmentation
of the paper behind explicit switches (all off when ``train=False``).

Typical use with the Trainer (``remove_unused_columns=False`` so the rows keep their columns;
`add_length_column` and `with_undecoded_images` are `dataset_columns`')::

    train = with_undecoded_images(add_length_column(dataset["train"], processor))
    collator = DiaNACollator(processor, train=True, round_retaining=True, token_masking=0.15,
                             image_augmentation=True)
    args = TrainingArguments(..., remove_unused_columns=False, label_names=[],
                             train_sampling_strategy="group_by_length")
    Trainer(model, args, train_dataset=train, data_collator=collator)

Randomness: with ``seed=None`` (the default) every batch draws its seed from torch's global CPU
generator, which the Trainer seeds (``set_seed``), DataLoader workers re-seed per worker and epoch,
and checkpoints save and restore, so a run, and a resumed run, is reproducible. With ``seed=int``
the collator owns a private stream (independent of everything else, e.g. for benchmarks); in a
DataLoader worker it is mixed with the worker's seed so workers never repeat each other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from diana.processing.image_loading import BAD_IMAGE_POLICIES, ImageInputError, load_rgb_pil

from .augmentation import MALS_MAX_WORDS, TokenMasker, caption_to_dialogue, clean_caption, sample_retained_rounds
from .collator_statistics import CollatorStatistics
from .image_augmentation import PedestrianImageAugmentation

logger = logging.getLogger(__name__)

# Row fields that identify a row in error messages, in the order they are most useful.
_ROW_KEYS = ("file_path", "person_index", "person_id", "entry_index", "dialogue_index", "image_id")


def _dialogue_rows(
    packed_ids: torch.Tensor, round_token_mask: torch.Tensor, num_rounds: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dialogues alone from official-tokenisation rows: a dialogue's own ids (its last round's view)
    lead its packed row. Returns right-padded (input_ids, attention_mask)."""
    last_view = round_token_mask[torch.arange(len(num_rounds)), num_rounds - 1]  # (B, L)
    lengths = last_view.sum(-1)  # (B,)
    longest = int(lengths.max())
    attention_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    return packed_ids[:, :longest].masked_fill(attention_mask == 0, pad_token_id), attention_mask


class DiaNACollator:
    """Collates dataset rows into ``pixel_values``, ``input_ids``, ``attention_mask``, ``person_ids``.

    Rows are dicts as `datasets` yields them:

    - ChatPedes (`diana.processing.data.chatpedes`): ``image``, ``dialogue`` (list of
      ``{"question", "answer"}``, or any form `DiaNAProcessor.normalize_dialogue` accepts),
      ``person_index`` / ``person_id``;
    - MALS (`diana.processing.data.mals`, needs ``mals_captions=True``): ``image``, ``caption``,
      ``person_id``.

    ``image`` may be a decoded PIL image, a ``{"path", "bytes"}`` dict (``Image(decode=False)``,
    see `with_undecoded_images`) or a path, turned into RGB by `image_loading.load_rgb_image` (the
    processor's loader); a file that cannot be read raises `ImageInputError` naming it, or with
    ``on_bad_image="skip"`` its row is left out of the batch, counted and logged. ``person_ids`` is
    ``person_index`` when the row has one (contiguous over the dataset) and ``person_id`` otherwise.

    Every augmentation is behind its own argument and applies only when ``train=True``; with
    ``train=False`` the output is deterministic: the processor's own image path, full dialogues,
    no token noise, and the first question of the pool for captions.

    Args:
        processor: A `DiaNAProcessor` (its tokenizer, image processor, dialogue template).
        train: Training mode; False switches every augmentation off.
        round_retaining: R3: each time a dialogue is drawn keep its first r rounds, r uniform in
            1..R.
        token_masking: Selection probability of token masking (0.15 in DiaNA; 0 = off); selected
            positions go 80% mask token, 10% random id, 10% unchanged.
        image_augmentation: The torchvision.transforms.v2 pipeline of
            `image_augmentation.build_train_image_transform` (flip, pad + crop, random erasing).
        mals_captions: Rows carry a MALS ``caption``: clean it (lower-case, strip ``.!"()*#:;~``,
            56 words; in both modes) and wrap it with a question drawn from the pool (train) or
            the first question (eval).
        max_length: Token limit (right truncation); None uses the processor's (400 fine-tuning,
            56 pretraining).
        seed: None follows torch's global generator (Trainer seed, resumable); an int gives the
            collator its own reproducible stream.
        return_round_ends: Also return ``round_end_positions``, ``round_truncated`` and
            ``num_rounds`` from the processor (for evaluation code; the model's ``forward`` does
            not take them).
        return_statistics: Also return this batch's `CollatorStatistics` counts as
            ``batch["collator_statistics"]`` (a dict of scalar tensors) so they survive DataLoader
            workers; the training loop must pop it before calling the model.
        image_augmentation_kwargs: Overrides for `build_train_image_transform` (e.g.
            ``{"erasing_probability": 0.0}``).
        image_cache: Keep every training image after the pipeline's deterministic head (decoded, RGB,
            resized: 3*H*W uint8 bytes) and run only the random tail on later draws; the batches are
            bit-identical to uncached ones. Pair it with `with_undecoded_images`, or `datasets` still
            decodes every row on access. Needs ``train=True`` and ``image_augmentation=True``; one cache
            per process: each DataLoader worker fills its own, and only persistent workers
            (``dataloader_persistent_workers``) keep theirs past an epoch. For data that fits in memory.
        on_bad_image: "error" (default) raises on an image that cannot be loaded (e.g. a file that
            became corrupt after the dataset builder checked it); "skip" leaves its row out of the
            batch, counts it (``images_skipped``, `skipped_images`) and logs the file. A batch
            whose every image fails still raises.
    """

    def __init__(
        self,
        processor: Any,
        *,
        train: bool,
        round_retaining: bool,
        token_masking: float,
        image_augmentation: bool,
        mals_captions: bool = False,
        max_length: int | None = None,
        seed: int | None = None,
        return_round_ends: bool = False,
        return_statistics: bool = False,
        image_augmentation_kwargs: Mapping[str, Any] | None = None,
        image_cache: bool = False,
        on_bad_image: str = "error",
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        if not 0.0 <= float(token_masking) < 1.0:
            raise ValueError(f"token_masking is a selection probability in [0, 1), got {token_masking}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and one token, got {max_length}")
        self.processor = processor
        self.train = bool(train)
        self.round_retaining = bool(round_retaining)
        self.token_masking = float(token_masking)
        self.image_augmentation = bool(image_augmentation)
        self.mals_captions = bool(mals_captions)
        self.max_length = max_length
        self.seed = seed
        self.return_round_ends = bool(return_round_ends)
        self.return_statistics = bool(return_statistics)
        # Built even in eval mode when asked for, so a misconfigured processor fails at start-up.
        self.masker = (
            TokenMasker.from_tokenizer(processor.tokenizer, probability=self.token_masking)
            if self.token_masking > 0
            else None
        )
        self.image_transform = (
            PedestrianImageAugmentation(processor.image_processor, **dict(image_augmentation_kwargs or {}))
            if self.image_augmentation
            else None
        )
        if self.return_round_ends and getattr(processor, "tokenization", "rounds") == "official":
            # Its rows pack each dialogue with the differing last tokens of its prefixes (read with a
            # round_token_mask); training batches hold the dialogues alone.
            raise ValueError("return_round_ends needs a processor with tokenization='rounds'; evaluate an "
                             "official-tokenisation processor with diana.training.evaluation")
        if image_cache and not (self.train and self.image_transform is not None):
            raise ValueError("image_cache keeps images after the training image pipeline's resize: it needs "
                             "train=True and image_augmentation=True")
        self.image_cache = bool(image_cache)
        self.on_bad_image = on_bad_image
        self.skipped_images: list[str] = []  # what on_bad_image="skip" left out, in this process
        self._images: dict[str, torch.Tensor] = {}
        self.statistics = CollatorStatistics()
        self._generator: torch.Generator | None = None
        self._generator_key: Any = None
        self.epoch: int | None = None

    # ----------------------------------------------------------------------------------------

    def reset_statistics(self) -> CollatorStatistics:
        """Returns the running counts and starts new ones."""
        statistics, self.statistics = self.statistics, CollatorStatistics()
        return statistics

    def __getstate__(self) -> dict[str, Any]:
        # A spawned DataLoader worker gets a fresh stream keyed by its own seed (see _batch_generator).
        state = dict(self.__dict__)
        state["_generator"], state["_generator_key"] = None, None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Keys the augmentation of rows carrying a ``row_index`` to (seed, epoch, rows): see
        ``_batch_generator``. `DiaNATrainer` calls it at every epoch start."""
        self.epoch = int(epoch)

    def _batch_generator(self, rows: Sequence[Mapping[str, Any]] = ()) -> torch.Generator:
        """One generator per batch.

        With an epoch set and rows that carry ``row_index``, the seed is a hash of (seed, epoch,
        row indices): the draws of a batch then do not depend on when it is collated. That is what
        makes a resumed run equal to an uninterrupted one: accelerate's data loader collates one
        batch ahead, so a checkpoint's saved global RNG state is already past the next batch's
        draws. Otherwise the seed comes from the global CPU generator or the private stream.
        """
        if self.epoch is not None and rows and all("row_index" in row for row in rows):
            key = [self.seed or 0, self.epoch, *(int(row["row_index"]) for row in rows)]
            digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
            return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 2)
        if self.seed is None:
            seed = int(torch.randint(2**62, (1,)))
        else:
            info = torch.utils.data.get_worker_info()
            key = None if info is None else info.seed
            if self._generator is None or self._generator_key != key:
                # Workers receive copies of the same collator: mix in the worker seed (distinct per
                # worker and per epoch, itself derived from the Trainer's seed) so they differ.
                base = self.seed if info is None else (self.seed * 1_000_003 + info.seed) % 2**63
                self._generator, self._generator_key = torch.Generator().manual_seed(base), key
            seed = int(torch.randint(2**62, (1,), generator=self._generator))
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def _describe(row: Mapping[str, Any], index: int) -> str:
        fields = [f"{key}={row[key]!r}" for key in _ROW_KEYS if row.get(key) is not None]
        return f"batch row {index}" + (f" ({', '.join(fields)})" if fields else "")

    @staticmethod
    def _person_id(row: Mapping[str, Any], where: str) -> int:
        for key in ("person_index", "person_id"):
            if row.get(key) is not None:
                return int(row[key])
        raise KeyError(f"{where}: the row has neither 'person_index' nor 'person_id'")

    def _rounds(
        self, row: Mapping[str, Any], where: str, generator: torch.Generator | None, counts: dict[str, int]
    ) -> list[tuple[str, str]]:
        """The row's dialogue as (question, answer) pairs, after caption wrapping and R3."""
        if self.mals_captions and row.get("caption") is not None:
            caption = row["caption"]
            if not isinstance(caption, str):
                raise TypeError(f"{where}: 'caption' must be a str, got {type(caption).__name__}")
            counts["captions"] += 1
            counts["captions_cut"] += len(clean_caption(caption, max_words=10**9).split()) > MALS_MAX_WORDS
            dialogue: Any = caption_to_dialogue(caption, generator)
        elif row.get("dialogue") is not None:
            dialogue = row["dialogue"]
        elif row.get("caption") is not None:
            raise ValueError(f"{where}: the row has a 'caption' but no 'dialogue'; MALS rows need mals_captions=True")
        else:
            raise KeyError(f"{where}: the row has no 'dialogue' (nor a 'caption' with mals_captions=True)")
        try:
            rounds = [tuple(pair) for pair in self.processor.normalize_dialogue(dialogue)]
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{where}: malformed dialogue: {error}") from error
        if not rounds:
            raise ValueError(f"{where}: the dialogue has no rounds")
        counts["rounds_available"] += len(rounds)
        if generator is not None and self.round_retaining:
            rounds = rounds[: sample_retained_rounds(len(rounds), generator)]
        counts["rounds_kept"] += len(rounds)
        return rounds  # type: ignore[return-value]

    def load_image_or_skip(self, row: Mapping[str, Any], where: str, counts: dict[str, int], batch_size: int) -> Any:
        """The row's image, or None when it cannot be loaded and ``on_bad_image="skip"`` (then counted in
        ``counts["images_skipped"]``, kept in `skipped_images` and logged with its file)."""
        try:
            return self.load_image(row["image"], where)
        except ImageInputError as error:
            if self.on_bad_image == "error":
                raise
            if counts["images_skipped"] == batch_size - 1:
                raise ImageInputError(f"no image of the batch could be loaded (on_bad_image='skip' cannot "
                                      f"return an empty batch); the last one: {error}") from error
            counts["images_skipped"] += 1
            self.skipped_images.append(str(error))
            logger.warning("skipped a row whose image cannot be loaded (on_bad_image='skip'): %s", error)
            return None

    def load_image(self, value: Any, where: str) -> Any:
        """The row's image for `pixel_values`: an RGB PIL image (`image_loading.load_rgb_pil`), or with
        ``image_cache`` its kept resized tensor (loaded and resized on first sight).

        Raises:
            ImageInputError: The image cannot be loaded; the message names the file and the row.
        """
        if not self.image_cache:
            return load_rgb_pil(value, where=where)
        key = _image_key(value)
        cached = self._images.get(key) if key is not None else None
        if cached is None:
            cached = self.image_transform.prepare(load_rgb_pil(value, where=where))
            if key is not None:
                self._images[key] = cached
        return cached

    def pixel_values(self, images: list[Any], generator: torch.Generator | None) -> torch.Tensor:
        """(B, 3, H, W): the training image pipeline when there is a batch generator (training) and
        augmentation is on; otherwise the processor's own path, so that training without
        augmentation and evaluation share resize and normalisation with inference exactly."""
        if generator is not None and self.image_transform is not None:
            return self.image_transform(images, generator)
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    # ----------------------------------------------------------------------------------------

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collates a list of dataset rows.

        Returns:
            ``pixel_values`` (B, 3, H, W) float32, ``input_ids`` / ``attention_mask`` (B, L)
            long, right-padded to the longest row, ``person_ids`` (B,) long; plus the optional
            keys of ``return_round_ends`` / ``return_statistics``.
        """
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
            raise TypeError("DiaNACollator expects a non-empty list of row dicts (Trainer's data_collator input)")
        counts = {key: 0 for key in asdict(CollatorStatistics())}
        counts["batches"], counts["samples"] = 1, len(rows)
        generator = self._batch_generator(rows) if self.train else None
        dialogues, images, person_ids = self._usable_rows(rows, generator, counts)
        text = self._text_batch(dialogues, generator, counts)
        pixel_values = self.pixel_values(images, generator)
        if generator is not None and self.image_transform is not None:
            counts["images_augmented"] = len(images)

        self.statistics.update(counts)
        batch: dict[str, Any] = {
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "person_ids": torch.tensor(person_ids, dtype=torch.long),
        }
        if self.return_round_ends:
            batch["round_end_positions"] = text["round_end_positions"]
            batch["round_truncated"] = text["round_truncated"]
            batch["num_rounds"] = text["num_rounds"]
        if self.return_statistics:
            batch["collator_statistics"] = {key: torch.tensor(value) for key, value in counts.items()}
        return batch

    def _usable_rows(
        self, rows: Sequence[Mapping[str, Any]], generator: torch.Generator | None, counts: dict[str, int]
    ) -> tuple[list[list[tuple[str, str]]], list[Any], list[int]]:
        """(dialogues after caption wrapping and R3, images, person ids) of the rows whose image loads
        (all rows unless ``on_bad_image="skip"``); sets ``counts["samples"]``."""
        dialogues, images, person_ids = [], [], []
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"batch row {index} is a {type(row).__name__}, expected a dict")
            where = self._describe(row, index)
            if "image" not in row:
                raise KeyError(f"{where}: the row has no 'image' column")
            rounds = self._rounds(row, where, generator, counts)
            person_id = self._person_id(row, where)
            image = self.load_image_or_skip(row, where, counts, len(rows))
            if image is None:
                continue
            dialogues.append(rounds)
            images.append(image)
            person_ids.append(person_id)
        counts["samples"] = len(images)
        return dialogues, images, person_ids

    def _text_batch(
        self, dialogues: list[list[tuple[str, str]]], generator: torch.Generator | None, counts: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        """The dialogues tokenised, right-padded and truncated (the dialogue alone per row), with token
        noise when training: ``input_ids``, ``attention_mask`` and the processor's round fields."""
        text = self.processor(
            dialogues=dialogues, return_round_ends=True, padding="longest", max_length=self.max_length,
            truncation=True, return_tensors="pt",
        )
        input_ids, attention_mask = text["input_ids"], text["attention_mask"]
        num_rounds, round_truncated = text["num_rounds"], text["round_truncated"]  # (B,), (B, R)
        if "round_token_mask" in text:
            input_ids, attention_mask = _dialogue_rows(
                input_ids, text["round_token_mask"], num_rounds, self.processor.pad_token_id
            )
        # Rounds beyond a dialogue's own count repeat its last round in the processor's output;
        # only the dialogue's real rounds are counted.
        real_round = torch.arange(round_truncated.shape[1]) < num_rounds[:, None]  # (B, R)
        truncated = round_truncated.bool() & real_round
        counts["dialogues_truncated"] = int(truncated.any(dim=1).sum())
        counts["rounds_truncated"] = int(truncated.sum())

        if generator is not None and self.masker is not None:
            result = self.masker(input_ids, attention_mask, generator)
            input_ids = result.input_ids
            counts["tokens_eligible"] = int(result.eligible.sum())
            counts["tokens_selected"] = int(result.selected.sum())
            counts["tokens_masked"] = int(result.masked.sum())
            counts["tokens_randomized"] = int(result.randomized.sum())
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "round_end_positions": text["round_end_positions"],
            "round_truncated": round_truncated, "num_rounds": num_rounds,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train={self.train}, round_retaining={self.round_retaining}, "
            f"token_masking={self.token_masking}, image_augmentation={self.image_augmentation}, "
            f"mals_captions={self.mals_captions}, max_length={self.max_length}, seed={self.seed})"
        )


def _image_key(value: Any) -> str | None:
    """What identifies an image cell for the cache: its bytes' digest when it has bytes (paths inside
    archives repeat across folders), else its path; None for an in-memory image without a file name."""
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return "bytes:" + hashlib.blake2b(value["bytes"], digest_size=16).hexdigest()
        return None if value.get("path") is None else "path:" + os.fspath(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return "path:" + os.fspath(value)
    filename = getattr(value, "filename", None)  # a PIL image opened from a file
    return "path:" + filename if filename else None


__all__ = ["DiaNACollator"]
