"""run_stage's argument parsing (training/arguments.py): YAML preset + flags, `--model_config` inline
or from a file, and errors that name what is wrong."""

from __future__ import annotations

import json

import pytest

from diana.training.arguments import parse_args
from tests.test_run_stage import TINY_MODEL


def test_preset_gives_defaults_and_flags_override_them(tmp_path):
    model, data, train = parse_args(["--config", "stage2_synthpedes_small", "--output_dir", str(tmp_path),
                                     "--learning_rate", "3e-4"])
    assert data.dataset == "chatpedes" and data.round_retaining
    assert train.learning_rate == pytest.approx(3e-4) and train.num_train_epochs == 11
    assert model.num_attribute_queries == 6


def test_model_config_inline_json_longer_than_a_file_name_or_from_a_file(tmp_path):
    inline = json.dumps(TINY_MODEL)
    assert len(inline) > 255  # longer than any file name: must not be looked up on disk
    model, _, _ = parse_args(["--config", "stage1_synthpedes_small", "--output_dir", str(tmp_path), "--model_config", inline])
    assert model.model_config == TINY_MODEL
    path = tmp_path / "model.yaml"
    path.write_text(inline)
    model, _, _ = parse_args(["--config", "stage1_synthpedes_small", "--output_dir", str(tmp_path), "--model_config", str(path)])
    assert model.model_config == TINY_MODEL
    with pytest.raises(FileNotFoundError, match="--model_config 'nowhere.yaml': no such file"):
        parse_args(["--output_dir", str(tmp_path), "--model_config", "nowhere.yaml"])
    with pytest.raises(ValueError, match="--model_config '{\"projection_dim\": 24': not valid JSON/YAML"):
        parse_args(["--output_dir", str(tmp_path), "--model_config", '{"projection_dim": 24'])
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a mapping"):
        parse_args(["--output_dir", str(tmp_path), "--model_config", str(path)])


def test_small_presets_share_one_model_config_found_in_the_configs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the name resolves under training/configs/, not the working directory
    stage0, data0, _ = parse_args(["--config", "stage0_synthpedes_small", "--output_dir", str(tmp_path)])
    stage1, data1, _ = parse_args(["--config", "stage1_synthpedes_small", "--output_dir", str(tmp_path)])
    assert stage0.model_config == stage1.model_config
    assert stage0.model_config["vision_config"]["initializer_range"] == 0.15
    assert stage0.model_config["text_config"]["hidden_size"] == 64
    assert (data0.objective, data1.objective) == ("image_attributes", "retrieval")
    # A file of that name in the working directory wins over the configs folder.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "synthpedes_small.yaml").write_text("projection_dim: 24\n")
    model, _, _ = parse_args(["--config", "stage1_synthpedes_small", "--output_dir", str(tmp_path)])
    assert model.model_config == {"projection_dim": 24}


def test_unknown_preset_key_is_named(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("learning_rate: 1.0e-4\nlerning_rate: 2.0e-4\n")
    with pytest.raises(ValueError, match=r"unknown keys in the YAML preset: \['lerning_rate'\]"):
        parse_args(["--config", str(preset), "--output_dir", str(tmp_path)])
