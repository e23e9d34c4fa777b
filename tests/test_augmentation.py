"""Training-time augmentation (processing/augmentation.py): caption cleaning, R3, token masking,
the torchvision.transforms.v2 image pipeline and robust image loading."""

from __future__ import annotations

from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import v2
from transformers import ViTImageProcessor

from diana.processing.tokenizer_setup import MASK_TOKEN
from diana.training.data.augmentation import (
    MALS_QUESTIONS,
    TokenMasker,
    caption_to_dialogue,
    clean_caption,
    retain_random_rounds,
    sample_retained_rounds,
)
from diana.training.data.image_augmentation import PedestrianImageAugmentation, build_train_image_transform
from tests.helpers import BOS_ID, EOS_ID, PAD_ID, TINY_IMAGE_SIZE

CUHK_MEAN = (0.38901, 0.36516, 0.34836)
CUHK_STD = (0.24344, 0.23739, 0.23369)


# --------------------------------------------------------------------------------------------
# MALS captions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ('A Woman (in her 20s) wears a "Red" coat; black pants: nice!', "a woman in her 20s wears a red coat black pants nice"),
        ("shirt.pants", "shirt pants"),  # replaced by a space, not deleted
        ("  The man's bag, black ~ *bold* #tag  \n\t next.", "the man's bag, black bold tag next"),  # ' and , stay
        ('.!"()*#:;~', ""),
        ("", ""),
    ],
)
def test_clean_caption_exact(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_clean_caption_cuts_to_56_words():
    words = [f"w{i}" for i in range(70)]
    assert clean_caption(" ".join(words)) == " ".join(words[:56])
    assert clean_caption(" ".join(words[:56])) == " ".join(words[:56])
    assert clean_caption("a. b. c", max_words=2) == "a b"
    with pytest.raises(TypeError, match="caption must be a str"):
        clean_caption(None)


def test_caption_to_dialogue_question_pool():
    assert len(MALS_QUESTIONS) == 7 and MALS_QUESTIONS[0] == "Please describe the person you saw."
    assert caption_to_dialogue("A Man.") == [{"question": MALS_QUESTIONS[0], "answer": "a man"}]
    generator = torch.Generator().manual_seed(0)
    drawn = Counter(caption_to_dialogue("x", generator)[0]["question"] for _ in range(700))
    assert set(drawn) == set(MALS_QUESTIONS)
    assert all(60 <= count <= 140 for count in drawn.values()), drawn  # ~100 each
    again = torch.Generator().manual_seed(0)
    first = [caption_to_dialogue("x", again)[0]["question"] for _ in range(20)]
    replay = torch.Generator().manual_seed(0)
    assert first == [caption_to_dialogue("x", replay)[0]["question"] for _ in range(20)]


# --------------------------------------------------------------------------------------------
# R3
# --------------------------------------------------------------------------------------------


def test_round_retaining_is_uniform_over_1_to_R():
    generator = torch.Generator().manual_seed(1)
    draws = 10_000
    counts = Counter(sample_retained_rounds(5, generator) for _ in range(draws))
    assert set(counts) == {1, 2, 3, 4, 5}
    for r in range(1, 6):
        assert abs(counts[r] / draws - 0.2) < 0.02, counts  # std 0.004
    assert {sample_retained_rounds(1, generator) for _ in range(20)} == {1}
    with pytest.raises(ValueError, match="at least one round"):
        sample_retained_rounds(0, generator)


def test_round_retaining_keeps_a_prefix_and_is_seeded():
    rounds = [(f"q{i}", f"a{i}") for i in range(8)]
    draw = lambda seed: [retain_random_rounds(rounds, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(30)]
    first = draw(3)
    assert all(1 <= len(kept) <= 8 and kept == rounds[: len(kept)] for kept in first)
    assert first == draw(3)
    assert [len(k) for k in first] != [len(k) for k in draw(4)]


# --------------------------------------------------------------------------------------------
# Token masking
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_processor):
    """The processor's Llama-3.2 tokenizer (the session fixture: loaded once for the suite)."""
    return tiny_processor.tokenizer


def _padded_batch(generator: torch.Generator, batch: int = 64, length: int = 512):
    """Right-padded ids: BOS, ordinary ids with a few special ids inside, then PAD."""
    ids = torch.randint(0, 128_000, (batch, length), generator=generator)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()  # (B, L)
    ids[:, 0] = BOS_ID
    ids[:, 7] = EOS_ID
    ids[:, 9] = 128_002  # the mask token itself is special
    ids[:, 11] = 128_100  # a reserved special token
    ids[attention_mask == 0] = PAD_ID
    return ids, attention_mask


def test_token_masker_from_llama_tokenizer(tokenizer):
    masker = TokenMasker.from_tokenizer(tokenizer)
    assert masker.mask_token_id == tokenizer.convert_tokens_to_ids(MASK_TOKEN) == 128_002
    assert masker.probability == 0.15
    # Llama 3: 128,000 BPE ids, 256 specials; random ids come from the former only.
    assert masker.random_candidates.numel() == 128_000 and int(masker.random_candidates.max()) == 127_999
    assert {BOS_ID, EOS_ID, PAD_ID, 128_002, 128_255} <= set(masker.special_ids.tolist())


def test_token_masking_rates_and_untouched_positions(tokenizer):
    masker = TokenMasker.from_tokenizer(tokenizer)
    ids, attention_mask = _padded_batch(torch.Generator().manual_seed(0))
    before = ids.clone()
    out = masker(ids, attention_mask, torch.Generator().manual_seed(5))
    assert torch.equal(ids, before), "the input must not be modified in place"

    special = torch.isin(ids, masker.special_ids)
    assert torch.equal(out.eligible, attention_mask.bool() & ~special)
    eligible, selected = int(out.eligible.sum()), int(out.selected.sum())
    assert eligible > 15_000
    assert abs(selected / eligible - 0.15) < 0.01
    masked, randomized = int(out.masked.sum()), int(out.randomized.sum())
    unchanged = selected - masked - randomized
    assert abs(masked / selected - 0.8) < 0.03
    assert abs(randomized / selected - 0.1) < 0.02
    assert abs(unchanged / selected - 0.1) < 0.02

    assert not (out.selected & ~out.eligible).any()
    untouched = ~out.selected
    assert torch.equal(out.input_ids[untouched], ids[untouched])  # specials, BOS, padding, unselected
    assert (out.input_ids[out.masked] == 128_002).all()
    replaced = out.input_ids[out.randomized]
    assert (replaced < 128_000).all() and (replaced >= 0).all()
    assert out.input_ids.shape == ids.shape and out.input_ids.dtype == ids.dtype


def test_token_masking_is_seeded_and_handles_left_padding(tokenizer):
    masker = TokenMasker.from_tokenizer(tokenizer)
    ids, attention_mask = _padded_batch(torch.Generator().manual_seed(1), batch=8, length=64)
    a = masker(ids, attention_mask, torch.Generator().manual_seed(2)).input_ids
    assert torch.equal(a, masker(ids, attention_mask, torch.Generator().manual_seed(2)).input_ids)
    assert not torch.equal(a, masker(ids, attention_mask, torch.Generator().manual_seed(3)).input_ids)
    left_ids, left_mask = ids.flip(1), attention_mask.flip(1)
    out = masker(left_ids, left_mask, torch.Generator().manual_seed(2))
    assert torch.equal(out.input_ids[left_mask == 0], left_ids[left_mask == 0])


def test_token_masking_arguments_are_checked(tokenizer):
    with pytest.raises(ValueError, match="probability"):
        TokenMasker(128_002, [128_000], 128_256, probability=1.5)
    with pytest.raises(ValueError, match="mask_fraction"):
        TokenMasker(128_002, [128_000], 128_256, mask_fraction=0.95, random_fraction=0.1)

    class NoMaskTokenizer:  # a tokenizer without Llama-3's reserved tokens
        all_special_ids = [0]
        added_tokens_decoder: dict = {}
        unk_token_id = 1

        def convert_tokens_to_ids(self, token):
            return 1

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="reserved_special_token_0"):
        TokenMasker.from_tokenizer(NoMaskTokenizer())


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_processor():
    height, width = TINY_IMAGE_SIZE
    return ViTImageProcessor(size={"height": height, "width": width}, image_mean=list(CUHK_MEAN), image_std=list(CUHK_STD))


def _noise_images(count: int = 4, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(150, 60), (97, 41), (64, 32), (200, 90)]
    return [PIL.Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(count)]


def _run(transform, images, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image).as_subclass(torch.Tensor) for image in images])


def test_augmentation_off_equals_the_processor(image_processor):
    images = _noise_images()
    reference = image_processor(images=images, return_tensors="pt")["pixel_values"]
    off = build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=0, padding=0,
                                      erasing_probability=0)
    ours = _run(off, images)
    assert ours.shape == reference.shape == (4, 3, *TINY_IMAGE_SIZE)
    # Same uint8 antialiased resize; only (x/255 - m)/s vs (x - 255 m)/(255 s) rounding differs.
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_augmentation_shapes_dtype_and_reproducibility(image_processor):
    augment = PedestrianImageAugmentation(image_processor)
    images = _noise_images(6) + [PIL.Image.new("L", (30, 70), 128)]
    state = torch.get_rng_state()
    out = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left as it was"
    assert out.shape == (7, 3, *TINY_IMAGE_SIZE) and out.dtype == torch.float32
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(images, torch.Generator().manual_seed(1)))


def test_flip_is_a_horizontal_mirror(image_processor):
    images = _noise_images()
    off = _run(build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=0, padding=0,
                                           erasing_probability=0), images)
    flipped = _run(build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=1.0,
                                               padding=0, erasing_probability=0), images)
    assert torch.equal(flipped, off.flip(-1))


def test_pad_and_crop_is_a_shift_with_black_border(image_processor):
    images = _noise_images()
    off = _run(build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=0, padding=0,
                                           erasing_probability=0), images)
    shifted = _run(build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=0,
                                               padding=10, erasing_probability=0), images, seed=3)
    black = (-torch.tensor(CUHK_MEAN) / torch.tensor(CUHK_STD))[:, None, None]  # 0 after normalisation
    height, width = TINY_IMAGE_SIZE
    shifts = []
    for base, out in zip(off, shifted):
        found = None
        for dy in range(-10, 11):
            for dx in range(-10, 11):
                # out[y, x] = base[y + dy, x + dx] where that is inside, black elsewhere.
                canvas = black.expand(3, height + 20, width + 20).clone()
                canvas[:, 10 : 10 + height, 10 : 10 + width] = base
                window = canvas[:, 10 + dy : 10 + dy + height, 10 + dx : 10 + dx + width]
                if torch.allclose(window, out, atol=1e-6):
                    found = (dy, dx)
                    break
            if found:
                break
        assert found is not None, "the output is not a padded shift of the resized image"
        shifts.append(found)
    assert len(set(shifts)) > 1  # the crop offset is random


def test_random_erasing_fills_a_rectangle_with_the_mean(image_processor):
    images = _noise_images(8)
    off = _run(build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=0, padding=0,
                                           erasing_probability=0), images)
    erased = _run(build_train_image_transform(TINY_IMAGE_SIZE, CUHK_MEAN, CUHK_STD, flip_probability=0,
                                              padding=0, erasing_probability=1.0), images, seed=4)
    height, width = TINY_IMAGE_SIZE
    for base, out in zip(off, erased):
        changed = (out != base).any(dim=0)  # (H, W)
        assert changed.any()
        assert (out[:, changed] == 0).all()  # filled with the mean colour: 0 after normalisation
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(changed.sum()) == int(box), "the erased region must be one rectangle"
        assert 0.02 * height * width - 1 <= int(box) <= 0.4 * height * width + 1
        assert torch.equal(out[:, ~changed], base[:, ~changed])


def test_default_padding_is_the_papers_10_pixels_scaled_to_the_image_width():
    def pads(size):
        transform = build_train_image_transform(size, (0.5,) * 3, (0.5,) * 3)
        return [t.padding for t in transform.transforms if isinstance(t, v2.Pad)]

    assert pads((384, 192)) == [10]  # the paper's pad of 10
    assert pads((64, 32)) == [2]     # not a third of a 32-px-wide person
    assert pads((768, 384)) == [20]
