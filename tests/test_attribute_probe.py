"""The SynthPedes attribute probe (training/attribute_probe.py): the probe itself on planted and random
features, the majority baseline, annotation errors naming the entry, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from diana.processing.data.synthpedes import ATTRIBUTE_NAMES, generate
from diana.training.evaluation.attribute_probe import fit_probe, load_synthpedes_split, main, majority_rate


def test_probe_reads_a_planted_attribute_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    directions = torch.randn(3, 16, generator=g)
    features = torch.randn(600, 16, generator=g) * 0.5 + directions[labels]
    names = [f"c{v}" for v in labels.tolist()]
    assert fit_probe(features[:400], names[:400], features[400:], names[400:]) > 0.95
    noise = torch.randn(600, 16, generator=g)  # no information about the labels
    accuracy = fit_probe(noise[:400], names[:400], noise[400:], names[400:])
    assert accuracy < majority_rate(names[:400], names[400:]) + 0.12


def test_a_class_never_seen_in_training_counts_as_an_error():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert fit_probe(x[:2], ["a", "b"], x[2:], ["a", "c"]) == pytest.approx(0.5)


def test_majority_rate_uses_the_training_majority():
    assert majority_rate(["a", "a", "b"], ["b", "b", "a", "c"]) == pytest.approx(0.25)
    # A tie is broken by name, not by set order (which follows the per-process string hash).
    for train in (["long", "short"], ["short", "long"]):
        assert majority_rate(train, ["short", "short", "long"]) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_probe")
    generate(str(root), persons=24, images_per_person=2, rounds=3, seed=5, image_size=(64, 32), progress=False)
    return root / "chatpedes"


def test_annotations_without_the_synthpedes_record_are_named(synth, tmp_path):
    entries = json.loads((synth / "test_reid.json").read_text())
    folder = tmp_path / "plain"
    folder.mkdir()
    del entries[1]["synthpedes"]
    (folder / "test_reid.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"test_reid.json: entry 1 has no 'synthpedes'"):
        load_synthpedes_split(folder, "test", None)
    entries = json.loads((synth / "test_reid.json").read_text())
    entries[2]["synthpedes"]["revealed"].append([["hat"]])
    n = len(entries[2]["synthpedes"]["revealed"]) - 1
    (folder / "test_reid.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"entry 2: {n} dialogues but {n + 1} 'revealed' lists"):
        load_synthpedes_split(folder, "test", None)


def test_command_reports_every_attribute_and_draws_it(synth, tmp_path, tiny_processor):
    from diana.modeling_diana import DiaNAModel
    from tests.helpers import tiny_config

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    DiaNAModel(tiny_config()).save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    report = main(["--model_name_or_path", str(model_dir), "--data_dir", str(synth), "--output_dir", str(tmp_path / "probe")])

    assert list(report) == list(ATTRIBUTE_NAMES)
    test = json.loads((synth / "test_reid.json").read_text())
    for name, row in report.items():
        stating = sum(any(name in stated for stated in rev) for e in test for rev in e["synthpedes"]["revealed"])
        assert row["dialogues"] == stating
        assert 0.0 <= row["image"] <= 1.0 and 0.0 <= row["image_majority"] <= 1.0
        assert ("text" in row) == (stating > 0)  # every attribute is stated in some training dialogue here
    saved = json.loads((tmp_path / "probe" / "attribute_probe.json").read_text())
    assert saved == report
    assert (tmp_path / "probe" / "attribute_probe.png").read_bytes()[:4] == b"\x89PNG"
