"""The questioner of a chat search: which question to ask the witness next.

A `QuestionBank` holds the questions the system may ask, each with its candidate answers and,
optionally, the attribute it asks about; `make_policy` turns a policy name (or a callable) into a
`Questioner`, whose `propose(session)` returns the next `ProposedQuestion` for a
`ChatSearchSession`, or None when nothing is left to ask.

Policies:

- ``info_gain``: the question whose answer is expected to leave the least uncertainty about which
  of the current top-N images is the person (see `InfoGainQuestioner` for the formula); it scores
  every (question, answer) hypothesis with the model in one batched pass
  (`ChatSearchSession.score_next_rounds`).
- ``random``: a uniformly random open question of the bank (seeded).
- ``dataset``: the next question of a given dialogue (the one annotated in the data), while it has one.
- ``oracle`` (SynthPedes): knows every gallery person's true attributes and asks about the attribute
  whose values are spread most evenly (highest entropy) among the persons still consistent with what
  the witness stated.
- a callable ``f(session) -> str | BankQuestion | None``: any other questioner (e.g. an LLM); a
  string found in the bank gets that question's answers and attribute.

The question bank, its file format and the rule for open questions: `question_bank`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..processing_diana import normalize_dialogue
from .question_bank import DONT_REMEMBER, BankQuestion, QuestionBank, normalize_text

POLICIES = ("info_gain", "random", "dataset", "oracle")


@dataclass(frozen=True)
class ProposedQuestion:
    """The next question a `Questioner` proposes.

    ``answers`` are the candidate answers (empty for a free question of a callable policy that is not
    in the bank); ``expected_entropy`` is the info_gain policy's score of it (nats), else None.
    """

    question: str
    answers: tuple[str, ...]
    attribute: str | None
    policy: str
    expected_entropy: float | None = None


# ----------------------------------------------------------------------------------------- policies


class Questioner:
    """Proposes the next question of a chat search; `make_policy` builds one.

    Every built-in policy proposes only the bank's open questions (`QuestionBank.open_questions`).
    All but ``info_gain`` read only ``session.rounds`` (a list of (question, answer)).
    """

    name = "questioner"

    def __init__(self, bank: QuestionBank | None) -> None:
        self.bank = bank

    def propose(self, session: Any) -> ProposedQuestion | None:
        raise NotImplementedError

    def _proposal(self, item: BankQuestion, expected_entropy: float | None = None) -> ProposedQuestion:
        return ProposedQuestion(item.question, item.answers, item.attribute, self.name, expected_entropy)


class RandomQuestioner(Questioner):
    """A uniformly random open question of the bank (numpy generator seeded with `seed`)."""

    name = "random"

    def __init__(self, bank: QuestionBank, seed: int = 0) -> None:
        super().__init__(bank)
        self.rng = np.random.default_rng(seed)

    def propose(self, session: Any) -> ProposedQuestion | None:
        options = self.bank.open_questions(session.rounds)
        return self._proposal(options[int(self.rng.integers(len(options)))]) if options else None


class DatasetQuestioner(Questioner):
    """The next question of `dialogue` (the rounds annotated in the data), while it has one; its
    candidate answers are the bank's when the bank has the question, else the annotated answer."""

    name = "dataset"

    def __init__(self, bank: QuestionBank | None, dialogue: Sequence[tuple[str, str]] | Any) -> None:
        super().__init__(bank)
        self.dialogue = normalize_dialogue(dialogue)

    def propose(self, session: Any) -> ProposedQuestion | None:
        k = len(session.rounds)
        if k >= len(self.dialogue):
            return None
        question, answer = self.dialogue[k]
        known = self.bank.find(question) if self.bank is not None else None
        return self._proposal(known) if known is not None else ProposedQuestion(question, (answer,), None, self.name)


class OracleQuestioner(Questioner):
    """Knows the gallery's true attributes: asks about the open attribute whose values (no value, e.g.
    no bag colour, counts as one) are spread most evenly, by entropy, among the gallery persons
    consistent with every value the witness stated (ties: bank order)."""

    name = "oracle"

    def __init__(self, bank: QuestionBank, gallery_attributes: Sequence[Mapping[str, str | None]]) -> None:
        super().__init__(bank)
        if not gallery_attributes:
            raise ValueError("the oracle policy needs gallery_attributes (one {attribute: value} per gallery person)")
        self.gallery = [dict(g) for g in gallery_attributes]

    def propose(self, session: Any) -> ProposedQuestion | None:
        options = [q for q in self.bank.open_questions(session.rounds) if q.attribute is not None]
        if not options:
            return None
        stated = {a: v for a, v in self.bank.stated_values(session.rounds).items() if v is not None}
        consistent = [g for g in self.gallery if all(g.get(a) == v or (v == "none" and g.get(a) is None)
                                                     for a, v in stated.items())]
        best = max(options, key=lambda q: _entropy(Counter(g.get(q.attribute) for g in consistent).values()))
        return self._proposal(best)


def _entropy(counts: Iterable[int]) -> float:
    counts = [c for c in counts if c]
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts) if total else 0.0


class InfoGainQuestioner(Questioner):
    """The open question with the lowest expected entropy of the belief over the top-N candidates.

    Belief: ``b(c) = softmax_c(t * s_c)`` over the session's current top-N images c (`session.candidates`),
    with s_c the model's score and t the model's learned inverse temperature ``exp(logit_scale)`` (the one
    its contrastive loss was trained with; ``temperature`` overrides it as ``t = 1 / temperature``).

    For a question q with candidate answers a, the model scores every candidate with every hypothetical
    next round (q, a): s_c(q, a) (`session.score_next_rounds`, all hypotheses in one batched pass). Read as
    the text-given-image direction of the contrastive model, the probability that candidate c's witness
    gives answer a is ``p(a | c) = softmax_a(t * s_c(q, a))`` (over q's answers). Then

        p(a) = sum_c b(c) p(a | c),     b(c | a) = b(c) p(a | c) / p(a)      (Bayes),
        E[H] = sum_a p(a) H(b(. | a))  = H(b) - I(C; A),

    so the question with the lowest expected entropy is the one whose answer carries the most mutual
    information about the person. ``posterior="model"`` instead takes the model's own belief after the
    round, ``softmax_c(t * s_c(q, a))``, as b(c | a) (what the next ranking will be).
    """

    name = "info_gain"

    def __init__(self, bank: QuestionBank, top_n: int = 50, temperature: float | None = None,
                 posterior: str = "bayes") -> None:
        super().__init__(bank)
        if top_n < 2:
            raise ValueError(f"info_gain needs top_n >= 2 candidates, got {top_n}")
        if posterior not in ("bayes", "model"):
            raise ValueError(f"posterior must be 'bayes' or 'model', got {posterior!r}")
        self.top_n, self.temperature, self.posterior = top_n, temperature, posterior

    def inverse_temperature(self, session: Any) -> float:
        if self.temperature is not None:
            return 1.0 / self.temperature
        return float(session.model.get_logit_scale())

    @torch.no_grad()
    def propose(self, session: Any) -> ProposedQuestion | None:
        options = self.bank.open_questions(session.rounds)
        if not options:
            return None
        scores, indices = session.candidates(self.top_n)
        hypotheses = [(q.question, a) for q in options for a in q.answers]
        next_scores = session.score_next_rounds(hypotheses, indices)  # (H, N)
        entropies = expected_entropies(
            scores.float(), next_scores, [len(q.answers) for q in options], self.inverse_temperature(session),
            posterior=self.posterior,
        )
        best = int(torch.argmin(entropies))  # first of equals: bank order
        return self._proposal(options[best], float(entropies[best]))


def expected_entropies(
    scores: torch.Tensor, next_scores: torch.Tensor, answer_counts: Sequence[int], inverse_temperature: float,
    posterior: str = "bayes",
) -> torch.Tensor:
    """Expected entropy (nats) of the belief after each question's answer (`InfoGainQuestioner`'s formula).

    Args:
        scores: (N,) current scores of the candidates.
        next_scores: (H, N) their scores after each hypothesis, question by question, answers in order.
        answer_counts: answers per question (summing to H).
        inverse_temperature: t.
        posterior: "bayes" or "model".

    Returns:
        (Q,) one per question.
    """
    belief = torch.softmax(inverse_temperature * scores.double(), dim=0)  # (N,)
    counts = torch.as_tensor(list(answer_counts))
    # Questions side by side: (Q, A, N), answers past a question's own count are absent (-inf logits).
    question_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    answer_of = torch.arange(len(question_of)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    present = torch.arange(int(counts.max()))[None, :, None] < counts[:, None, None]  # (Q, A, 1)
    logits = torch.full((len(counts), int(counts.max()), next_scores.shape[1]), -math.inf, dtype=torch.float64)
    logits[question_of, answer_of] = inverse_temperature * next_scores.double()
    likelihood = torch.softmax(logits, dim=1)  # p(a | c)
    p_answer = likelihood @ belief  # (Q, A)
    if posterior == "bayes":
        after = likelihood * belief / p_answer[..., None].clamp_min(1e-300)  # b(c | a)
    else:
        after = torch.softmax(logits.masked_fill(~present, 0.0), dim=2)
    entropy = -(after * torch.log(after.clamp_min(1e-300))).sum(dim=2)  # (Q, A)
    return (p_answer * entropy).masked_fill(~present[..., 0], 0.0).sum(dim=1)


class CallableQuestioner(Questioner):
    """Wraps ``f(session) -> str | BankQuestion | None``; a string found in the bank takes its answers and
    attribute, any other string is proposed with no candidate answers."""

    def __init__(self, function: Callable[[Any], Any], bank: QuestionBank | None) -> None:
        super().__init__(bank)
        self.function = function
        self.name = getattr(function, "__name__", type(function).__name__)

    def propose(self, session: Any) -> ProposedQuestion | None:
        out = self.function(session)
        if out is None:
            return None
        if isinstance(out, BankQuestion):
            return self._proposal(out)
        if not isinstance(out, str) or not out.strip():
            raise ValueError(f"questioner {self.name!r} returned {out!r}: expected a question string, a BankQuestion "
                             "or None")
        known = self.bank.find(out) if self.bank is not None else None
        return self._proposal(known) if known is not None else ProposedQuestion(out.strip(), (), None, self.name)


def make_policy(policy: str | Callable[[Any], Any], bank: QuestionBank | None = None, **options: Any) -> Questioner:
    """A `Questioner` from a policy name or a callable.

    Args:
        policy: "info_gain" (options top_n=50, temperature=None, posterior="bayes"), "random" (seed=0),
            "dataset" (dialogue=the annotated rounds), "oracle" (gallery_attributes=one {attribute: value}
            per gallery person), or a callable ``f(session) -> str | BankQuestion | None``.
        bank: the questions; every name but "dataset" and a callable needs one.

    Raises:
        ValueError: an unknown name (naming it and the valid ones), a missing bank or option.
    """
    if callable(policy):
        return CallableQuestioner(policy, bank)
    if policy not in POLICIES:
        raise ValueError(f"unknown questioner policy {policy!r}: one of {', '.join(POLICIES)} or a callable")
    if policy != "dataset" and bank is None:
        raise ValueError(f"the {policy!r} policy needs a question bank")
    builders: dict[str, Callable[..., Questioner]] = {
        "info_gain": InfoGainQuestioner, "random": RandomQuestioner, "dataset": DatasetQuestioner,
        "oracle": OracleQuestioner,
    }
    try:
        return builders[policy](bank, **options)
    except TypeError as error:
        raise ValueError(f"policy {policy!r}: {error}") from error


__all__ = [
    "BankQuestion", "DONT_REMEMBER", "InfoGainQuestioner", "POLICIES", "ProposedQuestion", "QuestionBank",
    "Questioner", "expected_entropies", "make_policy", "normalize_text",
]
