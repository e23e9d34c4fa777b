"""The one model loader (`processing.model_loading.load_model_and_processor`) that evaluation, the
attribute probe, export, index and search all call: a folder with its processor, a bare weights
folder, remote code, the saved dtype, and a clear error for what is no model folder."""

from __future__ import annotations

import pytest
import torch

from diana.modeling_diana import DiaNAModel
from diana.processing.cli_errors import UserInputError
from diana.processing.model_loading import load_model_and_processor
from tests.helpers import TINY_IMAGE_SIZE, tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_processor):
    """(folder with model + processor, bare weights folder, the model they hold)."""
    root = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config()).eval()
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    tiny_processor.register_for_auto_class()
    model.save_pretrained(root / "full")
    tiny_processor.save_pretrained(root / "full")
    model.save_pretrained(root / "bare")
    return root / "full", root / "bare", model


def _image_features(model, processor) -> torch.Tensor:
    pixels = processor(images=[torch.full((3, 70, 30), 0.5)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.get_image_features(pixels.to(model.dtype))


def test_a_folder_with_its_processor_loads_with_the_installed_classes_or_its_own_code(saved, tiny_processor):
    full, _, reference = saved
    model, processor = load_model_and_processor(full, device="cpu")
    assert type(model) is DiaNAModel and not model.training
    assert processor.tokenizer.get_vocab() == tiny_processor.tokenizer.get_vocab()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in reference.state_dict().items())
    # Same weights, same features up to float32 rounding: a BLAS kernel may sum in another order
    # depending on where the weights sit in memory (measured 2.4e-7 on an AMD EPYC).
    expected = _image_features(reference, tiny_processor)
    torch.testing.assert_close(_image_features(model, processor), expected, rtol=0, atol=1e-6)

    # Through AutoModel / AutoProcessor (the folder's auto_map): the same features.
    remote, remote_processor = load_model_and_processor(full, device="cpu", trust_remote_code=True)
    assert type(remote).__name__ == "DiaNAModel" and type(remote_processor).__name__ == "DiaNAProcessor"
    torch.testing.assert_close(_image_features(remote, remote_processor), expected, rtol=0, atol=1e-6)


def test_a_bare_folder_gets_the_fine_tuning_processor_at_the_models_image_size(saved, tokenizer_dir, caplog):
    _, bare, reference = saved
    model, processor = load_model_and_processor(bare, tokenizer_dir, device="cpu")
    assert "has no processor files" in caplog.text
    size = processor.image_processor.size
    assert (size["height"], size["width"]) == TINY_IMAGE_SIZE != (384, 192)
    assert processor.max_length == 400 and processor.tokenization == "rounds"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in reference.state_dict().items())


def test_dtype_auto_keeps_the_saved_one_and_a_named_dtype_converts(saved, tmp_path):
    full, _, _ = saved
    half = DiaNAModel.from_pretrained(full, dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    assert load_model_and_processor(tmp_path / "bf16", device="cpu", dtype="auto")[0].dtype == torch.bfloat16
    assert load_model_and_processor(tmp_path / "bf16", device="cpu", dtype="float32")[0].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model_and_processor(full, device="cpu", dtype="fp8")


def test_what_is_no_model_folder_is_named_as_the_flag(tmp_path):
    with pytest.raises(UserInputError, match=f"--model_name_or_path: model folder not found: {tmp_path / 'none'}"):
        load_model_and_processor(tmp_path / "none")
    with pytest.raises(UserInputError, match=r"--model_name_or_path: .* has no config\.json"):
        load_model_and_processor(tmp_path)
