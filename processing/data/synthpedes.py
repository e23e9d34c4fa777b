"""SynthPedes: procedurally drawn pedestrians in the ChatPedes and MALS on-disk formats.

Identity = a unique combination of visible attributes (hair colour and length, hat, top colour,
sleeves, stripes, lower colour and type, shoes, bag type and colour). Every image of a person
varies in pose, scale, position, background, lighting, a narrow occluding pole and mirroring;
no nuisance hides an attribute entirely. Attributes are drawn as large flat regions from a
well-separated palette at a small native size (128x64 H x W), so a tiny model trained from
scratch on a CPU can learn them.

Dialogues follow ChatPedes: round 1 is "Please describe the person you saw." answered with two
attributes; each later round asks about one attribute not yet mentioned (varied phrasings), so
round 1 is ambiguous among many persons and the full dialogue nearly identifies one. Each entry
keeps its ground truth in an extra `synthpedes` field (the builders ignore extra fields):
`{"attributes": {...}, "revealed": [[names stated in round 1], [round 2], ...] per dialogue}`.

The attribute oracle ranks the test gallery by the number of attributes stated in the first k
rounds that match the image's person: the ceiling a model can reach on this data.

    python -m diana.processing.data.synthpedes --output_dir DIR --persons 200 --images_per_person 3 --rounds 6 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..cli_errors import ArgumentParser, UserInputError, require_range, run_cli
from .synthpedes_attributes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    DESCRIBE_QUESTION,
    MALS_LABELS,
    caption,
    identity_key,
    make_dialogue,
    mals_labels,
    sample_attributes,
    sample_persons,
)
from .synthpedes_drawing import MIN_IMAGE_SIZE, SKIN_TONES, draw_person
from .synthpedes_oracle import attribute_oracle, format_oracle_table


def _save(img: Image.Image, path: str) -> None:
    # compress_level 1: flat regions compress well anyway and level 6 costs ~3x the time.
    img.save(path, format="PNG", compress_level=1)


def generate(
    out_dir: str | os.PathLike,
    persons: int = 200,
    images_per_person: int = 3,
    rounds: int = 6,
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    mals_images: int | None = None,
    mals_files: int = 2,
    two_dialogue_fraction: float = 0.3,
    image_size: tuple[int, int] = (128, 64),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes SynthPedes in the ChatPedes and MALS layouts and returns a summary.

    Layout: `out_dir/chatpedes/{imgs/synth/*.png, train_reid.json, test_reid.json}`,
    `out_dir/mals/{gene_attrs/synth_part*.json, gene_crop/part*/...png}`, `out_dir/oracle.json`,
    `out_dir/summary.json`. Train and test persons are disjoint (ids 1..N, test = the last ones).
    Every image gets 1 dialogue (stored half the time bare, half as a one-element list) or, with
    probability `two_dialogue_fraction`, 2 (a list): both `chats` forms occur.

    Args:
        out_dir: output folder.
        persons: number of identities (train + test).
        images_per_person: images per identity.
        rounds: rounds per dialogue.
        seed: everything is a function of the seed (and the other arguments).
        test_fraction: share of persons in the test split.
        mals_images: MALS-format images, each its own random identity (default persons x images_per_person).
        mals_files: number of `gene_attrs/*.json` files they are spread over.
        two_dialogue_fraction: share of images with two dialogues.
        image_size: (H, W) of the drawn images.
        overwrite: replace existing `chatpedes/` and `mals/` folders in out_dir.
        progress: show progress bars.

    Returns:
        Counts, paths, the oracle and the measured throughput.
    """
    n_test = check_generate_arguments(persons, images_per_person, rounds, test_fraction, image_size)
    mals_images = persons * images_per_person if mals_images is None else mals_images
    people = sample_persons(persons, seed)  # before any folder is replaced: too many persons fail here
    cp_dir, mals_dir = os.path.join(out_dir, "chatpedes"), os.path.join(out_dir, "mals")
    for d in (cp_dir, mals_dir):
        if os.path.exists(d) and os.listdir(d):
            if not overwrite:
                raise FileExistsError(f"{d} exists and is not empty (pass overwrite=True / --overwrite)")
            shutil.rmtree(d)

    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=persons * images_per_person + mals_images, desc="SynthPedes", disable=not progress)
    splits = write_chatpedes(cp_dir, people, n_test, images_per_person, rounds, seed, two_dialogue_fraction,
                             image_size, bar)
    num_parts = write_mals(mals_dir, mals_images, mals_files, seed, image_size, bar)
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    oracle = attribute_oracle(cp_dir, "test")
    with open(os.path.join(out_dir, "oracle.json"), "w", encoding="utf-8") as f:
        json.dump(oracle, f, indent=1)
    n_images = persons * images_per_person + mals_images
    summary = {
        "out_dir": os.path.abspath(out_dir),
        "chatpedes_dir": os.path.abspath(cp_dir),
        "mals_dir": os.path.abspath(mals_dir),
        "seed": seed,
        "rounds": rounds,
        "image_size": list(image_size),
        **{split: {"persons": persons - n_test if split == "train" else n_test, "images": len(entries),
                   "dialogues": sum(len(e["synthpedes"]["revealed"]) for e in entries)}
           for split, entries in splits.items()},
        "mals": {"images": mals_images, "files": num_parts},
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "images_per_minute": round(60 * n_images / max(seconds, 1e-9)),
        "images_per_cpu_minute": round(60 * n_images / max(cpu_seconds, 1e-9)),
        "oracle": oracle,
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def check_generate_arguments(persons: int, images_per_person: int, rounds: int, test_fraction: float,
                             image_size: tuple[int, int]) -> int:
    """Refuses what `generate` cannot draw or split; returns the number of test persons."""
    if persons < 3 or images_per_person < 1 or rounds < 1:
        raise ValueError("need persons >= 3, images_per_person >= 1, rounds >= 1")
    if image_size[0] < MIN_IMAGE_SIZE[0] or image_size[1] < MIN_IMAGE_SIZE[1]:
        raise ValueError(f"image_size {tuple(image_size)}: the figures need at least {MIN_IMAGE_SIZE} (height, width)")
    n_test = max(1, int(round(persons * test_fraction)))
    if persons - n_test < 2:
        raise ValueError(f"test_fraction={test_fraction} leaves {persons - n_test} train persons (need >= 2)")
    return n_test


def write_chatpedes(cp_dir: str, people: list[dict[str, str | None]], n_test: int, images_per_person: int, rounds: int, seed: int,
                    two_dialogue_fraction: float, image_size: tuple[int, int], bar: Any) -> dict[str, list[dict]]:
    """Draws every person's images with their dialogues into the ChatPedes layout (`people`: their
    attributes, person id = position + 1); returns the
    entries of `train_reid.json` and `test_reid.json` (test = the last `n_test` persons)."""
    os.makedirs(os.path.join(cp_dir, "imgs", "synth"), exist_ok=True)
    persons = len(people)
    skins = np.random.default_rng([seed, 2]).integers(len(SKIN_TONES), size=persons)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for p, attrs in enumerate(people):
        pid = p + 1
        split = "train" if p < persons - n_test else "test"
        for k in range(images_per_person):
            rng = np.random.default_rng([seed, 3, pid, k])
            rel = f"synth/{pid:06d}_{k}.png"
            _save(draw_person(attrs, SKIN_TONES[skins[p]], rng, image_size), os.path.join(cp_dir, "imgs", rel))
            n_dialogues = 2 if rng.uniform() < two_dialogue_fraction else 1
            dialogues, revealed = zip(*(make_dialogue(attrs, rounds, rng) for _ in range(n_dialogues)))
            chats: Any = list(dialogues) if n_dialogues == 2 or rng.uniform() < 0.5 else dialogues[0]
            splits[split].append({
                "id": pid, "file_path": rel, "chats": chats,
                "synthpedes": {"attributes": attrs, "revealed": list(revealed)},
            })
            bar.update()
    for split, entries in splits.items():
        with open(os.path.join(cp_dir, f"{split}_reid.json"), "w", encoding="utf-8") as f:
            json.dump(entries, f)
    return splits


def write_mals(mals_dir: str, mals_images: int, mals_files: int, seed: int, image_size: tuple[int, int],
               bar: Any) -> int:
    """Draws `mals_images` images, each its own random identity, with their captions and labels into
    the MALS layout, spread over `mals_files` annotation files; returns the number of files."""
    mrng = np.random.default_rng([seed, 4])
    mals_attrs = [sample_attributes(mrng) for _ in range(mals_images)]
    parts: list[list[dict[str, Any]]] = [[] for _ in range(max(1, mals_files))]
    for i, attrs in enumerate(mals_attrs):
        rng = np.random.default_rng([seed, 5, i])
        part = i % len(parts)
        rel = f"gene_crop/part{part}/{i:07d}.png"
        os.makedirs(os.path.join(mals_dir, os.path.dirname(rel)), exist_ok=True)
        _save(draw_person(attrs, SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], rng, image_size),
              os.path.join(mals_dir, rel))
        parts[part].append({"image": rel, "caption": caption(attrs, rng), "image_id": f"synth_{i:07d}",
                            "label": mals_labels(attrs), "synthpedes": {"attributes": attrs}})
        bar.update()
    os.makedirs(os.path.join(mals_dir, "gene_attrs"), exist_ok=True)
    for j, records in enumerate(parts):
        with open(os.path.join(mals_dir, "gene_attrs", f"synth_part{j}.json"), "w", encoding="utf-8") as f:
            json.dump(records, f)
    return len(parts)


def validate_arguments(args: argparse.Namespace) -> None:
    """Refuses the flags `generate` cannot work with, by their names (before anything is written).

    Raises:
        UserInputError (ValueError), FileExistsError.
    """
    require_range("--persons", args.persons, 3)
    require_range("--images_per_person", args.images_per_person, 1)
    require_range("--rounds", args.rounds, 1)
    require_range("--test_fraction", args.test_fraction, 0.0, 1.0, high_inclusive=False)
    require_range("--mals_images", args.mals_images, 1)
    require_range("--mals_files", args.mals_files, 1)
    if args.image_size[0] < MIN_IMAGE_SIZE[0] or args.image_size[1] < MIN_IMAGE_SIZE[1]:
        raise UserInputError(f"--image_size {args.image_size[0]} {args.image_size[1]}: must be at least "
                             f"{MIN_IMAGE_SIZE[0]} {MIN_IMAGE_SIZE[1]} (height width)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise FileExistsError(f"--output_dir {args.output_dir} is a file, not a folder")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(prog="python -m diana.processing.data.synthpedes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder to write chatpedes/, mals/ and summary.json to")
    parser.add_argument("--persons", type=int, default=200, help="identities (train + test)")
    parser.add_argument("--images_per_person", type=int, default=3, help="images drawn per person")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per dialogue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test_fraction", type=float, default=0.25, help="share of persons in test")
    parser.add_argument("--mals_images", type=int, default=None,
                        help="MALS-layout images (default persons x images_per_person)")
    parser.add_argument("--mals_files", type=int, default=2, help="gene_attrs/*.json files")
    parser.add_argument("--image_size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"),
                        help="drawn image height and width")
    parser.add_argument("--overwrite", action="store_true", help="replace existing chatpedes/ and mals/ folders")
    args = parser.parse_args(argv)
    validate_arguments(args)
    summary = generate(
        args.output_dir, args.persons, args.images_per_person, args.rounds, args.seed, test_fraction=args.test_fraction,
        mals_images=args.mals_images, mals_files=args.mals_files, image_size=tuple(args.image_size), overwrite=args.overwrite,
    )
    o = summary["oracle"]
    print(f"SynthPedes -> {summary['out_dir']}")
    print(f"  train: {summary['train']}  test: {summary['test']}  mals: {summary['mals']}")
    print(f"  {summary['seconds']} s wall ({summary['images_per_minute']} images/minute), {summary['cpu_seconds']} s CPU "
          f"({summary['images_per_cpu_minute']} images per CPU-minute), one process")
    print(f"Attribute oracle ({o['split']}: {o['num_queries']} queries, {o['num_gallery']} gallery images, "
          f"{o['num_persons']} persons; chance R@1 {o['chance_R@1']}%; ties: {o['tie_rule']}):")
    print(format_oracle_table(o))
    return summary


# The names other modules and the tests use, with the module that defines each.
__all__ = [
    "ATTRIBUTES", "ATTRIBUTE_NAMES", "DESCRIBE_QUESTION", "MALS_LABELS", "SKIN_TONES", "attribute_oracle", "draw_person",
    "generate", "identity_key", "main", "sample_attributes",
]


if __name__ == "__main__":
    run_cli(main)
