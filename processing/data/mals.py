"""MALS (Yang et al., ACM MM 2023; the APTM release) as a `datasets` builder.

On disk (the MALS release's layout)::

    data_dir/
      gene_attrs/*.json   91 files; each a list of
                          {"image": "gene_crop/...", "caption": str, "image_id": str|int, "label": [27 x {1,0,-1}]}
      gene_crop/...       images; `image` paths are relative to data_dir

One row per image; each image is its own identity (`person_id` = row index in the built
dataset). Everything is one `train` split (MALS is pretraining data only).

    builder = MALS(data_dir="/data/MALS", files=["*_0.json"])   # a subset by glob or name
    builder.download_and_prepare(); ds = builder.as_dataset()["train"]

Files are read one at a time, so 1.5M records never sit in memory as Python objects.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import datasets
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

NUM_ATTRIBUTES = 27
ATTRIBUTE_VALUES = (1, 0, -1)  # -1 = unknown

_DESCRIPTION = (
    "MALS: 1.5M synthetic pedestrian image-caption pairs with 27 attribute labels, the "
    "pretraining data of APTM (Yang et al., ACM MM 2023). One row per image; each image its own identity."
)
_CITATION = """\
@inproceedings{yang2023towards,
  title={Towards Unified Text-based Person Retrieval: A Large-scale Multi-Attribute and Language Search Benchmark},
  author={Yang, Shuyu and Zhou, Yinan and Zheng, Zhedong and Wang, Yaxiong and Zhu, Li and Wu, Yujiao},
  booktitle={Proceedings of the 31st ACM International Conference on Multimedia},
  year={2023}
}"""

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "file_path": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "attributes": datasets.List(datasets.Value("int8")),
        "person_id": datasets.Value("int64"),
    }
)


@dataclass
class MALSConfig(datasets.BuilderConfig):
    """Options of the MALS builder.

    Attributes:
        files: annotation files to read, as names or glob patterns relative to `gene_attrs/`
            (default: every `*.json`). Order of rows = sorted file names, then file order.
        images_dir: the root image paths are relative to (default: data_dir).
        on_missing_image: "error" (default) or "skip" (skipped rows listed in `builder.report`).
        image_check: "header" (default: the header and the end marker of each image, refusing
            missing, zero-byte, cut-off and over-`MAX_IMAGE_PIXELS` files; ~0.2 ms per image, ~5 min
            for MALS' 1.5M once per build), "exists" (one stat per image, refusing missing and
            zero-byte files) or "full" (decodes every image; ~45 min for MALS on one core). An
            image that passes and still fails to load (damaged inside) is named by the training
            collator, and skipped and counted there under on_missing_image="skip".
    """

    files: list[str] | None = None
    images_dir: str | None = None
    on_missing_image: str = "error"
    image_check: str = "header"


def annotation_files(data_dir: str, files: list[str] | None) -> list[str]:
    """The selected `gene_attrs/*.json` files, sorted; an error when a pattern matches nothing."""
    root = os.path.join(data_dir, "gene_attrs")
    if not os.path.isdir(root):
        raise AnnotationError(f"MALS annotation folder not found: {root}")
    patterns = files or ["*.json"]
    if isinstance(patterns, str):
        patterns = [patterns]
    selected: set[str] = set()
    for pattern in patterns:
        matched = glob.glob(os.path.join(root, pattern))
        if not matched:
            raise AnnotationError(f"MALS: no annotation file in {root} matches {pattern!r}")
        selected.update(os.path.abspath(m) for m in matched)
    return sorted(selected)


def parse_record(record: Any, where: str) -> dict[str, Any]:
    """Validates one MALS record.

    Raises:
        AnnotationError: a missing field, a wrong type, a label list that is not 27 values in {1, 0, -1}.
    """
    image = require(record, "image", str, where)
    if not image:
        raise AnnotationError(f"{where}: field 'image' is empty")
    caption = require(record, "caption", str, where)
    image_id = require(record, "image_id", (str, int), where)
    label = require(record, "label", list, where)
    if len(label) != NUM_ATTRIBUTES:
        raise AnnotationError(f"{where}: field 'label' must have {NUM_ATTRIBUTES} values, got {len(label)}")
    for j, v in enumerate(label):
        if isinstance(v, bool) or not isinstance(v, int) or v not in ATTRIBUTE_VALUES:
            raise AnnotationError(f"{where}: field 'label'[{j}] must be 1, 0 or -1, got {v!r}")
    return {"image": image, "caption": caption, "image_id": str(image_id), "label": label}


class MALS(ReportingBuilder):
    """MALS builder; see the module docstring. The cache key includes the selected annotation
    files' names, sizes and mtimes (hashing ~1 GB of JSON would cost seconds on every load)."""

    BUILDER_CONFIG_CLASS = MALSConfig
    VERSION = datasets.Version("1.0.0")

    def __init__(self, *args: Any, data_dir: str | None = None, hash: str | None = None, **kwargs: Any):
        if data_dir is None:
            raise ValueError("MALS needs data_dir= (the folder holding gene_attrs/ and gene_crop/)")
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
        if hash is None:
            hash = fingerprint(annotation_files(data_dir, kwargs.get("files")), contents=False)
        super().__init__(*args, data_dir=data_dir, hash=hash, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description=_DESCRIPTION, citation=_CITATION, features=FEATURES)

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        files = annotation_files(self.config.data_dir, self.config.files)
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"files": files})]

    def _generate_examples(self, files: list[str]):
        cfg = self.config
        images_dir = os.path.abspath(cfg.images_dir or cfg.data_dir)
        report = SkipReport(cfg.on_missing_image, cfg.image_check)
        person_id = 0
        for path in tqdm(files, desc="MALS files", disable=len(files) < 4):
            for i, record in enumerate(load_json_list(path)):
                where = f"{path}: entry {i}"
                rec = parse_record(record, where)
                image = resolve_image(
                    images_dir, rec["image"], where=where, split="train", entry_index=i, annotation_file=path,
                    image_check=cfg.image_check, on_missing_image=cfg.on_missing_image, report=report,
                )
                if image is None:
                    continue
                yield f"{os.path.basename(path)}_{i}", {
                    "image": image,
                    "file_path": rec["image"],
                    "image_id": rec["image_id"],
                    "caption": rec["caption"],
                    "attributes": rec["label"],
                    "person_id": person_id,
                }
                person_id += 1
        # Set only once every file was read: a failed build leaves no report behind.
        self._report = report
        log_report(report, "MALS")


def load_mals(
    data_dir: str,
    cache_dir: str | None = None,
    files: list[str] | None = None,
    *,
    return_report: bool = False,
    **kwargs: Any,
) -> datasets.DatasetDict | tuple[datasets.DatasetDict, SkipReport | None]:
    """Builds (or reads from the cache) MALS.

    Args:
        data_dir: folder with gene_attrs/ and gene_crop/.
        cache_dir: datasets cache folder (default: the HF datasets cache).
        files: names or glob patterns under gene_attrs/ (default: all `*.json`).
        return_report: also return the skip report.
        **kwargs: MALSConfig options (on_missing_image, image_check, images_dir).

    Returns:
        DatasetDict with one `train` split (and the SkipReport when asked).
    """
    if files is not None:
        kwargs["files"] = sorted(files) if not isinstance(files, str) else [files]
    return MALS(data_dir=data_dir, cache_dir=cache_dir, **kwargs).prepared_splits(return_report)


__all__ = ["MALS", "MALSConfig", "FEATURES", "NUM_ATTRIBUTES", "load_mals", "parse_record"]
