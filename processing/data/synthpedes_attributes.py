"""SynthPedes persons: the attribute space, identities (a unique attribute combination), and what a
witness says about one: ChatPedes-style dialogues, MALS-style captions and the 27 MALS labels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..dialogue_template import DEFAULT_FIRST_QUESTION

DESCRIBE_QUESTION = DEFAULT_FIRST_QUESTION
# Upper / lower palettes are Market-1501's up* / down* colours, so the MALS labels (27, the
# Market-1501 attribute list) are all known except gender and age.
UPPER_COLOURS = ("black", "white", "red", "purple", "yellow", "gray", "blue", "green")
LOWER_COLOURS = ("black", "white", "pink", "purple", "yellow", "gray", "blue", "green", "brown")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair_colour": ("black", "brown", "blonde", "gray"),
    "hair_length": ("short", "long"),
    "hat": ("none", "red", "blue", "white", "green"),
    "upper_colour": UPPER_COLOURS,
    "sleeves": ("short", "long"),
    "pattern": ("plain", "striped"),
    "lower_colour": LOWER_COLOURS,
    "lower_type": ("trousers", "shorts", "skirt"),
    "shoes": ("black", "white", "red", "brown"),
    "bag": ("none", "backpack", "shoulder bag", "handbag"),
    "bag_colour": ("black", "red", "blue", "yellow"),  # only when bag != "none"
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)

MALS_LABELS = (
    "age", "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender",
    "upblack", "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen",
    "downblack", "downwhite", "downpink", "downpurple", "downyellow", "downgray", "downblue",
    "downgreen", "downbrown",
)  # Market-1501 order; 1 = the named property holds (clothes: skirt, down: short, up: short sleeves, hair: long)

# ----------------------------------------------------------------------------- language

CLAUSES: dict[str, dict[str, list[str]]] = {
    # attribute -> value or "*" -> clauses ("the person ..."), one attribute each.
    "hair_colour": {"*": ["had {v} hair", "had hair that was {v}"]},
    "hair_length": {"*": ["had {v} hair", "wore the hair {v}"]},
    "hat": {"none": ["wore no hat", "had nothing on the head"], "*": ["wore a {v} cap", "had a {v} hat on"]},
    "upper_colour": {"*": ["wore a {v} top", "had on a {v} shirt", "was dressed in a {v} top"]},
    "sleeves": {"*": ["wore {v} sleeves", "had a top with {v} sleeves"]},
    "pattern": {"plain": ["wore a plain top", "had a top without stripes"],
                "striped": ["wore a striped top", "had a top with stripes"]},
    "lower_colour": {"*": ["had {v} lower clothing", "wore something {v} on the legs"]},
    "lower_type": {"trousers": ["wore trousers", "was in long trousers"], "shorts": ["wore shorts", "was in shorts"],
                   "skirt": ["wore a skirt", "was in a skirt"]},
    "shoes": {"*": ["wore {v} shoes", "had {v} shoes on"]},
    "bag": {"none": ["carried no bag", "had no bag"], "*": ["carried a {v}", "had a {v}"]},
    "bag_colour": {"*": ["had a {v} bag", "carried a bag that was {v}"]},
}
QUESTIONS: dict[str, list[str]] = {
    "hair_colour": ["What colour was their hair?", "Can you describe the hair colour?"],
    "hair_length": ["Was the hair long or short?", "How long was their hair?"],
    "hat": ["Were they wearing a hat?", "Did the person have anything on the head?"],
    "upper_colour": ["What colour was their top?", "What colour was the upper clothing?", "Can you tell me the colour of the top?"],
    "sleeves": ["Were the sleeves long or short?", "What sleeve length did the top have?"],
    "pattern": ["Did the top have any pattern?", "Was the top plain or striped?"],
    "lower_colour": ["What colour was the lower clothing?", "What colour were their bottoms?"],
    "lower_type": ["Were they wearing trousers, shorts or a skirt?", "What kind of lower clothing was it?"],
    "shoes": ["What colour were the shoes?", "Did you notice the shoes?"],
    "bag": ["Were they carrying a bag?", "Did the person have a bag?"],
    "bag_colour": ["What colour was the bag?", "Do you remember the colour of the bag?"],
}
# Every answer names its subject ("The top was red.", never "It was red."): a witness's answer is
# then readable without the question, which a tiny text tower trained from scratch needs to bind
# a colour to the right garment within minutes.
ANSWERS: dict[str, dict[str, list[str]]] = {
    "hair_colour": {"*": ["The hair was {v}.", "{V} hair."]},
    "hair_length": {"*": ["The hair was {v}.", "{V} hair."]},
    "hat": {"none": ["No, no hat.", "No hat."], "*": ["Yes, a {v} cap.", "A {v} hat."]},
    "upper_colour": {"*": ["The top was {v}.", "A {v} top.", "{V} top."]},
    "sleeves": {"*": ["The sleeves were {v}.", "{V} sleeves."]},
    "pattern": {"plain": ["The top was plain.", "A plain top, no pattern."], "striped": ["The top had stripes.", "A striped top."]},
    "lower_colour": {"*": ["The lower clothing was {v}.", "{V} lower clothing."]},
    "lower_type": {"trousers": ["They wore trousers.", "Long trousers."], "shorts": ["They wore shorts.", "Shorts."],
                   "skirt": ["A skirt.", "They wore a skirt."]},
    "shoes": {"*": ["The shoes were {v}.", "{V} shoes."]},
    "bag": {"none": ["No bag.", "No, they did not carry a bag."], "*": ["Yes, a {v}.", "They carried a {v}."]},
    "bag_colour": {"*": ["The bag was {v}.", "A {v} bag."]},
}
FIRST_ANSWERS = ["The person {c1} and {c2}.", "I saw someone who {c1} and {c2}.", "The pedestrian {c1} and {c2}.",
                 "It was a pedestrian who {c1} and {c2}."]
EXHAUSTED = (["Is there anything else you remember?", "Anything else?"], ["No, that is all I remember.", "Nothing else."])


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(table: dict[str, list[str]], value: str, rng: np.random.Generator) -> str:
    text = _pick(rng, table.get(value, table.get("*", [])))
    return text.format(v=value, V=value[:1].upper() + value[1:])


def describable(attributes: dict[str, str | None]) -> list[str]:
    """The attributes a witness can state about this person (bag colour only with a bag)."""
    return [a for a in ATTRIBUTE_NAMES if attributes[a] is not None]


def make_dialogue(
    attributes: dict[str, str | None], rounds: int, rng: np.random.Generator
) -> tuple[list[list[dict[str, str]]], list[list[str]]]:
    """One ChatPedes-format dialogue and the attribute names each round states.

    Round 1 states two attributes; every later round one not yet stated; once none is left the
    questioner asks for anything else and learns nothing (so any `rounds` works).
    """
    names = describable(attributes)
    order = [names[i] for i in rng.permutation(len(names))]
    if "bag_colour" in order and order.index("bag_colour") < order.index("bag"):
        # "What colour was the bag?" presupposes the bag: state the bag first.
        i, j = order.index("bag_colour"), order.index("bag")
        order[i], order[j] = order[j], order[i]
    first, rest = order[:2], order[2:]
    c1, c2 = (_fill(CLAUSES[a], attributes[a], rng) for a in first)
    dialogue = [[{"from": "gpt", "value": DESCRIBE_QUESTION},
                 {"from": "user", "value": _pick(rng, FIRST_ANSWERS).format(c1=c1, c2=c2)}]]
    revealed = [list(first)]
    for _ in range(rounds - 1):
        if rest:
            a = rest.pop(0)
            q, ans, stated = _pick(rng, QUESTIONS[a]), _fill(ANSWERS[a], attributes[a], rng), [a]
        else:
            q, ans, stated = _pick(rng, EXHAUSTED[0]), _pick(rng, EXHAUSTED[1]), []
        dialogue.append([{"from": "gpt", "value": q}, {"from": "user", "value": ans}])
        revealed.append(stated)
    return dialogue, revealed


def caption(attributes: dict[str, str | None], rng: np.random.Generator) -> str:
    """A MALS-style full caption stating every attribute."""
    a = attributes
    hat = " and no hat" if a["hat"] == "none" else f" and a {a['hat']} cap"
    stripes = "striped " if a["pattern"] == "striped" else ""
    bag = "carrying no bag" if a["bag"] == "none" else f"carrying a {a['bag_colour']} {a['bag']}"
    subject = _pick(rng, ["A person", "A pedestrian", "Someone"])
    return (f"{subject} with {a['hair_length']} {a['hair_colour']} hair{hat}, wearing a {stripes}{a['upper_colour']} "
            f"top with {a['sleeves']} sleeves, {a['lower_colour']} {a['lower_type']} and {a['shoes']} shoes, {bag}.")


def mals_labels(attributes: dict[str, str | None]) -> list[int]:
    """The 27 labels in MALS_LABELS order, in {1, 0, -1} (gender and age unknown: -1)."""
    a = attributes
    flags = {
        "age": -1, "gender": -1,
        "backpack": int(a["bag"] == "backpack"), "bag": int(a["bag"] == "shoulder bag"), "handbag": int(a["bag"] == "handbag"),
        "clothes": int(a["lower_type"] == "skirt"), "down": int(a["lower_type"] != "trousers"),
        "up": int(a["sleeves"] == "short"), "hair": int(a["hair_length"] == "long"), "hat": int(a["hat"] != "none"),
    }
    flags.update({f"up{c}": int(a["upper_colour"] == c) for c in UPPER_COLOURS})
    flags.update({f"down{c}": int(a["lower_colour"] == c) for c in LOWER_COLOURS})
    return [flags[name] for name in MALS_LABELS]


# ----------------------------------------------------------------------------- identities

def sample_attributes(rng: np.random.Generator) -> dict[str, str | None]:
    attrs: dict[str, str | None] = {a: _pick(rng, vals) for a, vals in ATTRIBUTES.items()}
    if attrs["bag"] == "none":
        attrs["bag_colour"] = None
    return attrs


def identity_key(attributes: dict[str, str | None]) -> tuple[str | None, ...]:
    return tuple(attributes[a] for a in ATTRIBUTE_NAMES)


def num_identities() -> int:
    """Size of the identity space (bag colour only exists with a bag)."""
    n = math.prod(len(v) for a, v in ATTRIBUTES.items() if a not in ("bag", "bag_colour"))
    return n * (1 + (len(ATTRIBUTES["bag"]) - 1) * len(ATTRIBUTES["bag_colour"]))


def sample_persons(n: int, seed: int) -> list[dict[str, str | None]]:
    """`n` persons with pairwise distinct attribute combinations (identity = the combination)."""
    if n > num_identities() // 4:
        raise ValueError(f"persons={n} is too many for {num_identities()} attribute combinations")
    rng = np.random.default_rng([seed, 1])
    persons, seen = [], set()
    while len(persons) < n:
        attrs = sample_attributes(rng)
        key = identity_key(attrs)
        if key not in seen:
            seen.add(key)
            persons.append(attrs)
    assert len({identity_key(p) for p in persons}) == n
    return persons
