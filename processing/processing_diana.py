"""DiaNA processor: raw dialogues and pedestrian photos to DiaNA model inputs.

Shipped next to the weights (trust_remote_code), so this file imports only torch, transformers,
PIL, numpy, the standard library and its sibling `image_loading` (copied along by
`save_pretrained`: it turns every image input into the RGB picture the model sees).

The dialogue text must match what DiaNA was trained on (the official code's template):

    {system prompt}\\n\\nASSISTANT: {q1}\\nUSER: {a1}\\nASSISTANT: {q2}\\nUSER: {a2}...

encoded as BOS + tokens, no EOS, right-padded with `<|finetune_right_pad_id|>`.

Prefix-consistent tokenisation. The model reads the vector of "the first k rounds" at the end of
round k inside ONE pass over the full dialogue (the text tower is causal; it pools the last
token or the mean of the tokens up to there). That is only exact if the ids of the first k
rounds are a prefix of the full dialogue's ids. Plain tokenisation of the whole string breaks
this: the Llama-3 pre-tokenizer glues
punctuation to the newlines after it (` ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*`), so "...coat.\\nASSISTANT"
yields the token ".\\n" while the 1-round prefix ends in ".". The processor therefore tokenises
the text in round segments (segment 1 = system prompt + "\\n\\nASSISTANT: q1\\nUSER: a1",
segment k = "\\nASSISTANT: qk\\nUSER: ak") and concatenates their ids. Only round boundaries that
follow punctuation differ from plain tokenisation; decoding the ids gives the template string
exactly.

Official tokenisation (`tokenization="official"`, what converted official weights were trained
on): every k-round prefix is tokenised as one string, as the official code does. Its ids are then
not a prefix of the longer dialogue's, so `return_round_ends=True` packs each row as the full
dialogue followed by, for every shorter prefix, the few last tokens where its ids leave the full
dialogue's; `round_token_mask` (B, R, L) says which tokens make each prefix, and
`DiaNAModel.encode_dialogues(..., round_token_mask=...)` reads every prefix from one tower pass.

User text stays text in both modes: a question or answer that spells a special token
("<|end_of_text|>") is tokenised as the characters it is made of, never as the control id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_loading import ImageInputError, load_rgb_image

SYSTEM_PROMPT = (
    "You are an intelligent system designed to retrieve pedestrian images from dialogues. Extract key "
    "attributes such as clothing, accessories, gender, and distinctive features from the conversation. "
    "Use the aggregated information from all dialogue turns to perform accurate person image retrieval."
)
DEFAULT_FIRST_QUESTION = "Please describe the person you saw."
QUESTION_PREFIX = "ASSISTANT: "
ANSWER_PREFIX = "USER: "
BOS_TOKEN = "<|begin_of_text|>"
# "rounds": round by round, every k-round prefix an id prefix (models trained by this project);
# "official": each prefix's whole text at once, as the official code (converted official weights).
TOKENIZATIONS = ("rounds", "official")
PAD_TOKEN = "<|finetune_right_pad_id|>"

# Image statistics (the official code's): CUHK-PEDES for ChatPedes fine-tuning, MALS for pretraining.
CUHK_PEDES_MEAN = (0.38901, 0.36516, 0.34836)
CUHK_PEDES_STD = (0.24344, 0.23739, 0.23369)
MALS_MEAN = (0.44168, 0.41813, 0.42375)
MALS_STD = (0.30883, 0.29743, 0.30101)

# Message roles. ChatPedes stores the questioner as "gpt" and the witness as "user"; chat-template
# users write "assistant" for the questioner.
QUESTION_ROLES = frozenset({"gpt", "assistant"})
ANSWER_ROLES = frozenset({"user"})
SYSTEM_ROLE = "system"

# The same rendering as `render_dialogue`, for `apply_chat_template(messages, tokenize=False)`.
# Jinja's `trim` is Python's `str.strip`, matching `normalize_dialogue`. A system message is
# optional; without one DiaNA's fixed system prompt is inserted.
DIALOGUE_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_prompt = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_prompt = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content | trim -}}"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- text(system_prompt) -}}"
    "{%- for message in turns -%}"
    "{%- set expect_question = loop.index0 % 2 == 0 -%}"
    "{%- if message['role'] in ['assistant', 'gpt'] and expect_question -%}"
    "{{- ('\\n\\n' if loop.first else '\\n') + 'ASSISTANT: ' + text(message['content']) -}}"
    "{%- elif message['role'] == 'user' and not expect_question -%}"
    "{{- '\\nUSER: ' + text(message['content']) -}}"
    "{%- else -%}"
    "{{- raise_exception('DiaNA dialogues alternate assistant (question) and user (answer) messages, "
    "starting with a question; message ' ~ loop.index0 ~ ' has role ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class DialogueError(ValueError):
    """A dialogue that cannot be rendered; the message names the dialogue index and round."""


def _where(index: int | None, round_index: int | None = None) -> str:
    parts = []
    if index is not None:
        parts.append(f"dialogue {index}")
    if round_index is not None:
        parts.append(f"round {round_index + 1}")
    return (", ".join(parts) + ": ") if parts else ""


def _text(value: Any, index: int | None, round_index: int, field: str) -> str:
    if not isinstance(value, str):
        raise DialogueError(
            f"{_where(index, round_index)}{field} must be a string, got {type(value).__name__}: {value!r:.80}"
        )
    # Each question/answer is stripped so that a round's text never ends in whitespace: the
    # template strips trailing whitespace, and a k-round prefix must render as a prefix.
    value = value.strip()
    if not value:
        raise DialogueError(f"{_where(index, round_index)}empty {field}")
    return value


def _message_role_and_value(message: Mapping, index: int | None, position: int) -> tuple[str, Any]:
    if "from" in message:
        return message["from"], message.get("value")
    if "role" in message:
        content = message.get("content")
        if isinstance(content, list):  # chat-template content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        return message["role"], content
    raise DialogueError(
        f"{_where(index)}message {position} has neither 'from'/'value' (ChatPedes) nor 'role'/'content' keys: "
        f"{sorted(message)}"
    )


def _pairs_from_messages(messages: Sequence[Mapping], index: int | None) -> list[tuple[str, str]]:
    """Flat message list ([{"from": "gpt", ...}, {"from": "user", ...}, ...]) to (q, a) pairs."""
    pairs: list[tuple[str, str]] = []
    question: Any = None
    has_question = False
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DialogueError(
                f"{_where(index, len(pairs))}message {position} must be a dict, got {type(message).__name__}"
            )
        role, value = _message_role_and_value(message, index, position)
        round_index = len(pairs)
        if role == SYSTEM_ROLE:
            if position != 0:
                raise DialogueError(f"{_where(index, round_index)}a system message is only allowed first")
            if not isinstance(value, str) or value.strip() != SYSTEM_PROMPT:
                raise DialogueError(
                    f"{_where(index)}DiaNA was trained with one fixed system prompt; drop the system message or "
                    "pass exactly processing_diana.SYSTEM_PROMPT"
                )
            continue
        if role in QUESTION_ROLES:
            if has_question:
                raise DialogueError(
                    f"{_where(index, round_index)}two questions in a row (message {position}, role {role!r})"
                )
            question, has_question = value, True
        elif role in ANSWER_ROLES:
            if not has_question:
                raise DialogueError(f"{_where(index, round_index)}answer without a question (message {position})")
            pairs.append((_text(question, index, round_index, "question"), _text(value, index, round_index, "answer")))
            has_question = False
        else:
            raise DialogueError(
                f"{_where(index, round_index)}unknown role {role!r} in message {position} "
                f"(questions: {sorted(QUESTION_ROLES)}, answers: {sorted(ANSWER_ROLES)})"
            )
    if has_question:
        raise DialogueError(f"{_where(index, len(pairs))}question without an answer")
    return pairs


def normalize_dialogue(dialogue: Any, index: int | None = None) -> list[tuple[str, str]]:
    """Bring a dialogue in any accepted form to a list of stripped (question, answer) pairs.

    Accepted forms:
        - ChatPedes messages, flat: `[{"from": "gpt", "value": q}, {"from": "user", "value": a}, ...]`
          (chat-style `{"role": "assistant"|"user", "content": ...}` works the same);
        - ChatPedes rounds: `[[{"from": "gpt", ...}, {"from": "user", ...}], ...]`;
        - `(question, answer)` pairs: `[(q1, a1), (q2, a2), ...]`;
        - `{"question", "answer"}` dicts (the dataset column format);
        - a string: one round answering "Please describe the person you saw.".

    Args:
        dialogue: The dialogue.
        index: Its index in the batch, used in error messages.

    Raises:
        DialogueError: Unknown role, two questions in a row, empty dialogue / question / answer, a
            non-string value; the message names the dialogue index and the (1-based) round.
    """
    if isinstance(dialogue, str):
        return [(DEFAULT_FIRST_QUESTION, _text(dialogue, index, 0, "answer"))]
    if isinstance(dialogue, Mapping) or not isinstance(dialogue, Sequence) or isinstance(dialogue, bytes):
        raise DialogueError(
            f"{_where(index)}a dialogue must be a list of rounds or a string, got {type(dialogue).__name__}"
        )
    if len(dialogue) == 0:
        raise DialogueError(f"{_where(index)}empty dialogue")

    first = dialogue[0]
    if isinstance(first, Mapping) and ("question" in first or "answer" in first):
        pairs = []
        for round_index, item in enumerate(dialogue):
            if not isinstance(item, Mapping) or "question" not in item or "answer" not in item:
                raise DialogueError(
                    f"{_where(index, round_index)}expected a {{'question', 'answer'}} dict, got {item!r:.80}"
                )
            pairs.append((_text(item["question"], index, round_index, "question"),
                          _text(item["answer"], index, round_index, "answer")))
        return pairs
    if isinstance(first, Mapping):
        pairs = _pairs_from_messages(dialogue, index)
    else:
        pairs = []
        messages: list[Mapping] = []
        for round_index, item in enumerate(dialogue):
            if isinstance(item, (str, bytes, Mapping)) or not isinstance(item, Sequence) or len(item) != 2:
                raise DialogueError(
                    f"{_where(index, round_index)}expected a (question, answer) pair or a 2-message round, "
                    f"got {item!r:.80}"
                )
            if isinstance(item[0], Mapping):  # ChatPedes round: [{"from": "gpt"}, {"from": "user"}]
                messages.extend(item)
            else:
                if messages:
                    raise DialogueError(
                        f"{_where(index, round_index)}mixes message rounds and (question, answer) pairs"
                    )
                pairs.append((_text(item[0], index, round_index, "question"),
                              _text(item[1], index, round_index, "answer")))
        if messages:
            if pairs:
                raise DialogueError(f"{_where(index)}mixes message rounds and (question, answer) pairs")
            pairs = _pairs_from_messages(messages, index)
    if not pairs:
        raise DialogueError(f"{_where(index)}empty dialogue (no question/answer round)")
    return pairs


def round_segments(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The template text of each round; their concatenation is the rendered dialogue.

    Segment 1 carries the system prompt; every later segment starts with its newline, so the first
    k segments render exactly the first k rounds.
    """
    segments = []
    for k, (question, answer) in enumerate(pairs):
        head = SYSTEM_PROMPT + "\n\n" if k == 0 else "\n"
        segments.append(f"{head}{QUESTION_PREFIX}{question}\n{ANSWER_PREFIX}{answer}")
    return segments


def render_dialogue(dialogue: Any, max_rounds: int | None = None, index: int | None = None) -> str:
    """The exact training text of a dialogue (without BOS), optionally only its first `max_rounds` rounds."""
    pairs = normalize_dialogue(dialogue, index)
    if max_rounds is not None:
        pairs = pairs[: _check_max_rounds(max_rounds)]
    return "".join(round_segments(pairs)).rstrip()


def _check_max_rounds(max_rounds: Any) -> int:
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    return int(max_rounds)


def _as_dialogue_batch(dialogues: Any) -> list[Any]:
    """A batch of dialogues from one dialogue or a list of them.

    A single dialogue is recognised when unambiguous: a string, a flat list of dicts, or a list of
    (question, answer) string pairs. Anything else that is a list is a batch; a single dialogue in
    the nested ChatPedes round form must be passed in a list.
    """
    if isinstance(dialogues, str):
        return [dialogues]
    if isinstance(dialogues, Sequence) and len(dialogues) > 0:
        first = dialogues[0]
        if isinstance(first, Mapping):
            return [dialogues]
        if (isinstance(first, (tuple, list)) and len(first) == 2
                and all(isinstance(x, str) for x in first)):
            return [dialogues]
        return list(dialogues)
    if isinstance(dialogues, Sequence):
        raise DialogueError("dialogues is an empty list")
    raise DialogueError(f"dialogues must be a dialogue or a list of dialogues, got {type(dialogues).__name__}")


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


@dataclass
class _EncodedDialogue:
    """One dialogue's ids and, per round prefix k, where it is in them.

    `round_views[k]` = (shared, tail_start, end): prefix k is made of ids[:shared] followed by
    ids[tail_start : end + 1] (nothing when end < tail_start); its last token is at `end`.
    `dialogue_length`: how many leading ids are the full dialogue's own (the rest are the packed tails
    of the official tokenisation); None = all of them.
    """

    ids: list[int]
    round_ends: list[int]
    round_truncated: list[bool]
    round_views: list[tuple[int, int, int]]
    dialogue_length: int | None = None


def round_token_mask(round_views: Sequence[tuple[int, int, int]], length: int) -> torch.Tensor:
    """(R, length) bool: which positions of a row make each round prefix.

    Args:
        round_views: per round (shared, tail_start, end): the first `shared` tokens of the row, then the
            tokens tail_start..end (none when end < tail_start).
        length: the row length (padding included).
    """
    positions = torch.arange(length)
    views = torch.tensor(round_views, dtype=torch.long).view(-1, 3)  # (R, 3)
    shared, start, end = views[:, :1], views[:, 1:2], views[:, 2:3]
    return (positions < shared) | ((positions >= start) & (positions <= end))


def _repeat_last(values: list, count: int) -> list:
    """Pads a per-round list to `count` rounds by repeating its last round."""
    return values + [values[-1]] * (count - len(values))


class DiaNAProcessor(ProcessorMixin):
    r"""Turns dialogues and pedestrian photos into DiaNA inputs.

    Wraps a `ViTImageProcessor` (RGB, resize to H x W, rescale, normalise) and the Llama-3.2
    tokenizer. Dialogues are rendered with DiaNA's template and tokenised round by round so that
    every k-round prefix is an exact id prefix (see the module docstring).

    Args:
        image_processor: The image processor (`ViTImageProcessor` with the DiaNA size and statistics).
        tokenizer: A Llama-3 tokenizer; `<|begin_of_text|>` and `<|finetune_right_pad_id|>` must exist.
        max_length: Maximum dialogue length in tokens, BOS included (400 fine-tuning, 56 pretraining).
        chat_template: Jinja template for `apply_chat_template`; defaults to DiaNA's dialogue template.
        tokenization: "rounds" (default: round by round, every k-round prefix an id prefix) or "official"
            (each prefix's text as one string, as the official code, for converted official weights; see the
            module docstring). Saved in processor_config.json.
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
            tokenisation the ids are the packed row (see the module docstring) and `round_ends[b][k]`
            the last token of prefix k's view in it.
        """
        encoded = self._encode_rounds(dialogues, max_rounds, max_length, truncation)
        return [e.ids for e in encoded], [e.round_ends for e in encoded], [e.round_truncated for e in encoded]

    def _encode_rounds(
        self, dialogues: Any, max_rounds: int | None, max_length: int | None, truncation: bool
    ) -> list[_EncodedDialogue]:
        batch = _as_dialogue_batch(dialogues)
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        all_pairs = [normalize_dialogue(d, index=i) for i, d in enumerate(batch)]
        if max_rounds is not None:
            keep = _check_max_rounds(max_rounds)
            all_pairs = [pairs[:keep] for pairs in all_pairs]
        if self.tokenization == "official":
            return self._encode_official(all_pairs, max_length, truncation)
        segment_ids = self._tokenize_text([seg for pairs in all_pairs for seg in round_segments(pairs)])
        encoded, cursor = [], 0
        for pairs in all_pairs:
            ids, ends = [self.bos_token_id], []
            for seg in segment_ids[cursor : cursor + len(pairs)]:
                ids.extend(seg)
                ends.append(len(ids) - 1)
            cursor += len(pairs)
            if truncation and len(ids) > max_length:
                ids = ids[:max_length]
            last = len(ids) - 1
            kept = [min(end, last) for end in ends]
            encoded.append(_EncodedDialogue(
                ids=ids, round_ends=kept, round_truncated=[end > last for end in ends],
                round_views=[(end + 1, end + 1, end) for end in kept],
            ))
        return encoded

    def _encode_official(
        self, all_pairs: list[list[tuple[str, str]]], max_length: int, truncation: bool
    ) -> list[_EncodedDialogue]:
        """Every k-round prefix tokenised as one string (the official way), packed per dialogue: the
        full dialogue's ids, then each shorter prefix's ids past their common prefix with them."""
        texts = []
        for pairs in all_pairs:
            segments = round_segments(pairs)
            texts.extend("".join(segments[: k + 1]) for k in range(len(segments)))
        prefix_ids = [[self.bos_token_id, *ids] for ids in self._tokenize_text(texts)]
        encoded, cursor = [], 0
        for pairs in all_pairs:
            prefixes = prefix_ids[cursor : cursor + len(pairs)]
            cursor += len(pairs)
            cut = [len(ids) > max_length for ids in prefixes]
            if truncation:
                prefixes = [ids[:max_length] for ids in prefixes]
            full = prefixes[-1]
            packed, views = list(full), []
            for ids in prefixes:
                shared = 0
                for a, b in zip(ids, full):
                    if a != b:
                        break
                    shared += 1
                tail = ids[shared:]
                start = len(packed) if tail else shared
                packed.extend(tail)
                views.append((shared, start, start + len(tail) - 1 if tail else shared - 1))
            encoded.append(_EncodedDialogue(
                ids=packed, round_ends=[end for _, _, end in views], round_truncated=cut, round_views=views,
                dialogue_length=len(full),
            ))
        return encoded

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
            out["round_end_positions"] = [_repeat_last(e.round_ends, rounds) for e in encoded]
            out["round_truncated"] = [_repeat_last(e.round_truncated, rounds) for e in encoded]
            out["num_rounds"] = [len(e.round_ends) for e in encoded]
            if self.tokenization == "official":
                masks = [
                    round_token_mask(_repeat_last(e.round_views, rounds), len(row)) for e, row in zip(encoded, input_ids)
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
