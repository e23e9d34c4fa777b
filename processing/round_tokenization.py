"""Dialogue ids in which every round prefix can be found: what lets one tower pass give every round's vector.

Prefix-consistent tokenisation ("rounds"). The model reads the vector of "the first k rounds" at the
end of round k inside ONE pass over the full dialogue (the text tower is causal; it pools the last
token or the mean of the tokens up to there). That is only exact if the ids of the first k rounds are
a prefix of the full dialogue's ids. Plain tokenisation of the whole string breaks this: the Llama-3
pre-tokenizer glues punctuation to the newlines after it (` ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*`), so
"...coat.\\nASSISTANT" yields the token ".\\n" while the 1-round prefix ends in ".". The text is
therefore tokenised in round segments (`dialogue_template.round_segments`: segment 1 = system prompt
+ "\\n\\nASSISTANT: q1\\nUSER: a1", segment k = "\\nASSISTANT: qk\\nUSER: ak") whose ids are
concatenated. Only round boundaries that follow punctuation differ from plain tokenisation; decoding
the ids gives the template string exactly.

Official tokenisation ("official", what converted official weights were trained on): every k-round
prefix is tokenised as one string, as the official code does. Its ids are then not a prefix of the
longer dialogue's, so each row is packed as the full dialogue followed by, for every shorter prefix,
the few last tokens where its ids leave the full dialogue's; `round_token_mask` (R, L) says which
tokens make each prefix, and `DiaNAModel.encode_dialogues(..., round_token_mask=...)` reads every
prefix from one tower pass.

Ships next to the weights as remote code with `processing_diana`: imports only torch, the standard
library and its sibling `dialogue_template`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .dialogue_template import round_segments

# "rounds": round by round, every k-round prefix an id prefix (models trained by this project);
# "official": each prefix's whole text at once, as the official code (converted official weights).
TOKENIZATIONS = ("rounds", "official")

# Template text (holding user text) -> ids without special tokens, one list per text.
TextTokenizer = Callable[[list[str]], list[list[int]]]
Pairs = list[tuple[str, str]]


@dataclass
class EncodedDialogue:
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


def encode_round_by_round(
    all_pairs: Sequence[Pairs], tokenize: TextTokenizer, bos_token_id: int, max_length: int, truncation: bool
) -> list[EncodedDialogue]:
    """BOS + the ids of each round segment, concatenated: every k-round prefix is an id prefix.

    Args:
        all_pairs: per dialogue, its (question, answer) pairs.
        tokenize: template text -> ids without special tokens.
        bos_token_id: the id put first.
        max_length: the most ids a dialogue keeps when `truncation` (BOS included).
        truncation: cut on the right at `max_length`; a round cut away is flagged and its end clamped
            to the last kept token.
    """
    segment_ids = tokenize([seg for pairs in all_pairs for seg in round_segments(pairs)])
    encoded, cursor = [], 0
    for pairs in all_pairs:
        ids, ends = [bos_token_id], []
        for seg in segment_ids[cursor : cursor + len(pairs)]:
            ids.extend(seg)
            ends.append(len(ids) - 1)
        cursor += len(pairs)
        if truncation and len(ids) > max_length:
            ids = ids[:max_length]
        last = len(ids) - 1
        kept = [min(end, last) for end in ends]
        encoded.append(EncodedDialogue(
            ids=ids, round_ends=kept, round_truncated=[end > last for end in ends],
            round_views=[(end + 1, end + 1, end) for end in kept],
        ))
    return encoded


def encode_prefix_by_prefix(
    all_pairs: Sequence[Pairs], tokenize: TextTokenizer, bos_token_id: int, max_length: int, truncation: bool
) -> list[EncodedDialogue]:
    """Every k-round prefix tokenised as one string (the official way), packed per dialogue: the
    full dialogue's ids, then each shorter prefix's ids past their common prefix with them.

    Arguments as `encode_round_by_round`; each prefix is truncated on its own, as the official code does.
    """
    texts = []
    for pairs in all_pairs:
        segments = round_segments(pairs)
        texts.extend("".join(segments[: k + 1]) for k in range(len(segments)))
    prefix_ids = [[bos_token_id, *ids] for ids in tokenize(texts)]
    encoded, cursor = [], 0
    for pairs in all_pairs:
        prefixes = prefix_ids[cursor : cursor + len(pairs)]
        cursor += len(pairs)
        cut = [len(ids) > max_length for ids in prefixes]
        if truncation:
            prefixes = [ids[:max_length] for ids in prefixes]
        encoded.append(_packed_prefixes(prefixes, cut))
    return encoded


def _packed_prefixes(prefixes: list[list[int]], cut: list[bool]) -> EncodedDialogue:
    """The last (full) prefix's ids followed by each prefix's tail past what it shares with them."""
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
    return EncodedDialogue(
        ids=packed, round_ends=[end for _, _, end in views], round_truncated=cut, round_views=views,
        dialogue_length=len(full),
    )


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


def repeat_last(values: list, count: int) -> list:
    """Pads a per-round list to `count` rounds by repeating its last round."""
    return values + [values[-1]] * (count - len(values))


__all__ = [
    "EncodedDialogue", "TOKENIZATIONS", "encode_prefix_by_prefix", "encode_round_by_round", "repeat_last",
    "round_token_mask",
]
