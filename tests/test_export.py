"""Export of a Hub-ready folder: files, card, fresh-process load (project not importable), adapters,
push (Hub calls recorded, no network) and the dry run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

from diana.hub_cards import export
from diana.processing.cli_errors import UserInputError
from diana.modeling_diana import DiaNAModel
from diana.training.evaluation import evaluate_retrieval
from tests.helpers import tiny_config

QUESTIONS = ["Please describe the person you saw.", "Any bag?", "Shoes?"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiaNAModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tiny_processor, tmp_path_factory):
    """A training-output-like folder: weights + processor + eval_results.json (from the real
    evaluation on a tiny split) + run_args.json + the per-round curve in eval_*/."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("run")
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = {"image": [], "file_path": [], "person_id": [], "dialogue": []}
    for i in range(8):
        path = images / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path)
        rows["image"].append(str(path))
        rows["file_path"].append(f"{i}.png")
        rows["person_id"].append(i // 2)
        rows["dialogue"].append([{"question": q, "answer": f"answer {i} {j}"} for j, q in enumerate(QUESTIONS)])
    split = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    folder = root / "output"
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    results = evaluate_retrieval(model, tiny_processor, split, batch_size=4, score_modes=("global",),
                                 output_dir=folder / "eval_validation_step0")
    (folder / "eval_results.json").write_text(json.dumps(results))
    run_args = {
        "model": {"model_config": {"projection_dim": 24}, "num_attribute_queries": 3, "lora_rank": 0},
        "data": {"dataset": "chatpedes", "data_dir": str(root), "eval_split": "validation", "max_length": 400},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 5e-4, "num_train_epochs": 2, "seed": 7},
    }
    (folder / "run_args.json").write_text(json.dumps(run_args))
    return folder, results


def test_export_checkpoint_loads_in_a_fresh_process_and_dry_run_lists_files(checkpoint, tmp_path, capsys):
    folder, results = checkpoint
    output = tmp_path / "hub"
    assert export.main(["--model_name_or_path", str(folder), "--output_dir", str(output), "--repo_id", "me/diana-tiny",
                        "--push_to_hub", "me/diana-tiny", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "fresh-process check passed: transformers_modules." in printed

    for name in export.REQUIRED_FILES + ("loss_diana.py", "eval_results.json", "run_args.json", "per_round_curves.png"):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_diana.DiaNAConfig", "AutoModel": "modeling_diana.DiaNAModel"}
    assert json.loads((output / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == "processing_diana.DiaNAProcessor"
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        assert "logit_scale" in weights.keys()

    card = ModelCard.load(output / "README.md")
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["recall@1"] == round(results["global"]["full"]["R@1"], 2)
    assert values["map"] == round(results["global"]["full"]["mAP"], 2)
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}
    assert card.data.base_model is None  # the run started from a random config
    assert "(per_round_curves.png)" in card.text and "| seed | 7 |" in card.text

    # Dry run: every file with its size, and nothing else.
    listed = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in printed.splitlines()
              if line.startswith("  ") and line.split()[0].replace(",", "").isdigit()}
    on_disk = {p.name: p.stat().st_size for p in output.iterdir()}
    assert listed == on_disk
    assert f"would upload {len(on_disk)} files" in printed


def test_fresh_process_check_fails_without_the_code_files(checkpoint, model, tiny_processor, tmp_path):
    folder, _ = checkpoint
    output = export.export_folder(model, tiny_processor, tmp_path / "hub")
    (output / "processing_diana.py").unlink()  # the project has it, the folder does not
    with pytest.raises(export.ExportCheckError, match="fresh process without the diana package"):
        export.verify_folder(output, model, tiny_processor)


def test_feature_comparison_refuses_other_weights_and_project_imports(model, tiny_processor, tmp_path):
    output = export.export_folder(model, tiny_processor, tmp_path / "hub")
    reloaded = DiaNAModel.from_pretrained(output).eval()
    images = [Image.fromarray(np.full((40, 20, 3), 60 * i, np.uint8)) for i in range(3)]
    text = tiny_processor(dialogues=export.PROBE_DIALOGUES, return_round_ends=True, return_tensors="pt")
    pixels = tiny_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = {
            "pixel_values": pixels, "input_ids": text["input_ids"],
            "image_embeds": reloaded.encode_images(pixels).image_embeds,
            "text_embeds": reloaded.encode_dialogues(text["input_ids"], text["attention_mask"],
                                                     text["round_end_positions"]).text_embeds,
        }
    report = {"model_class": "transformers_modules.hub.modeling_diana.DiaNAModel", "diana_imported": []}
    assert max(export.compare_features(model, tiny_processor, report, theirs, images).values()) <= 1e-5
    tampered = DiaNAModel.from_pretrained(output).eval()
    with torch.no_grad():
        tampered.visual_projection.weight.add_(0.05 * torch.randn_like(tampered.visual_projection.weight))
    with pytest.raises(export.ExportCheckError, match="image_embeds differ"):
        export.compare_features(tampered, tiny_processor, report, theirs, images)
    with pytest.raises(export.ExportCheckError, match="imported the project"):
        export.compare_features(model, tiny_processor, {**report, "diana_imported": ["diana"]}, theirs, images)
    with pytest.raises(export.ExportCheckError, match="did not use the folder's code"):
        export.compare_features(model, tiny_processor, {**report, "model_class": "diana.modeling_diana.X"}, theirs, images)


def test_adapter_and_base_export_as_one_merged_plain_model(model, tiny_processor, tmp_path):
    from diana.training.lora import apply_lora

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = DiaNAModel.from_pretrained(_saved(model, tiny_processor, base_dir)).eval()
    peft_model = apply_lora(base, rank=2)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # LoRA B starts at zero: make the adapter matter
    peft_model.save_pretrained(adapter_dir)
    peft_model.eval()
    text = tiny_processor(dialogues=export.PROBE_DIALOGUES, return_round_ends=True, return_tensors="pt")
    with torch.no_grad():
        expected = peft_model.base_model.model.encode_dialogues(
            text["input_ids"], text["attention_mask"], text["round_end_positions"]).text_embeds
        unadapted = model.encode_dialogues(text["input_ids"], text["attention_mask"], text["round_end_positions"]).text_embeds
    assert (expected - unadapted).abs().max() > 1e-3

    output = tmp_path / "hub"
    export.main(["--adapter_dir", str(adapter_dir), "--base_model_name_or_path", str(base_dir), "--output_dir", str(output), "--skip_check"])
    with safe_open(str(output / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k or "base_layer" in k or "modules_to_save" in k]
    merged = DiaNAModel.from_pretrained(output).eval()
    with torch.no_grad():
        got = merged.encode_dialogues(text["input_ids"], text["attention_mask"], text["round_end_positions"]).text_embeds
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_push_uploads_the_folder_then_pins_the_card(checkpoint, model, tiny_processor, tmp_path, monkeypatch):
    import huggingface_hub

    folder, _ = checkpoint
    calls = []

    class Commit:
        oid = "c0ffee1234567890c0ffee1234567890c0ffee12"

    def fake_create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id))

    def fake_upload_folder(*, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))
        return Commit()

    def fake_upload_file(*, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        calls.append(("upload_file", repo_id, path_in_repo, open(path_or_fileobj).read()))

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(huggingface_hub, "upload_file", fake_upload_file)
    output = tmp_path / "hub"
    export.main(["--model_name_or_path", str(folder), "--output_dir", str(output), "--push_to_hub", "me/diana-tiny", "--skip_check"])
    assert [c[0] for c in calls] == ["create_repo", "upload_folder", "upload_file"]
    assert "model.safetensors" in calls[1][2] and "README.md" in calls[1][2]
    readme = calls[2][3]
    assert calls[2][2] == "README.md" and f'"me/diana-tiny", "{Commit.oid}"' in readme
    assert ModelCard.load(output / "README.md").data.eval_results  # the pinned card is still complete


def test_bad_arguments_are_refused(checkpoint, tmp_path):
    folder, _ = checkpoint
    with pytest.raises(UserInputError, match="--dry_run needs --push_to_hub"):
        export.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "x"), "--dry_run"])
    with pytest.raises(ValueError, match="exactly one"):
        export.main(["--model_name_or_path", str(folder), "--adapter_dir", str(folder), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(UserInputError, match=r"--model_name_or_path: .* has no config\.json"):
        export.main(["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "x")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "full"), "--skip_check"])


def _saved(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_export_leaves_no_stray_files(checkpoint, model, tiny_processor, tmp_path):
    output = export.export_folder(model, tiny_processor, tmp_path / "hub")
    assert sorted(p.name for p in output.iterdir()) == sorted(export.REQUIRED_FILES + ("loss_diana.py", "chat_template.jinja"))
    shutil.rmtree(output)


def test_official_release_is_converted_and_gets_a_processor(tokenizer_dir, tmp_path):
    from tests.test_convert_official_checkpoint import write_official_folder

    official_dir = tmp_path / "official"
    official, _ = write_official_folder(official_dir)
    output = tmp_path / "hub"
    export.main(["--official_dir", str(official_dir), "--tokenizer_dir", str(tokenizer_dir), "--output_dir", str(output),
                 "--skip_check"])
    for name in export.REQUIRED_FILES:
        assert (output / name).is_file(), name
    model = DiaNAModel.from_pretrained(output).eval()
    processor_config = json.loads((output / "processor_config.json").read_text())
    assert processor_config["image_processor"]["size"] == dict(zip(("height", "width"), model.config.vision_config.image_size))
    pixels = torch.randn(2, 3, *model.config.vision_config.image_size)
    with torch.no_grad():
        ours = model.get_image_features(pixels)
        theirs = official.encode_image(pixels)[0]  # (pooled projection, refiner slots)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
