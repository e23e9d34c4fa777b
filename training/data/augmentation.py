"""Training-time text augmentation for DiaNA (the paper's), and MALS captions as dialogues.

Independent pieces, each a small pure function or object driven by an explicit `torch.Generator`,
so a run is reproducible and a test can pin every random draw:

- random round retaining (R3): keep the first r rounds of a dialogue, r uniform in 1..R;
- token masking: 15% of the non-special, non-padding positions are selected; of those 80% become
  the mask token `<|reserved_special_token_0|>`, 10% a random non-special id, 10% stay. Input noise
  only: no labels are produced (DiaNA has no MLM loss);
- MALS caption cleaning (APTM's `pre_caption`) and the "describe the person" question pool that
  turns a caption into a one-round dialogue.

The image augmentation is `image_augmentation`'s. The collator (`collator.py`) switches them on only
for training; evaluation never calls them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diana.processing.processing_diana import DEFAULT_FIRST_QUESTION
from diana.processing.tokenizer_setup import MASK_TOKEN

# As in the paper: the pool a MALS caption's question is drawn from; the first one is ChatPedes'
# fixed round-1 question, used whenever no random draw is wanted (evaluation, lengths).
MALS_QUESTIONS: tuple[str, ...] = (
    DEFAULT_FIRST_QUESTION,
    "What is the person wearing in the picture?",
    "Can you detail the clothing and accessories of the person?",
    "Describe the appearance of the individual in the image.",
    "How would you describe the attire of the person in the image?",
    "Please provide details about the person's outfit.",
    "Describe the attire and notable features of the individual in the picture.",
)
MALS_MAX_WORDS = 56

# APTM's pre_caption replaces these with a space (not deletes them), so "shirt.pants" stays two
# words; whitespace runs are then collapsed.
_CAPTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------
# MALS captions
# --------------------------------------------------------------------------------------------


def clean_caption(caption: str, max_words: int = MALS_MAX_WORDS) -> str:
    """Normalises a MALS caption the way APTM pretraining did.

    Lower-cases, replaces each of ``. ! " ( ) * # : ; ~`` by a space, collapses whitespace, strips
    the ends and keeps the first `max_words` words.

    Args:
        caption: The raw caption.
        max_words: Words kept (56 in DiaNA pretraining).

    Returns:
        The cleaned caption (possibly empty).

    Raises:
        TypeError: If `caption` is not a string.
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a str, got {type(caption).__name__}: {caption!r}")
    text = _CAPTION_PUNCTUATION.sub(" ", caption.lower())
    words = _WHITESPACE.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words]) if words != [""] else ""


def caption_to_dialogue(
    caption: str, generator: torch.Generator | None = None, *, clean: bool = True
) -> list[dict[str, str]]:
    """Wraps a caption as a one-round dialogue.

    Args:
        caption: The MALS caption.
        generator: Draws the question uniformly from `MALS_QUESTIONS`; None takes the first
            question ("Please describe the person you saw."), the deterministic evaluation choice.
        clean: Apply `clean_caption` first.

    Returns:
        ``[{"question": q, "answer": caption}]``.
    """
    if clean:
        caption = clean_caption(caption)
    if generator is None:
        question = MALS_QUESTIONS[0]
    else:
        question = MALS_QUESTIONS[int(torch.randint(len(MALS_QUESTIONS), (1,), generator=generator))]
    return [{"question": question, "answer": caption}]


# --------------------------------------------------------------------------------------------
# Random round retaining (R3)
# --------------------------------------------------------------------------------------------


def sample_retained_rounds(num_rounds: int, generator: torch.Generator) -> int:
    """Draws r uniformly from 1..num_rounds (R3).

    Raises:
        ValueError: If `num_rounds` < 1 (a dialogue without rounds cannot be retrieved from).
    """
    if num_rounds < 1:
        raise ValueError(f"random round retaining needs at least one round, got {num_rounds}")
    return int(torch.randint(1, num_rounds + 1, (1,), generator=generator))


def retain_random_rounds(rounds: Sequence[Any], generator: torch.Generator) -> list[Any]:
    """Keeps the first r rounds of a dialogue, r uniform in 1..len(rounds).

    Args:
        rounds: One entry per round (e.g. the (question, answer) pairs of
            `DiaNAProcessor.normalize_dialogue`).
        generator: The random source.

    Returns:
        `list(rounds[:r])`.
    """
    return list(rounds[: sample_retained_rounds(len(rounds), generator)])


# --------------------------------------------------------------------------------------------
# Token masking
# --------------------------------------------------------------------------------------------


@dataclass
class MaskingResult:
    """Output of `TokenMasker`.

    Attributes:
        input_ids: (B, L) the noised ids (a new tensor; the input is not modified).
        eligible: (B, L) bool, positions that could be selected (attended, non-special).
        selected: (B, L) bool, the selected positions (⊆ eligible).
        masked: (B, L) bool, selected positions replaced by the mask token.
        randomized: (B, L) bool, selected positions replaced by a random non-special id.
    """

    input_ids: torch.Tensor
    eligible: torch.Tensor
    selected: torch.Tensor
    masked: torch.Tensor
    randomized: torch.Tensor


class TokenMasker:
    """BERT-style input noise on dialogue ids: select `probability` of the eligible positions,
    then replace 80% of them by the mask token, 10% by a random id, leave 10% unchanged.

    Eligible positions are those with ``attention_mask == 1`` whose id is not special (BOS, the pad
    id, the mask token itself and every reserved special token are never selected), so the
    sequence length, the pooled last-token position and the padding are never changed.

    Args:
        mask_token_id: The id written at "mask" positions.
        special_ids: Ids that are never selected.
        vocab_size: Ids are in [0, vocab_size); random replacements are drawn uniformly from the
            ids in that range that are not special.
        probability: Selection rate among eligible positions (0.15 in DiaNA).
        mask_fraction: Share of selected positions set to the mask token.
        random_fraction: Share of selected positions set to a random id (the rest stay).
    """

    def __init__(
        self,
        mask_token_id: int,
        special_ids: Sequence[int],
        vocab_size: int,
        probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"token masking probability must be in [0, 1], got {probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1.0:
            raise ValueError(
                f"mask_fraction ({mask_fraction}) + random_fraction ({random_fraction}) must be in [0, 1]"
            )
        special = torch.tensor(sorted(set(int(i) for i in special_ids) | {int(mask_token_id)}), dtype=torch.long)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[special[special < vocab_size]] = False
        self.mask_token_id = int(mask_token_id)
        self.special_ids = special
        self.random_candidates = keep.nonzero().squeeze(1)  # (V',) the non-special ids
        if self.random_candidates.numel() == 0:
            raise ValueError("token masking: every id below vocab_size is special, nothing to sample")
        self.probability = float(probability)
        self.mask_fraction = float(mask_fraction)
        self.random_fraction = float(random_fraction)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, probability: float = 0.15, **kwargs: Any) -> TokenMasker:
        """Builds the masker from a (Llama-3) tokenizer.

        The mask id is looked up by name (`MASK_TOKEN`, 128002 in Llama 3); the special set is
        `all_special_ids` plus every added token flagged special (Llama 3's 256 reserved tokens).

        Raises:
            ValueError: If the tokenizer has no `MASK_TOKEN`.
        """
        special = set(tokenizer.all_special_ids)
        special |= {i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        if mask_id is None or mask_id == tokenizer.unk_token_id or mask_id not in special:
            raise ValueError(
                f"the tokenizer has no special token {MASK_TOKEN!r} (got id {mask_id}); DiaNA's token "
                "masking needs the Llama-3 tokenizer"
            )
        return cls(mask_id, sorted(special), vocab_size=len(tokenizer), probability=probability, **kwargs)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
    ) -> MaskingResult:
        """Noises a right- or left-padded batch.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) 1 on real tokens.
            generator: The random source (CPU).

        Returns:
            A `MaskingResult`.
        """
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
        special = self.special_ids.to(input_ids.device)
        eligible = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, L)
        # One uniform draw decides selection, a second the kind of replacement; drawing both for
        # every position keeps the stream independent of the data (same draws for any batch content).
        select_draw = torch.rand(input_ids.shape, generator=generator)
        action_draw = torch.rand(input_ids.shape, generator=generator)
        random_index = torch.randint(len(self.random_candidates), input_ids.shape, generator=generator)
        selected = eligible & (select_draw.to(input_ids.device) < self.probability)
        action_draw = action_draw.to(input_ids.device)
        masked = selected & (action_draw < self.mask_fraction)
        randomized = selected & (action_draw >= self.mask_fraction) & (
            action_draw < self.mask_fraction + self.random_fraction
        )
        noised = input_ids.clone()
        noised[masked] = self.mask_token_id
        random_ids = self.random_candidates.to(input_ids.device)[random_index.to(input_ids.device)]  # (B, L)
        noised[randomized] = random_ids[randomized].to(noised.dtype)
        return MaskingResult(noised, eligible, selected, masked, randomized)


__all__ = [
    "MALS_QUESTIONS",
    "MALS_MAX_WORDS",
    "clean_caption",
    "caption_to_dialogue",
    "sample_retained_rounds",
    "retain_random_rounds",
    "MaskingResult",
    "TokenMasker",
]
