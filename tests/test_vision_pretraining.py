"""Stage 0, the image tower trained on MALS captions' n-grams and labels (training/vision_pretraining.py): the
targets, the masked loss, the collator's errors. The run through run_stage is in test_run_stage.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diana.processing import build_processor
from diana.training.vision_pretraining import (
    VisionPretrainingCollator,
    VisionPretrainingModel,
    build_ngram_vocabulary,
    caption_ngrams,
)


class _Tower(torch.nn.Module):
    """A stand-in image tower with Swinv2's interface: every pixel is a final token (its 3 channels,
    scaled) and `pooler_output` is their mean."""

    num_features = 3

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))

    def forward(self, pixel_values):
        tokens = pixel_values.flatten(2).transpose(1, 2) * self.scale  # (B, H*W, 3)
        return type("Out", (), {"pooler_output": tokens.mean(dim=1), "last_hidden_state": tokens})()


def test_caption_ngrams_are_the_cleaned_words_and_adjacent_pairs():
    grams = caption_ngrams('A person with LONG blonde hair, wearing a "striped" top.')
    assert {"long", "blonde hair", "long blonde", "striped", "striped top", "a person", "hair"} <= grams
    assert "hair wearing" in grams  # the comma is no word: the pair across it is kept
    assert not any(g != g.lower() or '"' in g or "." in g or "," in g for g in grams)
    assert "long hair" not in grams and "person blonde" not in grams  # pairs are adjacent words only


def test_vocabulary_keeps_the_informative_band_most_frequent_first():
    captions = ["a red top"] * 6 + ["a blue top"] * 3 + ["a green top"]
    vocab = build_ngram_vocabulary(captions, min_fraction=0.2, max_fraction=0.9)
    # "a" and "top" are in every caption (they say nothing), the "green" ones in 10%: all out.
    # Most frequent first, ties alphabetically.
    assert vocab == ["a red", "red", "red top", "a blue", "blue", "blue top"]
    assert build_ngram_vocabulary(captions, min_fraction=0.2, max_fraction=0.9, max_size=2) == ["a red", "red"]
    assert "green" in build_ngram_vocabulary(captions, min_fraction=0.1, max_fraction=0.9)
    with pytest.raises(ValueError, match="none of .* n-grams of 10 captions"):
        build_ngram_vocabulary(captions, min_fraction=0.95, max_fraction=0.97)
    with pytest.raises(ValueError, match="no captions"):
        build_ngram_vocabulary([])
    with pytest.raises(ValueError, match="min_fraction"):
        build_ngram_vocabulary(captions, min_fraction=0.5, max_fraction=0.4)


def test_loss_leaves_unknown_labels_out_and_scales_the_ngram_term_per_target_on():
    torch.manual_seed(0)
    model = VisionPretrainingModel(_Tower(), num_ngrams=4, num_labels=3, ngrams_per_caption=2.0)
    pixels = torch.randn(5, 3, 8, 4)
    ngrams = torch.randint(0, 2, (5, 4)).float()
    labels = torch.tensor([[1, 0, -1], [0, -1, -1], [1, 1, -1], [-1, 0, -1], [0, 0, -1]])
    out = model(pixels, ngrams, labels)
    logits = out["logits"]
    expected_ngram = F.binary_cross_entropy_with_logits(logits[:, :4], ngrams, reduction="sum") / 5 / 2.0
    known = labels >= 0
    expected_label = F.binary_cross_entropy_with_logits(logits[:, 4:][known], labels[known].float())
    torch.testing.assert_close(out["ngram_loss"], expected_ngram)
    torch.testing.assert_close(out["label_loss"], expected_label)
    torch.testing.assert_close(out["loss"], expected_ngram + expected_label)
    # Label 2 is unknown in every row: its head row gets no gradient, the known ones do.
    out["loss"].backward()
    assert torch.all(model.heads["mean"].weight.grad[6] == 0) and model.heads["mean"].weight.grad[4].abs().sum() > 0
    # An unknown label changes nothing whatever its logit: flipping a -1 to 1 would.
    flipped = labels.clone()
    flipped[0, 2] = 1
    assert not torch.allclose(model(pixels, ngrams, flipped)["loss"], out["loss"])


def test_a_batch_without_any_known_label_still_trains_the_ngrams():
    model = VisionPretrainingModel(_Tower(), num_ngrams=2, num_labels=2, ngrams_per_caption=1.0)
    out = model(torch.randn(2, 3, 4, 4), torch.ones(2, 2), torch.full((2, 2), -1))
    assert out["label_loss"].item() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.vision_model.scale.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ngrams_per_caption"):
        VisionPretrainingModel(_Tower(), num_ngrams=2, num_labels=0, ngrams_per_caption=0)


def test_readouts_add_their_losses_and_the_tokens_head_sees_where():
    torch.manual_seed(0)
    model = VisionPretrainingModel(_Tower(), num_ngrams=3, num_labels=2, ngrams_per_caption=1.5,
                                   readouts=("mean", "tokens", "token_max"), num_tokens=8)
    pixels = torch.randn(4, 3, 4, 2)
    ngrams, labels = torch.randint(0, 2, (4, 3)).float(), torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0]])
    out = model(pixels, ngrams, labels)
    tokens = pixels.flatten(2).transpose(1, 2)
    per_readout = {
        "mean": model.heads["mean"](tokens.mean(dim=1)),
        "tokens": model.heads["tokens"](tokens.flatten(1)),
        "token_max": model.heads["token_max"](tokens).amax(dim=1),
    }
    known = labels >= 0
    ngram = sum(F.binary_cross_entropy_with_logits(z[:, :3], ngrams, reduction="sum") / 4 / 1.5 for z in per_readout.values())
    label = sum(F.binary_cross_entropy_with_logits(z[:, 3:][known], labels[known].float()) for z in per_readout.values())
    torch.testing.assert_close(out["ngram_loss"], ngram)
    torch.testing.assert_close(out["label_loss"], label)
    torch.testing.assert_close(out["loss"], ngram + label)
    torch.testing.assert_close(out["logits"], per_readout["mean"])  # the head of what the global vector is made of
    out["loss"].backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in model.heads.values())

    # The same pixels in other places (the mean is unchanged): the tokens head tells them apart.
    moved = pixels.flip(-1)
    assert not torch.allclose(model._logits("tokens", model.vision_model(moved)), per_readout["tokens"])


def test_readouts_are_checked():
    with pytest.raises(ValueError, match="distinct names out of"):
        VisionPretrainingModel(_Tower(), 2, 0, 1.0, readouts=("mean", "pixels"))
    with pytest.raises(ValueError, match="distinct names out of"):
        VisionPretrainingModel(_Tower(), 2, 0, 1.0, readouts=("mean", "mean"))
    with pytest.raises(ValueError, match="needs num_tokens"):
        VisionPretrainingModel(_Tower(), 2, 0, 1.0, readouts=("tokens",))
    model = VisionPretrainingModel(_Tower(), 2, 0, 1.0, readouts=("tokens",), num_tokens=8)
    with pytest.raises(ValueError, match="built for 8 final tokens, the tower gave 6"):
        model(torch.randn(1, 3, 3, 2))


def _rows(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8))
    captions = ["A person with long black hair, a red top.", "Someone with short brown hair.", "A red top and a bag."]
    return [{"image": image, "caption": captions[i % 3], "attributes": [i % 2] * 26 + [-1], "person_id": i,
             "row_index": i} for i in range(n)]


def test_collator_builds_multi_hot_ngrams_labels_and_the_augmented_images():
    processor = build_processor(image_size=(64, 32), profile="pretrain")
    vocab = ["red top", "long", "short", "hair", "bag"]
    collator = VisionPretrainingCollator(processor, vocab, seed=3)
    rows = _rows()
    batch = collator(rows)
    assert batch["pixel_values"].shape == (3, 3, 64, 32)
    assert batch["ngram_targets"].tolist() == [[1, 1, 0, 1, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 1]]
    assert batch["label_targets"][1].tolist() == [1] * 26 + [-1]
    # Training draws are keyed to (seed, epoch, rows): a resumed run sees the same images.
    collator.set_epoch(2)
    torch.testing.assert_close(collator(rows)["pixel_values"], collator(rows)["pixel_values"])
    evaluation = VisionPretrainingCollator(processor, vocab, train=False)
    torch.testing.assert_close(evaluation(rows)["pixel_values"], processor(images=[r["image"] for r in rows],
                                                                            return_tensors="pt")["pixel_values"])


def test_collator_passes_the_erasing_probability_to_the_augmentation():
    processor = build_processor(image_size=(64, 32), profile="pretrain")
    rows = _rows(4)

    def mean_filled(erasing: float) -> list[int]:
        collator = VisionPretrainingCollator(processor, ["red"], seed=3,
                                             image_augmentation_kwargs={"erasing_probability": erasing})
        pixels = collator(rows)["pixel_values"]
        return (pixels == 0).all(dim=1).sum(dim=(1, 2)).tolist()  # pixels set to the mean, per image

    # Erasing fills a rectangle of at least 2% of the image with the mean; noise images have none of their own.
    assert all(n >= 0.02 * 64 * 32 - 1 for n in mean_filled(1.0))
    assert mean_filled(0.0) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"random erasing probability must be in \[0, 1\], got 1.5"):
        VisionPretrainingCollator(processor, ["red"], image_augmentation_kwargs={"erasing_probability": 1.5})


def test_collator_errors_name_the_row():
    processor = build_processor(image_size=(64, 32), profile="pretrain")
    collator = VisionPretrainingCollator(processor, ["red"])
    rows = _rows(2)
    del rows[1]["caption"]
    with pytest.raises(KeyError, match=r"batch row 1 \(.*person_id=1.*\): the row has no 'caption'"):
        collator(rows)
    rows = _rows(2)
    rows[0]["attributes"] = [1, 0]
    with pytest.raises(ValueError, match=r"batch row 0 .*'attributes' must hold 27 labels"):
        collator(rows)
    rows = _rows(2)
    rows[1]["image"] = "/nonexistent/person.jpg"
    with pytest.raises(Exception, match="/nonexistent/person.jpg"):
        collator(rows)
