"""SynthPedes: procedurally drawn pedestrians in the ChatPedes and MALS on-disk formats.

Identity = a unique combination of visible attributes (hair colour and length, hat, top colour,
sleeves, stripes, lower colour and type, shoes, bag type and colour). Every image of a person
varies in pose, scale, position, background, lighting, a narrow occluding pole and mirroring;
no nuisance hides an attribute entirely. Attributes are drawn as large flat regions from a
well-separated palette at a small native size (128x64 H x W), so a tiny model trained from
scratch on a CPU can learn them.

Dialogues follow ChatPedes: round 1 is "Please describe the person you saw." answered with two
attributes; each later round asks about one attribute not yet mentioned (varied phrasings), so
round 1 is ambiguous among many persons and the full dialogue nearly identifies one. Each entry
keeps its ground truth in an extra `synthpedes` field (the builders ignore extra fields):
`{"attributes": {...}, "revealed": [[names stated in round 1], [round 2], ...] per dialogue}`.

The attribute oracle ranks the test gallery by the number of attributes stated in the first k
rounds that match the image's person: the ceiling a model can reach on this data.

    python -m diana.processing.data.synthpedes --out DIR --persons 200 --images-per-person 3 --rounds 6 --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..cli_errors import ArgumentParser, UserInputError, require_range, run_cli
from ..processing_diana import DEFAULT_FIRST_QUESTION

DESCRIBE_QUESTION = DEFAULT_FIRST_QUESTION
# The smallest (height, width) the figures can be drawn at (smaller ones leave no room for a limb).
MIN_IMAGE_SIZE = (16, 8)

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

RGB = {
    "black": (30, 30, 32), "white": (236, 236, 232), "gray": (128, 128, 128), "red": (205, 35, 40),
    "purple": (125, 50, 165), "yellow": (235, 205, 45), "blue": (35, 75, 200), "green": (45, 150, 60),
    "pink": (240, 150, 190), "brown": (120, 72, 35), "blonde": (225, 195, 120),
}
# Kept >= 45 levels away from every clothing colour (a brown leg on brown trousers would hide the type).
SKIN_TONES = ((241, 204, 177), (224, 172, 135), (190, 135, 95))

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


# ----------------------------------------------------------------------------- drawing

def _shade(c: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]


def _stripe_colour(c: Sequence[int]) -> tuple[int, int, int]:
    # Stripes must not change the perceived colour class: darken light colours, lighten dark ones.
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return _shade(c, 0.55) if lum > 100 else tuple(int(v * 0.5 + 110) for v in c)  # type: ignore[return-value]


def draw_person(
    attributes: dict[str, str | None], skin: Sequence[int], rng: np.random.Generator, size: tuple[int, int] = (128, 64)
) -> Image.Image:
    """Draws one image of a person with random nuisance.

    The figure is laid out in a canonical 128x64 frame (top of the head at y=8, feet at y=118,
    bags out to x=8..56) and mapped to the image by a random scale and shift.

    Args:
        attributes: the person's attributes.
        skin: the person's skin tone (a per-person nuisance, not an attribute).
        rng: per-image generator (all nuisance comes from it).
        size: (H, W) of the output.

    Returns:
        An RGB image.
    """
    H, W = size
    u, v = W / 64.0, H / 128.0
    s = rng.uniform(0.8, 1.0)
    x0 = 32 + rng.uniform(-1, 1) * max(0.0, (62 - 48 * s) / 2)
    y0 = rng.uniform(1, max(1.5, 127 - 110 * s))
    spread = rng.uniform(-1, 1)  # walking phase: legs apart, arms swinging
    leg, arm = 3.0 * spread, 3.0 * spread

    def T(x: float, y: float) -> tuple[float, float]:
        return ((x0 + (x - 32) * s) * u, (y0 + (y - 8) * s) * v)

    def box(x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
        return [T(x1, y1), T(x2, y2)]

    def poly(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [T(x, y) for x, y in points]

    # Background: a muted colour with a vertical gradient, a few muted blocks and a ground band.
    hue, sat, val = rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75)
    top = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255
    bottom = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1, sat, val * rng.uniform(0.7, 1.1))) * 255
    grad = np.linspace(0, 1, H)[:, None, None]
    bg = np.broadcast_to(top * (1 - grad) + bottom * grad, (H, W, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(bg))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        bx, by = rng.uniform(0, W), rng.uniform(0, H * 0.7)
        c = tuple(int(x) for x in np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0.3, 0.8))) * 255)
        d.rectangle([bx, by, bx + rng.uniform(4, W / 2), by + rng.uniform(4, H / 3)], fill=c)
    ground = y0 + 108 * s
    gc = tuple(int(x) for x in np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.2), rng.uniform(0.4, 0.7))) * 255)
    d.rectangle([0, ground * v, W, H], fill=gc)

    a = attributes
    upper, lower = RGB[a["upper_colour"]], RGB[a["lower_colour"]]
    skin = tuple(skin)
    bag_c = RGB[a["bag_colour"]] if a["bag"] != "none" else None

    if a["bag"] == "backpack":  # the pack's body shows beside the torso, behind the left arm
        d.rectangle(box(8, 33, 17, 62), fill=bag_c)

    # Legs and lower clothing (y 66..110).
    left_leg = [(22, 68), (31, 68), (30 - leg, 110), (23 - leg, 110)]
    right_leg = [(33, 68), (42, 68), (41 + leg, 110), (34 + leg, 110)]
    for lg in (left_leg, right_leg):
        d.polygon(poly(lg), fill=skin)
    if a["lower_type"] == "trousers":
        for lg in (left_leg, right_leg):
            d.polygon(poly(lg), fill=lower)
        d.rectangle(box(22, 64, 42, 72), fill=lower)
    elif a["lower_type"] == "shorts":
        d.rectangle(box(22, 64, 42, 72), fill=lower)
        for x1, x2, dx in ((22, 31, -leg), (33, 42, leg)):
            d.polygon(poly([(x1, 70), (x2, 70), (x2 + dx * 0.4, 86), (x1 + dx * 0.4, 86)]), fill=lower)
    else:  # skirt
        d.polygon(poly([(21, 64), (43, 64), (48, 92), (16, 92)]), fill=lower)
    shoe = RGB[a["shoes"]]
    d.ellipse(box(20 - leg, 107, 32 - leg, 116), fill=shoe)
    d.ellipse(box(32 + leg, 107, 44 + leg, 116), fill=shoe)

    # Torso (y 30..66), stripes, neck, head.
    d.polygon(poly([(20, 31), (44, 31), (42, 67), (22, 67)]), fill=upper)
    if a["pattern"] == "striped":
        sc = _stripe_colour(upper)
        for y in range(36, 64, 7):
            d.rectangle(box(21, y, 43, y + 2.5), fill=sc)
    d.rectangle(box(29, 26, 35, 32), fill=skin)
    d.ellipse(box(25, 12, 39, 29), fill=skin)

    hair = RGB[a["hair_colour"]]
    d.chord(box(24, 10, 40, 28), 180, 360, fill=hair)
    d.rectangle(box(24, 17, 27, 23), fill=hair)
    d.rectangle(box(37, 17, 40, 23), fill=hair)
    if a["hat"] != "none":
        hat = RGB[a["hat"]]
        d.chord(box(23, 6, 41, 24), 180, 360, fill=hat)
        d.rectangle(box(23, 13, 45, 16), fill=hat)

    # Arms: sleeve colour to the wrist (long) or to above the elbow (short), hands in skin.
    for x1, x2, dx in ((15, 20.5, -arm), (43.5, 49, arm)):
        d.polygon(poly([(x1, 31), (x2, 31), (x2 + dx, 62), (x1 + dx, 62)]), fill=skin)
        end = 62 if a["sleeves"] == "long" else 45
        f = (end - 31) / 31
        d.polygon(poly([(x1, 31), (x2, 31), (x2 + dx * f, end), (x1 + dx * f, end)]), fill=upper)
        d.ellipse(box(x1 + dx - 0.5, 60, x2 + dx + 0.5, 66), fill=skin)

    if a["bag"] == "backpack":  # straps over both shoulders
        d.rectangle(box(23, 31, 26, 52), fill=bag_c)
        d.rectangle(box(38, 31, 41, 52), fill=bag_c)
    elif a["bag"] == "shoulder bag":  # diagonal strap across the chest to a bag at the hip
        d.line(poly([(23, 32), (46, 58)]), fill=bag_c, width=max(1, int(round(2.5 * s * u))))
        d.rectangle(box(43, 55, 55, 70), fill=bag_c)
    elif a["bag"] == "handbag":  # hanging from the right hand, no strap
        hx = 46 + arm
        d.rectangle(box(hx - 1, 65, hx + 9, 79), fill=bag_c)
        d.line(poly([(hx + 1, 65), (hx + 4, 61), (hx + 7, 65)]), fill=bag_c, width=max(1, int(round(1.5 * s * u))))

    if a["hair_length"] == "long":
        # Strands over the shoulders, drawn over straps and top; the shaded edge keeps them
        # visible on a top (or background) of the hair's own colour.
        edge = _stripe_colour(hair)
        d.rectangle(box(21.5, 17, 26.5, 46), fill=hair, outline=edge)
        d.rectangle(box(37.5, 17, 42.5, 46), fill=hair, outline=edge)

    # Occlusion: a narrow pole; at most 5 canonical px wide, so it never covers a whole attribute
    # region (each region is >= 6 px wide or has a twin on the other side).
    if rng.uniform() < 0.3:
        px = rng.uniform(0, W)
        pw = rng.uniform(2, 4) * u
        pc = tuple(int(x) for x in np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.2), rng.uniform(0.2, 0.8))) * 255)
        d.rectangle([px, 0, px + pw, H], fill=pc)

    if rng.uniform() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Lighting: global gain, a slight colour cast and sensor noise.
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.94, 1.06, size=3).astype(np.float32)
    arr = arr * gain + rng.normal(0, 3, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- oracle

def _expected_hit_at_k(n_tie: np.ndarray, n_pos: np.ndarray, k: int) -> np.ndarray:
    """P(a positive within the first k) when n_pos positives lie in a tie block of n_tie at the
    top, in uniformly random order: 1 - C(n_tie - n_pos, k) / C(n_tie, k)."""
    miss = np.ones_like(n_tie, dtype=np.float64)
    for i in range(k):
        miss *= np.clip((n_tie - n_pos - i) / np.maximum(n_tie - i, 1), 0, None)
    return 1.0 - miss


def _expected_ap(n_tie: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """E[AP] for n_pos positives uniformly placed among the first n_tie ranks.

    A positive at rank r has E[precision] = (1 + (r-1)(R-1)/(n-1)) / r (the others spread
    hypergeometrically), so E[AP] = (1/n) [H_n (n-R)/(n-1) + n (R-1)/(n-1)], and 1 when n = 1.
    """
    n, R = n_tie.astype(np.float64), n_pos.astype(np.float64)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(n.max()) + 1))])[n_tie]  # H_n
    denom = np.maximum(n - 1, 1)
    ap = (harmonic * (n - R) / denom + n * (R - 1) / denom) / n
    return np.where(n <= 1, 1.0, ap)


def attribute_oracle(chatpedes_dir: str | os.PathLike, split: str = "test", ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Per-round retrieval metrics of the attribute oracle on a SynthPedes ChatPedes folder.

    Gallery = every image of the split; queries = every dialogue (text -> image). For the first k
    rounds of a query, an image's score is the number of stated attributes its person matches.
    The query's own person matches all of them, so its images always sit in the top tie block
    (every image whose person matches every stated attribute); the metrics are the exact
    expectations under a uniformly random order inside that block (ties carry no information,
    so any fixed tie rule would favour or penalise the oracle arbitrarily).

    Args:
        chatpedes_dir: folder with `{split}_reid.json` written by `generate`.
        split: "test" (the protocol's gallery) or "train".
        ks: recall cut-offs.

    Returns:
        {"rounds": [{"round": k, "R@1": ..., "mAP": ...}, ...] (percent), "full": the last round,
        "num_queries", "num_gallery", "num_persons", "chance_R@1", "tie_rule"}.
    """
    with open(os.path.join(chatpedes_dir, f"{split}_reid.json"), encoding="utf-8") as f:
        entries = json.load(f)
    if not entries or "synthpedes" not in entries[0]:
        raise ValueError(f"{chatpedes_dir}/{split}_reid.json has no 'synthpedes' ground truth (not written by SynthPedes)")
    codes = {a: {val: i for i, val in enumerate(vals)} for a, vals in ATTRIBUTES.items()}

    def encode(attrs: dict[str, str | None]) -> np.ndarray:
        return np.array([codes[a][attrs[a]] if attrs[a] is not None else -1 for a in ATTRIBUTE_NAMES])

    gallery = np.stack([encode(e["synthpedes"]["attributes"]) for e in entries])  # (G, A)
    gallery_pid = np.array([e["id"] for e in entries])
    queries = [(e["id"], encode(e["synthpedes"]["attributes"]), rev) for e in entries for rev in e["synthpedes"]["revealed"]]
    num_rounds = max(len(rev) for _, _, rev in queries)
    index = {a: i for i, a in enumerate(ATTRIBUTE_NAMES)}
    rounds = []
    for k in range(1, num_rounds + 1):
        n_tie, n_pos = [], []
        for pid, attrs, rev in queries:
            cols = [index[a] for r in rev[:k] for a in r]
            score = (gallery[:, cols] == attrs[cols]).sum(axis=1)  # (G,) matched stated attributes
            pos = gallery_pid == pid
            assert (score[pos] == len(cols)).all()
            n_tie.append(int((score == len(cols)).sum()))
            n_pos.append(int(pos.sum()))
        t, p = np.array(n_tie), np.array(n_pos)
        row: dict[str, Any] = {"round": k}
        for kk in ks:
            row[f"R@{kk}"] = round(100 * float(_expected_hit_at_k(t, p, kk).mean()), 2)
        row["mAP"] = round(100 * float(_expected_ap(t, p).mean()), 2)
        row["mean_tied"] = round(float(t.mean()), 2)
        rounds.append(row)
    return {
        "split": split,
        "rounds": rounds,
        "full": rounds[-1],
        "num_queries": len(queries),
        "num_gallery": len(entries),
        "num_persons": int(len(np.unique(gallery_pid))),
        "chance_R@1": round(100 * float(np.mean([np.mean(gallery_pid == pid) for pid, _, _ in queries])), 2),
        "tie_rule": "expected value under a uniformly random order of tied gallery images",
    }


def format_oracle_table(oracle: dict[str, Any]) -> str:
    """A markdown table of the per-round oracle metrics."""
    keys = [k for k in oracle["rounds"][0] if k != "round"]
    lines = ["| round | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in oracle["rounds"]:
        lines.append(f"| {row['round']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generation

def _save(img: Image.Image, path: str) -> None:
    # compress_level 1: flat regions compress well anyway and level 6 costs ~3x the time.
    img.save(path, format="PNG", compress_level=1)


def generate(
    out_dir: str | os.PathLike,
    persons: int = 200,
    images_per_person: int = 3,
    rounds: int = 6,
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    mals_images: int | None = None,
    mals_files: int = 2,
    two_dialogue_fraction: float = 0.3,
    image_size: tuple[int, int] = (128, 64),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes SynthPedes in the ChatPedes and MALS layouts and returns a summary.

    Layout: `out_dir/chatpedes/{imgs/synth/*.png, train_reid.json, test_reid.json}`,
    `out_dir/mals/{gene_attrs/synth_part*.json, gene_crop/part*/...png}`, `out_dir/oracle.json`,
    `out_dir/summary.json`. Train and test persons are disjoint (ids 1..N, test = the last ones).
    Every image gets 1 dialogue (stored half the time bare, half as a one-element list) or, with
    probability `two_dialogue_fraction`, 2 (a list): both `chats` forms occur.

    Args:
        out_dir: output folder.
        persons: number of identities (train + test).
        images_per_person: images per identity.
        rounds: rounds per dialogue.
        seed: everything is a function of the seed (and the other arguments).
        test_fraction: share of persons in the test split.
        mals_images: MALS-format images, each its own random identity (default persons x images_per_person).
        mals_files: number of `gene_attrs/*.json` files they are spread over.
        two_dialogue_fraction: share of images with two dialogues.
        image_size: (H, W) of the drawn images.
        overwrite: replace existing `chatpedes/` and `mals/` folders in out_dir.
        progress: show progress bars.

    Returns:
        Counts, paths, the oracle and the measured throughput.
    """
    if persons < 3 or images_per_person < 1 or rounds < 1:
        raise ValueError("need persons >= 3, images_per_person >= 1, rounds >= 1")
    if image_size[0] < MIN_IMAGE_SIZE[0] or image_size[1] < MIN_IMAGE_SIZE[1]:
        raise ValueError(f"image_size {tuple(image_size)}: the figures need at least {MIN_IMAGE_SIZE} (height, width)")
    n_test = max(1, int(round(persons * test_fraction)))
    if persons - n_test < 2:
        raise ValueError(f"test_fraction={test_fraction} leaves {persons - n_test} train persons (need >= 2)")
    mals_images = persons * images_per_person if mals_images is None else mals_images
    people = sample_persons(persons, seed)
    cp_dir, mals_dir = os.path.join(out_dir, "chatpedes"), os.path.join(out_dir, "mals")
    for d in (cp_dir, mals_dir):
        if os.path.exists(d) and os.listdir(d):
            if not overwrite:
                raise FileExistsError(f"{d} exists and is not empty (pass overwrite=True / --overwrite)")
            shutil.rmtree(d)
    os.makedirs(os.path.join(cp_dir, "imgs", "synth"), exist_ok=True)

    skins = np.random.default_rng([seed, 2]).integers(len(SKIN_TONES), size=persons)
    start, cpu_start = time.perf_counter(), time.process_time()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    bar = tqdm(total=persons * images_per_person + mals_images, desc="SynthPedes", disable=not progress)
    for p, attrs in enumerate(people):
        pid = p + 1
        split = "train" if p < persons - n_test else "test"
        for k in range(images_per_person):
            rng = np.random.default_rng([seed, 3, pid, k])
            rel = f"synth/{pid:06d}_{k}.png"
            _save(draw_person(attrs, SKIN_TONES[skins[p]], rng, image_size), os.path.join(cp_dir, "imgs", rel))
            n_dialogues = 2 if rng.uniform() < two_dialogue_fraction else 1
            dialogues, revealed = zip(*(make_dialogue(attrs, rounds, rng) for _ in range(n_dialogues)))
            chats: Any = list(dialogues) if n_dialogues == 2 or rng.uniform() < 0.5 else dialogues[0]
            splits[split].append({
                "id": pid, "file_path": rel, "chats": chats,
                "synthpedes": {"attributes": attrs, "revealed": list(revealed)},
            })
            bar.update()
    for split, entries in splits.items():
        with open(os.path.join(cp_dir, f"{split}_reid.json"), "w", encoding="utf-8") as f:
            json.dump(entries, f)

    mrng = np.random.default_rng([seed, 4])
    mals_attrs = [sample_attributes(mrng) for _ in range(mals_images)]
    parts: list[list[dict[str, Any]]] = [[] for _ in range(max(1, mals_files))]
    for i, attrs in enumerate(mals_attrs):
        rng = np.random.default_rng([seed, 5, i])
        part = i % len(parts)
        rel = f"gene_crop/part{part}/{i:07d}.png"
        os.makedirs(os.path.join(mals_dir, os.path.dirname(rel)), exist_ok=True)
        _save(draw_person(attrs, SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], rng, image_size), os.path.join(mals_dir, rel))
        parts[part].append({"image": rel, "caption": caption(attrs, rng), "image_id": f"synth_{i:07d}",
                            "label": mals_labels(attrs), "synthpedes": {"attributes": attrs}})
        bar.update()
    bar.close()
    os.makedirs(os.path.join(mals_dir, "gene_attrs"), exist_ok=True)
    for j, records in enumerate(parts):
        with open(os.path.join(mals_dir, "gene_attrs", f"synth_part{j}.json"), "w", encoding="utf-8") as f:
            json.dump(records, f)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    oracle = attribute_oracle(cp_dir, "test")
    with open(os.path.join(out_dir, "oracle.json"), "w", encoding="utf-8") as f:
        json.dump(oracle, f, indent=1)
    n_images = persons * images_per_person + mals_images
    summary = {
        "out_dir": os.path.abspath(out_dir),
        "chatpedes_dir": os.path.abspath(cp_dir),
        "mals_dir": os.path.abspath(mals_dir),
        "seed": seed,
        "rounds": rounds,
        "image_size": list(image_size),
        "train": {"persons": persons - n_test, "images": len(splits["train"]),
                  "dialogues": sum(len(e["synthpedes"]["revealed"]) for e in splits["train"])},
        "test": {"persons": n_test, "images": len(splits["test"]),
                 "dialogues": sum(len(e["synthpedes"]["revealed"]) for e in splits["test"])},
        "mals": {"images": mals_images, "files": len(parts)},
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "images_per_minute": round(60 * n_images / max(seconds, 1e-9)),
        "images_per_cpu_minute": round(60 * n_images / max(cpu_seconds, 1e-9)),
        "oracle": oracle,
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def validate_arguments(args: argparse.Namespace) -> None:
    """Refuses the flags `generate` cannot work with, by their names (before anything is written).

    Raises:
        UserInputError (ValueError), FileExistsError.
    """
    require_range("--persons", args.persons, 3)
    require_range("--images-per-person", args.images_per_person, 1)
    require_range("--rounds", args.rounds, 1)
    require_range("--test-fraction", args.test_fraction, 0.0, 1.0, high_inclusive=False)
    require_range("--mals-images", args.mals_images, 1)
    require_range("--mals-files", args.mals_files, 1)
    if args.image_size[0] < MIN_IMAGE_SIZE[0] or args.image_size[1] < MIN_IMAGE_SIZE[1]:
        raise UserInputError(f"--image-size {args.image_size[0]} {args.image_size[1]}: must be at least "
                             f"{MIN_IMAGE_SIZE[0]} {MIN_IMAGE_SIZE[1]} (height width)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out} is a file, not a folder")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(prog="python -m diana.processing.data.synthpedes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--persons", type=int, default=200, help="identities (train + test)")
    parser.add_argument("--images-per-person", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per dialogue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of persons in test")
    parser.add_argument("--mals-images", type=int, default=None, help="MALS-format images (default persons x images-per-person)")
    parser.add_argument("--mals-files", type=int, default=2, help="gene_attrs/*.json files")
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    parser.add_argument("--overwrite", action="store_true", help="replace existing chatpedes/ and mals/ folders")
    args = parser.parse_args(argv)
    validate_arguments(args)
    summary = generate(
        args.out, args.persons, args.images_per_person, args.rounds, args.seed, test_fraction=args.test_fraction,
        mals_images=args.mals_images, mals_files=args.mals_files, image_size=tuple(args.image_size), overwrite=args.overwrite,
    )
    o = summary["oracle"]
    print(f"SynthPedes -> {summary['out_dir']}")
    print(f"  train: {summary['train']}  test: {summary['test']}  mals: {summary['mals']}")
    print(f"  {summary['seconds']} s wall ({summary['images_per_minute']} images/minute), {summary['cpu_seconds']} s CPU "
          f"({summary['images_per_cpu_minute']} images per CPU-minute), one process")
    print(f"Attribute oracle ({o['split']}: {o['num_queries']} queries, {o['num_gallery']} gallery images, "
          f"{o['num_persons']} persons; chance R@1 {o['chance_R@1']}%; ties: {o['tie_rule']}):")
    print(format_oracle_table(o))
    return summary


if __name__ == "__main__":
    run_cli(main)
