"""The fresh-process check of an exported folder: a Python process that cannot import `diana` loads
it with `AutoModel` / `AutoProcessor` (`trust_remote_code=True`, offline) and must reproduce the
features of the model it was exported from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from diana.processing.processing_diana import DEFAULT_FIRST_QUESTION

PROBE_DIALOGUES = [
    [(DEFAULT_FIRST_QUESTION, "A man in a grey hoodie and blue jeans."),
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
