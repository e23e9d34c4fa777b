"""ChatPedes-shaped inputs for the benchmarks: dialogues and pedestrian photos of realistic size.

Speed depends on the shapes, not on the words: what matters is ten rounds per dialogue, a long first
description and short follow-ups, so that a rendered 10-round dialogue is ~250-400 Llama-3 tokens
(ChatPedes' range) and a one-round prefix ~80-110. The generator below draws such dialogues from
small word pools, seeded, so every run measures the same inputs.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from diana.processing.processing_diana import DEFAULT_FIRST_QUESTION
from diana.processing.tokenizer_setup import BOS_TOKEN_ID, PAD_TOKEN_ID

# ChatPedes' test split (the MALS release's layout): 3,074 images of 1,000 people; every image has two dialogues
# of ten rounds in the released annotations, hence ~6k queries.
CHATPEDES_TEST_IMAGES = 3074
CHATPEDES_IMAGES = 37128  # train + test: what the builder checks
CHATPEDES_TEST_PERSONS = 1000
CHATPEDES_TEST_DIALOGUES = 6148
CHATPEDES_ROUNDS = 10
FIRST_QUESTION = DEFAULT_FIRST_QUESTION

_COLOURS = ["black", "white", "red", "blue", "dark blue", "grey", "green", "yellow", "brown", "pink", "purple", "beige"]
_GARMENTS = ["t-shirt", "jacket", "coat", "sweater", "shirt", "hoodie", "dress", "blouse", "vest", "cardigan"]
_LOWER = ["jeans", "trousers", "shorts", "skirt", "leggings", "pants"]
_SHOES = ["sneakers", "boots", "sandals", "shoes", "high heels", "slippers"]
_ITEMS = ["backpack", "handbag", "shoulder bag", "umbrella", "plastic bag", "suitcase", "phone", "bottle"]
_HAIR = ["short black hair", "long brown hair", "a ponytail", "curly hair", "shoulder-length hair", "a bun"]
_QUESTIONS = [
    "What color is the person's {part}?",
    "Is the person carrying anything in their hands?",
    "Can you describe the person's shoes in more detail?",
    "Was the person wearing a hat or anything on their head?",
    "What kind of {part} was the person wearing, long or short sleeved?",
    "Did you notice anything distinctive about the person's hair?",
    "Was the person walking alone or with someone else?",
    "Were there any patterns or logos on the {part}?",
    "Did the person have a bag, and if so where was it?",
    "How would you describe the person's build and posture?",
]
_PARTS = ["top", "jacket", "trousers", "shirt", "coat", "skirt"]


def _description(rng: random.Random) -> str:
    return (
        f"The {rng.choice(['man', 'woman', 'young man', 'young woman', 'person'])} has {rng.choice(_HAIR)} and is "
        f"wearing a {rng.choice(_COLOURS)} {rng.choice(_GARMENTS)} over a {rng.choice(_COLOURS)} "
        f"{rng.choice(_GARMENTS)}, {rng.choice(_COLOURS)} {rng.choice(_LOWER)} and {rng.choice(_COLOURS)} "
        f"{rng.choice(_SHOES)}. {rng.choice(['She', 'He', 'They'])} is carrying a {rng.choice(_COLOURS)} "
        f"{rng.choice(_ITEMS)} and walking {rng.choice(['towards the camera', 'away from the camera', 'to the left'])}."
    )


def _answer(rng: random.Random) -> str:
    forms = [
        f"It is {rng.choice(_COLOURS)} with {rng.choice(['white', 'black', 'thin', 'wide'])} stripes near the collar.",
        f"Yes, a {rng.choice(_COLOURS)} {rng.choice(_ITEMS)} in the {rng.choice(['left', 'right'])} hand.",
        f"They look like {rng.choice(_COLOURS)} {rng.choice(_SHOES)} with {rng.choice(_COLOURS)} soles.",
        "No, nothing on the head, the hair is visible.",
        f"Long sleeved, and the {rng.choice(_PARTS)} reaches below the waist.",
        f"The person has {rng.choice(_HAIR)} that covers the ears.",
        "Alone, there is nobody else close to the person.",
        f"There is a small {rng.choice(_COLOURS)} logo on the chest.",
        f"Yes, a {rng.choice(_COLOURS)} {rng.choice(_ITEMS)} hanging on the {rng.choice(['left', 'right'])} shoulder.",
        f"Slim build, walking upright at a {rng.choice(['normal', 'fast', 'slow'])} pace.",
    ]
    return rng.choice(forms)


def make_dialogues(num: int, rounds: int = CHATPEDES_ROUNDS, seed: int = 0) -> list[list[dict[str, str]]]:
    """`num` dialogues of `rounds` rounds as `{"question", "answer"}` dicts (a processor input form);
    round 1 is always the describe-the-person question, as in ChatPedes."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        dialogue = [{"question": FIRST_QUESTION, "answer": _description(rng)}]
        for _ in range(rounds - 1):
            question = rng.choice(_QUESTIONS).format(part=rng.choice(_PARTS))
            dialogue.append({"question": question, "answer": _answer(rng)})
        out.append(dialogue)
    return out


def make_pil_images(num: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB photos at CUHK-PEDES-like sizes (portrait, ~60-160 px wide, ~160-400 px high),
    so the processor's resize does real work."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num):
        height = int(rng.integers(160, 400))
        width = int(height * rng.uniform(0.3, 0.45))
        images.append(Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)))
    return images


def synthetic_text_batch(
    lengths: list[int], rounds: int, vocab_size: int, seed: int = 0, pad_to: int | None = None
):
    """Random token ids with the processor's layout (BOS first, right padding with the Llama-3 pad id)
    and evenly spaced round ends, for when no tokenizer is at hand (`gpu.py --synthetic-text`).

    Returns:
        dict with `input_ids`, `attention_mask` (B, L) and `round_end_positions` (B, rounds).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    length = max(lengths) if pad_to is None else pad_to
    batch = len(lengths)
    input_ids = torch.full((batch, length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    ends = torch.zeros((batch, rounds), dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(0, min(vocab_size, 128000), (n,), generator=gen)
        input_ids[i, 0] = BOS_TOKEN_ID
        attention_mask[i, :n] = 1
        # The first round carries the system prompt and the long description: ~1/3 of the tokens.
        first = n // 3
        ends[i] = torch.linspace(first, n - 1, rounds).round().long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "round_end_positions": ends}
