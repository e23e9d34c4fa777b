"""Question banks: the questions a questioner may ask, with candidate answers and the attribute each
asks about; their JSON file; and `diana build-question-bank`.

Open questions (every built-in policy): a question is never asked twice (compared after
`normalize_text`), and a question whose ``attribute`` the witness already stated is not asked. An
attribute counts as stated once a question about it was asked, or once one of its phrases appears
in any answer (the description included): the bank's ``attribute_phrases`` list, per attribute and
value, the phrases that state it ("red top", "no hat"), matched as whole words after
`normalize_text`. `QuestionBank.from_synthpedes` builds them from SynthPedes' description clauses
and answer templates, so "The person had black hair and wore a red top." states hair_colour=black
and upper_colour=red. One phrase may state several attributes ("no bag" states bag=none and
bag_colour=none: a colour of a bag that is not there is not asked for).

Bank file (JSON, UTF-8)::

    {"format": "diana-question-bank", "version": 1,
     "questions": [{"question": "Were they wearing a hat?",
                    "answers": ["No hat.", "A red hat.", "A blue hat."],
                    "attribute": "hat"}, ...],
     "attribute_phrases": {"hat": {"none": ["no hat", "wore no hat"], "red": ["red cap", "a red hat"]}}}

``attribute`` may be null (the question is then only never repeated); ``attribute_phrases`` may be
absent or empty (nothing is inferred from the answers).

    python -m diana.processing.search.question_bank build --data_dir DIR --output_file bank.json
    python -m diana.processing.search.question_bank build --synthpedes --output_file bank.json
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli_errors import ArgumentParser, UserInputError, require_path, require_range, run_cli
from ..data import synthpedes_attributes as synthpedes
from ..processing_diana import normalize_dialogue

BANK_FORMAT = "diana-question-bank"
BANK_VERSION = 1
# What a witness says when the question asks about something they cannot tell.
DONT_REMEMBER = "I don't remember."


def normalize_text(text: str) -> str:
    """Lower case, every run of non-letters/digits one space, stripped: the form questions and
    phrases are compared in ("What colour was the top?" -> "what colour was the top")."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


@dataclass(frozen=True)
class BankQuestion:
    """A question the system may ask, its candidate answers and what it asks about."""

    question: str
    answers: tuple[str, ...]  # candidate answers (non-empty)
    attribute: str | None = None  # never asked again once the witness stated it

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"bank question {self.question!r}: the question must be a non-empty string")
        answers = tuple(self.answers) if isinstance(self.answers, (list, tuple)) else self.answers
        if not isinstance(answers, tuple) or not answers:
            raise ValueError(f"bank question {self.question!r}: it has no candidate answers")
        bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
        if bad:
            raise ValueError(f"bank question {self.question!r}: answer {bad[0]!r} is not a non-empty string")
        object.__setattr__(self, "answers", answers)



class QuestionBank:
    """The questions a questioner may ask (`BankQuestion`s) and the phrases that state attributes.

    Args:
        questions: at least one; no two with the same normalised text.
        attribute_phrases: {attribute: {value: [phrases]}} (see the module docstring).

    Raises:
        ValueError: an empty bank, a repeated question, a malformed phrase table (naming the item).
    """

    def __init__(
        self,
        questions: Iterable[BankQuestion],
        attribute_phrases: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        self.questions: list[BankQuestion] = list(questions)
        if not self.questions:
            raise ValueError("the question bank is empty: it needs at least one question")
        seen: dict[str, int] = {}
        for i, item in enumerate(self.questions):
            if not isinstance(item, BankQuestion):
                raise ValueError(f"bank question {i}: expected a BankQuestion, got {type(item).__name__}")
            key = normalize_text(item.question)
            if key in seen:
                raise ValueError(f"bank questions {seen[key]} and {i} are the same question: {item.question!r}")
            seen[key] = i
        self.attribute_phrases = _check_phrases(attribute_phrases or {})
        # normalised phrase -> [(attribute, value)], longest phrases first so "no bag" wins over "bag".
        self._phrase_table = _phrase_table(self.attribute_phrases)
        self._by_text = {normalize_text(q.question): q for q in self.questions}

    def __len__(self) -> int:
        return len(self.questions)

    def find(self, question: str) -> BankQuestion | None:
        """The bank question with this text (compared after `normalize_text`), if any."""
        return self._by_text.get(normalize_text(question))

    # ---- what the witness said ---------------------------------------------------------------

    def stated_values(self, rounds: Sequence[tuple[str, str]]) -> dict[str, str | None]:
        """{attribute: value} stated so far: from the phrases found in the answers, and (value None
        unless a phrase gave it) every attribute a bank question already asked about."""
        stated: dict[str, str | None] = {}
        for question, answer in rounds:
            asked = self.find(question)
            if asked is not None and asked.attribute is not None:
                stated.setdefault(asked.attribute, None)
            text = f" {normalize_text(answer)} "
            for phrase, pairs in self._phrase_table:
                if f" {phrase} " in text:
                    for attribute, value in pairs:
                        if stated.get(attribute) is None:
                            stated[attribute] = value
        return stated

    def open_questions(self, rounds: Sequence[tuple[str, str]]) -> list[BankQuestion]:
        """The bank questions still worth asking after `rounds`: not asked yet, attribute not stated."""
        asked = {normalize_text(question) for question, _ in rounds}
        stated = self.stated_values(rounds)
        return [q for q in self.questions
                if normalize_text(q.question) not in asked and (q.attribute is None or q.attribute not in stated)]

    # ---- files -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT, "version": BANK_VERSION,
            "questions": [{"question": q.question, "answers": list(q.answers), "attribute": q.attribute}
                          for q in self.questions],
            "attribute_phrases": {a: {v: list(p) for v, p in values.items()} for a, values in self.attribute_phrases.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the bank as JSON (the module docstring's format)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuestionBank:
        """Reads a bank file.

        Raises:
            FileNotFoundError; ValueError naming the file and the entry that is wrong.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"question bank {path}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise ValueError(f"question bank {path}: not a question bank (expected \"format\": \"{BANK_FORMAT}\")")
        if data.get("version") != BANK_VERSION:
            raise ValueError(f"question bank {path}: version {data.get('version')!r}, this code reads {BANK_VERSION}")
        entries = data.get("questions")
        if not isinstance(entries, list):
            raise ValueError(f"question bank {path}: field 'questions' must be a list")
        questions = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("answers", None), list):
                raise ValueError(f"question bank {path}: question {i} needs 'question' and a list 'answers'")
            try:
                questions.append(BankQuestion(entry.get("question"), tuple(entry["answers"]), entry.get("attribute")))
            except ValueError as error:
                raise ValueError(f"question bank {path}: question {i}: {error}") from error
        try:
            return cls(questions, data.get("attribute_phrases") or {})
        except ValueError as error:
            raise ValueError(f"question bank {path}: {error}") from error

    # ---- builders ----------------------------------------------------------------------------

    @classmethod
    def from_synthpedes(cls) -> QuestionBank:
        """SynthPedes' attribute questions (the first phrasing of each), one candidate answer per value
        (its first answer template), and the phrases of its description clauses and answer templates."""
        questions = []
        for attribute in synthpedes.ATTRIBUTE_NAMES:
            templates = synthpedes.ANSWERS[attribute]
            answers = tuple(_fill(templates.get(v, templates.get("*"))[0], v) for v in synthpedes.ATTRIBUTES[attribute])
            questions.append(BankQuestion(synthpedes.QUESTIONS[attribute][0], answers, attribute))
        phrases: dict[str, dict[str, list[str]]] = {}
        for attribute in synthpedes.ATTRIBUTE_NAMES:
            table = phrases.setdefault(attribute, {})
            for value in synthpedes.ATTRIBUTES[attribute]:
                for source in (synthpedes.CLAUSES[attribute], synthpedes.ANSWERS[attribute]):
                    for template in source.get(value, source.get("*", [])):
                        table.setdefault(value, []).append(_fill(template, value))
        # "No bag." also says there is no bag colour to ask about.
        phrases["bag_colour"]["none"] = list(phrases["bag"]["none"])
        for table in phrases.values():
            for value, texts in table.items():
                table[value] = sorted({_phrase(t) for t in texts if _phrase(t)}, key=lambda t: (-len(t), t))
        return cls(questions, phrases)

    @classmethod
    def from_dialogues(cls, dataset_or_entries: Iterable[Any], max_answers: int = 8, min_count: int = 1) -> QuestionBank:
        """Questions of ChatPedes-format dialogues grouped by normalised text, each group's most frequent
        phrasing as the question and its `max_answers` most frequent answers as candidates.

        Round 1 (the fixed describe question) is left out. A group gets an attribute only from SynthPedes
        ground truth (an entry's ``synthpedes.revealed``): when every one of its rounds that has ground
        truth stated the same single attribute.

        Args:
            dataset_or_entries: rows with a ``dialogue`` column (a `datasets` split) or raw ChatPedes
                entries (``chats``: one dialogue or a list of them), or bare dialogues.
            max_answers: candidate answers kept per question (ties: first seen first).
            min_count: questions asked fewer times are left out.

        Raises:
            ValueError: nothing to build from; a malformed dialogue (naming the entry).
        """
        if max_answers < 1:
            raise ValueError(f"max_answers must be at least 1, got {max_answers}")
        phrasings: dict[str, Counter] = defaultdict(Counter)
        answers: dict[str, Counter] = defaultdict(Counter)
        attributes: dict[str, set] = defaultdict(set)
        for i, entry in enumerate(dataset_or_entries):
            for dialogue, revealed in _entry_dialogues(entry, i):
                for k, (question, answer) in enumerate(dialogue[1:], start=1):
                    key = normalize_text(question)
                    phrasings[key][question] += 1
                    answers[key][answer] += 1
                    if revealed is not None and k < len(revealed):  # ground truth: one attribute, or none
                        attributes[key].add(revealed[k][0] if len(revealed[k]) == 1 else None)
        questions = []
        for key, counts in phrasings.items():
            if sum(counts.values()) < min_count:
                continue
            attribute = next(iter(attributes[key])) if len(attributes[key]) == 1 else None
            top = tuple(a for a, _ in answers[key].most_common(max_answers))
            questions.append(BankQuestion(counts.most_common(1)[0][0], top, attribute))
        if not questions:
            raise ValueError("no question past round 1 in the given dialogues: the bank would be empty")
        return cls(questions)


def _fill(template: str, value: str) -> str:
    return template.format(v=value, V=value[:1].upper() + value[1:])


def _phrase(text: str) -> str:
    """A template's text as a phrase: normalised, a leading yes/no answer word dropped."""
    words = normalize_text(text).split()
    while words and words[0] in ("yes", "no") and len(words) > 1 and words[1] not in ("hat", "bag", "pattern"):
        words = words[1:]
    return " ".join(words)


def _check_phrases(phrases: Mapping[str, Any]) -> dict[str, dict[str, list[str]]]:
    if not isinstance(phrases, Mapping):
        raise ValueError("attribute_phrases must map attribute -> {value: [phrases]}")
    out: dict[str, dict[str, list[str]]] = {}
    for attribute, values in phrases.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"attribute_phrases[{attribute!r}] must map value -> [phrases]")
        owner: dict[str, str] = {}
        for value, texts in values.items():
            if not isinstance(texts, list) or not all(isinstance(t, str) and normalize_text(t) for t in texts):
                raise ValueError(f"attribute_phrases[{attribute!r}][{value!r}] must be a list of non-empty phrases")
            for text in texts:
                key = normalize_text(text)
                if owner.setdefault(key, value) != value:
                    raise ValueError(f"attribute_phrases[{attribute!r}]: phrase {text!r} states both "
                                     f"{owner[key]!r} and {value!r}")
        out[attribute] = {value: list(texts) for value, texts in values.items()}
    return out


def _phrase_table(phrases: Mapping[str, Mapping[str, Sequence[str]]]) -> list[tuple[str, list[tuple[str, str]]]]:
    table: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for attribute, values in phrases.items():
        for value, texts in values.items():
            for text in texts:
                table[normalize_text(text)].append((attribute, value))
    return sorted(table.items(), key=lambda item: -len(item[0]))


def _entry_dialogues(entry: Any, where: int) -> list[tuple[list[tuple[str, str]], list | None]]:
    """(rounds, SynthPedes revealed lists or None) of each dialogue of one row / entry / dialogue."""
    if isinstance(entry, Mapping) and "dialogue" in entry:
        return [(normalize_dialogue(entry["dialogue"], index=where), None)]
    if isinstance(entry, Mapping) and "chats" in entry:
        chats = entry["chats"]
        first = next((c for c in chats if c != []), None) if isinstance(chats, list) else None
        many = isinstance(first, list) and bool(first) and isinstance(first[0], list)
        dialogues = chats if many else [chats]
        revealed = (entry.get("synthpedes") or {}).get("revealed")
        out = []
        for j, dialogue in enumerate(dialogues):
            try:
                out.append((normalize_dialogue(dialogue), revealed[j] if revealed and j < len(revealed) else None))
            except ValueError as error:
                raise ValueError(f"entry {where}, dialogue {j}: {error}") from error
        return out
    return [(normalize_dialogue(entry, index=where), None)]


# -------------------------------------------------------------------------------------- command


def build_bank(data_dir: str | None, split: str = "train", max_answers: int = 8) -> QuestionBank:
    """The bank of a ChatPedes-layout folder's `{split}_reid.json`, or SynthPedes' own when `data_dir`
    is None."""
    if data_dir is None:
        return QuestionBank.from_synthpedes()
    path = Path(data_dir) / f"{split}_reid.json"
    if not path.is_file():
        raise UserInputError(f"--data_dir {data_dir}: no {path.name} (a ChatPedes-layout folder has "
                             "train_reid.json and test_reid.json)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise UserInputError(f"{path}: expected a list of entries")
    try:
        return QuestionBank.from_dialogues(entries, max_answers=max_answers)
    except ValueError as error:
        raise UserInputError(f"{path}: {error}") from error


def main(argv: Sequence[str] | None = None) -> QuestionBank:
    parser = ArgumentParser(prog="python -m diana.processing.search.question_bank",
                            description="Build a question bank for the questioner (JSON).")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a question bank file")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="ChatPedes-layout folder: its questions, grouped")
    source.add_argument("--synthpedes", action="store_true", help="SynthPedes' attribute questions and answers")
    build.add_argument("--split", default="train", choices=["train", "test"], help="annotation file to read")
    build.add_argument("--max_answers", type=int, default=8, help="candidate answers per question")
    build.add_argument("--output_file", required=True, help="the bank file to write")
    args = parser.parse_args(argv)
    require_path("--data_dir", args.data_dir, "folder")
    require_range("--max_answers", args.max_answers, 1)
    bank = build_bank(None if args.synthpedes else args.data_dir, args.split, args.max_answers)
    bank.save(args.output_file)
    with_attribute = sum(q.attribute is not None for q in bank.questions)
    print(f"{len(bank)} questions ({with_attribute} with an attribute), "
          f"{sum(len(q.answers) for q in bank.questions)} candidate answers -> {args.output_file}")
    return bank

__all__ = ["BANK_FORMAT", "BANK_VERSION", "BankQuestion", "DONT_REMEMBER", "QuestionBank", "build_bank", "normalize_text"]

if __name__ == "__main__":
    run_cli(main)
