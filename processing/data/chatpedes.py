"""ChatPedes (Bai et al., CVPR 2025) as a `datasets` builder: CUHK-PEDES images + dialogues.

On disk (the layout of the official release)::

    data_dir/
      train_reid.json   [{"id": 1, "file_path": "CUHK01/0363004.png", "chats": ...}, ...]
      test_reid.json
      imgs00/           cam_a/, cam_b/, CUHK01/, CUHK03/, Market/, ... (the `file_path`s are
                        relative to it; `imgs/`, CUHK-PEDES' own name, is found as well, or pass
                        images_dir=...)

`chats` is one dialogue or a list of dialogues; a dialogue is a list of rounds; a round is
`[{"from": "gpt", "value": question}, {"from": "user", "value": answer}]`. Other entry and turn
fields are ignored. One row per dialogue. The validation split is a deterministic set of
held-out train persons (the release has none, and checkpoints must never be chosen on test).

Use the builder directly (datasets 5 has no loading scripts)::

    builder = ChatPedes(data_dir="/data/ChatPedes", cache_dir="/data/hf_cache")
    builder.download_and_prepare()
    ds = builder.as_dataset()          # DatasetDict: train / validation / test
    builder.report                     # images skipped under on_missing_image="skip"

or `load_chatpedes(data_dir)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from .annotations import (
    AnnotationError,
    ReportingBuilder,
    SkipReport,
    fingerprint,
    load_json_list,
    log_report,
    require,
    resolve_image,
)

ANNOTATION_FILES = {"train": "train_reid.json", "test": "test_reid.json"}
# Image folders looked for in data_dir, in order: CUHK-PEDES' own name, then the official ChatPedes
# release's.
IMAGE_FOLDERS = ("imgs", "imgs00")
QUESTIONER, WITNESS = "gpt", "user"

_DESCRIPTION = (
    "ChatPedes: multi-round witness dialogues about CUHK-PEDES pedestrians for chat-based person "
    "retrieval (Bai et al., CVPR 2025). One row per dialogue."
)
_CITATION = """\
@inproceedings{bai2025chat,
  title={Chat-based Person Retrieval via Dialogue-Refined Cross-Modal Alignment},
  author={Bai, Yang and Ji, Yucheng and Cao, Min and Wang, Jinqiao and Ye, Mang},
  booktitle={CVPR},
  year={2025}
}"""

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "file_path": datasets.Value("string"),
        "person_id": datasets.Value("int64"),
        "person_index": datasets.Value("int64"),
        "dialogue": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
        "num_rounds": datasets.Value("int32"),
        "entry_index": datasets.Value("int32"),
        "dialogue_index": datasets.Value("int32"),
    }
)


@dataclass
class ChatPedesConfig(datasets.BuilderConfig):
    """Options of the ChatPedes builder.

    Attributes:
        images_dir: the image root the `file_path`s are relative to (default: the first of
            `IMAGE_FOLDERS` found in data_dir).
        validation_persons: train persons held out as the validation split (0: no validation split).
        validation_seed: seed of the held-out person draw.
        on_missing_image: "error" (default) or "skip" (skipped rows are listed in `builder.report`).
        image_check: "full" (default: decodes every image with the loader training and
            evaluation use, so every accepted image loads; 1-2 min for 37k images on one core, once
            per build),
            "header" (headers and end markers: ~8 s, misses corruption inside a file) or "exists"
            (missing and zero-byte files only). See `_annotations.check_image`.
    """

    images_dir: str | None = None
    validation_persons: int = 200
    validation_seed: int = 0
    on_missing_image: str = "error"
    image_check: str = "full"


def _parse_round(rnd: Any, where: str) -> dict[str, str]:
    if not isinstance(rnd, list) or len(rnd) != 2:
        n = len(rnd) if isinstance(rnd, list) else type(rnd).__name__
        raise AnnotationError(f"{where}: a round must be a list of 2 turns (question, answer), got {n}")
    values = []
    for turn, expected in zip(rnd, (QUESTIONER, WITNESS)):
        speaker = require(turn, "from", str, where)
        value = require(turn, "value", str, where)
        if speaker not in (QUESTIONER, WITNESS):
            raise AnnotationError(f"{where}: unknown speaker {speaker!r} (expected 'gpt' then 'user')")
        if speaker != expected:
            raise AnnotationError(f"{where}: turn from {speaker!r} where {expected!r} was expected (a round is gpt then user)")
        values.append(value)
    return {"question": values[0], "answer": values[1]}


def parse_dialogue(dialogue: Any, where: str) -> list[dict[str, str]]:
    """Validates one ChatPedes dialogue and returns its rounds as question/answer dicts.

    Raises:
        AnnotationError: empty dialogue, malformed round, unknown speaker, wrong order or type;
            the message ends with the 1-based round number.
    """
    if not isinstance(dialogue, list):
        raise AnnotationError(f"{where}: a dialogue must be a list of rounds, got {type(dialogue).__name__}")
    if not dialogue:
        raise AnnotationError(f"{where}: empty dialogue")
    return [_parse_round(rnd, f"{where}, round {r + 1}") for r, rnd in enumerate(dialogue)]


def parse_chats(chats: Any, where: str) -> list[list[dict[str, str]]]:
    """`chats` is one dialogue (a list of rounds, each a list of turn dicts) or a list of dialogues
    (a list of lists of rounds); returns a list of dialogues.

    The form is read from the first element that is not an empty list: a round inside it (a list)
    makes `chats` a list of dialogues, so `[[], [[...], ...]]` is reported as the empty dialogue 0
    rather than as a malformed round. When every element is empty (`[[], []]`) both forms give an
    empty dialogue, reported as dialogue 0.
    """
    if not isinstance(chats, list):
        raise AnnotationError(f"{where}: field 'chats' must be a list, got {type(chats).__name__}")
    if not chats:
        raise AnnotationError(f"{where}: empty dialogue ('chats' is empty)")
    first = next((element for element in chats if element != []), None)
    if first is None or (isinstance(first, list) and isinstance(first[0], list)):
        return [parse_dialogue(d, f"{where}, dialogue {i}") for i, d in enumerate(chats)]
    return [parse_dialogue(chats, f"{where}, dialogue 0")]


def parse_entries(path: str, raw: list[Any] | None = None) -> list[dict[str, Any]]:
    """Validates a ChatPedes annotation file.

    Args:
        path: the annotation file (named in every error).
        raw: its entries when the caller has already read them with `load_json_list` (read once).

    Returns:
        One dict per entry: entry_index, person_id, file_path, dialogues.

    Raises:
        AnnotationError: naming the file, the entry index and the field / dialogue / round.
    """
    entries = []
    for i, entry in enumerate(load_json_list(path) if raw is None else raw):
        where = f"{path}: entry {i}"
        person_id = require(entry, "id", int, where)
        file_path = require(entry, "file_path", str, where)
        if not file_path:
            raise AnnotationError(f"{where}: field 'file_path' is empty")
        dialogues = parse_chats(require(entry, "chats", list, where), where)
        entries.append({"entry_index": i, "person_id": person_id, "file_path": file_path, "dialogues": dialogues})
    return entries


def validation_person_ids(train_person_ids: list[int], n: int, seed: int) -> set[int]:
    """The held-out persons: a seeded draw from the sorted unique train ids (so the split does not
    depend on the entry order in the file)."""
    unique = np.unique(np.asarray(train_person_ids, dtype=np.int64))
    if n < 0 or n >= len(unique):
        raise ValueError(f"validation_persons={n} must be in [0, {len(unique) - 1}] (train has {len(unique)} persons)")
    rng = np.random.default_rng(seed)
    return set(int(p) for p in rng.permutation(unique)[:n])


def find_images_dir(data_dir: str, images_dir: str | None = None) -> str:
    """The folder the `file_path`s are relative to: `images_dir` when given, else the first of
    `IMAGE_FOLDERS` inside `data_dir`.

    Raises:
        FileNotFoundError: naming the folders looked for, what `data_dir` holds, and `images_dir=`.
    """
    if images_dir is not None:
        folder = os.path.abspath(os.path.expanduser(images_dir))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"ChatPedes images_dir={images_dir!r}: {folder} is not a folder")
        return folder
    for name in IMAGE_FOLDERS:
        folder = os.path.join(data_dir, name)
        if os.path.isdir(folder):
            return folder
    present = sorted(n for n in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, n)))
    raise FileNotFoundError(
        f"ChatPedes image folder not found: looked for {' and '.join(repr(n) for n in IMAGE_FOLDERS)} in {data_dir}, "
        f"which holds the folders {present or 'none'}; pass images_dir= (the folder the annotations' file_path "
        "entries such as 'cam_a/...' are relative to)"
    )


class ChatPedes(ReportingBuilder):
    """ChatPedes builder; see the module docstring. The cache key includes a hash of the two
    annotation files' contents, so edited annotations are re-read."""

    BUILDER_CONFIG_CLASS = ChatPedesConfig
    VERSION = datasets.Version("1.0.0")

    def __init__(self, *args: Any, data_dir: str | None = None, hash: str | None = None, **kwargs: Any):
        if data_dir is None:
            raise ValueError("ChatPedes needs data_dir= (the folder holding train_reid.json, test_reid.json, imgs00/)")
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
        if hash is None:
            files = [os.path.join(data_dir, f) for f in ANNOTATION_FILES.values()]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise AnnotationError(f"ChatPedes annotation file(s) not found: {', '.join(missing)}")
            hash = fingerprint(files, contents=True)
        super().__init__(*args, data_dir=data_dir, hash=hash, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description=_DESCRIPTION, citation=_CITATION, features=FEATURES)

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        cfg = self.config
        data_dir = cfg.data_dir
        images_dir = find_images_dir(data_dir, cfg.images_dir)
        parsed = {split: parse_entries(os.path.join(data_dir, f)) for split, f in ANNOTATION_FILES.items()}
        report = SkipReport(cfg.on_missing_image, cfg.image_check)

        all_ids = sorted({e["person_id"] for entries in parsed.values() for e in entries})
        person_index = {p: i for i, p in enumerate(all_ids)}
        overlap = {e["person_id"] for e in parsed["train"]} & {e["person_id"] for e in parsed["test"]}
        if overlap:
            report.notes.append(f"{len(overlap)} person ids occur in both train and test (kept in both)")

        held_out = (
            validation_person_ids([e["person_id"] for e in parsed["train"]], cfg.validation_persons, cfg.validation_seed)
            if cfg.validation_persons
            else set()
        )
        split_entries = {
            "train": [("train", e) for e in parsed["train"] if e["person_id"] not in held_out],
            "validation": [("train", e) for e in parsed["train"] if e["person_id"] in held_out],
            "test": [("test", e) for e in parsed["test"]],
        }
        rows: dict[str, list[dict[str, Any]]] = {}
        total = sum(len(v) for v in parsed.values())
        with tqdm(total=total, desc=f"ChatPedes: checking images ({cfg.image_check})", disable=total < 5000) as bar:
            for split, items in split_entries.items():
                rows[split] = []
                for source, e in items:
                    annotation_file = os.path.join(data_dir, ANNOTATION_FILES[source])
                    path = resolve_image(
                        images_dir, e["file_path"], where=f"{annotation_file}: entry {e['entry_index']}",
                        split=split, entry_index=e["entry_index"], annotation_file=annotation_file,
                        image_check=cfg.image_check, on_missing_image=cfg.on_missing_image, report=report,
                    )
                    bar.update()
                    if path is None:
                        continue
                    for d, dialogue in enumerate(e["dialogues"]):
                        rows[split].append(
                            {
                                "image": path,
                                "file_path": e["file_path"],
                                "person_id": e["person_id"],
                                "person_index": person_index[e["person_id"]],
                                "dialogue": dialogue,
                                "num_rounds": len(dialogue),
                                "entry_index": e["entry_index"],
                                "dialogue_index": d,
                            }
                        )
        self._report = report
        log_report(report, "ChatPedes")
        names = {"train": datasets.Split.TRAIN, "validation": datasets.Split.VALIDATION, "test": datasets.Split.TEST}
        return [
            datasets.SplitGenerator(name=names[split], gen_kwargs={"rows": rows[split]})
            for split in ("train", "validation", "test")
            if split != "validation" or held_out
        ]

    def _generate_examples(self, rows: list[dict[str, Any]]):
        for row in rows:
            yield f"{row['entry_index']}_{row['dialogue_index']}_{row['person_id']}", row


def load_chatpedes(
    data_dir: str, cache_dir: str | None = None, *, return_report: bool = False, **kwargs: Any
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, SkipReport | None]:
    """Builds (or reads from the cache) ChatPedes and returns its splits.

    Args:
        data_dir: folder with train_reid.json, test_reid.json and imgs00/ (or imgs/).
        cache_dir: datasets cache folder (default: the HF datasets cache).
        return_report: also return the skip report.
        **kwargs: ChatPedesConfig options (validation_persons, validation_seed, on_missing_image,
            image_check, images_dir).

    Returns:
        DatasetDict with train / validation / test (and the SkipReport when asked).
    """
    return ChatPedes(data_dir=data_dir, cache_dir=cache_dir, **kwargs).prepared_splits(return_report)


__all__ = ["ChatPedes", "ChatPedesConfig", "FEATURES", "IMAGE_FOLDERS", "find_images_dir", "load_chatpedes",
           "parse_chats", "parse_dialogue", "parse_entries"]
