"""A chat search session: a witness's description, then question/answer rounds, the top-k after
each. Each round runs the dialogue tower on that round's tokens only: the Llama tower is causal,
so the key/value cache of the ids the new dialogue shares with the previous one is exactly what a
from-scratch pass would recompute. With the processor's round-by-round tokenisation that is all of
the previous ids; with its official tokenisation the cache is cut back to where the ids part (a
round's final punctuation merges with the next round's newline) and those few tokens run again."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..processing_diana import DEFAULT_FIRST_QUESTION
from .index import GalleryIndex

# Photos ranked per query at least (the questioner's default top-N), so proposing a question after a
# round reuses the round's gallery search instead of scanning the gallery again.
CANDIDATE_POOL = 50
# DiaNAConfig.rejection_weight's default, for model configs saved before that field existed.
DEFAULT_REJECTION_WEIGHT = 0.15


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _pack_continuations(
    tails: Sequence[Sequence[int]], groups: Iterable[Any]
) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """Packs id sequences into rows, one row per group key: the ids all of a group's sequences begin
    with (segment 0; at most each one's length - 1, so each keeps a token of its own), then each
    sequence's rest (segment 1, 2, ...).

    Returns:
        ``(rows, segments, placement)``: the ids of each row, the segment number of each id, and for
        each input sequence its ``(row, segment)``; a sequence is its row's segment 0 plus its own.
    """
    members: dict[Any, list[int]] = {}
    for number, key in enumerate(groups):
        members.setdefault(key, []).append(number)
    rows, segments, placement = [], [], [(0, 0)] * len(tails)
    for row, numbers in enumerate(members.values()):
        shared = min(len(tails[n]) - 1 for n in numbers)
        for n in numbers[1:]:
            shared = min(shared, _common_prefix(tails[numbers[0]], tails[n]))
        ids, segment = list(tails[numbers[0]][:shared]), [0] * shared
        for own, n in enumerate(numbers, start=1):
            ids += tails[n][shared:]
            segment += [own] * (len(tails[n]) - shared)
            placement[n] = (row, own)
        rows.append(ids)
        segments.append(segment)
    return rows, segments, placement


def _tree_attention(segment: torch.Tensor, head: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive 4-d mask (G, 1, T, head + T) and positions (G, T) of packed rows (`_pack_continuations`;
    segment -1 = padding) run on a cached head of ``head`` tokens.

    A token sees the head, the earlier shared tokens (segment 0) and the earlier tokens of its own
    segment, so it computes what it would in its sequence alone; its position is the number of tokens
    it sees, itself included, minus one. Padding (never read) sees the head and the shared tokens.
    """
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # (G, T, T)
    allowed = (visible & (segment[:, None, :] >= 0) & causal) | torch.eye(length, dtype=torch.bool, device=segment.device)
    allowed = torch.cat([torch.ones(*allowed.shape[:2], head, dtype=torch.bool, device=segment.device), allowed], dim=2)
    positions = allowed.sum(-1) - 1  # (G, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None], positions


@dataclass
class RoundResult:
    """The ranking after one round of a search session, or after a "not this person" step."""

    round_index: int  # 1-based: the dialogue rounds this ranking reads
    question: str
    answer: str
    indices: list[int]
    scores: list[float]
    paths: list[str]
    ids: list[int]
    new_tokens: int  # tokens run through the dialogue tower for this round (0 for a rejection)
    truncated: bool  # the dialogue hit the processor's max_length in this round
    # Gallery indices (and paths) the witness rejected just before this ranking; empty for a dialogue round.
    rejected: list[int] = field(default_factory=list)
    rejected_paths: list[str] = field(default_factory=list)

    @property
    def is_rejection(self) -> bool:
        """Whether this ranking follows a "not this person" step rather than a new round."""
        return bool(self.rejected)


def move_query_away(query: torch.Tensor, rejected: torch.Tensor, weight: float) -> torch.Tensor:
    """Rocchio's negative feedback: ``normalise(query - weight * mean(rejected))`` along the last axis.

    Args:
        query: (1, D) dialogue vector, or (1, K, D) attribute slots.
        rejected: (R, D) or (R, K, D) normalised embeddings of the rejected photos (R >= 1).
        weight: how far to move (``DiaNAConfig.rejection_weight``).

    Returns:
        The moved query, same shape, unit length along the last axis (per slot for attribute slots).
    """
    return F.normalize(query - weight * rejected.to(query).mean(0), dim=-1)


class ChatSearchSession:
    """An interactive search: a description, then question/answer rounds, top-k after each.

    Each round runs only its own new tokens through the Llama tower, reusing the key/value cache
    of the earlier rounds (``model.text_model(..., cache=DynamicCache, use_cache=True)``), and
    pools the cached token states with ``model.encode_text_tokens`` (the model's own pooling, as
    ``config.text_pooling`` says); the encodings after round k equal ``model.encode_dialogues`` of
    the whole k-round dialogue, in every score mode and either processor tokenisation.

    The witness may also reject shown photos (:meth:`reject`, "not this person"): they leave the
    ranking for the rest of the search, and the query moves away from them by
    :func:`move_query_away` with ``rejection_weight``. ``text_embeds`` stays the dialogue's own
    encoding; ``query_embeds`` is what is searched (the same tensor while nothing is rejected).

    Args:
        model: a ``DiaNAModel`` (eval mode is set).
        processor: its ``DiaNAProcessor``.
        index: the gallery to search; refused if another model / processor made it.
        k: results per round.
        mode: score mode (default ``model.config.score_mode``).
        backend: ``"exact"`` or ``"faiss"``.
        faiss_factory: FAISS index factory string (``"Flat"`` is exact; e.g. ``"IVF4096,Flat"`` or
            ``"HNSW32"`` for galleries of millions).
        rejection_weight: in [0, 1]; default ``model.config.rejection_weight``.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        index: GalleryIndex,
        *,
        k: int = 10,
        mode: str | None = None,
        backend: str = "exact",
        faiss_factory: str = "Flat",
        check_index: bool = True,
        rejection_weight: float | None = None,
    ) -> None:
        if check_index:
            index.check_compatible(model, processor)
        self.model = model.eval()
        self.processor = processor
        self._round_ids: dict[tuple[str, str], list[int]] = {}  # a later round's own ids (round-by-round tokenisation)
        self.index = index
        self.k = k
        self.mode = mode or getattr(model.config, "score_mode", "global")
        self.backend = backend
        self.faiss_factory = faiss_factory
        if rejection_weight is None:
            # A config saved before the field existed (e.g. older remote code on the Hub) has no value.
            rejection_weight = getattr(model.config, "rejection_weight", DEFAULT_REJECTION_WEIGHT)
        if not (isinstance(rejection_weight, (int, float)) and 0 <= rejection_weight <= 1):
            raise ValueError(f"rejection_weight must be a number in [0, 1], got {rejection_weight!r}")
        self.rejection_weight = float(rejection_weight)
        self.reset()

    def reset(self) -> None:
        """Forget the dialogue (and the cache) and every rejection, to start a new search."""
        self.rounds: list[tuple[str, str]] = []
        self.results: list[RoundResult] = []
        self.rejected: list[int] = []  # gallery indices, in the order the witness rejected them
        self._ids: list[int] = []
        self._cache: Any = None
        self._token_states: torch.Tensor | None = None  # (1, L, D) projected tower tokens
        self.text_embeds: torch.Tensor | None = None  # (1, D) after the latest round
        self.text_attribute_embeds: torch.Tensor | None = None  # (1, K, D)
        self.query_embeds: torch.Tensor | None = None  # text_embeds moved away from the rejected photos
        self.query_attribute_embeds: torch.Tensor | None = None
        self._ranked: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (n asked, top-n) of the latest query

    @property
    def first_question(self) -> str:
        """The fixed question of round 1 (as in the paper)."""
        return DEFAULT_FIRST_QUESTION

    def start(self, description: str) -> RoundResult:
        """Begin a new search with the witness's description (round 1)."""
        self.reset()
        return self.add_round(self.first_question, description)

    @torch.no_grad()
    def add_round(self, question: str, answer: str) -> RoundResult:
        """Add one question/answer round and return the new top-k (rejected photos excluded)."""
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError(f"round {len(self.rounds) + 1}: question and answer must be strings")
        if not answer.strip():
            raise ValueError(f"round {len(self.rounds) + 1}: the answer is empty")
        rounds = [*self.rounds, (question, answer)]
        ids, truncated = self._dialogue_ids(rounds)
        new_tokens = self._run_tower(ids)
        encoding = self.model.encode_text_tokens(
            self._token_states, torch.ones(self._token_states.shape[:2], dtype=torch.bool, device=self._token_states.device),
            with_attributes=self.mode != "global",
        )
        self.text_embeds = encoding.text_embeds.float()  # (1, D)
        if encoding.text_attribute_embeds is not None:
            self.text_attribute_embeds = encoding.text_attribute_embeds.float()  # (1, K, D)
        self.rounds = rounds
        self._move_query()
        return self._record_ranking(question, answer, new_tokens, truncated)

    @torch.no_grad()
    def reject(self, ranks: Iterable[int]) -> RoundResult:
        """"Not this person": drop the photos at these 1-based ranks of the latest ranking for the rest of
        the search, move the query away from them, and return the new top-k (no new dialogue round).

        Raises:
            ValueError: nothing shown yet, no rank given, or a rank the latest ranking did not show.
        """
        if not self.results:
            raise ValueError("nothing to reject yet: describe the person first")
        shown = self.results[-1]
        ranks = list(ranks)
        if not ranks:
            raise ValueError("no rank to reject given")
        for rank in ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= len(shown.indices):
                raise ValueError(f"rank {rank!r} was not shown: the latest ranking shows ranks 1-{len(shown.indices)}")
        picked = list(dict.fromkeys(shown.indices[rank - 1] for rank in ranks))  # once each, in the given order
        self.rejected += picked
        self._move_query()
        question, answer = self.rounds[-1]
        return self._record_ranking(question, answer, 0, shown.truncated, rejected=picked)

    def _move_query(self) -> None:
        """The query after the latest round and rejections; the ranking of the previous one no longer holds."""
        self.query_embeds, self.query_attribute_embeds = self.queries_for(self.text_embeds, self.text_attribute_embeds)
        self._ranked = None

    def queries_for(
        self, text_embeds: torch.Tensor, text_attribute_embeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The vectors to search for a dialogue's encodings under this session's rejections.

        With nothing rejected (or ``rejection_weight`` 0) they are the given tensors themselves, so the
        search is exactly the plain one; otherwise each moves by :func:`move_query_away` from the
        rejected photos' global (and, in the attribute / fused modes, per-slot attribute) embeddings.
        """
        if not self.rejected or self.rejection_weight == 0:
            return text_embeds, text_attribute_embeds
        rows = torch.tensor(self.rejected, dtype=torch.long)
        moved = move_query_away(text_embeds, self.index.image_embeds[rows], self.rejection_weight)
        moved_attributes = text_attribute_embeds
        if text_attribute_embeds is not None and self.index.image_attribute_embeds is not None:
            moved_attributes = move_query_away(
                text_attribute_embeds, self.index.image_attribute_embeds[rows], self.rejection_weight
            )
        return moved, moved_attributes

    def candidates(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The current top-``n`` under the session's rules: the query after the latest round moved away
        from the rejected photos, which never appear.

        Returns:
            ``(scores (m,), indices (m,))`` best first, ties by gallery index; m = n, or fewer when the
            gallery has fewer photos left.
        """
        if self.query_embeds is None:
            raise ValueError("no round yet: describe the person first")
        # One gallery search per query serves both the shown top-k and the questioner's top-N: the ranking
        # is a fixed order (score, then gallery index), so a shorter top is a prefix of a longer one.
        if self._ranked is None or n > self._ranked[0]:
            asked = max(n, CANDIDATE_POOL)
            self._ranked = (asked, *self.rank(self.query_embeds, self.query_attribute_embeds, asked))
        _, scores, indices = self._ranked
        return scores[:n], indices[:n]

    @torch.no_grad()
    def rank(
        self, query_embeds: torch.Tensor, query_attribute_embeds: torch.Tensor | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``n`` gallery photos for one query (already moved by :meth:`queries_for`), the rejected
        ones left out, in this session's score mode and back end: ``(scores (m,), indices (m,))``."""
        # Asking for len(rejected) more and dropping the rejected ones keeps the back end's own order
        # (ties by gallery index) and works for exact and FAISS alike.
        scores, indices = self.index.search(
            query_embeds, n + len(self.rejected), text_attribute_embeds=query_attribute_embeds, mode=self.mode,
            model=self.model, backend=self.backend, faiss_factory=self.faiss_factory,
        )
        excluded = set(self.rejected)
        keep = [j for j, i in enumerate(indices[0].tolist()) if i >= 0 and i not in excluded][:n]  # FAISS pads with -1
        keep = torch.tensor(keep, dtype=torch.long)
        return scores[0, keep], indices[0, keep]

    def _record_ranking(
        self, question: str, answer: str, new_tokens: int, truncated: bool, rejected: list[int] | None = None
    ) -> RoundResult:
        """Rank the gallery for the current query, store the result and return it."""
        scores, indices = self.candidates(self.k)
        picked = indices.tolist()
        rejected = rejected or []
        result = RoundResult(
            round_index=len(self.rounds), question=question, answer=answer, indices=picked,
            scores=scores.tolist(), paths=[self.index.paths[i] for i in picked],
            ids=[int(self.index.ids[i]) for i in picked], new_tokens=new_tokens, truncated=truncated,
            rejected=list(rejected), rejected_paths=[self.index.paths[i] for i in rejected],
        )
        self.results.append(result)
        return result

    def _dialogue_ids(self, rounds: list[tuple[str, str]]) -> tuple[list[int], bool]:
        """The processor's ids of the dialogue so far (what `encode_dialogues` of it reads) and whether
        its last round was cut by the processor's max_length."""
        batch = self.processor(dialogues=[rounds], return_tensors=None, padding=False)
        ids = list(batch["input_ids"][0])
        full = self.processor(dialogues=[rounds], return_tensors=None, padding=False, truncation=False)
        return ids, len(full["input_ids"][0]) > len(ids)

    def _run_tower(self, ids: list[int]) -> int:
        """Brings the cached tower states to `ids`; returns how many tokens went through the tower.

        The cache keeps the states of the longest common prefix of the cached ids and `ids` (the tower is
        causal: those states are what a fresh pass computes) and the rest runs on top of it. With round-by-
        round tokenisation that is the new round's tokens; with the official tokenisation also the few
        tokens at the previous round's end that merge differently once a round follows.
        """
        keep = _common_prefix(self._ids, ids)
        if self._cache is None or keep == 0:
            self._cache, self._token_states = DynamicCache(config=self.model.text_model.config), None
        elif keep < len(self._ids):
            self._cache.crop(keep - len(self._ids))  # negative: drop that many cached tokens
            self._token_states = self._token_states[:, :keep]
        self._ids = list(ids)
        if keep == len(ids):
            return 0
        model = self.model
        device = next(model.parameters()).device
        hidden = model.text_model(
            input_ids=torch.tensor([ids[keep:]], device=device), cache=self._cache, use_cache=True,
        ).last_hidden_state  # (1, n_new, H)
        states = model.text_projection(hidden)  # (1, n_new, D)
        self._token_states = states if self._token_states is None else torch.cat([self._token_states, states], 1)
        return len(ids) - keep

    @torch.no_grad()
    def score_next_rounds(
        self, rounds: Sequence[tuple[str, str]], candidate_indices: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """(H, N) scores of gallery images `candidate_indices` after each hypothetical next round.

        Row h scores the dialogue so far followed by ``rounds[h]`` (question, answer), exactly as
        `add_round` would, without changing the session. All H dialogues run through the tower in ONE
        batched pass on top of the session's key/value cache (`_hypothesis_states`): only their own new
        tokens are computed, and the tokens that the answers to one question share (the question and the
        template around it) only once.
        """
        if not rounds:
            raise ValueError("score_next_rounds needs at least one (question, answer) round")
        states, token_mask = self._hypothesis_states(self._next_round_ids(rounds), [q for q, _ in rounds])
        encoding = self.model.encode_text_tokens(states, token_mask, with_attributes=self.mode != "global")
        index = torch.as_tensor(candidate_indices, dtype=torch.long).cpu()
        attributes = self.index.image_attribute_embeds
        device = states.device
        # The same rejection rule as add_round: each hypothesis's query moves away from the rejected photos.
        text, text_attributes = self.queries_for(
            encoding.text_embeds.float(), None if self.mode == "global" else encoding.text_attribute_embeds.float()
        )
        return self.model.similarity(
            text, self.index.image_embeds[index].to(device, torch.float32),
            text_attribute_embeds=text_attributes,
            image_attribute_embeds=None if self.mode == "global" else attributes[index].to(device, torch.float32),
            mode=self.mode,
        ).float()

    def _next_round_ids(self, rounds: Sequence[tuple[str, str]]) -> list[list[int]]:
        """The processor's ids of the dialogue so far followed by each of `rounds` (what `_dialogue_ids` of it
        gives). With round-by-round tokenisation a later round's ids do not depend on what came before
        (each round's text is tokenised on its own), so they are the cached ids plus the round's own ids,
        found once per (question, answer) and kept; otherwise every dialogue is tokenised whole."""
        if getattr(self.processor, "tokenization", None) != "rounds" or not self.rounds:
            dialogues = [[*self.rounds, (question, answer)] for question, answer in rounds]
            return [list(ids) for ids in self.processor(dialogues=dialogues, return_tensors=None, padding=False)["input_ids"]]
        missing = list(dict.fromkeys(r for r in rounds if r not in self._round_ids))
        if missing:
            head = [(self.first_question, "-")]
            calls = [head] + [[*head, pair] for pair in missing]
            ids = self.processor(dialogues=calls, return_tensors=None, padding=False, truncation=False)["input_ids"]
            for pair, row in zip(missing, ids[1:]):
                if list(row[: len(ids[0])]) != list(ids[0]):  # not an id prefix: the property above fails
                    raise RuntimeError("round-by-round ids are not prefix-consistent; use the official path")
                self._round_ids[pair] = list(row[len(ids[0]):])
        return [(self._ids + self._round_ids[pair])[: self.processor.max_length] for pair in rounds]

    def _hypothesis_states(
        self, hypothesis_ids: list[list[int]], groups: Sequence[Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected tower states (H, L, D) of several continuations of the cached dialogue and the
        (H, L) mask of each one's tokens, from one batched pass over the tokens past the cached head.

        The cached head is the longest prefix that the cached ids share with every continuation, kept
        short of each continuation's last token so that every row runs at least one token. Continuations
        with the same ``groups`` key (the answers to one question) share one row: the tokens they all
        begin with come first, then each one's own rest, and a tree-shaped mask lets a token see the
        head, the shared tokens and its own segment only, with the positions it has alone. So the states
        are those of each continuation run alone, while the question's tokens run once, not once per
        answer (a causal pass with the head's cache expanded along the batch when the attention
        implementation takes no 4-d mask, e.g. FlashAttention).
        """
        keep = min(min(_common_prefix(self._ids, ids), len(ids) - 1) for ids in hypothesis_ids)
        if self._cache is None:
            keep = 0
        model = self.model
        device = next(model.parameters()).device
        tails = [ids[keep:] for ids in hypothesis_ids]
        if groups is None or "flash" in str(model.text_model.config._attn_implementation):
            groups = range(len(tails))  # one row each: a causal pass
        rows, segments, placement = _pack_continuations(tails, groups)
        length = max(map(len, rows))
        pad = getattr(self.processor, "pad_token_id", 0) or 0
        new_ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows], device=device)  # (G, T)
        segment = torch.tensor([seg + [-1] * (length - len(seg)) for seg in segments], device=device)  # (G, T)
        cache = None
        if keep:
            # Each layer's cached keys / values of the head, repeated for every row.
            cache = DynamicCache(
                ddp_cache_data=[
                    (layer.keys[:, :, :keep].expand(len(rows), -1, -1, -1),
                     layer.values[:, :, :keep].expand(len(rows), -1, -1, -1))
                    for layer in self._cache.layers
                ],
                config=model.text_model.config,
            )
        if len(rows) == len(tails):
            hidden = model.text_model(input_ids=new_ids, cache=cache, use_cache=cache is not None).last_hidden_state
        else:
            mask, positions = _tree_attention(segment, keep, model.text_model.get_input_embeddings().weight.dtype)
            hidden = model.text_model(input_ids=new_ids, attention_mask=mask, position_ids=positions, cache=cache,
                                      use_cache=cache is not None).last_hidden_state
        states = model.text_projection(hidden)  # (G, T, D)
        if keep:
            states = torch.cat([self._token_states[:, :keep].expand(len(rows), -1, -1), states], dim=1)
        row_of = torch.tensor([row for row, _ in placement], device=device)
        own = torch.tensor([seg for _, seg in placement], device=device)[:, None]  # (H, 1)
        tokens = segment[row_of]  # (H, T)
        token_mask = torch.cat([torch.ones(len(tails), keep, dtype=torch.bool, device=device),
                                (tokens == 0) | (tokens == own)], dim=1)  # head, shared, own segment
        return states[row_of], token_mask

    @torch.no_grad()
    def encode_from_scratch(self) -> torch.Tensor:
        """(R, D) embeddings of every round prefix by one full pass (to check the cached path)."""
        batch = self.processor(dialogues=[self.rounds], return_round_ends=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        encoding = self.model.encode_dialogues(
            batch["input_ids"].to(device), batch["attention_mask"].to(device),
            round_end_positions=batch["round_end_positions"].to(device),
            round_token_mask=batch["round_token_mask"].to(device) if "round_token_mask" in batch else None,
        )
        return encoding.text_embeds[0].float()
