"""DiaNA processor: raw dialogues and pedestrian photos to DiaNA model inputs.

Shipped next to the weights (trust_remote_code), so this file imports only torch, transformers,
PIL, numpy, the standard library and its siblings, copied along by `save_pretrained`:
`image_loading` (every image input to the RGB picture the model sees), `dialogue_template` (every
dialogue form to the training text) and `round_tokenization` (that text to ids in which every round
prefix can be found).

Dialogues are encoded as BOS + tokens, no EOS, right-padded with `<|finetune_right_pad_id|>`, with
the tokenisation chosen by `tokenization`: "rounds" (every k-round prefix an id prefix) or "official"
(every prefix tokenised whole, packed per row; `return_round_ends=True` then also gives
`round_token_mask`); see `round_tokenization`.

User text stays text in both modes: a question or answer that spells a special token
("<|end_of_text|>") is tokenised as the characters it is made of, never as the control id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .dialogue_template import (
    DEFAULT_FIRST_QUESTION,
    DIALOGUE_CHAT_TEMPLATE,
    SYSTEM_PROMPT,
    DialogueError,
    as_dialogue_batch,
    checked_max_rounds,
    normalize_dialogue,
    render_dialogue,
    round_segments,
)
from .image_loading import ImageInputError, load_rgb_image
from .round_tokenization import (
    TOKENIZATIONS,
    EncodedDialogue,
    encode_prefix_by_prefix,
    encode_round_by_round,
    repeat_last,
    round_token_mask,
)

BOS_TOKEN = "<|begin_of_text|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"

# Image statistics (the official code's): CUHK-PEDES for ChatPedes fine-tuning, MALS for pretraining.
CUHK_PEDES_MEAN = (0.38901, 0.36516, 0.34836)
CUHK_PEDES_STD = (0.24344, 0.23739, 0.23369)
MALS_MEAN = (0.44168, 0.41813, 0.42375)
MALS_STD = (0.30883, 0.29743, 0.30101)


def _as_image_batch(images: Any) -> list[Any]:
    if isinstance(images, (PIL.Image.Image, str, os.PathLike, Mapping)):
        return [images]
    if isinstance(images, np.ndarray) and images.dtype == object and images.ndim == 1:
        return list(images)  # a ragged batch stored as an object array: one image per element
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence):
        if len(images) == 0:
            raise ImageInputError("images is an empty list")
        return list(images)
    raise ImageInputError(f"images must be an image or a list of images, got {type(images).__name__}")


class DiaNAProcessor(ProcessorMixin):
    r"""Turns dialogues and pedestrian photos into DiaNA inputs.

    Wraps a `ViTImageProcessor` (RGB, resize to H x W, rescale, normalise) and the Llama-3.2
    tokenizer. Dialogues are rendered with DiaNA's template and tokenised round by round so that
    every k-round prefix is an exact id prefix (see `round_tokenization`).

    Args:
        image_processor: The image processor (`ViTImageProcessor` with the DiaNA size and statistics).
        tokenizer: A Llama-3 tokenizer; `<|begin_of_text|>` and `<|finetune_right_pad_id|>` must exist.
        max_length: Maximum dialogue length in tokens, BOS included (400 fine-tuning, 56 pretraining).
        chat_template: Jinja template for `apply_chat_template`; defaults to DiaNA's dialogue template.
        tokenization: "rounds" (default: round by round, every k-round prefix an id prefix) or "official"
            (each prefix's text as one string, as the official code, for converted official weights; see
            `round_tokenization`). Saved in processor_config.json.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_length: int = 400,
        chat_template: str | None = None,
        tokenization: str = "rounds",
        **kwargs,
    ):
        if chat_template is None:
            chat_template = DIALOGUE_CHAT_TEMPLATE
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"DiaNAProcessor tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
        self.max_length = int(max_length)
        self.tokenization = tokenization
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = self.chat_template
        self.bos_token_id = self._special_id(BOS_TOKEN)
        # Right padding always, whatever the loaded tokenizer says (Llama tokenizers may pad left):
        # the model pools the last non-pad token and the processor pads by hand below.
        self.pad_token_id = self._special_id(PAD_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token: DiaNA needs the Llama-3.2 tokenizer")
        return int(token_id)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]

    # Dialogue helpers, also available as module functions.
    def normalize_dialogue(self, dialogue: Any) -> list[tuple[str, str]]:
        """See `normalize_dialogue`."""
        return normalize_dialogue(dialogue)

    def render_dialogue(self, dialogue: Any, max_rounds: int | None = None) -> str:
        """See `render_dialogue`."""
        return render_dialogue(dialogue, max_rounds=max_rounds)

    def dialogue_token_ids(
        self,
        dialogues: Any,
        max_rounds: int | None = None,
        max_length: int | None = None,
        truncation: bool = True,
    ) -> tuple[list[list[int]], list[list[int]], list[list[bool]]]:
        """Token ids (BOS first, no EOS, unpadded), round end positions and round truncation flags.

        The lists `__call__(..., return_round_ends=True, padding=False)` builds its rows from, without
        padding or tensors (`DiaNAModel.encode_dialogues` turns such rows into vectors).

        Returns:
            (ids, round_ends, round_truncated) per dialogue; `round_ends[b][k]` is the index of the
            last token of the encoding of the first k+1 rounds (clamped to the last kept token when
            truncation cut that round, which is then flagged in `round_truncated`). With the official
            tokenisation the ids are the packed row (see `round_tokenization`) and `round_ends[b][k]`
            the last token of prefix k's view in it.
        """
        encoded = self._encode_rounds(dialogues, max_rounds, max_length, truncation)
        return [e.ids for e in encoded], [e.round_ends for e in encoded], [e.round_truncated for e in encoded]

    def _encode_rounds(
        self, dialogues: Any, max_rounds: int | None, max_length: int | None, truncation: bool
    ) -> list[EncodedDialogue]:
        batch = as_dialogue_batch(dialogues)
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        all_pairs = [normalize_dialogue(d, index=i) for i, d in enumerate(batch)]
        if max_rounds is not None:
            keep = checked_max_rounds(max_rounds)
            all_pairs = [pairs[:keep] for pairs in all_pairs]
        encode = encode_prefix_by_prefix if self.tokenization == "official" else encode_round_by_round
        return encode(all_pairs, self._tokenize_text, self.bos_token_id, max_length, truncation)

    def _tokenize_text(self, texts: list[str]) -> list[list[int]]:
        """Ids of template text holding user text, without special tokens. `split_special_tokens`: a
        question or answer spelling "<|end_of_text|>" stays those characters (the template's own
        special tokens, BOS and padding, are added by id)."""
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def __call__(
        self,
        images: Any = None,
        dialogues: Any = None,
        *,
        max_rounds: int | None = None,
        return_round_ends: bool = False,
        padding: bool | str = "longest",
        max_length: int | None = None,
        truncation: bool = True,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Prepare images and/or dialogues.

        Args:
            images: One image or a list (PIL of any mode, numpy, tensor, path), turned into RGB by
                `image_loading.load_rgb_image` (EXIF orientation applied, transparency on white,
                16-bit scaled; broken files refused naming them).
            dialogues: One dialogue or a list of dialogues (see `normalize_dialogue` for the forms;
                a single dialogue in nested ChatPedes round form must be wrapped in a list).
            max_rounds: Keep only the first k rounds of every dialogue.
            return_round_ends: Also return `round_end_positions` (B, R), `round_truncated` (B, R)
                and `num_rounds` (B,), R = most rounds in the batch; for a dialogue with n < R
                rounds, columns k > n repeat round n (the encoding of the first min(k, n) rounds).
            padding: "longest"/True pads to the longest dialogue in the batch, "max_length" to
                `max_length`, False/"do_not_pad" returns unpadded lists (return_tensors=None only
                unless all lengths agree).
            max_length: Overrides the processor's maximum length for this call.
            truncation: Cut dialogues on the right at `max_length`.
            return_tensors: "pt", "np" or None (lists).

        Returns:
            BatchFeature with `pixel_values` (B, 3, H, W) and/or `input_ids`, `attention_mask` (B, L)
            and the round fields above.
        """
        if images is None and dialogues is None:
            raise ValueError("DiaNAProcessor needs images and/or dialogues")
        data: dict[str, Any] = {}
        if images is not None:
            rgb = [PIL.Image.fromarray(load_rgb_image(img, index=i)) for i, img in enumerate(_as_image_batch(images))]
            pixel_values = self.image_processor(rgb, return_tensors="pt", do_convert_rgb=False)["pixel_values"]
            data["pixel_values"] = pixel_values if return_tensors == "pt" else pixel_values.numpy()
        if dialogues is not None:
            data.update(self._text_inputs(
                dialogues, max_rounds, return_round_ends, padding, max_length, truncation, return_tensors
            ))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _text_inputs(
        self, dialogues, max_rounds, return_round_ends, padding, max_length, truncation, return_tensors
    ) -> dict[str, Any]:
        max_length = self.max_length if max_length is None else int(max_length)
        encoded = self._encode_rounds(dialogues, max_rounds, max_length, truncation)
        # Without round ends a row is the dialogue alone (the packed prefix tails are for reading rounds).
        ids_batch = [e.ids if return_round_ends else e.ids[: e.dialogue_length] for e in encoded]
        longest = max(len(ids) for ids in ids_batch)
        if padding in (True, "longest"):
            target = longest
        elif padding == "max_length":
            target = max(max_length, longest)
        elif padding in (False, None, "do_not_pad"):
            target = None
            if return_tensors is not None and len({len(ids) for ids in ids_batch}) > 1:
                raise ValueError("dialogues of different lengths need padding to become tensors")
        else:
            raise ValueError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")

        input_ids, attention_mask = [], []
        for ids in ids_batch:
            pad = 0 if target is None else target - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)  # right padding: last real token = sum(mask) - 1
            attention_mask.append([1] * len(ids) + [0] * pad)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_round_ends:
            rounds = max(len(e.round_ends) for e in encoded)
            out["round_end_positions"] = [repeat_last(e.round_ends, rounds) for e in encoded]
            out["round_truncated"] = [repeat_last(e.round_truncated, rounds) for e in encoded]
            out["num_rounds"] = [len(e.round_ends) for e in encoded]
            if self.tokenization == "official":
                masks = [
                    round_token_mask(repeat_last(e.round_views, rounds), len(row)) for e, row in zip(encoded, input_ids)
                ]
                out["round_token_mask"] = masks
        as_tensors = return_tensors == "pt" and target is not None
        if "round_token_mask" in out:  # (B, R, L): stacked as is, not through Python lists
            out["round_token_mask"] = torch.stack(masks) if as_tensors else [m.tolist() for m in masks]
        if as_tensors:
            out = {key: value if torch.is_tensor(value)
                   else torch.tensor(value, dtype=torch.bool if key == "round_truncated" else torch.long)
                   for key, value in out.items()}
        return out

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs) -> Any:
        """Renders chat messages with DiaNA's template; with `tokenize=True` returns the processor's own ids.

        `tokenize=False` (the default) gives the rendered text. `tokenize=True` gives exactly
        `processor(dialogues=conversation)`'s ids (BOS first, user text never a control token): a list of
        ids, or a `BatchFeature` with `return_dict=True` (`input_ids`, `attention_mask`; tensors per
        `return_tensors`). A batch of conversations gives one row each.
        """
        if not kwargs.pop("tokenize", False):
            return super().apply_chat_template(conversation, chat_template=chat_template, tokenize=False, **kwargs)
        if chat_template is not None and chat_template != self.chat_template:
            raise ValueError("apply_chat_template(tokenize=True) gives DiaNA's own ids; another chat_template can only "
                             "render text (tokenize=False)")
        return_dict = kwargs.pop("return_dict", False)
        return_tensors = kwargs.pop("return_tensors", None)
        is_batch = isinstance(conversation, Sequence) and bool(conversation) and not isinstance(
            conversation[0], Mapping
        )
        # Rendered by the same template first: a conversation the template refuses is refused here too.
        super().apply_chat_template(conversation, chat_template=chat_template, tokenize=False)
        dialogues = list(conversation) if is_batch else [conversation]
        padding = "longest" if return_tensors is not None else False
        batch = self(dialogues=dialogues, padding=padding, return_tensors=return_tensors)
        if return_dict:
            return batch
        ids = batch["input_ids"]
        return ids if is_batch or return_tensors is not None else ids[0]

    def batch_decode(self, *args, **kwargs):
        """Forwarded to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwarded to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)


DiaNAProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "DiaNAProcessor",
    "DialogueError",
    "ImageInputError",
    "SYSTEM_PROMPT",
    "DEFAULT_FIRST_QUESTION",
    "DIALOGUE_CHAT_TEMPLATE",
    "CUHK_PEDES_MEAN",
    "CUHK_PEDES_STD",
    "MALS_MEAN",
    "MALS_STD",
    "load_rgb_image",
    "normalize_dialogue",
    "render_dialogue",
    "round_segments",
    "round_token_mask",
    "TOKENIZATIONS",
]
