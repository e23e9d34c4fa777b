"""DiaNACollator (processing/collator.py) on rows of tiny `datasets.Dataset`s with an Image()
column: output contract, R3 / token masking / image augmentation switched on only in training,
MALS captions, counted truncation, image errors naming the file, length column, Trainer use."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from diana.processing.image_loading import ImageInputError
from diana.training.data.augmentation import MALS_QUESTIONS
from diana.training.data.collator import DiaNACollator
from diana.training.data.dataset_columns import add_length_column, dialogue_length, with_undecoded_images
from diana.training.data.image_augmentation import build_train_image_transform
from tests.helpers import BOS_ID, PAD_ID, TINY_IMAGE_SIZE

ANSWERS = ["A woman in a red coat.", "Yes, a black backpack.", "She wears white shoes!", "Long dark hair."]
QUESTIONS = ["Please describe the person you saw.", "Was she carrying a bag?", "What shoes?", "And her hair?"]


def _dialogue(num_rounds: int, tag: int) -> list[dict[str, str]]:
    return [{"question": QUESTIONS[k], "answer": f"{ANSWERS[k]} ({tag})"} for k in range(num_rounds)]


def _write_images(folder, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        height, width = (90 + 7 * i, 40 + 3 * i)
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(array)
        if i % 3 == 1:
            image = image.convert("L")  # grey: must come out RGB
        elif i % 3 == 2:
            image = image.convert("RGBA")
            image.putalpha(PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        path = folder / f"cam_a/{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def chatpedes(tmp_path_factory) -> datasets.Dataset:
    """Six ChatPedes-like rows (the builder's columns), 1..4 rounds, person_index != person_id."""
    folder = tmp_path_factory.mktemp("chatpedes")
    paths = _write_images(folder, 6)
    rounds = [1, 4, 2, 3, 4, 1]
    features = datasets.Features({
        "image": datasets.Image(),
        "file_path": datasets.Value("string"),
        "person_id": datasets.Value("int64"),
        "person_index": datasets.Value("int64"),
        "dialogue": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
        "num_rounds": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(
        {
            "image": paths,
            "file_path": ["/".join(p.split("/")[-2:]) for p in paths],
            "person_id": [100, 100, 205, 205, 307, 411],
            "person_index": [0, 0, 1, 1, 2, 3],
            "dialogue": [_dialogue(r, i) for i, r in enumerate(rounds)],
            "num_rounds": rounds,
        },
        features=features,
    )


@pytest.fixture(scope="module")
def mals(tmp_path_factory) -> datasets.Dataset:
    folder = tmp_path_factory.mktemp("mals")
    paths = _write_images(folder, 3)
    long_caption = " ".join(["Tall"] * 70)
    return datasets.Dataset.from_dict(
        {"image": paths, "caption": ['A Woman (20s) in a "Red" coat.', "The man: black; pants!", long_caption],
         "person_id": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "person_id": datasets.Value("int64")}),
    )


def _paths(dataset) -> list[str]:
    return [cell["path"] for cell in with_undecoded_images(dataset)["image"]]


def _rows(dataset, indices=None):
    return [dataset[i] for i in (range(len(dataset)) if indices is None else indices)]


def _all_on(processor, train: bool, **kwargs) -> DiaNACollator:
    return DiaNACollator(processor, train=train, round_retaining=True, token_masking=0.15,
                         image_augmentation=True, **kwargs)


# --------------------------------------------------------------------------------------------
# Output contract and evaluation path
# --------------------------------------------------------------------------------------------


def test_eval_batch_is_the_processor_output(tiny_processor, chatpedes):
    rows = _rows(chatpedes)
    collator = _all_on(tiny_processor, train=False)  # every switch on, but evaluation
    state = torch.get_rng_state()
    batch = collator(rows)
    assert torch.equal(torch.get_rng_state(), state), "evaluation must not draw random numbers"
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "person_ids"}
    assert batch["pixel_values"].shape == (6, 3, *TINY_IMAGE_SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["person_ids"].dtype == torch.long and batch["person_ids"].tolist() == [0, 0, 1, 1, 2, 3]

    reference = tiny_processor(images=_paths(chatpedes),
                               dialogues=[row["dialogue"] for row in rows])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["input_ids"], reference["input_ids"])  # full dialogues, no noise
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert (batch["input_ids"][:, 0] == BOS_ID).all()
    assert collator.statistics.images_augmented == 0 and collator.statistics.tokens_selected == 0


def test_official_tokenisation_batches_hold_the_dialogues_alone(tiny_processor, chatpedes):
    import copy

    official = copy.copy(tiny_processor)
    official.tokenization = "official"
    rows = _rows(chatpedes)
    batch = _all_on(official, train=False)(rows)
    reference = official(dialogues=[row["dialogue"] for row in rows])  # each dialogue's own official ids
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert not torch.equal(reference["input_ids"], tiny_processor(dialogues=[row["dialogue"] for row in rows])["input_ids"])
    with pytest.raises(ValueError, match="tokenization='rounds'"):
        _all_on(official, train=False, return_round_ends=True)


def test_decoded_and_undecoded_rows_agree(tiny_processor, chatpedes):
    collator = _all_on(tiny_processor, train=False)
    decoded = collator(_rows(chatpedes))
    undecoded = collator(_rows(with_undecoded_images(chatpedes)))
    for key in decoded:
        assert torch.equal(decoded[key], undecoded[key]), key


def test_round_ends_are_returned_on_request(tiny_processor, chatpedes):
    batch = _all_on(tiny_processor, train=False, return_round_ends=True)(_rows(chatpedes))
    assert batch["num_rounds"].tolist() == chatpedes["num_rounds"]
    assert batch["round_end_positions"].shape == batch["round_truncated"].shape == (6, 4)
    last = batch["attention_mask"].sum(1) - 1
    assert torch.equal(batch["round_end_positions"][:, -1], last)


def test_person_id_is_used_without_person_index(tiny_processor, chatpedes):
    rows = [{k: v for k, v in row.items() if k != "person_index"} for row in _rows(chatpedes, [2, 4])]
    collator = _all_on(tiny_processor, train=False)
    assert collator(rows)["person_ids"].tolist() == [205, 307]
    del rows[1]["person_id"]
    with pytest.raises(KeyError, match="batch row 1.*neither 'person_index' nor 'person_id'"):
        collator(rows)


# --------------------------------------------------------------------------------------------
# R3
# --------------------------------------------------------------------------------------------


def test_round_retaining_draws_every_prefix_uniformly(tiny_processor, chatpedes):
    row = chatpedes[1]  # 4 rounds
    collator = DiaNACollator(tiny_processor, train=True, round_retaining=True, token_masking=0.0,
                             image_augmentation=False, seed=0, return_round_ends=True)
    kept = []
    for _ in range(4):
        batch = collator([row] * 100)
        kept += batch["num_rounds"].tolist()
        for r in set(batch["num_rounds"].tolist()):
            prefix = tiny_processor(dialogues=[row["dialogue"]], max_rounds=r)["input_ids"][0]
            assert torch.equal(batch["input_ids"][batch["num_rounds"] == r][0, : len(prefix)], prefix)
    counts = Counter(kept)
    assert set(counts) == {1, 2, 3, 4}
    assert all(70 <= counts[r] <= 130 for r in counts), counts  # 100 expected, std ~8.7
    assert collator.statistics.rounds_available == 1600 and collator.statistics.rounds_kept == sum(kept)

    # Off when asked, and off at evaluation whatever the switch says.
    for off in (DiaNACollator(tiny_processor, train=True, round_retaining=False, token_masking=0.0,
                              image_augmentation=False, return_round_ends=True),
                _all_on(tiny_processor, train=False, return_round_ends=True)):
        assert set(off([row] * 20)["num_rounds"].tolist()) == {4}


def test_training_randomness_is_reproducible(tiny_processor, chatpedes):
    rows = _rows(chatpedes)
    first = _all_on(tiny_processor, train=True, seed=3)(rows)
    again = _all_on(tiny_processor, train=True, seed=3)(rows)
    other = _all_on(tiny_processor, train=True, seed=4)(rows)
    for key in ("input_ids", "pixel_values"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    # seed=None follows torch's global generator (the Trainer's seed, restored on resume).
    follow = _all_on(tiny_processor, train=True)
    torch.manual_seed(11)
    a = follow(rows)
    torch.manual_seed(11)
    b = follow(rows)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


# --------------------------------------------------------------------------------------------
# Token masking
# --------------------------------------------------------------------------------------------


def test_token_masking_only_touches_attended_non_special_tokens(tiny_processor, chatpedes):
    rows = _rows(chatpedes) * 8  # 48 dialogues, ~4,000 eligible tokens
    clean = DiaNACollator(tiny_processor, train=False, round_retaining=False, token_masking=0.0,
                          image_augmentation=False)(rows)
    collator = DiaNACollator(tiny_processor, train=True, round_retaining=False, token_masking=0.15,
                             image_augmentation=False, seed=0)
    noisy = collator(rows)
    assert torch.equal(noisy["attention_mask"], clean["attention_mask"])
    changed = noisy["input_ids"] != clean["input_ids"]
    assert not changed[clean["attention_mask"] == 0].any()  # padding
    assert not changed[:, 0].any()  # BOS
    assert (noisy["input_ids"][clean["attention_mask"] == 0] == PAD_ID).all()

    stats = collator.statistics
    eligible = int(((clean["attention_mask"] == 1) & (clean["input_ids"] < 128_000)).sum())
    assert stats.tokens_eligible == eligible
    assert abs(stats.tokens_selected / eligible - 0.15) < 0.03
    assert int((noisy["input_ids"] == 128_002).sum()) == stats.tokens_masked
    assert abs(stats.tokens_masked / stats.tokens_selected - 0.8) < 0.07
    # 90% of the selected ids change (a random id equal to the old one is a 1/128,000 event).
    assert abs(int(changed.sum()) / stats.tokens_selected - 0.9) < 0.06

    off = DiaNACollator(tiny_processor, train=True, round_retaining=False, token_masking=0.0,
                        image_augmentation=False, seed=0)
    assert torch.equal(off(rows)["input_ids"], clean["input_ids"])
    with pytest.raises(ValueError, match="token_masking"):
        DiaNACollator(tiny_processor, train=True, round_retaining=False, token_masking=1.5, image_augmentation=False)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def test_image_augmentation_switch(tiny_processor, chatpedes):
    rows = _rows(chatpedes)
    reference = _all_on(tiny_processor, train=False)(rows)["pixel_values"]
    plain = DiaNACollator(tiny_processor, train=True, round_retaining=True, token_masking=0.15,
                          image_augmentation=False, seed=0)
    assert torch.equal(plain(rows)["pixel_values"], reference)  # augmentation off = the processor
    augmenting = _all_on(tiny_processor, train=True, seed=0)
    augmented = augmenting(rows)["pixel_values"]
    assert augmented.shape == reference.shape and augmented.dtype == torch.float32
    assert not torch.allclose(augmented, reference)
    assert augmenting.statistics.images_augmented == 6


def test_augmentation_pipeline_off_matches_the_real_processor(tiny_processor, chatpedes):
    """Grey and transparent images included: both paths must start from the same RGB pixels."""
    from diana.processing.image_loading import load_rgb_pil
    from diana.training.data.image_augmentation import image_processor_geometry

    size, mean, std, _ = image_processor_geometry(tiny_processor.image_processor)
    assert size == TINY_IMAGE_SIZE
    off = build_train_image_transform(size, mean, std, flip_probability=0, padding=0, erasing_probability=0)
    paths = chatpedes["image"]  # decoded PIL images of modes RGB, L, RGBA
    ours = torch.stack([off(load_rgb_pil(image)).as_subclass(torch.Tensor) for image in paths])
    reference = tiny_processor(images=list(paths))["pixel_values"]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_corrupt_image_error_names_the_file_and_row(tiny_processor, chatpedes, tmp_path):
    broken = tmp_path / "cam_b" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    rows = _rows(with_undecoded_images(chatpedes), [0, 1])
    rows[1] = dict(rows[1], image={"path": str(broken), "bytes": None})
    with pytest.raises(ImageInputError, match=r"broken\.jpg.*batch row 1.*person_index=0"):
        _all_on(tiny_processor, train=True, seed=0)(rows)
    rows[1] = dict(rows[1], image=None)
    with pytest.raises(ImageInputError, match="missing"):
        _all_on(tiny_processor, train=False)(rows)


def test_image_cache_gives_the_same_batches_and_decodes_each_image_once(tiny_processor, chatpedes, monkeypatch):
    import diana.training.data.collator as collator_module

    loads = Counter()
    real_load = collator_module.load_rgb_pil

    def counting_load(value, *, where=None):
        loads[str(value["path"] if isinstance(value, dict) else getattr(value, "filename", value))] += 1
        return real_load(value, where=where)

    monkeypatch.setattr(collator_module, "load_rgb_pil", counting_load)
    plain = _all_on(tiny_processor, train=True, seed=5)
    cached = _all_on(tiny_processor, train=True, seed=5, image_cache=True)
    undecoded = with_undecoded_images(chatpedes)
    # Grey and transparent files among them; rows 0-1 and 2-3 repeat in later batches, in other orders;
    # a row as bytes (an archive's cell) and a decoded PIL image are keyed too.
    with_bytes = dict(undecoded[4], image={"path": "elsewhere/004.png", "bytes": open(_paths(chatpedes)[4], "rb").read()})
    batches = [[0, 1, 2], [3, 2, 1, 0], [5, 0, 4], [1, 1, 3]]
    wants = [plain(_rows(undecoded, indices)) for indices in batches]
    assert sum(loads.values()) == 13  # without the cache: every draw
    loads.clear()
    for indices, want in zip(batches, wants):
        got = cached(_rows(undecoded, indices))
        for key in want:
            assert torch.equal(want[key], got[key]), key
    assert list(loads.values()) == [1] * 6 and len(cached._images) == 6  # with it: first sight only
    loads.clear()
    want, got = plain([with_bytes, chatpedes[2]]), cached([with_bytes, chatpedes[2]])
    assert torch.equal(want["pixel_values"], got["pixel_values"])
    cached([with_bytes, chatpedes[2]])
    # Bytes keyed by content (loaded by plain, then once by cached); the decoded image of row 2 by its file
    # name, already cached from the undecoded rows (loaded by plain only).
    assert len(cached._images) == 7 and loads["elsewhere/004.png"] == 2 and loads[_paths(chatpedes)[2]] == 1
    # A corrupt file still fails on first sight, naming it.
    with pytest.raises(ImageInputError, match="broken"):
        cached([dict(undecoded[0], image={"path": "/nonexistent/broken.png", "bytes": None})])
    with pytest.raises(ValueError, match="image_augmentation=True"):
        DiaNACollator(tiny_processor, train=True, round_retaining=False, token_masking=0.0, image_augmentation=False,
                      image_cache=True)
    with pytest.raises(ValueError, match="train=True"):
        _all_on(tiny_processor, train=False, image_cache=True)


# --------------------------------------------------------------------------------------------
# MALS captions, truncation
# --------------------------------------------------------------------------------------------


def test_mals_captions_are_cleaned_and_wrapped(tiny_processor, mals):
    rows = _rows(mals)
    with pytest.raises(ValueError, match="mals_captions=True"):
        _all_on(tiny_processor, train=False)(rows)

    evaluation = DiaNACollator(tiny_processor, train=False, round_retaining=True, token_masking=0.15,
                               image_augmentation=True, mals_captions=True)
    batch = evaluation(rows)
    assert batch["person_ids"].tolist() == [0, 1, 2]
    expected = [[{"question": MALS_QUESTIONS[0], "answer": "a woman 20s in a red coat"}],
                [{"question": MALS_QUESTIONS[0], "answer": "the man black pants"}],
                [{"question": MALS_QUESTIONS[0], "answer": " ".join(["tall"] * 56)}]]
    assert torch.equal(batch["input_ids"], tiny_processor(dialogues=expected)["input_ids"])
    assert evaluation.statistics.captions == 3 and evaluation.statistics.captions_cut == 1

    training = DiaNACollator(tiny_processor, train=True, round_retaining=True, token_masking=0.0,
                             image_augmentation=False, mals_captions=True, seed=0)
    row = rows[0]
    texts = set()
    for _ in range(3):
        batch = training([row] * 30)
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            texts.add(tiny_processor.decode(ids[mask.bool()], skip_special_tokens=True))
    assert len(texts) >= 5  # questions drawn from the pool of 7
    assert all("USER: a woman 20s in a red coat" in text for text in texts)
    asked = {q for q in MALS_QUESTIONS if any(f"ASSISTANT: {q}\nUSER:" in t for t in texts)}
    assert len(asked) == len(texts)  # every text asks one question of the pool


def test_truncation_is_counted(tiny_processor, chatpedes):
    rows = _rows(chatpedes)
    full = _all_on(tiny_processor, train=False)(rows)["attention_mask"].sum(1)
    limit = int(full.min()) + 5
    collator = DiaNACollator(tiny_processor, train=False, round_retaining=False, token_masking=0.0,
                             image_augmentation=False, max_length=limit)
    batch = collator(rows)
    assert batch["input_ids"].shape[1] == limit
    assert collator.statistics.dialogues_truncated == int((full > limit).sum()) > 0
    collator(rows)
    assert collator.reset_statistics().dialogues_truncated == 2 * int((full > limit).sum())
    assert collator.statistics.samples == 0
    per_batch = DiaNACollator(tiny_processor, train=False, round_retaining=False, token_masking=0.0,
                              image_augmentation=False, max_length=limit, return_statistics=True)(rows)
    assert int(per_batch["collator_statistics"]["dialogues_truncated"]) == int((full > limit).sum())


# --------------------------------------------------------------------------------------------
# Lengths, DataLoader workers, Trainer
# --------------------------------------------------------------------------------------------


def test_length_column_matches_collated_lengths(tiny_processor, chatpedes, mals):
    with_lengths = add_length_column(chatpedes, tiny_processor)
    collated = _all_on(tiny_processor, train=False)(_rows(chatpedes))["attention_mask"].sum(1).tolist()
    assert with_lengths["length"][:] == collated
    assert dialogue_length(chatpedes[1], tiny_processor) == collated[1]
    assert add_length_column(chatpedes, tiny_processor, max_length=70)["length"][:] == [min(n, 70) for n in collated]
    mals_lengths = add_length_column(mals, tiny_processor)["length"][:]
    evaluation = DiaNACollator(tiny_processor, train=False, round_retaining=False, token_masking=0.0,
                               image_augmentation=False, mals_captions=True)
    assert mals_lengths == evaluation(_rows(mals))["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("seed", [None, 5])
def test_dataloader_workers_draw_different_augmentations(tiny_processor, chatpedes, seed):
    same_row = datasets.Dataset.from_list([chatpedes[1]] * 4, features=chatpedes.features)
    collator = _all_on(tiny_processor, train=True, seed=seed)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(with_undecoded_images(same_row), batch_size=2, num_workers=2,
                                         collate_fn=collator, multiprocessing_context="fork")
    first, second = list(loader)  # one batch from each worker
    assert not torch.equal(first["pixel_values"], second["pixel_values"])


def test_trainer_runs_with_the_collator(tiny_processor, chatpedes, tmp_path):
    from transformers import Trainer, TrainingArguments

    from diana.modeling_diana import DiaNAModel
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    collator = _all_on(tiny_processor, train=True)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, remove_unused_columns=False,
        label_names=[], train_sampling_strategy="group_by_length", report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )
    dataset = with_undecoded_images(add_length_column(chatpedes, tiny_processor))
    trainer = Trainer(model=DiaNAModel(tiny_config()), args=args, train_dataset=dataset, data_collator=collator)
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert collator.statistics.batches == 2 and collator.statistics.samples == 6
