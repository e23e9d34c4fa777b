"""Stage 0: the image tower alone, trained on MALS's own supervision (`--objective image_attributes`).

DiaNA starts its image tower from an ImageNet-22k Swinv2 (as in the paper). A run that cannot load one
(the SynthPedes presets: nothing is downloaded, everything starts random) first teaches the random
tower to see, with the supervision every MALS record already carries:

- its caption's words and word pairs (bag of n-grams, the weakly supervised image pretraining of
  Joulin et al., ECCV 2016, and Li et al., ICCV 2017): "blonde hair", "striped", "short sleeves",
  "red backpack" each become one binary target;
- its 27 attribute labels (`label`, Market-1501 order; -1 = unknown, masked out of the loss).

Why: trained contrastively from scratch, the image tower learns the attributes that already tell a
batch's persons apart (clothing colours) and stays at chance on the rest (hair, sleeves, pattern,
bag), so the dialogue tower never learns to read them either (`attribute_probe`). Targets that
name every attribute give each one its own gradient.

The output folder is a whole DiaNA model (only its image tower trained) plus the processor, the
starting point of stage 1 (`--model_name_or_path`); `vision_pretraining.json` keeps the n-gram
vocabulary.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diana.training.data.augmentation import clean_caption
from diana.training.data.collator import DiaNACollator

from .trainer import DiaNATrainer

VOCABULARY_FILE = "vision_pretraining.json"


def caption_ngrams(caption: str) -> set[str]:
    """The words and adjacent word pairs of a caption, after MALS caption cleaning (every word,
    not only the first 56: the targets describe the image, not the tokenised text)."""
    words = clean_caption(caption, max_words=10**9).replace(",", " ").split()
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def count_ngrams(captions: Iterable[str]) -> tuple[Counter[str], int]:
    """(in how many captions each n-gram occurs, the number of captions)."""
    counts: Counter[str] = Counter()
    total = 0
    for caption in captions:
        counts.update(caption_ngrams(caption))
        total += 1
    return counts, total


def build_ngram_vocabulary(
    captions: Iterable[str], *, min_fraction: float = 0.002, max_fraction: float = 0.9, max_size: int = 1000
) -> list[str]:
    """`select_ngrams(*count_ngrams(captions), ...)`."""
    return select_ngrams(*count_ngrams(captions), min_fraction=min_fraction, max_fraction=max_fraction,
                         max_size=max_size)


def select_ngrams(
    counts: Counter[str], total: int, *, min_fraction: float = 0.002, max_fraction: float = 0.9, max_size: int = 1000
) -> list[str]:
    """The n-grams used as targets, most frequent first.

    Kept: those in at least `min_fraction` of the captions (rarer ones are noise to a linear head)
    and at most `max_fraction` (one in nearly every caption, "a" or "with", says nothing about
    the image); then the `max_size` most frequent (ties broken alphabetically, so the order is stable).

    Raises:
        ValueError: no caption, or no n-gram survives the filter (names the counts).
    """
    if not 0 <= min_fraction <= max_fraction <= 1:
        raise ValueError(f"need 0 <= min_fraction ({min_fraction}) <= max_fraction ({max_fraction}) <= 1")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if total == 0:
        raise ValueError("build_ngram_vocabulary: no captions")
    kept = [g for g, c in counts.items() if min_fraction * total <= c <= max_fraction * total]
    if not kept:
        raise ValueError(f"build_ngram_vocabulary: none of {len(counts)} n-grams of {total} captions is in between "
                         f"{min_fraction:.2%} and {max_fraction:.0%} of them")
    return sorted(kept, key=lambda g: (-counts[g], g))[:max_size]


READOUTS = ("mean", "tokens", "token_max")


def readouts_problem(readouts: Sequence[str]) -> str | None:
    """What is wrong with a list of readout names (None: nothing)."""
    readouts = list(readouts or [])
    if not readouts or any(r not in READOUTS for r in readouts) or len(set(readouts)) != len(readouts):
        return f"readouts must be distinct names out of {list(READOUTS)}, got {readouts}"
    return None


class VisionPretrainingModel(nn.Module):
    """An image tower plus one linear head per readout of its final tokens: one logit per n-gram of
    the vocabulary, then one per MALS label.

    Readouts:
    - ``"mean"``: the pooled vector (the mean of the final tokens), what DiaNA's global vector is
      made of; its logits are ``out["logits"]``;
    - ``"tokens"``: the final tokens side by side (a position-keeping head; needs a fixed image size);
    - ``"token_max"``: the head applied to every token, the highest logit per target kept.
    Why more than the mean: through the mean, every token gets the same gradient, so a feature of one
    body region (stripes on the torso, long hair on the shoulders, a backpack beside the back) is learnt
    only slowly; a head that knows where (tokens) or picks the one token (token_max) credits the
    region's tokens, and the mean head beside it keeps what they learn readable from the mean.

    `loss` = n-gram term + label term, each summed over the readouts. The n-gram term is the binary
    cross-entropy summed over the vocabulary and divided by `ngrams_per_caption` (the average number
    of targets that are on), so its size does not grow with the vocabulary; the label term is the
    mean binary cross-entropy over the known labels (-1 = unknown is left out).
    """

    def __init__(self, vision_model: nn.Module, num_ngrams: int, num_labels: int, ngrams_per_caption: float,
                 readouts: Sequence[str] = ("mean",), num_tokens: int | None = None):
        super().__init__()
        if num_ngrams < 1 and num_labels < 1:
            raise ValueError("VisionPretrainingModel needs n-gram or label targets")
        if ngrams_per_caption <= 0:
            raise ValueError(f"ngrams_per_caption must be > 0, got {ngrams_per_caption}")
        readouts = tuple(readouts)
        if problem := readouts_problem(readouts):
            raise ValueError(problem)
        if "tokens" in readouts and not (num_tokens and num_tokens > 0):
            raise ValueError("the 'tokens' readout needs num_tokens, the number of final tokens of the tower")
        self.vision_model = vision_model
        width = getattr(vision_model, "num_features", None) or vision_model.config.hidden_size
        self.num_ngrams, self.num_labels = num_ngrams, num_labels
        self.ngrams_per_caption = float(ngrams_per_caption)
        self.readouts = readouts
        self.num_tokens = num_tokens
        targets = num_ngrams + num_labels
        self.heads = nn.ModuleDict(
            {r: nn.Linear(width * num_tokens if r == "tokens" else width, targets) for r in readouts}
        )

    def _logits(self, readout: str, output: Any) -> torch.Tensor:
        head = self.heads[readout]
        if readout == "mean":
            return head(output.pooler_output)
        tokens = output.last_hidden_state  # (B, N, C)
        if readout == "token_max":
            return head(tokens).amax(dim=1)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"the 'tokens' readout was built for {self.num_tokens} final tokens, the tower gave "
                             f"{tokens.shape[1]} (another image size?)")
        return head(tokens.flatten(1))

    def _terms(self, logits: torch.Tensor, ngram_targets: torch.Tensor | None,
               label_targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if ngram_targets is not None and self.num_ngrams:
            ngram_logits = logits[:, : self.num_ngrams].float()
            bce = F.binary_cross_entropy_with_logits(ngram_logits, ngram_targets.float(), reduction="none")
            terms["ngram_loss"] = bce.sum(dim=1).mean() / self.ngrams_per_caption
        if label_targets is not None and self.num_labels:
            label_logits = logits[:, self.num_ngrams :].float()
            known = label_targets >= 0
            if known.any():
                terms["label_loss"] = F.binary_cross_entropy_with_logits(label_logits[known], label_targets[known].float())
            else:  # a batch with no known label: a zero that keeps the head in the graph (DDP)
                terms["label_loss"] = label_logits.sum() * 0.0
        return terms

    def forward(self, pixel_values: torch.Tensor, ngram_targets: torch.Tensor | None = None,
                label_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        output = self.vision_model(pixel_values=pixel_values)
        logits = {r: self._logits(r, output) for r in self.readouts}
        out: dict[str, torch.Tensor] = {"logits": logits["mean"] if "mean" in logits else logits[self.readouts[0]]}
        if ngram_targets is None and label_targets is None:
            return out
        loss = out["logits"].new_zeros((), dtype=torch.float32)
        for readout in self.readouts:
            for name, value in self._terms(logits[readout], ngram_targets, label_targets).items():
                out[name] = out[name] + value if name in out else value
                loss = loss + value
        out["loss"] = loss
        return out


class VisionPretrainingCollator(DiaNACollator):
    """MALS rows -> ``pixel_values`` (the training image augmentation of `DiaNACollator`, same
    resumable draws), ``ngram_targets`` (B, V) in {0, 1} and ``label_targets`` (B, 27) in {1, 0, -1}."""

    def __init__(self, processor: Any, vocabulary: Sequence[str], *, num_labels: int = 27, train: bool = True,
                 image_augmentation: bool = True, seed: int | None = None, image_cache: bool = False,
                 image_augmentation_kwargs: Mapping[str, Any] | None = None, on_bad_image: str = "error"):
        super().__init__(processor, train=train, round_retaining=False, token_masking=0.0,
                         image_augmentation=image_augmentation, mals_captions=True, seed=seed, image_cache=image_cache,
                         image_augmentation_kwargs=image_augmentation_kwargs, on_bad_image=on_bad_image)
        self.vocabulary = list(vocabulary)
        self.index = {g: i for i, g in enumerate(self.vocabulary)}
        self.num_labels = num_labels

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
            raise TypeError("VisionPretrainingCollator expects a non-empty list of row dicts")
        counts = {"images_skipped": 0}
        images, kept = [], []
        for index, row in enumerate(rows):
            where = self._describe(row, index)
            for key in ("image", "caption"):
                if key not in row:
                    raise KeyError(f"{where}: the row has no {key!r} column (a MALS row is needed)")
            if not isinstance(row["caption"], str):
                raise TypeError(f"{where}: 'caption' must be a str, got {type(row['caption']).__name__}")
            if self.num_labels:
                values = row.get("attributes")
                if values is None or len(values) != self.num_labels:
                    raise ValueError(f"{where}: 'attributes' must hold {self.num_labels} labels, got {values!r}")
            image = self.load_image_or_skip(row, where, counts, len(rows))
            if image is not None:
                images.append(image)
                kept.append(row)
        self.statistics.update({"images_skipped": counts["images_skipped"]})
        ngrams = torch.zeros(len(kept), len(self.vocabulary))
        labels = torch.full((len(kept), self.num_labels), -1, dtype=torch.long)
        for index, row in enumerate(kept):
            for gram in caption_ngrams(row["caption"]):
                if gram in self.index:
                    ngrams[index, self.index[gram]] = 1.0
            if self.num_labels:
                labels[index] = torch.as_tensor(row["attributes"], dtype=torch.long)
        # The augmentation's draws stay keyed to the whole batch's rows, so skipping does not move them.
        pixel_values = self.pixel_values(images, self._batch_generator(rows) if self.train else None)
        return {"pixel_values": pixel_values, "ngram_targets": ngrams, "label_targets": labels}


class VisionPretrainingTrainer(DiaNATrainer):
    """`DiaNATrainer` (loss terms in the log lines, resumable augmentation) on the image tower's
    targets; there is no retrieval to evaluate in this objective."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"], ngram_targets=inputs.get("ngram_targets"),
                        label_targets=inputs.get("label_targets"))
        if model.training:
            self.record_terms({name: outputs.get(name) for name in ("ngram_loss", "label_loss")})
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def evaluate(self, *args, **kwargs):
        raise ValueError("--objective image_attributes has no retrieval evaluation: leave eval_strategy 'no'")


def save_vocabulary(output_dir: str | os.PathLike, vocabulary: Sequence[str], ngrams_per_caption: float) -> None:
    os.makedirs(output_dir, exist_ok=True)
    record = {"vocabulary": list(vocabulary), "ngrams_per_caption": ngrams_per_caption}
    with open(os.path.join(output_dir, VOCABULARY_FILE), "w") as f:
        json.dump(record, f, indent=2)
