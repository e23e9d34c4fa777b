"""Turn a trained DiaNA model into a Hub-ready folder, check it loads on its own, push it.

    python -m diana.hub_cards.export --model_name_or_path DIR --output_dir DIR
    python -m diana.hub_cards.export --adapter_dir DIR --base_model_name_or_path DIR --output_dir DIR
    python -m diana.hub_cards.export --official_dir DIR --output_dir DIR        # the authors' release
    ... [--eval_results_file FILE] [--run_args_file FILE] [--repo_id NAME] [--push_to_hub REPO [--dry_run]]

The folder holds ``config.json`` (with ``auto_map``), the remote-code files (``modeling_diana.py``,
``configuration_diana.py``, ``loss_diana.py``, ``processing_diana.py`` and its siblings ``image_loading.py``,
``dialogue_template.py``, ``round_tokenization.py``), the processor files
(``processor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``),
``model.safetensors``, ``README.md`` (the model card), ``eval_results.json``, ``run_args.json``
and the per-round curve picture. Before it is declared ready, a fresh Python process in which
the ``diana`` package cannot be imported loads it with ``AutoModel`` / ``AutoProcessor``
(``trust_remote_code=True``, offline) and must reproduce this process's features (`export_check`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

import diana.processing
from diana.hub_cards.convert_official_checkpoint import convert, official_processor
from diana.hub_cards.evaluation_report import CURVES_FILE
from diana.hub_cards.export_check import PROBE_DIALOGUES, ExportCheckError, compare_features, verify_folder
from diana.hub_cards.hub_upload import UploadPlan, push_to_hub, upload_plan
from diana.hub_cards.merge_lora import load_and_merge
from diana.hub_cards.model_card import Evaluation, load_evaluation, load_run_args, render_model_card, write_model_card
from diana.processing.cli_errors import ArgumentParser, UserInputError, require_model_folder, require_path, run_cli
from diana.processing.model_loading import has_processor_files, load_model_and_processor, load_processor
from diana.processing.search import list_images

CURVE_NAMES = (CURVES_FILE,)
REQUIRED_FILES = (
    "config.json", "model.safetensors", "configuration_diana.py", "modeling_diana.py", "processing_diana.py",
    "image_loading.py", "dialogue_template.py", "round_tokenization.py", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json", "README.md",
)


# --------------------------------------------------------------------------------------------
# Loading what is exported
# --------------------------------------------------------------------------------------------


def load_for_export(
    model_name_or_path: str | None = None,
    *,
    adapter_dir: str | None = None,
    base_model_name_or_path: str | None = None,
    official_dir: str | None = None,
    tokenizer_dir: str | None = None,
) -> tuple[Any, Any, Path | None]:
    """(plain ``DiaNAModel`` on the CPU, its ``DiaNAProcessor``, folder the run files are looked up in).

    Exactly one source: a DiaNA folder (a training output, a ``checkpoint-N`` or a converted
    official checkpoint), an adapter + base pair (LoRA merged with ``merge_and_unload``), or an
    official release folder (converted on the fly, with the official tokenisation).
    """
    adapter_pair = adapter_dir is not None or base_model_name_or_path is not None
    if sum([model_name_or_path is not None, adapter_pair, official_dir is not None]) != 1:
        raise UserInputError("give exactly one of --model_name_or_path, --adapter_dir with --base_model_name_or_path, "
                             "or --official_dir")
    if model_name_or_path is not None:
        model, processor = load_model_and_processor(model_name_or_path, tokenizer_dir, "cpu", "auto")
        return model, processor, Path(model_name_or_path)
    if official_dir is not None:
        model = convert(official_dir)
        return model, official_processor(model.config, tokenizer_dir), Path(official_dir)
    if adapter_dir is None or base_model_name_or_path is None:
        raise UserInputError("--adapter_dir and --base_model_name_or_path go together (a LoRA adapter folder and the "
                             "model it adapts)")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter_dir {adapter_dir}: no adapter_config.json (not a peft adapter folder)")
    model = load_and_merge(base_model_name_or_path, adapter_dir)
    processor_source = adapter_dir if has_processor_files(adapter_dir) else base_model_name_or_path
    return model, load_processor(processor_source, model.config, tokenizer_dir), Path(adapter_dir)


def find_run_files(folder: Path | None) -> tuple[Path | None, Path | None, Path | None]:
    """(eval_results.json, run_args.json, curve picture) of a training output, if present.

    A ``checkpoint-N`` folder's run files are in its parent; the curve of the last evaluation
    lies in the newest ``eval_*`` sub-folder.
    """
    if folder is None:
        return None, None, None
    candidates = [folder, folder.parent] if folder.name.startswith("checkpoint-") else [folder]
    eval_file = next((c / "eval_results.json" for c in candidates if (c / "eval_results.json").is_file()), None)
    args_file = next((c / "run_args.json" for c in candidates if (c / "run_args.json").is_file()), None)
    curve = None
    if eval_file is not None:
        pictures = [p for name in CURVE_NAMES for p in eval_file.parent.glob(f"eval_*/{name}")]
        pictures += [eval_file.parent / n for n in CURVE_NAMES if (eval_file.parent / n).is_file()]
        if pictures:
            curve = max(pictures, key=lambda p: p.stat().st_mtime)
    return eval_file, args_file, curve


# --------------------------------------------------------------------------------------------
# Writing and checking the folder
# --------------------------------------------------------------------------------------------


def export_folder(
    model: Any,
    processor: Any,
    output_dir: str | os.PathLike,
    *,
    eval_results: str | os.PathLike | None = None,
    run_args: str | os.PathLike | None = None,
    curve: str | os.PathLike | None = None,
    repo_id: str = "your-name/diana",
    revision: str = "main",
    dataset: str | None = None,
    split: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the Hub folder: weights + code + processor + card + results + picture.

    Args:
        model: a plain ``DiaNAModel`` (merge adapters first).
        processor: its ``DiaNAProcessor``.
        output_dir: the folder to create.
        eval_results: ``eval_results.json`` of the run (rendered into the card and copied).
        run_args: ``run_args.json`` of the run (the recipe in the card; copied).
        curve: the per-round curve picture (shown in the card; copied).
        repo_id: Hub repository named in the card's usage example.
        revision: revision the usage example pins.
        dataset: data set key overriding the run's (e.g. ``synthpedes``).
        split: split name overriding the run's.
        overwrite: replace an existing non-empty ``output_dir``.
    """
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--output_dir {output} exists and is not empty (use --overwrite)")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    if type(model).__name__ != "DiaNAModel":
        raise TypeError(f"export a plain DiaNAModel, got {type(model).__name__} (merge adapters first)")

    # save_pretrained writes auto_map and copies the class files only for registered classes.
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    processor.register_for_auto_class("AutoProcessor")
    model.save_pretrained(output)
    processor.save_pretrained(output)

    args_record = load_run_args(run_args) if run_args else None
    evaluations: list[Evaluation] = []
    curve_name = None
    if curve is not None:
        curve_name = Path(curve).name
        shutil.copyfile(curve, output / curve_name)
    if eval_results is not None:
        evaluations.append(load_evaluation(eval_results, args_record, dataset=dataset, split=split, curve=curve_name))
        shutil.copyfile(eval_results, output / "eval_results.json")
    if run_args is not None:
        shutil.copyfile(run_args, output / "run_args.json")
    card = render_model_card(evaluations, args_record, config=model.config, repo_id=repo_id, revision=revision)
    write_model_card(card, output)
    for path in output.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; a shared folder should be readable
    missing = [name for name in REQUIRED_FILES if not (output / name).is_file()]
    if missing:
        raise ExportCheckError(f"{output}: the export lacks {missing}")
    config = json.loads((output / "config.json").read_text())
    if "AutoModel" not in config.get("auto_map", {}):
        raise ExportCheckError(f"{output}/config.json has no auto_map.AutoModel: the folder would not load remotely")
    return output


# --------------------------------------------------------------------------------------------
# Space folder
# --------------------------------------------------------------------------------------------

SPACE_DIR = Path(__file__).resolve().parent / "space"
PROCESSING_DIR = Path(diana.processing.__file__).resolve().parent
# The part of `diana.processing` the Space app imports, copied under `diana/processing/` next to it
# (the Space does not install this project; its model code comes from the Hub with the weights).
SPACE_RUNTIME = (
    "image_loading.py", "dialogue_template.py", "round_tokenization.py", "processing_diana.py", "cli_errors.py",
    "data/__init__.py", "data/synthpedes_attributes.py", "search/__init__.py", "search/ann.py",
    "search/contact_sheet.py", "search/fingerprints.py", "search/index.py", "search/question_bank.py",
    "search/questioner.py",
    "search/session.py", "search/storage.py", "search/topk.py",
)


def prepare_space(
    output_dir: str | os.PathLike,
    model_repo: str,
    *,
    examples: str | os.PathLike | None = None,
    max_images: int = 24,
    overwrite: bool = False,
) -> Path:
    """Write a Hub Space folder for the demo: ``app.py``, ``README.md`` (its ``models:`` entry set
    to ``model_repo``, which the app loads), ``requirements.txt``, ``diana/processing/`` (the
    modules of ``SPACE_RUNTIME``: the Space does not install this project) and ``examples/``.

    Args:
        output_dir: the folder to create.
        model_repo: the model's Hub repository.
        examples: a folder of images (one example gallery) or of sub-folders (one gallery each),
            e.g. a SynthPedes ``chatpedes/imgs``; the first ``max_images`` of each are copied.
        max_images: images per example gallery.
        overwrite: replace an existing non-empty ``output_dir``.
    """
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty (use --overwrite)")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    shutil.copyfile(SPACE_DIR / "app.py", output / "app.py")
    shutil.copyfile(SPACE_DIR / "requirements.txt", output / "requirements.txt")
    runtime = output / "diana" / "processing"
    runtime.mkdir(parents=True)
    # Not the project's own `__init__`: that one builds processors and imports the tokenizer set-up,
    # which the Space does not need; the app imports the modules it uses directly.
    (runtime / "__init__.py").write_text('"""The part of diana.processing the Space app imports."""\n')
    for name in SPACE_RUNTIME:
        target = runtime / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROCESSING_DIR / name, target)
    _, header, body = (SPACE_DIR / "README.md").read_text(encoding="utf-8").split("---", 2)
    metadata = yaml.safe_load(header)
    metadata["models"] = [model_repo]
    body = body.replace("your-name/diana", model_repo)
    (output / "README.md").write_text("---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
                                      + "---" + body, encoding="utf-8")
    if examples is not None:
        root = Path(examples)
        folders = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
        direct = [p for p in root.iterdir() if p.is_file()] if root.is_dir() else []
        galleries = {root.name: root} if direct or not folders else {p.name: p for p in folders}
        for name, folder in galleries.items():
            images = list_images(folder)[:max_images]
            if not images:
                raise ValueError(f"--space_examples_dir: {folder} holds no images")
            target = output / "examples" / name
            target.mkdir(parents=True)
            for image in images:
                shutil.copyfile(image, target / Path(image).name)
    return output


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `python -m diana.hub_cards.export` (`diana export`) flags."""
    parser = ArgumentParser(
        prog="python -m diana.hub_cards.export",
        description="Turn a DiaNA model into a Hub-ready folder, check it loads on its own, optionally push it.",
    )
    source = parser.add_argument_group("source (exactly one)")
    source.add_argument("--model_name_or_path",
                        help="DiaNA folder (training output, checkpoint-N, converted official checkpoint) or Hub id")
    source.add_argument("--adapter_dir", help="LoRA adapter folder (with --base_model_name_or_path)")
    source.add_argument("--base_model_name_or_path", help="the DiaNA folder the adapter was trained on")
    source.add_argument("--official_dir",
                        help="official release folder (config.json with model_type 'main'); converted first")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder when the source has no processor files")
    parser.add_argument("--eval_results_file", help="eval_results.json (default: the source folder's own, if any)")
    parser.add_argument("--run_args_file", help="run_args.json (default: the source folder's own, if any)")
    parser.add_argument("--curve_file", help="per-round curve picture (default: found next to the eval results)")
    parser.add_argument("--dataset", help="data set key for the card (chatpedes | mals | synthpedes); default from the run")
    parser.add_argument("--split", help="evaluated split for the card; default from the run")
    parser.add_argument("--output_dir", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--repo_id", help="Hub repository named in the card (default: --push_to_hub or your-name/diana)")
    parser.add_argument("--revision", default="main", help="revision the card's usage example pins before a push")
    parser.add_argument("--skip_check", action="store_true", help="do not run the fresh-process load check")
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry_run", action="store_true", help="with --push_to_hub: list files and sizes, no network")
    parser.add_argument("--space_output_dir", help="also write a Hub Space folder for the demo here")
    parser.add_argument("--space_examples_dir",
                        help="images (or sub-folders of images) bundled as the Space's example galleries")
    return parser


def validate_arguments(args: argparse.Namespace) -> None:
    """Refuses every argument that cannot work before the model loads (a while for the full-size
    one), naming the flag and the value.

    Raises:
        UserInputError (ValueError), FileExistsError.
    """
    if args.dry_run and not args.push_to_hub:
        raise UserInputError("--dry_run needs --push_to_hub REPO")
    require_model_folder("--model_name_or_path", args.model_name_or_path, allow_hub_id=True)
    for flag in ("adapter_dir", "base_model_name_or_path", "official_dir", "tokenizer_dir", "space_examples_dir"):
        require_path(f"--{flag}", getattr(args, flag), "folder")
    for flag in ("eval_results_file", "run_args_file", "curve_file"):
        require_path(f"--{flag}", getattr(args, flag), "file")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output_dir {output} is a file, not a folder")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--output_dir {output} exists and is not empty (use --overwrite)")


def run_files_for(args: argparse.Namespace, source: Path | None) -> tuple[Any, Any, Any]:
    """(eval results, run args, curve picture) for the card: the flags' files, else the source folder's own."""
    found_eval, found_args, found_curve = find_run_files(source)
    eval_results = args.eval_results_file or found_eval
    run_args = args.run_args_file or found_args
    curve = args.curve_file or (found_curve if eval_results == found_eval else None)
    if curve is None and eval_results is not None:
        curve = next((Path(eval_results).parent / n for n in CURVE_NAMES if (Path(eval_results).parent / n).is_file()),
                     None)
    return eval_results, run_args, curve


def push(args: argparse.Namespace, output: Path, model: Any, eval_results: Any, run_args: Any, curve: Any) -> None:
    """`--push_to_hub REPO`: the upload (or, with `--dry_run`, the list of what it would upload)."""
    plan = upload_plan(output, args.push_to_hub)
    if args.dry_run:
        print(plan)
        return
    args_record = load_run_args(run_args) if run_args else None
    evaluations = [load_evaluation(eval_results, args_record, dataset=args.dataset, split=args.split,
                                   curve=Path(curve).name if curve else None)] if eval_results else []
    revision = push_to_hub(
        output, args.push_to_hub, private=args.private,
        card_kwargs={"evaluations": evaluations, "run_args": args_record, "config": model.config},
    )
    print(f"pushed to https://huggingface.co/{args.push_to_hub} at {revision}")


def main(argv: list[str] | None = None) -> int:
    """Exports (and checks, and optionally pushes) one model; returns the exit status."""
    args = build_parser().parse_args(argv)
    validate_arguments(args)
    model, processor, source = load_for_export(
        args.model_name_or_path, adapter_dir=args.adapter_dir, base_model_name_or_path=args.base_model_name_or_path,
        official_dir=args.official_dir, tokenizer_dir=args.tokenizer_dir,
    )
    eval_results, run_args, curve = run_files_for(args, source)
    repo_id = args.repo_id or args.push_to_hub or "your-name/diana"
    output = export_folder(
        model, processor, args.output_dir, eval_results=eval_results, run_args=run_args, curve=curve,
        repo_id=repo_id, revision=args.revision, dataset=args.dataset, split=args.split, overwrite=args.overwrite,
    )
    print(f"exported {output} (eval results: {eval_results or 'none'}, run args: {run_args or 'none'}, "
          f"curve: {curve or 'none'})")
    if not args.skip_check:
        report = verify_folder(output, model, processor)
        print(f"fresh-process check passed: {report['model_class']}, max |diff| {report['max_abs_diff']}")
    if args.space_output_dir:
        space = prepare_space(args.space_output_dir, repo_id, examples=args.space_examples_dir,
                              overwrite=args.overwrite)
        print(f"Space folder {space} (upload it with: hf upload --repo-type space YOUR-NAME/SPACE {space})")
    if args.push_to_hub:
        push(args, output, model, eval_results, run_args, curve)
    return 0


__all__ = [
    "CURVE_NAMES", "PROBE_DIALOGUES", "REQUIRED_FILES", "SPACE_RUNTIME", "ExportCheckError", "UploadPlan",
    "compare_features", "export_folder", "find_run_files", "load_for_export", "main", "prepare_space",
    "verify_folder",
]


if __name__ == "__main__":
    run_cli(main)
