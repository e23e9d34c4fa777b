"""SynthPedes (processing/data/synthpedes*.py): determinism, formats, visible attributes, the oracle."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from diana.processing.data.chatpedes import load_chatpedes, parse_chats
from diana.processing.data.mals import load_mals
from diana.processing.data.synthpedes import (
    ATTRIBUTES,
    DESCRIBE_QUESTION,
    MALS_LABELS,
    SKIN_TONES,
    attribute_oracle,
    draw_person,
    generate,
    identity_key,
    main,
    sample_attributes,
)
from diana.processing.data.synthpedes_oracle import _expected_ap, _expected_hit_at_k

SUBJECTS = {
    "hair_colour": ["hair"], "hair_length": ["hair"], "hat": ["hat", "cap"], "upper_colour": ["top"],
    "sleeves": ["sleeves"], "pattern": ["top"], "lower_colour": ["lower clothing"],
    "lower_type": ["trousers", "shorts", "skirt"], "shoes": ["shoes"], "bag": ["bag", "backpack"], "bag_colour": ["bag"],
}
KW = dict(persons=20, images_per_person=2, rounds=5, mals_images=8, mals_files=2, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(str(out), seed=11, **KW)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "summary.json"}


def test_same_seed_same_bytes_other_seed_other_data(synth, tmp_path):
    out, _ = synth
    generate(str(tmp_path / "a"), seed=11, **KW)
    generate(str(tmp_path / "b"), seed=12, **KW)
    same, other = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert same == _digest(out)
    assert set(other) == set(same)  # same layout ...
    changed = [k for k in same if same[k] != other[k]]
    assert len(changed) > 0.9 * len(same)  # ... different content
    with pytest.raises(FileExistsError):
        generate(str(tmp_path / "a"), seed=11, **KW)
    generate(str(tmp_path / "a"), seed=11, overwrite=True, **KW)
    assert _digest(tmp_path / "a") == same


def test_identities_splits_and_dialogues(synth):
    out, summary = synth
    train = json.loads((out / "chatpedes" / "train_reid.json").read_text())
    test = json.loads((out / "chatpedes" / "test_reid.json").read_text())
    assert {e["id"] for e in train}.isdisjoint({e["id"] for e in test})
    assert len({e["id"] for e in test}) == summary["test"]["persons"] == 5
    assert len(train) + len(test) == 40
    # Identity = the attribute combination: one combination per id, distinct across ids.
    combos: dict[int, tuple] = {}
    for e in train + test:
        key = identity_key(e["synthpedes"]["attributes"])
        assert combos.setdefault(e["id"], key) == key
    assert len(set(combos.values())) == len(combos) == 20
    forms = set()
    for e in train + test:
        attrs, revealed = e["synthpedes"]["attributes"], e["synthpedes"]["revealed"]
        forms.add(isinstance(e["chats"][0][0], list))
        dialogues = parse_chats(e["chats"], "x")
        assert len(dialogues) == len(revealed) in (1, 2)
        for dialogue, rev in zip(dialogues, revealed):
            assert len(dialogue) == 5 and dialogue[0]["question"] == DESCRIBE_QUESTION
            assert len(rev[0]) == 2 and all(len(r) <= 1 for r in rev[1:])
            stated = [a for r in rev for a in r]
            assert len(stated) == len(set(stated))  # each round reveals something new
            assert all(attrs[a] is not None for a in stated)
            # The answer of each round names the value it reveals (shape words excepted) and,
            # after round 1, its subject, so it reads without the question.
            for r, (rnd, names) in enumerate(zip(dialogue, rev)):
                for a in names:
                    answer = rnd["answer"].lower()
                    if attrs[a] not in ("none", "plain", "striped"):
                        assert attrs[a].split()[-1] in answer
                    if r > 0:
                        assert any(w in answer for w in SUBJECTS[a]), (a, answer)
    assert forms == {True, False}


def test_mals_records_agree_with_attributes(synth):
    out, _ = synth
    records = [r for f in sorted((out / "mals" / "gene_attrs").glob("*.json")) for r in json.loads(f.read_text())]
    assert len(records) == 8
    for r in records:
        a, label = r["synthpedes"]["attributes"], dict(zip(MALS_LABELS, r["label"]))
        assert len(r["label"]) == 27 and (out / "mals" / r["image"]).is_file()
        assert label[f"up{a['upper_colour']}"] == 1 and sum(v for k, v in label.items() if k.startswith("up") and k != "up") == 1
        assert label[f"down{a['lower_colour']}"] == 1
        assert label["backpack"] == (a["bag"] == "backpack") and label["hat"] == (a["hat"] != "none")
        assert label["gender"] == label["age"] == -1
        for v in (a["upper_colour"], a["lower_colour"], a["shoes"], a["hair_colour"], a["lower_type"]):
            assert v in r["caption"]


def test_output_loads_in_both_builders_unchanged(synth, tmp_path):
    out, summary = synth
    ds = load_chatpedes(str(out / "chatpedes"), cache_dir=str(tmp_path), validation_persons=3)
    assert ds["train"].num_rows + ds["validation"].num_rows == summary["train"]["dialogues"]
    assert ds["test"].num_rows == summary["test"]["dialogues"]
    mals = load_mals(str(out / "mals"), cache_dir=str(tmp_path))["train"]
    assert mals.num_rows == 8 and mals[0]["image"].size == (64, 128)


def test_every_attribute_stays_visible_under_nuisance():
    # Same nuisance (same rng seed), one attribute changed: the picture must change visibly
    # (>= 30 pixels by > 40 levels), whatever the pose, pole, lighting or the other attributes.
    for seed in range(30):
        base = sample_attributes(np.random.default_rng([5, seed]))
        ref = np.asarray(draw_person(base, SKIN_TONES[seed % 3], np.random.default_rng(seed)), dtype=int)
        for attr, values in ATTRIBUTES.items():
            for value in values:
                if base[attr] is None or value == base[attr] or (attr == "bag" and "none" in (value, base[attr])):
                    continue
                other = dict(base, **{attr: value})
                img = np.asarray(draw_person(other, SKIN_TONES[seed % 3], np.random.default_rng(seed)), dtype=int)
                changed = int((np.abs(img - ref).max(-1) > 40).sum())
                assert changed >= 30, (seed, attr, base[attr], value, changed)
    # Two images of one person differ (nuisance), and sizes follow image_size.
    a = sample_attributes(np.random.default_rng(0))
    one, two = (np.asarray(draw_person(a, SKIN_TONES[0], np.random.default_rng(s))) for s in (1, 2))
    assert one.shape == (128, 64, 3) and (one != two).any()
    assert draw_person(a, SKIN_TONES[0], np.random.default_rng(1), size=(96, 48)).size == (48, 96)


@pytest.mark.parametrize("n_tie, n_pos", [(1, 1), (3, 1), (4, 2), (6, 3), (7, 1), (5, 5)])
def test_tie_expectations_match_enumeration(n_tie, n_pos):
    # Brute force over every placement of the positives inside the tie block.
    hits = {k: [] for k in (1, 2, 5)}
    aps = []
    for pos in itertools.combinations(range(n_tie), n_pos):
        for k in hits:
            hits[k].append(min(pos) < k)
        aps.append(np.mean([(i + 1) / (r + 1) for i, r in enumerate(sorted(pos))]))
    t, p = np.array([n_tie]), np.array([n_pos])
    for k, h in hits.items():
        assert _expected_hit_at_k(t, p, k)[0] == pytest.approx(np.mean(h))
    assert _expected_ap(t, p)[0] == pytest.approx(np.mean(aps))


def test_oracle_rises_with_rounds_and_matches_a_direct_ranking(synth):
    out, summary = synth
    oracle = attribute_oracle(str(out / "chatpedes"))
    assert oracle == summary["oracle"] == json.loads((out / "oracle.json").read_text())
    r1 = [row["R@1"] for row in oracle["rounds"]]
    assert len(r1) == 5 and all(b >= a for a, b in zip(r1, r1[1:])) and r1[-1] > r1[0]
    assert oracle["num_gallery"] == 10 and oracle["num_queries"] == summary["test"]["dialogues"]

    # Independent check of round 1 R@1: rank by matched stated attributes, average the hit
    # over many random tie orders.
    test = json.loads((out / "chatpedes" / "test_reid.json").read_text())
    rng = np.random.default_rng(0)
    hits = []
    for q in test:
        for rev in q["synthpedes"]["revealed"]:
            stated = rev[0]
            score = np.array([sum(g["synthpedes"]["attributes"][a] == q["synthpedes"]["attributes"][a] for a in stated)
                              for g in test])
            for _ in range(1000):
                order = np.lexsort((rng.random(len(test)), -score))
                hits.append(test[order[0]]["id"] == q["id"])
    assert oracle["rounds"][0]["R@1"] == pytest.approx(100 * np.mean(hits), abs=2.5)


def test_cli_prints_the_oracle_table(tmp_path, capsys):
    main(["--output_dir", str(tmp_path), "--persons", "12", "--images_per_person", "2", "--rounds", "3",
          "--seed", "1", "--mals_images", "3"])
    printed = capsys.readouterr().out
    assert "| round | R@1 | R@5 | R@10 | mAP |" in printed
    assert (tmp_path / "oracle.json").is_file() and (tmp_path / "mals" / "gene_attrs" / "synth_part1.json").is_file()
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    assert f"| 3 | {oracle['rounds'][2]['R@1']:.2f} |" in printed


def test_bad_arguments():
    with pytest.raises(ValueError, match="persons"):
        generate("/nonexistent", persons=2, images_per_person=1, rounds=1, seed=0)
    with pytest.raises(ValueError, match="too many"):
        generate("/nonexistent", persons=10**7, images_per_person=1, rounds=1, seed=0)
