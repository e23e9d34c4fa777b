"""The ChatPedes builder (processing/chatpedes.py) on SynthPedes output and on broken copies of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pytest

from diana.processing.data.annotations import AnnotationError, MissingImageError
from diana.processing.data.chatpedes import ChatPedes, load_chatpedes, parse_chats
from diana.processing.data.synthpedes import generate
from tests.helpers import write_png_bomb


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), persons=16, images_per_person=2, rounds=4, seed=3, mals_images=4, progress=False)
    return out / "chatpedes"


@pytest.fixture
def data(synth, tmp_path) -> Path:
    """A private copy of the ChatPedes folder that a test may break."""
    dst = tmp_path / "chatpedes"
    shutil.copytree(synth, dst)
    return dst


def _entries(folder: Path, split: str) -> list[dict]:
    return json.loads((folder / f"{split}_reid.json").read_text())


def _write(folder: Path, split: str, entries: list[dict]) -> None:
    (folder / f"{split}_reid.json").write_text(json.dumps(entries))


def _dialogues(entry: dict) -> list[list[dict[str, str]]]:
    chats = entry["chats"]
    dialogues = chats if isinstance(chats[0][0], list) else [chats]
    return [[{"question": q["value"], "answer": a["value"]} for q, a in d] for d in dialogues]


def _paths(ds: datasets.Dataset) -> list[str]:
    return [x["path"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def test_rows_fields_and_ids_match_the_annotation_files(synth, tmp_path):
    ds = load_chatpedes(str(synth), cache_dir=str(tmp_path / "cache"), validation_persons=3, validation_seed=1)
    assert set(ds) == {"train", "validation", "test"}
    train_entries, test_entries = _entries(synth, "train"), _entries(synth, "test")
    assert ds["train"].features["dialogue"] == datasets.List(
        {"question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    assert list(ds["train"].features) == [
        "image", "file_path", "person_id", "person_index", "dialogue", "num_rounds", "entry_index", "dialogue_index",
    ]
    # One row per dialogue; train + validation together are exactly train_reid.json.
    n_train = sum(len(_dialogues(e)) for e in train_entries)
    assert ds["train"].num_rows + ds["validation"].num_rows == n_train
    assert ds["test"].num_rows == sum(len(_dialogues(e)) for e in test_entries)

    # Splits are disjoint by person and validation holds exactly the requested number of persons.
    persons = {s: set(ds[s]["person_id"]) for s in ds}
    assert len(persons["validation"]) == 3
    assert not persons["train"] & persons["validation"]
    assert not persons["train"] & persons["test"] and not persons["validation"] & persons["test"]

    # person_index is contiguous over the whole dataset and ordered like person_id.
    all_ids = sorted({e["id"] for e in train_entries + test_entries})
    for split in ds:
        for pid, pidx in zip(ds[split]["person_id"], ds[split]["person_index"]):
            assert all_ids[pidx] == pid

    # Every row reproduces its entry: path, dialogue, round count; images are absolute paths.
    source = {"train": train_entries, "validation": train_entries, "test": test_entries}
    for split in ds:
        rows = ds[split].remove_columns("image")
        for row, path in zip(rows, _paths(ds[split])):
            entry = source[split][row["entry_index"]]
            assert row["person_id"] == entry["id"] and row["file_path"] == entry["file_path"]
            assert row["dialogue"] == _dialogues(entry)[row["dialogue_index"]]
            assert row["num_rounds"] == len(row["dialogue"]) == 4
            assert os.path.isabs(path) and path == str(synth / "imgs" / entry["file_path"])
    assert ds["test"][0]["image"].size == (64, 128)


def test_both_chats_forms_are_read(synth):
    entries = _entries(synth, "train") + _entries(synth, "test")
    single = [e for e in entries if not isinstance(e["chats"][0][0], list)]
    listed = [e for e in entries if isinstance(e["chats"][0][0], list)]
    assert single and listed, "the fixture must exercise both forms"
    where = "x: entry 0"
    assert parse_chats(single[0]["chats"], where) == _dialogues(single[0])
    assert parse_chats(listed[0]["chats"], where) == _dialogues(listed[0])
    # The same dialogue bare or wrapped in a list gives the same rows.
    assert parse_chats(single[0]["chats"], where) == parse_chats([single[0]["chats"]], where)


def test_validation_split_is_deterministic_and_seeded(synth, tmp_path):
    def held_out(seed: int, cache: str) -> set[int]:
        ds = load_chatpedes(str(synth), cache_dir=str(tmp_path / cache), validation_persons=4, validation_seed=seed)
        return set(ds["validation"]["person_id"])

    assert held_out(0, "a") == held_out(0, "b")
    assert held_out(0, "a") != held_out(7, "c")
    ds = load_chatpedes(str(synth), cache_dir=str(tmp_path / "d"), validation_persons=0)
    assert set(ds) == {"train", "test"}
    assert ds["train"].num_rows == sum(len(_dialogues(e)) for e in _entries(synth, "train"))
    with pytest.raises(ValueError, match="validation_persons=99"):
        load_chatpedes(str(synth), cache_dir=str(tmp_path / "e"), validation_persons=99)


def _break(entries: list[dict], case: str) -> str:
    """Breaks entry 3 (or the file) and returns the expected message fragment."""
    e = entries[3]
    dialogue = e["chats"][0] if isinstance(e["chats"][0][0], list) else e["chats"]
    if case == "missing field":
        del e["chats"]
        return "entry 3: missing field 'chats'"
    if case == "wrong type":
        e["id"] = str(e["id"])
        return "entry 3: field 'id' must be int, got str"
    if case == "unknown speaker":
        dialogue[1][1]["from"] = "human"
        return "entry 3, dialogue 0, round 2: unknown speaker 'human'"
    if case == "swapped speakers":
        dialogue[0].reverse()
        return "entry 3, dialogue 0, round 1: turn from 'user' where 'gpt' was expected"
    if case == "empty dialogue":
        e["chats"] = []
        return "entry 3: empty dialogue"
    if case == "empty dialogue in a list":
        e["chats"] = [dialogue, []]
        return "entry 3, dialogue 1: empty dialogue"
    if case == "empty dialogue first in a list":
        e["chats"] = [[], dialogue]  # a list of dialogues (its second holds rounds), not an empty round
        return "entry 3, dialogue 0: empty dialogue"
    if case == "round of one turn":
        dialogue[2] = dialogue[2][:1]
        return "entry 3, dialogue 0, round 3: a round must be a list of 2 turns"
    if case == "answer not a string":
        dialogue[0][1]["value"] = 5
        return "entry 3, dialogue 0, round 1: field 'value' must be str, got int"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing field", "wrong type", "unknown speaker", "swapped speakers", "empty dialogue",
     "empty dialogue in a list", "empty dialogue first in a list", "round of one turn", "answer not a string"],
)
def test_bad_entries_name_file_entry_and_place(data, tmp_path, case):
    entries = _entries(data, "test")
    expected = _break(entries, case)
    _write(data, "test", entries)
    with pytest.raises(AnnotationError) as err:
        load_chatpedes(str(data), cache_dir=str(tmp_path / "cache"), validation_persons=2)
    assert str(data / "test_reid.json") in str(err.value)
    assert expected in str(err.value)


def test_malformed_json_names_the_file_and_line(data, tmp_path):
    text = (data / "train_reid.json").read_text()
    (data / "train_reid.json").write_text(text[: len(text) // 2])
    with pytest.raises(AnnotationError, match=r"train_reid\.json: malformed JSON at line 1 column \d+"):
        load_chatpedes(str(data), cache_dir=str(tmp_path / "cache"))


def test_missing_annotation_file(data, tmp_path):
    (data / "test_reid.json").unlink()
    with pytest.raises(AnnotationError, match="test_reid.json"):
        ChatPedes(data_dir=str(data), cache_dir=str(tmp_path / "cache"))


def test_missing_or_unreadable_image_errors_naming_it(data, tmp_path):
    entries = _entries(data, "test")
    (data / "imgs" / entries[1]["file_path"]).unlink()
    with pytest.raises(MissingImageError, match=f"test_reid.json: entry 1: image '{entries[1]['file_path']}'.* is missing"):
        load_chatpedes(str(data), cache_dir=str(tmp_path / "c1"), validation_persons=2)

    shutil.copy(data / "imgs" / entries[0]["file_path"], data / "imgs" / entries[1]["file_path"])
    (data / "imgs" / entries[2]["file_path"]).write_bytes(b"not a png at all")
    with pytest.raises(MissingImageError, match=f"entry 2: image '{entries[2]['file_path']}'.* is unreadable"):
        load_chatpedes(str(data), cache_dir=str(tmp_path / "c2"), validation_persons=2)
    # "exists" trades that check for speed: the garbage file passes it (a zero-byte file does not).
    ds = load_chatpedes(str(data), cache_dir=str(tmp_path / "c3"), validation_persons=2, image_check="exists")
    assert entries[2]["file_path"] in ds["test"]["file_path"]
    (data / "imgs" / entries[2]["file_path"]).write_bytes(b"")
    with pytest.raises(MissingImageError, match=f"entry 2: image '{entries[2]['file_path']}'.* empty file"):
        load_chatpedes(str(data), cache_dir=str(tmp_path / "c4"), validation_persons=2, image_check="exists")


def _corrupt_inside(path: Path) -> None:
    """Garbles the compressed pixel data but keeps the file's length and its end marker."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = bytes(40)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode, refused", [
    ("exists", {"empty"}),
    ("header", {"empty", "truncated", "bomb"}),
    ("full", {"empty", "truncated", "bomb", "corrupt inside"}),
])
def test_each_check_refuses_what_it_promises_and_the_default_decodes_every_image(data, tmp_path, mode, refused):
    from diana.processing.data.annotations import check_image
    from diana.processing.image_loading import ImageInputError, load_rgb_image

    entries = _entries(data, "test")
    files = {name: data / "imgs" / entries[i]["file_path"] for i, name in
             enumerate(["empty", "truncated", "bomb", "corrupt inside"])}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:-40])
    write_png_bomb(files["bomb"])
    _corrupt_inside(files["corrupt inside"])
    for name, path in files.items():  # every one of them fails where images are loaded
        with pytest.raises(ImageInputError, match=str(path)):
            load_rgb_image(path)
    assert {name for name, path in files.items() if check_image(str(path), mode) is not None} == refused
    if mode == ChatPedes.BUILDER_CONFIG_CLASS.image_check:  # the default accepts only images that load
        ds, report = load_chatpedes(str(data), cache_dir=str(tmp_path / "c"), validation_persons=0,
                                    on_missing_image="skip", return_report=True)
        assert {s["file_path"] for s in report.skipped["test"]} == {entries[i]["file_path"] for i in range(4)}
        for cell in ds["test"].cast_column("image", datasets.Image(decode=False))["image"]:
            load_rgb_image(cell)


def test_the_official_layout_with_imgs00_is_found(data, tmp_path):
    entries = _entries(data, "train")
    (data / "imgs").rename(data / "imgs00")  # the official release: imgs00/cam_a/..., file_path "cam_a/..."
    ds = load_chatpedes(str(data), cache_dir=str(tmp_path / "c1"), validation_persons=0)
    assert _paths(ds["train"])[0] == str(data / "imgs00" / entries[0]["file_path"])

    (data / "imgs00").rename(data / "pictures")
    with pytest.raises(FileNotFoundError) as error:
        load_chatpedes(str(data), cache_dir=str(tmp_path / "c2"), validation_persons=0)
    message = str(error.value)
    assert "'imgs' and 'imgs00'" in message and "['pictures']" in message and "images_dir=" in message
    ds = load_chatpedes(str(data), cache_dir=str(tmp_path / "c3"), validation_persons=0,
                        images_dir=str(data / "pictures"))
    assert _paths(ds["train"])[0] == str(data / "pictures" / entries[0]["file_path"])


def test_skipped_images_are_counted_in_a_persistent_report(data, tmp_path):
    test_entries, train_entries = _entries(data, "test"), _entries(data, "train")
    (data / "imgs" / test_entries[0]["file_path"]).unlink()
    (data / "imgs" / test_entries[2]["file_path"]).write_bytes(b"\x89PNG garbage")
    (data / "imgs" / train_entries[5]["file_path"]).unlink()
    kwargs = dict(cache_dir=str(tmp_path / "cache"), validation_persons=0, on_missing_image="skip")

    ds, report = load_chatpedes(str(data), return_report=True, **kwargs)
    lost = len(_dialogues(test_entries[0])) + len(_dialogues(test_entries[2]))
    assert ds["test"].num_rows == sum(len(_dialogues(e)) for e in test_entries) - lost
    assert report.num_skipped == {"test": 2, "train": 1} and report.total_skipped == 3
    skipped = {(s["file_path"], s["reason"].split(":")[0]) for s in report.skipped["test"]}
    assert skipped == {(test_entries[0]["file_path"], "missing"), (test_entries[2]["file_path"], "unreadable")}
    assert report.skipped["train"][0]["entry_index"] == 5
    assert test_entries[0]["file_path"] not in ds["test"]["file_path"]

    # A second load comes from the cache (no generation) and still has the report.
    builder = ChatPedes(data_dir=str(data), **kwargs)
    builder.download_and_prepare()
    assert builder.report.to_dict() == report.to_dict()


def test_cache_notices_changed_annotation_files(data, tmp_path):
    cache = str(tmp_path / "cache")
    first = ChatPedes(data_dir=str(data), cache_dir=cache, validation_persons=2)
    first.download_and_prepare()
    assert ChatPedes(data_dir=str(data), cache_dir=cache, validation_persons=2).cache_dir == first.cache_dir

    # Same size, same structure: only one answer's letters change.
    entries = _entries(data, "test")
    text = (data / "test_reid.json").read_text()
    old = entries[0]["chats"][0][0][1]["value"] if isinstance(entries[0]["chats"][0][0], list) else entries[0]["chats"][0][1]["value"]
    new = old.replace(old[:3], "XYZ", 1)
    (data / "test_reid.json").write_text(text.replace(json.dumps(old), json.dumps(new), 1))
    assert (data / "test_reid.json").stat().st_size == len(text.encode())

    again = ChatPedes(data_dir=str(data), cache_dir=cache, validation_persons=2)
    assert again.cache_dir != first.cache_dir
    again.download_and_prepare()
    rows = again.as_dataset(split="test").filter(lambda r: r["entry_index"] == 0 and r["dialogue_index"] == 0)
    assert rows[0]["dialogue"][0]["answer"] == new


def test_bad_options_are_rejected(synth, tmp_path):
    with pytest.raises(ValueError, match="on_missing_image"):
        ChatPedes(data_dir=str(synth), cache_dir=str(tmp_path), on_missing_image="ignore")
    with pytest.raises(ValueError, match="image_check"):
        ChatPedes(data_dir=str(synth), cache_dir=str(tmp_path), image_check="deep")
    with pytest.raises(ValueError, match="data_dir"):
        ChatPedes(cache_dir=str(tmp_path))


def test_dataset_card_lists_the_builder_fields():
    import yaml

    import diana.hub_cards
    from diana.processing.data.chatpedes import FEATURES

    card = Path(diana.hub_cards.__file__).parent / "dataset_cards" / "chatpedes.md"
    meta = yaml.safe_load(card.read_text().split("---")[1])
    assert [f["name"] for f in meta["dataset_info"]["features"]] == list(FEATURES)
    assert [s["name"] for s in meta["dataset_info"]["splits"]] == ["train", "validation", "test"]
    body = card.read_text()
    for name in FEATURES:
        assert f"| `{name}` |" in body
    assert "Bai" in body and "Li, Shuang" in body


def test_header_check_tells_a_cut_jpeg_from_one_with_trailing_data(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from diana.processing.data.annotations import check_image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    (tmp_path / "trailer.jpg").write_bytes(jpeg + b"maker notes after the end marker " * 64)
    (tmp_path / "cut.jpg").write_bytes(jpeg[:-100])
    assert check_image(str(tmp_path / "trailer.jpg"), "header") is None
    assert "truncated" in check_image(str(tmp_path / "cut.jpg"), "header")
