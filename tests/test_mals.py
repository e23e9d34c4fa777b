"""The MALS builder (processing/mals.py) on SynthPedes output and on broken copies of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pytest

from diana.processing.data.annotations import AnnotationError, MissingImageError
from diana.processing.data.mals import MALS, load_mals
from diana.processing.data.synthpedes import generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), persons=4, images_per_person=1, rounds=2, seed=5, mals_images=15, mals_files=3, progress=False)
    return out / "mals"


@pytest.fixture
def data(synth, tmp_path) -> Path:
    dst = tmp_path / "mals"
    shutil.copytree(synth, dst)
    return dst


def _records(folder: Path, name: str) -> list[dict]:
    return json.loads((folder / "gene_attrs" / name).read_text())


def test_all_files_rows_fields_and_identities(synth, tmp_path):
    ds = load_mals(str(synth), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train"}
    train = ds["train"]
    assert list(train.features) == ["image", "file_path", "image_id", "caption", "attributes", "person_id"]
    assert train.features["attributes"] == datasets.List(datasets.Value("int8"))
    names = sorted(os.listdir(synth / "gene_attrs"))
    assert names == ["synth_part0.json", "synth_part1.json", "synth_part2.json"]
    records = [r for n in names for r in _records(synth, n)]
    assert train.num_rows == len(records) == 15
    # Rows follow sorted file order, then record order; each image is its own identity.
    assert train["person_id"] == list(range(15))
    assert train["image_id"] == [r["image_id"] for r in records]
    assert train["caption"] == [r["caption"] for r in records]
    assert train["attributes"] == [r["label"] for r in records]
    assert all(len(a) == 27 and set(a) <= {1, 0, -1} for a in train["attributes"])
    paths = [x["path"] for x in train.cast_column("image", datasets.Image(decode=False))["image"]]
    for path, rel, rec in zip(paths, train["file_path"], records):
        assert rel == rec["image"] and path == str(synth / rel) and os.path.isfile(path)
    assert train[0]["image"].size == (64, 128)


def test_subset_by_name_or_pattern(synth, tmp_path):
    one = load_mals(str(synth), cache_dir=str(tmp_path / "c"), files=["synth_part1.json"])["train"]
    assert one["image_id"] == [r["image_id"] for r in _records(synth, "synth_part1.json")]
    two = load_mals(str(synth), cache_dir=str(tmp_path / "c"), files=["synth_part[02].json"])["train"]
    assert two.num_rows == len(_records(synth, "synth_part0.json")) + len(_records(synth, "synth_part2.json"))
    assert two["person_id"] == list(range(two.num_rows))
    with pytest.raises(AnnotationError, match="matches 'nope_\\*.json'"):
        load_mals(str(synth), cache_dir=str(tmp_path / "c"), files=["nope_*.json"])


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing label", "entry 2: missing field 'label'"),
        ("short label", "entry 2: field 'label' must have 27 values, got 26"),
        ("label value", "entry 2: field 'label'[4] must be 1, 0 or -1, got 2"),
        ("caption type", "entry 2: field 'caption' must be str, got list"),
        ("image_id type", "entry 2: field 'image_id' must be str or int, got float"),
        ("not an object", "entry 2: entry must be a JSON object, got list"),
    ],
)
def test_bad_records_name_file_and_entry(data, tmp_path, case, expected):
    records = _records(data, "synth_part1.json")
    r = records[2]
    if case == "missing label":
        del r["label"]
    elif case == "short label":
        r["label"] = r["label"][:26]
    elif case == "label value":
        r["label"][4] = 2
    elif case == "caption type":
        r["caption"] = [r["caption"]]
    elif case == "image_id type":
        r["image_id"] = 1.5
    else:
        records[2] = [r]
    (data / "gene_attrs" / "synth_part1.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError) as err:
        load_mals(str(data), cache_dir=str(tmp_path / "cache"))
    assert f"{data / 'gene_attrs' / 'synth_part1.json'}: {expected}" in str(err.value)


def test_malformed_json(data, tmp_path):
    path = data / "gene_attrs" / "synth_part2.json"
    path.write_text(path.read_text() + ",")
    with pytest.raises(AnnotationError, match=r"synth_part2\.json: malformed JSON at line 1"):
        load_mals(str(data), cache_dir=str(tmp_path / "cache"))


def test_missing_image_error_or_counted_skip(data, tmp_path):
    records = _records(data, "synth_part0.json")
    (data / records[1]["image"]).unlink()
    with pytest.raises(MissingImageError, match=f"synth_part0.json: entry 1: image '{records[1]['image']}'"):
        load_mals(str(data), cache_dir=str(tmp_path / "c1"))

    ds, report = load_mals(str(data), cache_dir=str(tmp_path / "c2"), on_missing_image="skip", return_report=True)
    assert ds["train"].num_rows == 14 and records[1]["image_id"] not in ds["train"]["image_id"]
    assert ds["train"]["person_id"] == list(range(14))
    assert report.num_skipped == {"train": 1}
    assert report.skipped["train"][0] == {
        "file": str(data / "gene_attrs" / "synth_part0.json"), "entry_index": 1,
        "file_path": records[1]["image"], "reason": "missing",
    }
    cached = MALS(data_dir=str(data), cache_dir=str(tmp_path / "c2"), on_missing_image="skip")
    cached.download_and_prepare()
    assert cached.report.total_skipped == 1


def test_the_default_check_refuses_zero_byte_and_cut_off_images(data, tmp_path):
    records = _records(data, "synth_part1.json")
    (data / records[2]["image"]).write_bytes(b"")
    cut = data / records[3]["image"]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a copy that stopped half way
    with pytest.raises(MissingImageError, match=f"synth_part1.json: entry 2: image '{records[2]['image']}'.* empty file"):
        load_mals(str(data), cache_dir=str(tmp_path / "c1"))
    ds, report = load_mals(str(data), cache_dir=str(tmp_path / "c2"), on_missing_image="skip", return_report=True)
    assert records[2]["image_id"] not in ds["train"]["image_id"]
    assert records[3]["image_id"] not in ds["train"]["image_id"]
    reasons = [entry["reason"] for entry in report.skipped["train"]]
    assert reasons[0] == "unreadable: empty file (0 bytes)" and len(reasons) == 2 and reasons[1].startswith("unreadable")


def test_cache_notices_changed_annotation_files(data, tmp_path):
    cache = str(tmp_path / "cache")
    assert load_mals(str(data), cache_dir=cache)["train"].num_rows == 15
    path = data / "gene_attrs" / "synth_part0.json"
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records + [dict(records[0], image_id="extra")]))
    train = load_mals(str(data), cache_dir=cache)["train"]
    assert train.num_rows == 16 and "extra" in train["image_id"]


def test_dataset_card_lists_the_builder_fields():
    import yaml

    import diana.hub_cards
    from diana.processing.data.mals import FEATURES

    card = Path(diana.hub_cards.__file__).parent / "dataset_cards" / "mals.md"
    meta = yaml.safe_load(card.read_text().split("---")[1])
    assert [f["name"] for f in meta["dataset_info"]["features"]] == list(FEATURES)
    body = card.read_text()
    for name in FEATURES:
        assert f"| `{name}` |" in body
    assert "Yang, Shuyu" in body
