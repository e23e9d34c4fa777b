"""Who the interactive evaluation searches for and who answers: the targets of a ChatPedes-layout
split (with the SynthPedes ground truth when the entries carry it), its gallery, and the simulated
witnesses.

- `SynthPedesWitness` answers exactly from the person's attributes, in the generator's answer
  templates (the template drawn with a per-target seed); "I don't remember." when the question asks
  about nothing the person has (a bag colour without a bag) or about no attribute;
- `DialogueWitness` (other ChatPedes-layout data) answers from the target's own annotated rounds: the
  answer of the round whose question is the asked question (compared after `normalize_text`, the
  bank's grouping), else "I don't remember.".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from diana.processing.data import synthpedes_attributes as synthpedes
from diana.processing.data.annotations import load_json_list
from diana.processing.data.chatpedes import find_images_dir, parse_entries
from diana.processing.processing_diana import normalize_dialogue
from diana.processing.search.question_bank import DONT_REMEMBER, normalize_text
from diana.processing.search.questioner import ProposedQuestion


@dataclass
class Target:
    """One simulated search: the person sought, the description and what the witness knows."""

    person_id: int
    file_path: str
    dialogues: list[list[tuple[str, str]]]  # the entry's annotated dialogues; round 1 of the first = description
    attributes: dict[str, str | None] | None = None  # SynthPedes ground truth

    @property
    def description(self) -> str:
        return self.dialogues[0][0][1]


@dataclass
class Gallery:
    """Every distinct image of a split with its person and (SynthPedes) attributes."""

    paths: list[str]
    person_ids: list[int]
    attributes: list[dict[str, str | None] | None] = field(default_factory=list)

    def person_attributes(self) -> list[dict[str, str | None]]:
        """One attribute dict per distinct person (what the oracle knows)."""
        seen: dict[int, dict[str, str | None]] = {}
        for pid, attrs in zip(self.person_ids, self.attributes):
            if attrs is not None:
                seen.setdefault(pid, attrs)
        return list(seen.values())


def load_split_entries(data_dir: str | os.PathLike, split: str = "test") -> tuple[list[Target], Gallery]:
    """Targets (one per image entry) and the gallery of a ChatPedes-layout folder's `{split}_reid.json`.

    Raises:
        FileNotFoundError; AnnotationError naming the file and entry.
    """
    path = os.path.join(str(data_dir), f"{split}_reid.json")
    raw = load_json_list(path)
    images_dir = find_images_dir(str(data_dir))
    targets, paths, ids, attributes, seen = [], [], [], [], set()
    for entry, parsed in zip(raw, parse_entries(path, raw)):
        truth = (entry.get("synthpedes") or {}).get("attributes") if isinstance(entry, dict) else None
        dialogues = [normalize_dialogue(d, index=parsed["entry_index"]) for d in parsed["dialogues"]]
        targets.append(Target(parsed["person_id"], parsed["file_path"], dialogues, truth))
        if parsed["file_path"] not in seen:
            seen.add(parsed["file_path"])
            paths.append(os.path.join(images_dir, parsed["file_path"]))
            ids.append(parsed["person_id"])
            attributes.append(truth)
    return targets, Gallery(paths, ids, attributes)


def pick_targets(targets: Sequence[Target], per: str = "image", max_targets: int | None = None) -> list[Target]:
    """Every entry ("image") or each person's first entry ("person"), the first `max_targets` of them."""
    if per not in ("image", "person"):
        raise ValueError(f"targets per must be 'image' or 'person', got {per!r}")
    chosen, persons = [], set()
    for target in targets:
        if per == "person" and target.person_id in persons:
            continue
        persons.add(target.person_id)
        chosen.append(target)
    return chosen if max_targets is None else chosen[:max_targets]


# ------------------------------------------------------------------------------------------ witnesses


class SynthPedesWitness:
    """Answers from a SynthPedes person's attributes in the generator's answer templates."""

    def __init__(self, attributes: Mapping[str, str | None], seed: int = 0) -> None:
        self.attributes = dict(attributes)
        self.rng = np.random.default_rng(seed)
        # The generator's questions name their attribute too (for questions given as bare strings).
        self._by_question = {normalize_text(q): a for a, qs in synthpedes.QUESTIONS.items() for q in qs}

    def answer(self, question: ProposedQuestion | str) -> str:
        text = question if isinstance(question, str) else question.question
        attribute = None if isinstance(question, str) else question.attribute
        attribute = attribute or self._by_question.get(normalize_text(text))
        value = self.attributes.get(attribute) if attribute in synthpedes.ANSWERS else None
        if value is None:
            return DONT_REMEMBER
        templates = synthpedes.ANSWERS[attribute]
        options = templates.get(value, templates.get("*"))
        template = options[int(self.rng.integers(len(options)))]
        return template.format(v=value, V=value[:1].upper() + value[1:])


class DialogueWitness:
    """Answers from the target's own annotated rounds (past round 1): the answer of the first round whose
    question equals the asked one after `normalize_text`, else "I don't remember."."""

    def __init__(self, dialogues: Sequence[Sequence[tuple[str, str]]]) -> None:
        self._answers: dict[str, str] = {}
        for dialogue in dialogues:
            for question, answer in dialogue[1:]:
                self._answers.setdefault(normalize_text(question), answer)

    def answer(self, question: ProposedQuestion | str) -> str:
        text = question if isinstance(question, str) else question.question
        return self._answers.get(normalize_text(text), DONT_REMEMBER)


def make_witness(target: Target, seed: int = 0) -> SynthPedesWitness | DialogueWitness:
    """The SynthPedes witness when the target carries ground truth, else the dialogue witness."""
    if target.attributes is not None:
        return SynthPedesWitness(target.attributes, seed)
    return DialogueWitness(target.dialogues)


__all__ = ["DialogueWitness", "Gallery", "SynthPedesWitness", "Target", "load_split_entries", "make_witness",
           "pick_targets"]
