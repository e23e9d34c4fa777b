"""Turn a trained DiaNA model into a Hub-ready folder, check it loads on its own, push it.

    python -m diana.hub_cards.export --checkpoint DIR --output DIR
    python -m diana.hub_cards.export --adapter DIR --base DIR --output DIR
    python -m diana.hub_cards.export --official DIR --output DIR        # authors' release
    ... [--eval-results FILE] [--run-args FILE] [--repo-id NAME] [--push-to-hub REPO [--dry-run]]

The folder holds ``config.json`` (with ``auto_map``), the remote-code files (``modeling_diana.py``,
``configuration_diana.py``, ``loss_diana.py``, ``processing_diana.py``, ``image_loading.py``), the processor files
(``processor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``),
``model.safetensors``, ``README.md`` (the model card), ``eval_results.json``, ``run_args.json``
and the per-round curve picture. Before it is declared ready, a fresh Python process in which
the ``diana`` package cannot be imported loads it with ``AutoModel`` / ``AutoProcessor``
(``trust_remote_code=True``, offline) and must reproduce this process's features.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import diana.processing
from diana.hub_cards.convert_official_checkpoint import convert
from diana.hub_cards.merge_lora import load_and_merge
from diana.hub_cards.model_card import (
    Evaluation,
    load_evaluation,
    load_run_args,
    render_model_card,
    write_model_card,
)
from diana.modeling_diana import DiaNAModel
from diana.processing import build_processor
from diana.processing.cli_errors import ArgumentParser, UserInputError, require_path, run_cli
from diana.processing.processing_diana import DiaNAProcessor
from diana.processing.search import list_images

CURVE_NAMES = ("per_round_curves.png",)
REQUIRED_FILES = (
    "config.json", "model.safetensors", "configuration_diana.py", "modeling_diana.py", "processing_diana.py",
    "image_loading.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
)
PROBE_DIALOGUES = [
    [("Please describe the person you saw.", "A man in a grey hoodie and blue jeans."),
     ("Is he carrying anything?", "A red umbrella in his left hand."),
     ("What shoes?", "White sneakers.")],
    "A young woman with a long black skirt and a white shirt.",
]

# Run in a fresh interpreter: anything importable from this project would hide a missing file.
_VERIFY_SCRIPT = r"""
import importlib.abc, json, sys
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diana" or name.startswith("diana.") or name == "tests" or name.startswith("tests."):
            raise ModuleNotFoundError(f"blocked by the export check: {name}")
        return None
sys.meta_path.insert(0, _Blocker())
folder, probe_dir, out_file = sys.argv[1:4]
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
probe = json.load(open(f"{probe_dir}/probe.json"))
images = [Image.open(f"{probe_dir}/{name}").convert("RGB") for name in probe["images"]]
with torch.no_grad():
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    text = processor(dialogues=probe["dialogues"], return_round_ends=True, return_tensors="pt")
    image_enc = model.encode_images(pixels.to(model.dtype))
    text_enc = model.encode_dialogues(
        text["input_ids"], text["attention_mask"], text["round_end_positions"], text.get("round_token_mask")
    )
save_file({
    "pixel_values": pixels.float().contiguous(), "input_ids": text["input_ids"].contiguous(),
    "image_embeds": image_enc.image_embeds.float().contiguous(),
    "text_embeds": text_enc.text_embeds.float().contiguous(),
}, out_file)
print(json.dumps({
    "model_class": f"{type(model).__module__}.{type(model).__name__}",
    "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
    "diana_imported": sorted(m for m in sys.modules if m == "diana" or m.startswith("diana.")),
}))
"""


class ExportCheckError(RuntimeError):
    """The exported folder does not load on its own or gives other features."""


# --------------------------------------------------------------------------------------------
# Loading what is exported
# --------------------------------------------------------------------------------------------


def _load_processor(folder: Path | None, config: Any, tokenizer_dir: str | None) -> Any:

    if folder is not None and (folder / "processor_config.json").is_file():
        return DiaNAProcessor.from_pretrained(str(folder))
    # A converted official checkpoint or a bare model folder has no processor: build the default
    # fine-tuning one at the model's own image size.
    size = getattr(config.vision_config, "image_size", (384, 192))
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return build_processor(tokenizer_dir=tokenizer_dir, image_size=size)


def load_for_export(
    checkpoint: str | None = None,
    *,
    adapter: str | None = None,
    base: str | None = None,
    official: str | None = None,
    tokenizer_dir: str | None = None,
) -> tuple[Any, Any, Path | None]:
    """(plain ``DiaNAModel``, ``DiaNAProcessor``, folder the run files are looked up in).

    Exactly one source: a DiaNA folder (a training output, a ``checkpoint-N`` or a converted
    official checkpoint), an adapter + base pair (LoRA merged with ``merge_and_unload``), or an
    official release folder (converted on the fly).
    """

    sources = [checkpoint is not None, adapter is not None or base is not None, official is not None]
    if sum(sources) != 1:
        raise ValueError("give exactly one of --checkpoint, --adapter with --base, or --official")
    if checkpoint is not None:
        folder = Path(checkpoint)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint {folder}: no config.json (not a DiaNA model folder)")
        model = DiaNAModel.from_pretrained(str(folder))
        return model, _load_processor(folder, model.config, tokenizer_dir), folder
    if official is not None:

        model = convert(official)
        return model, _load_processor(None, model.config, tokenizer_dir), Path(official)
    if adapter is None or base is None:
        raise ValueError("--adapter and --base go together (a LoRA adapter folder and the model it adapts)")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json (not a peft adapter folder)")

    model = load_and_merge(base, adapter)
    processor_folder = Path(adapter) if (Path(adapter) / "processor_config.json").is_file() else Path(base)
    return model, _load_processor(processor_folder, model.config, tokenizer_dir), Path(adapter)


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
            raise FileExistsError(f"--output {output} exists and is not empty (use --overwrite)")
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


def _write_probe(folder: Path, image_size: tuple[int, int]) -> list[str]:
    names = []
    height, width = image_size
    for i in range(3):
        yy, xx = np.mgrid[0:height * 2, 0:width * 2]
        pixels = np.stack([(yy * (3 + i)) % 256, (xx * (5 + 2 * i)) % 256, ((yy + xx) * (7 - i)) % 256], -1)
        name = f"probe_{i}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
        names.append(name)
    json.dump({"images": names, "dialogues": PROBE_DIALOGUES}, open(folder / "probe.json", "w"))
    return names


def fresh_process_features(folder: str | os.PathLike, image_size: tuple[int, int], *, timeout: float = 600
                           ) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[Image.Image]]:
    """Load ``folder`` in a fresh interpreter that cannot import ``diana``; encode the probe there.

    Returns:
        (the child's report: loaded class paths and any ``diana`` module it imported, its
        features, the probe images it encoded).

    Raises:
        ExportCheckError: the child could not load the folder (its stderr is quoted).
    """
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="diana-export-check-") as scratch:
        scratch = Path(scratch)
        names = _write_probe(scratch, image_size)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_MODULES_CACHE=str(scratch / "modules"), PYTHONNOUSERSITE="1")
        out_file = scratch / "features.safetensors"
        run = subprocess.run(
            [sys.executable, "-c", _VERIFY_SCRIPT, str(folder), str(scratch), str(out_file)],
            cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout,
        )
        if run.returncode != 0:
            raise ExportCheckError(
                f"{folder} does not load in a fresh process without the diana package:\n{run.stderr[-3000:]}"
            )
        report = json.loads(run.stdout.strip().splitlines()[-1])
        features = load_file(str(out_file))
        images = [Image.open(scratch / n).convert("RGB") for n in names]
    return report, features, images


@torch.no_grad()
def compare_features(
    model: Any, processor: Any, report: dict[str, Any], theirs: dict[str, torch.Tensor], images: list[Image.Image],
    *, atol: float | None = None,
) -> dict[str, float]:
    """Check the child's report and features against ``model`` / ``processor`` in this process.

    Returns:
        The largest absolute difference per compared tensor.

    Raises:
        ExportCheckError: the child imported the project, used other code, tokenised differently
            or gave features further apart than ``atol`` (1e-5 in fp32, 2e-2 in half precision).
    """
    if atol is None:
        atol = 1e-5 if model.dtype == torch.float32 else 2e-2
    if report["diana_imported"]:
        raise ExportCheckError(f"the fresh process imported the project ({report['diana_imported']})")
    if not report["model_class"].startswith("transformers_modules."):
        raise ExportCheckError(f"AutoModel did not use the folder's code: {report['model_class']}")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    text = processor(dialogues=PROBE_DIALOGUES, return_round_ends=True, return_tensors="pt")
    device = next(model.parameters()).device
    model.eval()
    ours = {
        "pixel_values": pixels.float(),
        "image_embeds": model.encode_images(pixels.to(device, model.dtype)).image_embeds.float().cpu(),
        "text_embeds": model.encode_dialogues(
            text["input_ids"].to(device), text["attention_mask"].to(device), text["round_end_positions"].to(device),
            # Official-tokenisation processors pack each row with its prefixes' differing last tokens.
            text["round_token_mask"].to(device) if "round_token_mask" in text else None,
        ).text_embeds.float().cpu(),
    }
    if not torch.equal(text["input_ids"], theirs["input_ids"]):
        raise ExportCheckError("the exported processor tokenises the probe dialogues differently")
    differences = {}
    for key, value in ours.items():
        if value.shape != theirs[key].shape:
            raise ExportCheckError(f"{key}: shape {tuple(theirs[key].shape)} from the folder, {tuple(value.shape)} here")
        differences[key] = float((value - theirs[key]).abs().max())
        if differences[key] > atol:
            raise ExportCheckError(f"{key} differ by {differences[key]:.3g} (> {atol:g}) between the folder and this model")
    return differences


def verify_folder(
    folder: str | os.PathLike, model: Any, processor: Any, *, atol: float | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Load ``folder`` in a fresh interpreter that cannot import ``diana`` and compare its features.

    Args:
        folder: the exported folder.
        model: the model it was exported from (this process's reference).
        processor: its processor.
        atol: largest allowed feature difference (default 1e-5 in fp32, 2e-2 in half precision).
        timeout: seconds the child process may take.

    Returns:
        The child's report (loaded class paths) and ``max_abs_diff`` per compared tensor.

    Raises:
        ExportCheckError: see :func:`fresh_process_features` and :func:`compare_features`.
    """
    size = tuple(processor.image_processor.size[k] for k in ("height", "width"))
    report, theirs, images = fresh_process_features(folder, size, timeout=timeout)
    return {**report, "max_abs_diff": compare_features(model, processor, report, theirs, images, atol=atol)}


# --------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------


@dataclass
class UploadPlan:
    """Files that would be uploaded (relative path, bytes)."""

    repo_id: str
    files: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def __str__(self) -> str:
        lines = [f"would upload {len(self.files)} files ({_human(self.total_bytes)}) to https://huggingface.co/{self.repo_id}:"]
        lines += [f"  {size:>12,d}  {name}" for name, size in self.files]
        lines.append("then re-upload README.md with the usage example pinned to the new commit")
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


def upload_plan(folder: str | os.PathLike, repo_id: str) -> UploadPlan:
    """List what ``push_to_hub`` would upload, without the network."""
    root = Path(folder)
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    )
    return UploadPlan(repo_id, files)


def push_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
    commit_message: str = "Upload DiaNA model", card_kwargs: dict[str, Any] | None = None,
) -> str:
    """Upload the folder with ``huggingface_hub.upload_folder``; returns the pinned commit.

    After the upload the card's usage example is re-rendered with ``revision=<that commit>`` and
    README.md alone is uploaded again, so the card points at code a reader can review.
    """
    from huggingface_hub import create_repo, upload_file, upload_folder

    create_repo(repo_id, private=private, exist_ok=True, token=token)
    commit = upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token,
        ignore_patterns=["__pycache__/*", ".*"],
    )
    revision = commit.oid
    if card_kwargs is not None:
        card = render_model_card(**card_kwargs, repo_id=repo_id, revision=revision)
        readme = Path(folder) / "README.md"
        write_model_card(card, Path(folder))
        upload_file(path_or_fileobj=str(readme), path_in_repo="README.md", repo_id=repo_id, token=token,
                    commit_message=f"Model card: pin the usage example to {revision[:10]}")
    return revision


# --------------------------------------------------------------------------------------------
# Space folder
# --------------------------------------------------------------------------------------------

SPACE_DIR = Path(__file__).resolve().parent / "space"
PROCESSING_DIR = Path(diana.processing.__file__).resolve().parent
# The part of `diana.processing` the Space app imports, copied under `diana/processing/` next to it
# (the Space does not install this project; its model code comes from the Hub with the weights).
SPACE_RUNTIME = (
    "__init__.py", "image_loading.py", "processing_diana.py", "search/__init__.py", "search/ann.py",
    "search/contact_sheet.py", "search/fingerprints.py", "search/index.py", "search/session.py", "search/storage.py",
    "search/topk.py",
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
    for name in SPACE_RUNTIME:
        target = output / "diana" / "processing" / name
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
                raise ValueError(f"--space-examples: {folder} holds no images")
            target = output / "examples" / name
            target.mkdir(parents=True)
            for image in images:
                shutil.copyfile(image, target / Path(image).name)
    return output


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m diana.hub_cards.export",
        description="Turn a DiaNA checkpoint into a Hub-ready folder, check it loads on its own, optionally push it.",
    )
    source = parser.add_argument_group("source (exactly one)")
    source.add_argument("--checkpoint", help="DiaNA folder: training output, checkpoint-N or converted official checkpoint")
    source.add_argument("--adapter", help="LoRA adapter folder (with --base)")
    source.add_argument("--base", help="the DiaNA folder the adapter was trained on")
    source.add_argument("--official", help="official release folder (config.json with model_type 'main'); converted first")
    parser.add_argument("--tokenizer-dir", help="tokenizer folder when the source has no processor files")
    parser.add_argument("--eval-results", help="eval_results.json (default: the checkpoint's own, if any)")
    parser.add_argument("--run-args", help="run_args.json (default: the checkpoint's own, if any)")
    parser.add_argument("--curve", help="per-round curve picture (default: found next to the eval results)")
    parser.add_argument("--dataset", help="data set key for the card (chatpedes | mals | synthpedes); default from the run")
    parser.add_argument("--split", help="evaluated split for the card; default from the run")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--repo-id", help="Hub repository named in the card (default: --push-to-hub or your-name/diana)")
    parser.add_argument("--revision", default="main", help="revision the card's usage example pins before a push")
    parser.add_argument("--skip-check", action="store_true", help="do not run the fresh-process load check")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list files and sizes, no network")
    parser.add_argument("--space-output", help="also write a Hub Space folder for the demo here")
    parser.add_argument("--space-examples", help="images (or sub-folders of images) bundled as the Space's example galleries")
    return parser


def validate_arguments(args: argparse.Namespace) -> None:
    """Refuses every argument that cannot work before the model loads (a while for the full-size
    one), naming the flag and the value.

    Raises:
        UserInputError (ValueError), FileExistsError.
    """
    if args.dry_run and not args.push_to_hub:
        raise UserInputError("--dry-run needs --push-to-hub REPO")
    for flag, value in (("--checkpoint", args.checkpoint), ("--adapter", args.adapter), ("--base", args.base),
                        ("--official", args.official), ("--tokenizer-dir", args.tokenizer_dir),
                        ("--space-examples", args.space_examples)):
        require_path(flag, value, "folder")
    for flag, value in (("--eval-results", args.eval_results), ("--run-args", args.run_args), ("--curve", args.curve)):
        require_path(flag, value, "file")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file, not a folder")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--output {output} exists and is not empty (use --overwrite)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate_arguments(args)
    model, processor, source = load_for_export(
        args.checkpoint, adapter=args.adapter, base=args.base, official=args.official, tokenizer_dir=args.tokenizer_dir
    )
    found_eval, found_args, found_curve = find_run_files(source)
    eval_results = args.eval_results or found_eval
    run_args = args.run_args or found_args
    curve = args.curve or (found_curve if eval_results == found_eval else None)
    if curve is None and eval_results is not None:
        curve = next((Path(eval_results).parent / n for n in CURVE_NAMES if (Path(eval_results).parent / n).is_file()), None)
    repo_id = args.repo_id or args.push_to_hub or "your-name/diana"
    output = export_folder(
        model, processor, args.output, eval_results=eval_results, run_args=run_args, curve=curve,
        repo_id=repo_id, revision=args.revision, dataset=args.dataset, split=args.split, overwrite=args.overwrite,
    )
    print(f"exported {output} (eval results: {eval_results or 'none'}, run args: {run_args or 'none'}, curve: {curve or 'none'})")
    if not args.skip_check:
        report = verify_folder(output, model, processor)
        print(f"fresh-process check passed: {report['model_class']}, max |diff| {report['max_abs_diff']}")
    if args.space_output:
        space = prepare_space(args.space_output, repo_id, examples=args.space_examples, overwrite=args.overwrite)
        print(f"Space folder {space} (upload it with: hf upload --repo-type space YOUR-NAME/SPACE {space})")
    if args.push_to_hub:
        plan = upload_plan(output, args.push_to_hub)
        if args.dry_run:
            print(plan)
            return 0
        args_record = load_run_args(run_args) if run_args else None
        evaluations = [load_evaluation(eval_results, args_record, dataset=args.dataset, split=args.split,
                                       curve=Path(curve).name if curve else None)] if eval_results else []
        revision = push_to_hub(
            output, args.push_to_hub, private=args.private,
            card_kwargs={"evaluations": evaluations, "run_args": args_record, "config": model.config},
        )
        print(f"pushed to https://huggingface.co/{args.push_to_hub} at {revision}")
    return 0


if __name__ == "__main__":
    run_cli(main)
