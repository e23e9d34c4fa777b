"""Evaluation only: a saved or converted DiaNA folder + a dataset folder -> the per-round report.

    python -m diana.training.evaluation.evaluate_model --model_name_or_path outputs/main_job/stage2 \\
        --data_dir outputs/main_job/synthpedes/chatpedes --split test --batch_size 64

Prints the per-round table (every score mode) and writes `eval_results.json`,
`per_round_curves.png` and `round_table.md` to `--output_dir`. The same protocol as
`DiaNATrainer.evaluate`, without training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from diana.hub_cards.evaluation_report import format_round_table, write_results
from diana.modeling_diana.configuration_diana import SCORE_MODES
from diana.processing.cli_errors import (
    UserInputError,
    require_choice,
    require_choices,
    require_device,
    require_model_folder,
    require_path,
    require_range,
    run_cli,
)
from diana.processing.data.chatpedes import load_chatpedes
from diana.processing.data.mals import load_mals
from diana.processing.model_loading import DTYPES, load_model_and_processor
from diana.training.arguments import OneLineHfArgumentParser
from diana.training.data.augmentation import caption_to_dialogue

from .protocol import evaluate_retrieval

logger = logging.getLogger(__name__)

DATASETS = ("chatpedes", "mals")
# The splits each data set's builder makes (ChatPedes: validation = held-out train persons).
SPLITS = {"chatpedes": ("test", "validation"), "mals": ("train",)}
TABLE_FILE = "round_table.md"


def _arg(default: Any = MISSING, help: str = "", **metadata: Any) -> Any:  # noqa: A002 (argparse's name)
    """A dataclass field with its `--help` text (HfArgumentParser reads `metadata`)."""
    metadata["help"] = help
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EvaluateModelArguments:
    """Arguments of `python -m diana.training.evaluation.evaluate_model` (`diana evaluate`)."""

    model_name_or_path: str = _arg(help="A DiaNA folder written by save_pretrained (training output, converted "
                                        "official checkpoint, Hub export) or a Hub repository id.")
    data_dir: str = _arg(help="Dataset folder: ChatPedes layout (train_reid.json, test_reid.json, imgs/) or MALS "
                              "layout (gene_attrs/, gene_crop/).")
    dataset: str = _arg("chatpedes", "chatpedes or mals (MALS captions become one-round dialogues).",
                        choices=list(DATASETS))
    split: str | None = _arg(None, "ChatPedes: test (default) or validation (held-out train persons, as in "
                                   "training); MALS: train (its only split).")
    batch_size: int = _arg(32, "Images / dialogues per encoder call.")
    output_dir: str | None = _arg(None, "Where to write the report (default: "
                                        "eval_<model folder name>_<dataset>_<split> in the working directory).")
    score_modes: list[str] = _arg(lambda: list(SCORE_MODES), "Score modes: global attribute fused.")
    max_rounds: int | None = _arg(None, "Report rounds 1..k only (the full dialogue is always reported).")
    max_samples: int | None = _arg(None, "Evaluate the first N rows of the split only (quick checks; the "
                                         "gallery shrinks with it).")
    validation_persons: int | None = _arg(None, "ChatPedes validation split size in persons (use the training "
                                                "run's value).")
    validation_seed: int | None = _arg(None, "ChatPedes validation split seed (use the training run's value).")
    cache_dir: str | None = _arg(None, "datasets cache folder.")
    reference: str | None = _arg(None, "JSON file of a reference curve printed side by side (e.g. SynthPedes "
                                       "oracle.json).")
    device: str | None = _arg(None, "cuda / cpu / cuda:1 ... (default: cuda if available).")
    revision: str | None = _arg(None, "Hub revision (branch, tag or commit) of a repository id.")
    dtype: str = _arg("auto", "auto (as saved), float32, bfloat16 or float16.", choices=list(DTYPES))
    tokenizer_dir: str | None = _arg(None, "Llama-3.2 tokenizer folder, used only when the model folder has no "
                                           "processor files.")
    trust_remote_code: bool = _arg(False, "Load with AutoModel/AutoProcessor and the code saved in the folder "
                                          "instead of the installed diana classes.")
    num_workers: int = _arg(0, "DataLoader workers decoding gallery images.")


def load_split(
    data_dir: str | os.PathLike,
    *,
    dataset: str = "chatpedes",
    split: str | None = None,
    cache_dir: str | None = None,
    max_samples: int | None = None,
    **chatpedes_kwargs: Any,
):
    """The evaluation rows (columns image, file_path, person_id, dialogue, num_rounds).

    ChatPedes: `load_chatpedes(data_dir)[split]` (default test). MALS: its one split, each caption
    wrapped as a one-round dialogue with the fixed evaluation question; every image is its own
    person, so a query's only positive is its own image.
    """
    if dataset == "chatpedes":

        split = split or "test"
        kwargs = {k: v for k, v in chatpedes_kwargs.items() if v is not None}
        if split == "test":
            # The validation persons are carved out of train and never touch test; 0 keeps the
            # builder's default (200 persons) from failing on small train sets.
            kwargs.setdefault("validation_persons", 0)
        splits = load_chatpedes(str(data_dir), cache_dir=cache_dir, **kwargs)
    elif dataset == "mals":

        split = split or "train"
        splits = load_mals(str(data_dir), cache_dir=cache_dir)
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if split not in splits:
        raise ValueError(f"{dataset} at {data_dir} has no split {split!r}; it has {sorted(splits)}")
    rows = splits[split]
    if max_samples is not None:
        rows = rows.select(range(min(int(max_samples), len(rows))))
    if dataset == "mals":
        import datasets

        rows = rows.map(
            lambda captions: {
                "dialogue": [caption_to_dialogue(c) for c in captions],
                "num_rounds": [1] * len(captions),
            },
            input_columns=["caption"],
            batched=True,
            features=datasets.Features({
                **rows.features,
                "dialogue": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
                "num_rounds": datasets.Value("int32"),
            }),
            desc="captions -> one-round dialogues",
        )
    return rows, split


def evaluate_folder(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    dataset: str = "chatpedes",
    split: str | None = None,
    batch_size: int = 32,
    score_modes: Sequence[str] = SCORE_MODES,
    max_rounds: int | None = None,
    max_samples: int | None = None,
    output_dir: str | os.PathLike | None = None,
    reference: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    validation_persons: int | None = None,
    validation_seed: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    tokenizer_dir: str | None = None,
    trust_remote_code: bool = False,
    num_workers: int = 0,
    revision: str | None = None,
) -> dict[str, Any]:
    """Loads a model folder and a dataset folder and runs `evaluate_retrieval` (see there for the
    result layout). Writes the report to `output_dir` when given, with `round_table.md`."""
    model, processor = load_model_and_processor(
        model_dir, tokenizer_dir, device, dtype, revision, trust_remote_code=trust_remote_code
    )
    rows, split = load_split(
        data_dir, dataset=dataset, split=split, cache_dir=cache_dir, max_samples=max_samples,
        validation_persons=validation_persons, validation_seed=validation_seed,
    )
    logger.info("evaluating %s on %s/%s: %d dialogues", model_dir, dataset, split, len(rows))
    results = evaluate_retrieval(
        model, processor, rows, batch_size=batch_size, score_modes=score_modes, max_rounds=max_rounds,
        reference=reference, num_workers=num_workers, desc=f"{dataset}/{split}",
    )
    results["meta"].update({"model": str(model_dir), "data": str(data_dir), "dataset": dataset, "split": split})
    if output_dir is not None:
        write_results(results, output_dir, reference=reference)
        Path(output_dir, TABLE_FILE).write_text(format_round_table(results, reference=reference))
    return results


def validate_arguments(args: EvaluateModelArguments, split: str) -> None:
    """Refuses every argument that cannot work, naming the flag, the value and the valid ones.

    Raises:
        UserInputError (ValueError).
    """
    require_model_folder("--model_name_or_path", args.model_name_or_path, allow_hub_id=True)
    require_path("--data_dir", args.data_dir, "folder")
    require_choice(f"--split (of --dataset {args.dataset})", split, SPLITS[args.dataset])
    if split == "validation" and not args.validation_persons:
        raise UserInputError("--split validation needs --validation_persons N (the training run's value: the "
                             "split is the N persons it held out of train)")
    require_range("--validation_persons", args.validation_persons, 0)
    require_choices("--score_modes", args.score_modes, SCORE_MODES)
    require_range("--batch_size", args.batch_size, 1)
    require_range("--max_rounds", args.max_rounds, 1)
    require_range("--max_samples", args.max_samples, 1)
    require_range("--num_workers", args.num_workers, 0)
    require_path("--reference", args.reference, "file")
    require_path("--tokenizer_dir", args.tokenizer_dir, "folder")
    require_device("--device", args.device)


def read_reference(path: str) -> dict[str, Any]:
    """The `--reference` curve file (JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"--reference {path}: not valid JSON ({error})") from error


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses the arguments, evaluates, prints the table; returns the results."""

    # 1. Arguments, all checked before the model and the data are loaded.
    parser = OneLineHfArgumentParser(EvaluateModelArguments, prog="python -m diana.training.evaluation.evaluate_model")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    split = args.split or SPLITS[args.dataset][0]
    validate_arguments(args, split)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    reference = read_reference(args.reference) if args.reference else None
    output_dir = args.output_dir or f"eval_{Path(args.model_name_or_path).resolve().name}_{args.dataset}_{split}"

    # 2. Model + data -> the protocol.
    results = evaluate_folder(
        args.model_name_or_path, args.data_dir, dataset=args.dataset, split=split, batch_size=args.batch_size,
        score_modes=args.score_modes, max_rounds=args.max_rounds, max_samples=args.max_samples,
        output_dir=output_dir, reference=reference, cache_dir=args.cache_dir,
        validation_persons=args.validation_persons, validation_seed=args.validation_seed, device=args.device,
        dtype=args.dtype, tokenizer_dir=args.tokenizer_dir, trust_remote_code=args.trust_remote_code,
        num_workers=args.num_workers, revision=args.revision,
    )

    # 3. Report.
    meta = results["meta"]
    print(f"\n{args.model_name_or_path} on {args.dataset}/{split}: {meta['num_queries']} dialogues, {meta['num_gallery']} images, "
          f"{meta['num_persons']} persons, up to {meta['num_rounds']} rounds "
          f"(dialogues cut by max_length per round: {meta['truncated_per_round']})\n")
    print(format_round_table(results, reference=reference))
    print(f"report: {os.path.abspath(output_dir)}")
    return results


if __name__ == "__main__":
    run_cli(main)
