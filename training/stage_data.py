"""The training and evaluation rows of one stage (ChatPedes dialogues or MALS captions) and the
image cache's memory check."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from diana.processing.data.chatpedes import load_chatpedes
from diana.processing.data.mals import load_mals
from diana.training.arguments import DataArguments
from diana.training.data.dataset_columns import with_undecoded_images
from diana.training.data.image_augmentation import image_processor_geometry

logger = logging.getLogger("diana.run_stage")


def load_data(data_args: DataArguments):
    """(train, eval or None, data report). The report lists what the builders skipped under
    `--on_missing_image skip` (never a silent drop)."""

    if data_args.data_dir is None:
        raise ValueError("--data_dir is required")

    def chatpedes(data_dir: str):
        splits, skips = load_chatpedes(
            data_dir, cache_dir=data_args.cache_dir, return_report=True,
            validation_persons=data_args.validation_persons, validation_seed=data_args.validation_seed,
            on_missing_image=data_args.on_missing_image,
        )
        return splits, skips

    reports = {}
    if data_args.dataset == "chatpedes":
        splits, reports["chatpedes"] = chatpedes(data_args.data_dir)
        train, evaluation = splits["train"], splits[data_args.eval_split]
    elif data_args.dataset == "mals":
        mals, reports["mals"] = load_mals(data_args.data_dir, cache_dir=data_args.cache_dir, files=data_args.mals_files,
                                          on_missing_image=data_args.on_missing_image, return_report=True)
        train, evaluation = mals["train"], None
        if data_args.eval_data_dir:
            splits, reports["chatpedes"] = chatpedes(data_args.eval_data_dir)
            evaluation = splits[data_args.eval_split]
    else:
        raise ValueError(f"--dataset must be 'chatpedes' or 'mals', got {data_args.dataset!r}")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.eval_max_samples is not None:
        evaluation = evaluation.select(range(min(data_args.eval_max_samples, len(evaluation))))
    report = {name: asdict(r) for name, r in reports.items() if r is not None}
    for name, r in report.items():
        skipped = sum(len(v) for v in r.get("skipped", {}).values())
        if skipped:
            logger.warning("%s: %d images skipped (listed in run_args.json)", name, skipped)
    return train, evaluation, report


def prepare_image_cache(train_dataset, data_args: DataArguments, processor, memory_bytes: int | None = None):
    """Checks that `--image_cache` fits (at most a quarter of this machine's memory, counting every row as its
    own image) and returns the training rows with undecoded images, so only the collator's cache decodes."""
    (height, width), *_ = image_processor_geometry(processor.image_processor)
    need = len(train_dataset) * 3 * height * width
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory_bytes // 4:
        raise ValueError(f"--image_cache would hold up to {need / 2**30:.1f} GiB ({len(train_dataset)} training rows "
                         f"at {height}x{width}), over a quarter of this machine's "
                         f"{memory_bytes / 2**30:.1f} GiB: leave it off for this data set")
    logger.info("image cache: each training image decoded and resized once, up to %.0f MiB", need / 2**20)
    return with_undecoded_images(train_dataset)


def prepare_training_rows(train_dataset, data_args: DataArguments, processor):
    """The training rows as the collator reads them: images left undecoded (the collator decodes, or its
    cache keeps each resized image once) and a stable `row_index` that keys each row's augmentation to
    (seed, epoch, row), so a resumed run draws the same augmentations."""
    if data_args.image_cache and not data_args.image_augmentation:
        # A preset's cache must not make `--image_augmentation false` fail: there is nothing to keep then.
        logger.warning("--image_cache keeps the training image pipeline's resized images: off, as "
                       "--image_augmentation is false")
        data_args.image_cache = False
    if data_args.image_cache:
        train_dataset = prepare_image_cache(train_dataset, data_args, processor)
    else:
        # The collator decodes, naming a file that fails (and skipping it under --on_missing_image skip);
        # `datasets` would decode on row access, where a truncated file fails without its name.
        train_dataset = with_undecoded_images(train_dataset)
    return train_dataset.add_column("row_index", list(range(len(train_dataset))))
