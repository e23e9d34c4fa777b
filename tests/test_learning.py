"""Learning check at a small scale: the stage 1 SynthPedes preset (its model, losses and augmentation as
shipped; 400 steps with the warm-up cut to 150) trained for ~80 s of this CPU, must leave the
ln(batch) plateau and retrieve held-out images from their captions far more often than chance. It guards
everything the other tests cannot see learning through: init, losses, collation, augmentation, optimiser
wiring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diana.modeling_diana import DiaNAModel
from diana.processing import build_processor
from diana.training.data.collator import DiaNACollator
from diana.processing.data.mals import load_mals
from diana.processing.data.synthpedes import generate
from diana.training.run_stage import main as run_stage

pytestmark = pytest.mark.xdist_group("learning")  # ~80 s of one worker

STEPS, BATCH, HELD_OUT = 400, 64, 400


def held_out_ranks(model: DiaNAModel, rows: list[dict]) -> torch.Tensor:
    """Rank (0 = first) of each caption's own image among all held-out images."""
    processor = build_processor(profile="pretrain", image_size=(64, 32))
    collate = DiaNACollator(processor, train=False, round_retaining=False, token_masking=0.0,
                            image_augmentation=False, mals_captions=True, max_length=128)
    texts, images = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 100):
            batch = collate(rows[start : start + 100])
            images.append(model.encode_images(batch["pixel_values"]).image_embeds)
            texts.append(model.encode_dialogues(batch["input_ids"], batch["attention_mask"]).text_embeds)
    scores = torch.cat(texts) @ torch.cat(images).t()  # (captions, images), row i's image is column i
    own = scores.diagonal()[:, None]
    return (scores > own).sum(dim=1)


def test_stage1_preset_learns_in_about_a_minute(tmp_path: Path):
    train_dir, held_dir = tmp_path / "train", tmp_path / "held_out"
    # MALS-layout images, each its own random identity; the held-out ones come from another seed.
    generate(str(train_dir), persons=4, images_per_person=1, rounds=2, seed=11, mals_images=3000, progress=False)
    generate(str(held_dir), persons=4, images_per_person=1, rounds=2, seed=12, mals_images=HELD_OUT, progress=False)

    out = tmp_path / "stage1"
    run_stage(["--config", "stage1_synthpedes_small", "--data_dir", str(train_dir / "mals"), "--output_dir", str(out),
               "--cache_dir", str(tmp_path / "cache"), "--max_steps", str(STEPS), "--warmup_steps", "150",
               "--per_device_train_batch_size", str(BATCH), "--logging_steps", "10", "--report_to", "none",
               "--freeze_vision_model", "false",
               "--disable_tqdm", "true"])

    history = [row for row in json.loads((out / "trainer_state.json").read_text())["log_history"] if "itc_loss" in row]
    plateau = math.log(BATCH)  # every caption equally likely: where from-scratch towers first collapse to
    assert history[0]["itc_loss"] > plateau - 0.05
    late = [row["itc_loss"] for row in history[-5:]]
    assert sum(late) / len(late) < plateau - 0.2, history

    model = DiaNAModel.from_pretrained(out).eval()
    rows = list(load_mals(str(held_dir / "mals"), cache_dir=str(tmp_path / "cache_held"))["train"])
    ranks = held_out_ranks(model, rows)
    chance_r10 = 10 / HELD_OUT
    r1, r10 = (ranks == 0).float().mean().item(), (ranks < 10).float().mean().item()
    print(f"learning check: itc {history[0]['itc_loss']} -> {sum(late) / len(late):.3f}; held-out R@1 {r1:.2%} R@10 {r10:.2%} "
          f"median rank {ranks.float().median():.0f} of {HELD_OUT}")
    # Measured on this 2-core CPU (80 s alone): ITC 4.24 -> 2.63, R@1 17% and R@10 71.5% against chance
    # 0.25% and 2.5%, median rank 4 of 400 (chance 200); with last-token pooling instead of the preset's
    # mean: ITC 2.85 at the end, R@1 10.75%, R@10 53%, median 9. With last-token pooling and transformers'
    # default Swinv2 init (0.02 instead of the preset's 0.15) the same check gives R@1 1.75%, R@10 18.75%,
    # median 31 and fails every bound, which leave room for other CPUs. (250 steps were enough before the
    # convolutional stem; with it R@1 at 250 steps was 1.5% for either init, too close to tell them apart.)
    assert r10 >= 12 * chance_r10, (r1, r10)
    assert r1 >= 16 / HELD_OUT, (r1, r10)
    assert ranks.float().median() < 20, ranks.float().median()
