"""save_pretrained -> AutoModel.from_pretrained(trust_remote_code=True) in a fresh process that cannot import
the project: the saved folder alone must define and load DiaNA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diana.modeling_diana import DiaNAModel
from tests.helpers import TINY_IMAGE_SIZE, tiny_config

# Runs in the child. A meta-path finder placed first refuses the project's packages, whatever the editable
# install, the working directory or PYTHONPATH would offer.
CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in ("diana", "modeling_diana", "processing", "training", "hub_cards", "tests"):
                raise ModuleNotFoundError(f"blocked project import: {name}")
            return None

    sys.meta_path.insert(0, BlockProject())
    try:
        import diana  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("the project is importable in the child")

    import torch
    from transformers import AutoConfig, AutoModel

    folder, inputs_file, outputs_file = sys.argv[1:4]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "DiaNAModel" and type(config).__name__ == "DiaNAConfig"
    module = type(model).__module__
    assert module.startswith("transformers_modules."), module
    assert not any(m == "diana" or m.startswith("diana.") for m in sys.modules)
    inputs = torch.load(inputs_file, weights_only=True)
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
        rounds = model.encode_dialogues(inputs["input_ids"], inputs["attention_mask"], round_end_positions=torch.tensor([[1, 4], [2, 2]]))
    torch.save({
        "loss": out.loss, "text_embeds": out.text_embeds, "image_embeds": out.image_embeds,
        "text_attribute_embeds": out.text_attribute_embeds, "image_attribute_embeds": out.image_attribute_embeds,
        "round_text_embeds": rounds.text_embeds, "module": module,
        "stem": type(model.vision_model.embeddings.patch_embeddings.projection).__name__,
    }, outputs_file)
    """
)


# "conv" + "mean": the SynthPedes presets' stem (a module the remote file must define and rebuild itself)
# and dialogue pooling; "patch" + "last": the paper's.
@pytest.mark.parametrize("vision_stem,text_pooling", [("patch", "last"), ("conv", "mean")])
def test_remote_code_round_trip_without_the_project(tmp_path, vision_stem, text_pooling):
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config(attribute_reduction="min", vision_stem=vision_stem, text_pooling=text_pooling)).eval()
    folder = tmp_path / "diana-tiny"
    model.save_pretrained(folder)

    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_diana.DiaNAConfig", "AutoModel": "modeling_diana.DiaNAModel"}
    assert saved["model_type"] == "diana"
    for name in ("configuration_diana.py", "modeling_diana.py", "loss_diana.py", "model.safetensors"):
        assert (folder / name).is_file(), name

    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inputs = {
        "pixel_values": torch.randn(2, 3, *TINY_IMAGE_SIZE, generator=g),
        "input_ids": torch.randint(0, 5000, (2, 5), generator=g),
        "attention_mask": mask,
        "person_ids": torch.tensor([3, 3]),
    }
    torch.save(inputs, tmp_path / "inputs.pt")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    remote = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert remote["module"].startswith("transformers_modules.")
    assert remote["stem"] == {"patch": "Conv2d", "conv": "DiaNAConvStem"}[vision_stem]
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
        rounds = model.encode_dialogues(inputs["input_ids"], inputs["attention_mask"], round_end_positions=torch.tensor([[1, 4], [2, 2]]))
    # 1e-5: a convolution may sum in another order in another process (the conv stem's loss: 3e-6 apart).
    for key in ("loss", "text_embeds", "image_embeds", "text_attribute_embeds", "image_attribute_embeds"):
        torch.testing.assert_close(remote[key], getattr(out, key), rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(remote["round_text_embeds"], rounds.text_embeds, rtol=0, atol=1e-6)
