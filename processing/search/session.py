"""A chat search session: a witness's description, then question/answer rounds, the top-k after
each. Each round runs the dialogue tower on that round's tokens only: the Llama tower is causal,
so the key/value cache of the ids the new dialogue shares with the previous one is exactly what a
from-scratch pass would recompute. With the processor's round-by-round tokenisation that is all of
the previous ids; with its official tokenisation the cache is cut back to where the ids part (a
round's final punctuation merges with the next round's newline) and those few tokens run again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ..processing_diana import DEFAULT_FIRST_QUESTION
from .index import GalleryIndex


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


@dataclass
class RoundResult:
    """The ranking after one round of a search session."""

    round_index: int  # 1-based
    question: str
    answer: str
    indices: list[int]
    scores: list[float]
    paths: list[str]
    ids: list[int]
    new_tokens: int  # tokens run through the dialogue tower for this round
    truncated: bool  # the dialogue hit the processor's max_length in this round


class ChatSearchSession:
    """An interactive search: a description, then question/answer rounds, top-k after each.

    Each round runs only its own new tokens through the Llama tower, reusing the key/value cache
    of the earlier rounds (``model.text_model(..., cache=DynamicCache, use_cache=True)``), and
    pools the cached token states with ``model.encode_text_tokens`` (the model's own pooling, as
    ``config.text_pooling`` says); the encodings after round k equal ``model.encode_dialogues`` of
    the whole k-round dialogue, in every score mode and either processor tokenisation.

    Args:
        model: a ``DiaNAModel`` (eval mode is set).
        processor: its ``DiaNAProcessor``.
        index: the gallery to search; refused if another model / processor made it.
        k: results per round.
        mode: score mode (default ``model.config.score_mode``).
        backend: ``"exact"`` or ``"faiss"``.
        faiss_factory: FAISS index factory string (``"Flat"`` is exact; e.g. ``"IVF4096,Flat"`` or
            ``"HNSW32"`` for galleries of millions).
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
        self.reset()

    def reset(self) -> None:
        """Forget the dialogue (and the cache) to start a new search."""
        self.rounds: list[tuple[str, str]] = []
        self.results: list[RoundResult] = []
        self._ids: list[int] = []
        self._cache: Any = None
        self._token_states: torch.Tensor | None = None  # (1, L, D) projected tower tokens
        self.text_embeds: torch.Tensor | None = None  # (1, D) after the latest round
        self.text_attribute_embeds: torch.Tensor | None = None  # (1, K, D)

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
        """Add one question/answer round and return the new top-k."""
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
        scores, indices = self.index.search(
            self.text_embeds, self.k, text_attribute_embeds=self.text_attribute_embeds, mode=self.mode,
            model=self.model, backend=self.backend, faiss_factory=self.faiss_factory,
        )
        picked = indices[0].tolist()
        result = RoundResult(
            round_index=len(rounds), question=question, answer=answer, indices=picked,
            scores=scores[0].tolist(), paths=[self.index.paths[i] for i in picked],
            ids=[int(self.index.ids[i]) for i in picked], new_tokens=new_tokens, truncated=truncated,
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
    def candidates(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The current top-`n` gallery images: ``(scores (n,), gallery indices (n,))``, best first.

        Raises:
            ValueError: before the first round (there is nothing to rank by yet).
        """
        if self.text_embeds is None:
            raise ValueError("the session has no round yet: start() it with a description first")
        scores, indices = self.index.search(
            self.text_embeds, n, text_attribute_embeds=self.text_attribute_embeds, mode=self.mode,
            model=self.model, backend=self.backend, faiss_factory=self.faiss_factory,
        )
        return scores[0], indices[0]

    @torch.no_grad()
    def score_next_rounds(
        self, rounds: Sequence[tuple[str, str]], candidate_indices: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """(H, N) scores of gallery images `candidate_indices` after each hypothetical next round.

        Row h scores the dialogue so far followed by ``rounds[h]`` (question, answer), exactly as
        `add_round` would, without changing the session. All H dialogues run through the tower in ONE
        batched pass on top of the session's key/value cache, expanded along the batch: only each
        hypothesis's own new tokens are computed. The new tokens are right-padded; the tower is causal,
        so padding after a hypothesis's last token cannot change its states, and the pooling reads only
        its real tokens.
        """
        if not rounds:
            raise ValueError("score_next_rounds needs at least one (question, answer) round")
        states, token_mask = self._hypothesis_states(self._next_round_ids(rounds))
        encoding = self.model.encode_text_tokens(states, token_mask, with_attributes=self.mode != "global")
        index = torch.as_tensor(candidate_indices, dtype=torch.long).cpu()
        attributes = self.index.image_attribute_embeds
        device = states.device
        return self.model.similarity(
            encoding.text_embeds.float(), self.index.image_embeds[index].to(device, torch.float32),
            text_attribute_embeds=None if self.mode == "global" else encoding.text_attribute_embeds.float(),
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

    def _hypothesis_states(self, hypothesis_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected tower states (H, L, D) of several continuations of the cached dialogue and the
        (H, L) mask of each one's tokens, from one batched pass over the tokens past their shared head.

        The cached head is the longest prefix that the cached ids share with every continuation, kept
        short of each continuation's last token so that every row runs at least one token.
        """
        keep = min(min(_common_prefix(self._ids, ids), len(ids) - 1) for ids in hypothesis_ids)
        if self._cache is None:
            keep = 0
        model = self.model
        device = next(model.parameters()).device
        count = len(hypothesis_ids)
        tails = [ids[keep:] for ids in hypothesis_ids]
        longest = max(map(len, tails))
        pad = getattr(self.processor, "pad_token_id", 0) or 0
        new_ids = torch.tensor([tail + [pad] * (longest - len(tail)) for tail in tails], device=device)  # (H, T)
        cache = None
        if keep:
            # Each layer's cached keys / values of the shared head, repeated for every hypothesis.
            cache = DynamicCache(
                ddp_cache_data=[
                    (layer.keys[:, :, :keep].expand(count, -1, -1, -1), layer.values[:, :, :keep].expand(count, -1, -1, -1))
                    for layer in self._cache.layers
                ],
                config=model.text_model.config,
            )
        hidden = model.text_model(input_ids=new_ids, cache=cache, use_cache=cache is not None).last_hidden_state
        states = model.text_projection(hidden)  # (H, T, D)
        if keep:
            states = torch.cat([self._token_states[:, :keep].expand(count, -1, -1), states], dim=1)
        lengths = torch.tensor([len(ids) for ids in hypothesis_ids], device=device)
        token_mask = torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None]  # (H, L)
        return states, token_mask

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
