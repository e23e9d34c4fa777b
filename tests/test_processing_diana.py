"""DiaNAProcessor with the real Llama-3.2 tokenizer: template, ids, rounds, truncation, images, remote code."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from diana.processing import build_processor
from diana.processing.processing_diana import DialogueError, DiaNAProcessor, ImageInputError

# The official system prompt, typed out again here so a typo in the code cannot hide behind a shared constant.
SYSTEM = (
    "You are an intelligent system designed to retrieve pedestrian images from dialogues. Extract key attributes "
    "such as clothing, accessories, gender, and distinctive features from the conversation. Use the aggregated "
    "information from all dialogue turns to perform accurate person image retrieval."
)
CUHK_MEAN, CUHK_STD = (0.38901, 0.36516, 0.34836), (0.24344, 0.23739, 0.23369)
MALS_MEAN, MALS_STD = (0.44168, 0.41813, 0.42375), (0.30883, 0.29743, 0.30101)
BOS, PAD = 128000, 128004

PAIRS = [
    ("Please describe the person you saw.", "A woman in a red coat."),
    ("Was she carrying a bag?", "Yes, a black backpack."),
    ("What about her shoes?", "White sneakers"),
]
RENDERED = (
    SYSTEM
    + "\n\nASSISTANT: Please describe the person you saw.\nUSER: A woman in a red coat."
    + "\nASSISTANT: Was she carrying a bag?\nUSER: Yes, a black backpack."
    + "\nASSISTANT: What about her shoes?\nUSER: White sneakers"
)


def chatpedes_flat(pairs):
    return [m for q, a in pairs for m in ({"from": "gpt", "value": q}, {"from": "user", "value": a})]


def chatpedes_rounds(pairs):
    return [[{"from": "gpt", "value": q}, {"from": "user", "value": a}] for q, a in pairs]


def messages(pairs):
    return [m for q, a in pairs for m in ({"role": "assistant", "content": q}, {"role": "user", "content": a})]


def segments(pairs):
    """DiaNA's round segments, written out from the rule in the processor docstring."""
    return [(SYSTEM + "\n\n" if k == 0 else "\n") + f"ASSISTANT: {q}\nUSER: {a}" for k, (q, a) in enumerate(pairs)]


def ids_of(processor, dialogue, **kw) -> list[int]:
    out = processor(dialogues=[dialogue], return_tensors=None, padding=False, **kw)
    return out["input_ids"][0]


def long_pairs(n: int):
    return [(f"Question number {k}: what else did you notice about the person?",
             f"Detail {k}: a {['red', 'blue', 'grey'][k % 3]} item, about {10 * k} cm, near the left side.")
            for k in range(n)]


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("form", ["flat", "rounds", "pairs", "qa_dicts", "messages", "messages_with_system", "list_pairs"])
def test_every_form_renders_the_exact_template(processor, form):
    dialogue = {
        "flat": chatpedes_flat(PAIRS),
        "rounds": chatpedes_rounds(PAIRS),
        "pairs": PAIRS,
        "list_pairs": [list(p) for p in PAIRS],
        "qa_dicts": [{"question": q, "answer": a} for q, a in PAIRS],
        "messages": messages(PAIRS),
        "messages_with_system": [{"role": "system", "content": SYSTEM}] + messages(PAIRS),
    }[form]
    assert processor.render_dialogue(dialogue) == RENDERED
    assert processor.normalize_dialogue(dialogue) == PAIRS
    assert processor.render_dialogue(dialogue, max_rounds=1) == (
        SYSTEM + "\n\nASSISTANT: Please describe the person you saw.\nUSER: A woman in a red coat."
    )


def test_free_text_is_one_round_answering_the_first_question(processor):
    assert processor.render_dialogue("A man in a blue shirt.") == (
        SYSTEM + "\n\nASSISTANT: Please describe the person you saw.\nUSER: A man in a blue shirt."
    )
    # A list of strings is a batch of descriptions.
    out = processor(dialogues=["A man.", "A woman in a long dress."], return_round_ends=True)
    assert out["num_rounds"].tolist() == [1, 1]


def test_values_are_stripped_so_no_round_ends_in_whitespace(processor):
    assert processor.render_dialogue([(" Please describe the person you saw. ", "A woman.  \n"), ("\tBag?", " No. ")]) == (
        SYSTEM + "\n\nASSISTANT: Please describe the person you saw.\nUSER: A woman.\nASSISTANT: Bag?\nUSER: No."
    )


def test_chat_template_gives_the_same_string(processor):
    msgs = messages(PAIRS)
    assert processor.apply_chat_template(msgs, tokenize=False) == RENDERED
    assert processor.tokenizer.apply_chat_template(msgs, tokenize=False) == RENDERED
    with_system = [{"role": "system", "content": SYSTEM}] + msgs
    assert processor.apply_chat_template(with_system, tokenize=False) == RENDERED
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in msgs]
    assert processor.apply_chat_template(parts, tokenize=False) == RENDERED
    with pytest.raises(Exception, match="alternate"):
        processor.apply_chat_template(msgs[:1] + msgs[:1], tokenize=False)


# ---------------------------------------------------------------- token ids


def test_ids_equal_meta_tokenizer_round_by_round(processor, meta_tokenizer):
    ids = ids_of(processor, PAIRS)
    expected = [BOS] + [t for seg in segments(PAIRS) for t in meta_tokenizer.encode(seg, bos=False, eos=False)]
    assert ids == expected
    assert processor.decode(ids, skip_special_tokens=True) == RENDERED
    assert PAD not in ids and ids[-1] != 128001  # no EOS
    # Plain tokenisation differs exactly because "coat.\n" is one token: the reason for segments.
    assert meta_tokenizer.encode(RENDERED, bos=True, eos=False) != ids


def test_ids_equal_plain_tokenisation_when_answers_end_without_punctuation(processor, meta_tokenizer):
    pairs = [("Please describe the person you saw.", "a woman in a red coat"), ("Was she carrying a bag?", "yes a black backpack"),
             ("Shoes?", "white sneakers 42")]
    text = processor.render_dialogue(pairs)
    assert ids_of(processor, pairs) == meta_tokenizer.encode(text, bos=True, eos=False)


def test_round_prefixes_are_exact_id_prefixes(processor):
    pairs = PAIRS + [("Anything on her head?", "A hat (beige).")]
    out = processor(dialogues=[pairs], return_round_ends=True, return_tensors=None, padding=False)
    full, ends = out["input_ids"][0], out["round_end_positions"][0]
    assert out["num_rounds"] == [4] and out["round_truncated"] == [[False] * 4]
    for k in range(1, 5):
        prefix = ids_of(processor, pairs[:k])
        assert full[: len(prefix)] == prefix
        assert ends[k - 1] == len(prefix) - 1
        assert ids_of(processor, pairs, max_rounds=k) == prefix
        assert processor.decode(prefix, skip_special_tokens=True) == processor.render_dialogue(pairs, max_rounds=k)
    assert ends[-1] == len(full) - 1


@pytest.mark.parametrize("tokenization", ["rounds", "official"])
def test_dialogue_token_ids_are_the_rows_of_the_call(processor, tokenization):
    """The unpadded lists and the processor call give the same ids, round ends and truncation flags."""
    processor = copy.copy(processor)
    processor.tokenization = tokenization
    dialogues = [PAIRS, long_pairs(25), "A man in a grey hoodie."]
    ids, ends, truncated = processor.dialogue_token_ids(dialogues)
    out = processor(dialogues=dialogues, return_round_ends=True, return_tensors=None, padding=False)
    assert ids == out["input_ids"] and len(ids[1]) >= 400
    assert [e + [e[-1]] * (25 - len(e)) for e in ends] == out["round_end_positions"]
    assert [t + [t[-1]] * (25 - len(t)) for t in truncated] == out["round_truncated"]
    assert [len(e) for e in ends] == out["num_rounds"] == [3, 25, 1]
    assert truncated[1][-1] and not any(truncated[0])


# ---------------------------------------------------------------- user text never a control token


def special_token_dialogues(processor):
    """One dialogue per special token of the tokenizer (256 in Llama-3.2), spelt in an answer, a question
    and at the very end of an answer (where it meets the next round's newline)."""
    specials = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
    assert len(specials) == 256 and "<|end_of_text|>" in specials and "<|finetune_right_pad_id|>" in specials
    return specials, [
        [("Please describe the person you saw.", f"A man {token} in red."), (f"{token}Bag?", f"Yes.{token}"),
         ("Hat?", "No.")]
        for token in specials
    ]


@pytest.mark.parametrize("tokenization", ["rounds", "official"])
def test_text_that_spells_a_special_token_stays_text(processor, meta_tokenizer, tokenization):
    proc = copy.copy(processor)
    proc.tokenization = tokenization
    specials, dialogues = special_token_dialogues(proc)
    out = proc(dialogues=dialogues, return_round_ends=True, return_tensors=None, padding=False)
    for token, dialogue, ids in zip(specials, dialogues, out["input_ids"]):
        # BOS by id, then no control id at all; the text decodes back with the token spelt out.
        assert ids[0] == BOS and all(i < 128000 for i in ids[1:]), token
        # Meta's reference encodes special-token strings as plain text unless told otherwise.
        if tokenization == "rounds":
            expected = [BOS] + [t for seg in segments(dialogue) for t in meta_tokenizer.encode(seg, bos=False, eos=False)]
        else:
            expected = meta_tokenizer.encode(proc.render_dialogue(dialogue), bos=True, eos=False)
        assert ids[: len(expected)] == expected, token
        assert proc.decode(expected) == "<|begin_of_text|>" + proc.render_dialogue(dialogue)
    if tokenization == "rounds":  # every k-round prefix is still an id prefix
        for dialogue, ids, ends in zip(dialogues[:8], out["input_ids"], out["round_end_positions"]):
            for k in range(1, 4):
                prefix = ids_of(proc, dialogue[:k])
                assert ids[: len(prefix)] == prefix and ends[k - 1] == len(prefix) - 1


# ---------------------------------------------------------------- official tokenisation


def official(processor):
    proc = copy.copy(processor)
    proc.tokenization = "official"
    return proc


def test_official_tokenisation_gives_each_prefix_the_ids_of_its_whole_text(processor, meta_tokenizer):
    proc = official(processor)
    pairs = PAIRS + [("Anything on her head?", "A hat (beige)."), ("Shoes?", "Red boots!")]
    out = proc(dialogues=[pairs, PAIRS[:2]], return_round_ends=True, return_tensors="pt")
    assert out["round_token_mask"].shape == (2, 5, out["input_ids"].shape[1])
    official_prefixes = []
    for row, dialogue in enumerate([pairs, PAIRS[:2]]):
        row_ids = out["input_ids"][row]
        for k in range(1, len(dialogue) + 1):
            # The official code: the k-round text tokenised as one string, BOS first.
            expected = meta_tokenizer.encode(proc.render_dialogue(dialogue, max_rounds=k), bos=True, eos=False)
            assert ids_of(proc, dialogue[:k]) == expected == ids_of(proc, dialogue, max_rounds=k)
            view = out["round_token_mask"][row, k - 1]
            assert row_ids[view].tolist() == expected, (row, k)  # the packed row holds each prefix's own ids
            assert int(out["round_end_positions"][row, k - 1]) == int(view.nonzero().max())
            official_prefixes.append(expected)
        # Without round ends a row is the whole dialogue's official ids only.
        assert ids_of(proc, dialogue) == official_prefixes[-1]
    # Answers end in "." / "!": official prefixes are not id prefixes (".\n" merges), so packing is needed,
    # but it adds only the few boundary tokens.
    assert official_prefixes[1][: len(official_prefixes[0])] != official_prefixes[0]
    extra = int(out["attention_mask"][0].sum()) - len(ids_of(proc, pairs))
    assert 0 < extra <= 2 * (len(pairs) - 1)


def test_official_tokenisation_truncates_every_prefix_like_the_official_code(processor, meta_tokenizer):
    proc = official(processor)
    pairs = long_pairs(25)
    out = proc(dialogues=[pairs], return_round_ends=True, return_tensors="pt")
    flags = out["round_truncated"][0].tolist()
    for k in (1, 12, 13, 25):
        whole = meta_tokenizer.encode(proc.render_dialogue(pairs, max_rounds=k), bos=True, eos=False)
        view = out["round_token_mask"][0, k - 1]
        assert out["input_ids"][0][view].tolist() == whole[:400]
        assert flags[k - 1] == (len(whole) > 400)
    assert flags[0] is False and flags[-1] is True


def test_tokenization_is_saved_with_the_processor(processor, tmp_path):
    assert processor.tokenization == "rounds" and processor.to_dict()["tokenization"] == "rounds"
    official(processor).save_pretrained(tmp_path / "official")
    assert json.loads((tmp_path / "official" / "processor_config.json").read_text())["tokenization"] == "official"
    assert DiaNAProcessor.from_pretrained(tmp_path / "official").tokenization == "official"
    with pytest.raises(ValueError, match="tokenization must be one of"):
        DiaNAProcessor(processor.image_processor, processor.tokenizer, tokenization="whole")


# ---------------------------------------------------------------- chat template, tokenized


@pytest.mark.parametrize("tokenization", ["rounds", "official"])
def test_chat_template_tokenized_gives_the_processor_ids(processor, tokenization):
    proc = processor if tokenization == "rounds" else official(processor)
    msgs = messages(PAIRS[:2] + [("Hat?", "A <|eot_id|> cap.")])
    ids = proc.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == BOS and ids == proc(dialogues=msgs)["input_ids"][0].tolist()
    assert all(i < 128000 for i in ids[1:])
    assert proc.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + proc.apply_chat_template(msgs)
    batch = proc.apply_chat_template([msgs, messages(PAIRS[:1])], tokenize=True, return_dict=True, return_tensors="pt")
    expected = proc(dialogues=[msgs, messages(PAIRS[:1])])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    with pytest.raises(Exception, match="alternate"):
        proc.apply_chat_template(msgs[:1] + msgs[:1], tokenize=True)
    with pytest.raises(ValueError, match="another chat_template"):  # its text would not be these ids
        proc.apply_chat_template(msgs, chat_template="{{ messages[0]['content'] }}", tokenize=True)


# ---------------------------------------------------------------- truncation


def test_truncation_at_400_round_ends_match_truncated_prefixes(processor):
    pairs = long_pairs(25)
    untruncated = ids_of(processor, pairs, truncation=False)
    assert len(untruncated) > 450
    out = processor(dialogues=[pairs], return_round_ends=True)
    ids = out["input_ids"][0].tolist()
    assert len(ids) == 400 and ids == untruncated[:400]
    flags = out["round_truncated"][0].tolist()
    for k in range(1, 26):
        prefix = ids_of(processor, pairs[:k])  # each prefix encoded on its own, truncated at 400
        assert out["round_end_positions"][0, k - 1].item() == len(prefix) - 1
        assert ids[: len(prefix)] == prefix
        assert flags[k - 1] == (len(ids_of(processor, pairs[:k], truncation=False)) > 400)
    assert flags[0] is False and flags[-1] is True
    # Per-call max_length overrides the processor's.
    assert processor(dialogues=[pairs], max_length=100)["input_ids"].shape == (1, 100)


def test_pretrain_preset_keeps_a_56_word_caption_and_uses_mals_statistics(tokenizer_dir):
    pre = build_processor(tokenizer_dir=tokenizer_dir, profile="pretrain", image_size=(64, 32))
    # The template alone is 61-68 tokens; the preset's 128 leaves the caption its 56 tokens.
    assert pre.max_length == 128
    short = "a man in blue"
    template_only = len(ids_of(pre, "x", truncation=False)) - 1
    assert 56 < template_only and template_only + 56 <= 128
    caption = " ".join(["the woman wears a long red coat with black boots and carries a bag"] * 6)
    out = pre(dialogues=[caption, short], return_round_ends=True)
    assert out["input_ids"].shape == (2, 128)
    assert out["input_ids"][0].tolist() == ids_of(pre, caption, truncation=False)[:128]
    assert out["input_ids"][1, : out["attention_mask"][1].sum()].tolist() == ids_of(pre, short, truncation=False)
    assert out["round_truncated"].tolist() == [[True], [False]]
    assert out["round_end_positions"][:, 0].tolist() == [127, len(ids_of(pre, short, truncation=False)) - 1]
    # The paper's literal 56-token limit still works per call, and shows why the preset is 128: the
    # template alone fills it, so even a short caption is cut away (flagged, round end at 55).
    at56 = pre(dialogues=[caption, short], max_length=56, return_round_ends=True)
    assert at56["input_ids"].shape == (2, 56)
    assert at56["input_ids"][1].tolist() == ids_of(pre, short, truncation=False)[:56]
    assert at56["round_truncated"].tolist() == [[True], [True]]
    assert at56["round_end_positions"][:, 0].tolist() == [55, 55]
    pixels = pre(images=Image.new("RGB", (32, 64), (10, 200, 30)))["pixel_values"]
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip((10, 200, 30), MALS_MEAN, MALS_STD)])
    assert torch.allclose(pixels[0, :, 5, 5], expected, atol=1e-4)
    with pytest.raises(ValueError, match="profile"):
        build_processor(tokenizer_dir=tokenizer_dir, profile="stage3")


# ---------------------------------------------------------------- batches


def test_mixed_length_batch_is_right_padded_to_the_longest(processor):
    batch = ["A man in a blue shirt.", PAIRS, PAIRS[:2]]
    singles = [ids_of(processor, d) for d in batch]
    out = processor(dialogues=batch, return_round_ends=True)
    longest = max(len(s) for s in singles)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, longest) and longest < 400
    assert out["input_ids"].dtype == torch.long
    for row, single in enumerate(singles):
        n = len(single)
        assert out["input_ids"][row, :n].tolist() == single and single[0] == BOS
        assert (out["input_ids"][row, n:] == PAD).all()
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
    assert out["num_rounds"].tolist() == [1, 3, 2]
    ends = out["round_end_positions"]
    assert ends.shape == (3, 3) and ends.dtype == torch.long and out["round_truncated"].dtype == torch.bool
    # Rounds past a dialogue's end repeat its last round: the encoding of all its rounds.
    assert ends[0].tolist() == [len(singles[0]) - 1] * 3
    assert ends[2, 1:].tolist() == [len(singles[2]) - 1] * 2
    assert ends[1, 2].item() == len(singles[1]) - 1
    assert (out["attention_mask"].gather(1, ends) == 1).all()

    fixed = processor(dialogues=batch, padding="max_length")
    assert fixed["input_ids"].shape == (3, 400)
    assert torch.equal(fixed["input_ids"][:, :longest], out["input_ids"])
    unpadded = processor(dialogues=batch, padding=False, return_tensors=None)
    assert unpadded["input_ids"] == singles
    with pytest.raises(ValueError, match="padding"):
        processor(dialogues=batch, padding=False)


# ---------------------------------------------------------------- bad input

GOOD = [("Please describe the person you saw.", "A man.")]


@pytest.mark.parametrize(
    "bad, message",
    [
        (chatpedes_flat(GOOD) + [{"from": "gpt", "value": "Hat?"}, {"from": "human", "value": "No."}],
         r"dialogue 1, round 2: unknown role 'human'"),
        (chatpedes_flat(GOOD) + [{"from": "gpt", "value": "Hat?"}, {"from": "gpt", "value": "Bag?"}],
         r"dialogue 1, round 2: two questions in a row"),
        ([], r"dialogue 1: empty dialogue"),
        (GOOD + [("Hat?", "   ")], r"dialogue 1, round 2: empty answer"),
        (GOOD + [("", "yes")], r"dialogue 1, round 2: empty question"),
        (GOOD + [("Hat?", None)], r"dialogue 1, round 2: answer must be a string, got NoneType"),
        ([{"question": "Q?", "answer": 3}], r"dialogue 1, round 1: answer must be a string, got int"),
        (chatpedes_flat(GOOD) + [{"from": "gpt", "value": 1.5}, {"from": "user", "value": "x"}],
         r"dialogue 1, round 2: question must be a string"),
        ([{"from": "user", "value": "A man."}], r"dialogue 1, round 1: answer without a question"),
        (chatpedes_flat(GOOD) + [{"from": "gpt", "value": "Hat?"}], r"dialogue 1, round 2: question without an answer"),
        ([["Q?", "A", "extra"]], r"dialogue 1, round 1: expected a \(question, answer\) pair"),
        ([{"role": "system", "content": "You are a pirate."}] + messages(GOOD), r"dialogue 1: .*fixed system prompt"),
    ],
)
def test_bad_dialogues_name_dialogue_and_round(processor, bad, message):
    with pytest.raises(DialogueError, match=message):
        processor(dialogues=[GOOD, bad])


def test_bad_call_arguments(processor):
    with pytest.raises(DialogueError, match="empty list"):
        processor(dialogues=[])
    with pytest.raises(ValueError, match="max_rounds"):
        processor(dialogues=[GOOD], max_rounds=0)
    with pytest.raises(ValueError, match="images and/or dialogues"):
        processor()


# ---------------------------------------------------------------- images


def normalised(rgb, mean=CUHK_MEAN, std=CUHK_STD) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)])


def _palette(colour):
    image = Image.new("P", (30, 50), 0)
    image.putpalette(list(colour) + [0] * 765)
    return image


def _transparent_palette():
    image = _palette((10, 200, 30))
    image.info["transparency"] = 0
    return image


COLOUR = (10, 200, 30)
HALF_ALPHA = tuple(round(c * 128 / 255 + 255 * 127 / 255) for c in COLOUR)
UNIFORM_CASES = {
    "RGB": (lambda: Image.new("RGB", (30, 50), COLOUR), COLOUR),
    "1": (lambda: Image.new("1", (30, 50), 1), (255, 255, 255)),
    "L": (lambda: Image.new("L", (30, 50), 100), (100, 100, 100)),
    "LA opaque": (lambda: Image.new("LA", (30, 50), (100, 255)), (100, 100, 100)),
    "LA transparent": (lambda: Image.new("LA", (30, 50), (100, 0)), (255, 255, 255)),
    "P": (lambda: _palette(COLOUR), COLOUR),
    "P transparency": (_transparent_palette, (255, 255, 255)),
    "RGBA opaque": (lambda: Image.new("RGBA", (30, 50), COLOUR + (255,)), COLOUR),
    "RGBA half": (lambda: Image.new("RGBA", (30, 50), COLOUR + (128,)), HALF_ALPHA),
    "CMYK": (lambda: Image.new("CMYK", (30, 50), (0, 255, 255, 0)), (255, 0, 0)),
    "I;16": (lambda: Image.fromarray(np.full((50, 30), 257 * 100, np.uint16)), (100, 100, 100)),
    "I": (lambda: Image.fromarray(np.full((50, 30), 257 * 100, np.int32)), (100, 100, 100)),
    "I 8-bit range": (lambda: Image.fromarray(np.full((50, 30), 100, np.int32)), (100, 100, 100)),
    "F": (lambda: Image.fromarray(np.full((50, 30), 0.5, np.float32)), (128, 128, 128)),
    "np HW uint8": (lambda: np.full((50, 30), 100, np.uint8), (100, 100, 100)),
    "np HWC uint8": (lambda: np.full((50, 30, 3), COLOUR, np.uint8), COLOUR),
    "np HWC4 transparent": (lambda: np.zeros((50, 30, 4), np.uint8), (255, 255, 255)),
    "np HWC uint16": (lambda: np.full((50, 30, 3), [257 * c for c in COLOUR], np.uint16), COLOUR),
    "np HWC float01": (lambda: np.full((50, 30, 3), [c / 255 for c in COLOUR], np.float32), COLOUR),
    "np CHW uint8": (lambda: np.broadcast_to(np.array(COLOUR, np.uint8)[:, None, None], (3, 50, 30)).copy(), COLOUR),
    "np bool": (lambda: np.ones((50, 30), bool), (255, 255, 255)),
    "torch CHW float": (lambda: torch.tensor([c / 255 for c in COLOUR]).view(3, 1, 1).expand(3, 50, 30), COLOUR),
    "torch CHW uint8": (lambda: torch.tensor(COLOUR, dtype=torch.uint8).view(3, 1, 1).expand(3, 50, 30), COLOUR),
}


def test_every_mode_becomes_the_right_rgb(tiny_processor):
    names = list(UNIFORM_CASES)
    images = [UNIFORM_CASES[name][0]() for name in names]
    pixels = tiny_processor(images=images)["pixel_values"]
    assert pixels.shape == (len(names), 3, 64, 32) and pixels.dtype == torch.float32
    for row, name in enumerate(names):
        expected = normalised(UNIFORM_CASES[name][1]).view(3, 1, 1).expand(3, 64, 32)
        assert torch.allclose(pixels[row], expected, atol=1e-4), name


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (500, 20), (32, 64), (1000, 480)])
def test_any_size_is_resized_to_height_by_width(tiny_processor, size):
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    array[: max(1, height // 2)] = (255, 0, 0)  # top half red
    array[height // 2 :] = (0, 0, 255)  # bottom half blue
    pixels = tiny_processor(images=[array, Image.fromarray(array)])["pixel_values"]
    assert pixels.shape == (2, 3, 64, 32)
    assert torch.equal(pixels[0], pixels[1])
    if height > 1:  # orientation kept: no height/width swap, no transpose
        assert torch.allclose(pixels[0, :, 0, 0], normalised((255, 0, 0)), atol=1e-4)
        assert torch.allclose(pixels[0, :, -1, -1], normalised((0, 0, 255)), atol=1e-4)


def test_model_size_image_is_only_rescaled_and_normalised(processor):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(384, 192, 3), dtype=np.uint8)
    pixels = processor(images=Image.fromarray(array))["pixel_values"]
    expected = (torch.from_numpy(array).permute(2, 0, 1).float() / 255 - torch.tensor(CUHK_MEAN).view(3, 1, 1)) / torch.tensor(
        CUHK_STD
    ).view(3, 1, 1)
    assert pixels.shape == (1, 3, 384, 192)
    assert torch.allclose(pixels[0], expected, atol=1e-4)


def test_image_paths_load(tiny_processor, tmp_path):
    Image.new("RGB", (30, 50), COLOUR).save(tmp_path / "a.png")
    Image.new("L", (30, 50), 100).save(tmp_path / "b.jpg", quality=100)
    undecoded = [{"bytes": (tmp_path / "a.png").read_bytes(), "path": None}, {"bytes": None, "path": str(tmp_path / "a.png")}]
    pixels = tiny_processor(images=[str(tmp_path / "a.png"), tmp_path / "b.jpg", *undecoded])["pixel_values"]
    assert torch.allclose(pixels[0, :, 10, 10], normalised(COLOUR), atol=1e-4)
    assert torch.allclose(pixels[1, :, 10, 10], normalised((100, 100, 100)), atol=0.02)
    assert torch.equal(pixels[2], pixels[0]) and torch.equal(pixels[3], pixels[0])


def test_bad_images_name_their_index(tiny_processor, tmp_path):
    good = Image.new("RGB", (30, 50))
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    Image.new("RGB", (300, 500), COLOUR).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    cases = [
        (str(tmp_path / "garbage.jpg"), r"image 1 \(.*garbage\.jpg\) could not be opened"),
        (str(tmp_path / "cut.png"), r"image 1 \(.*cut\.png\) could not be decoded"),
        (str(tmp_path / "missing.png"), r"image 1 \(.*missing\.png\) could not be opened"),
        (Image.new("RGB", (0, 10)), r"image 1 has zero size \(0x10\)"),
        (np.zeros((0, 5, 3), np.uint8), r"image 1 has zero size"),
        (np.full((5, 5), np.nan, np.float32), r"image 1 contains NaN"),
        (np.full((5, 5), 300.0, np.float32), r"image 1: float values must lie in"),
        (12, r"image 1: unsupported type int"),
        (np.array([[1, None]], dtype=object), r"image 1: unsupported array dtype object"),
        ({"bytes": b"junk", "path": "x.jpg"}, r"image 1 \(bytes of x\.jpg\) could not be opened"),
        ({"bytes": None, "path": None}, r"image 1: image dict without bytes or path"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageInputError, match=message):
            tiny_processor(images=[good, bad])


# ---------------------------------------------------------------- other tokenizer folders, remote code, model


def test_a_user_tokenizer_folder_works_the_same(processor, tmp_path):
    # Like Meta's own meta-llama/Llama-3.2-1B files: no pad token, a generic class, left padding.
    processor.tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.update(padding_side="left", tokenizer_class="PreTrainedTokenizerFast")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    user = build_processor(tokenizer_dir=tmp_path, image_size=(64, 32))
    assert user.tokenizer.padding_side == "right" and user.tokenizer.pad_token_id == PAD
    batch = ["A man.", PAIRS]
    a = processor(dialogues=batch, return_round_ends=True)
    b = user(dialogues=batch, return_round_ends=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert user.apply_chat_template(messages(PAIRS), tokenize=False) == RENDERED


CHILD = textwrap.dedent(
    """
    import importlib.abc, sys
    class BlockDiana(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "diana" or name.startswith("diana."):
                raise ImportError("the project is not importable here")
    sys.meta_path.insert(0, BlockDiana())
    try:
        import diana
        raise SystemExit("diana importable")
    except ImportError:
        pass
    import json, torch
    from transformers import AutoProcessor
    folder, out = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3])
    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    enc = proc(images=args["images"], dialogues=args["dialogues"], return_round_ends=True)
    torch.save({**dict(enc), "class": type(proc).__name__, "module": type(proc).__module__,
                "chat": proc.apply_chat_template(args["messages"], tokenize=False)}, out)
    """
)


def test_remote_code_round_trip_without_the_project(tiny_processor, tmp_path):
    from diana.modeling_diana import DiaNAModel
    from tests.helpers import tiny_config

    folder = tmp_path / "diana-tiny"
    DiaNAModel(tiny_config()).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_diana.DiaNAProcessor"
    }
    assert (folder / "processing_diana.py").is_file() and (folder / "chat_template.jinja").is_file()
    for sibling in ("image_loading.py", "dialogue_template.py", "round_tokenization.py"):
        assert (folder / sibling).is_file(), sibling  # its relative imports, copied along by save_pretrained
    for name in ("a.png", "b.png"):
        Image.new("RGBA", (30, 70), (10, 200, 30, 120)).save(tmp_path / name)
    args = {
        "images": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
        "dialogues": ["A man.", [list(p) for p in PAIRS], [{"question": "Q?", "answer": "A long answer."}]],
        "messages": messages(PAIRS),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "out.pt"), json.dumps(args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=False)
    assert remote.pop("class") == "DiaNAProcessor" and remote.pop("module").startswith("transformers_modules.")
    assert remote.pop("chat") == RENDERED
    local = tiny_processor(images=args["images"], dialogues=args["dialogues"], return_round_ends=True)
    assert sorted(remote) == sorted(local.keys())
    for key in local:
        assert torch.equal(remote[key], local[key]), key


def test_one_pass_round_features_equal_prefix_features(tiny_processor):
    """The reason for prefix-consistent ids: round k's vector read inside the full pass equals the
    vector of the first k rounds encoded alone (causal tower, last-token pooling)."""
    from diana.modeling_diana import DiaNAModel
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = DiaNAModel(tiny_config()).eval()
    batch = [PAIRS + [("Hat?", "A beige hat (wool).")], "A man.", PAIRS[:2]]
    out = tiny_processor(dialogues=batch, return_round_ends=True)
    with torch.no_grad():
        per_round = model.get_text_features(out["input_ids"], out["attention_mask"], out["round_end_positions"])
        assert per_round.shape[:2] == (3, 4)
        for b, dialogue in enumerate(batch):
            for k in range(1, out["num_rounds"][b].item() + 1):
                alone = tiny_processor(dialogues=[dialogue], max_rounds=k)
                vector = model.get_text_features(alone["input_ids"], alone["attention_mask"])
                assert torch.allclose(per_round[b, k - 1], vector[0], atol=1e-5), (b, k)
