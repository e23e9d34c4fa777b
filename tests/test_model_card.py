"""Model card rendering from an evaluation report + run arguments, and its metadata round trip."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from diana.hub_cards.model_card import (
    PAPER_BASE_MODELS, check_model_card, load_evaluation, load_run_args, parse_eval_results, render_model_card,
)
from diana.training.evaluation.metrics import cumulative_hits_at_k, retrieval_metrics_and_first_hit_ranks
from tests.helpers import tiny_config

ROUNDS = 3


def _eval_report(seed: int, modes=("global", "fused")) -> dict:
    """A report in evaluation.py's layout, from real metrics of random per-round similarities."""
    generator = torch.Generator().manual_seed(seed)
    query_ids = torch.arange(12) % 6
    gallery_ids = torch.arange(18) % 6
    report = {}
    for mode in modes:
        per_mode, first_hits = {}, []
        for k in range(1, ROUNDS + 1):
            similarity = torch.randn(12, 18, generator=generator) + 0.8 * k * (query_ids[:, None] == gallery_ids[None])
            metrics, ranks = retrieval_metrics_and_first_hit_ranks(similarity, query_ids, gallery_ids)
            per_mode[f"round_{k}"] = metrics
            first_hits.append(ranks)
        per_mode["full"] = dict(per_mode[f"round_{ROUNDS}"])
        per_mode["cumulative_hits@10"] = cumulative_hits_at_k(torch.stack(first_hits), k=10)
        report[mode] = per_mode
    report["meta"] = {"num_queries": 12, "num_gallery": 18, "num_persons": 6, "num_rounds": ROUNDS, "num_processes": 1}
    # evaluation.write_results adds a reference ranker as {"label", **curve}; SynthPedes' oracle layout.
    rounds = [{"round": k, "R@1": 40.0 + k + seed, "R@5": 60.5 + k, "R@10": 70.25 + k, "mAP": 45.0 + k}
              for k in range(1, ROUNDS + 1)]
    report["reference"] = {"label": "oracle", "rounds": rounds, "full": rounds[-1], "num_queries": 12}
    return report


def _run_args(tmp_path, **model_overrides) -> dict:
    record = {
        "model": {"model_name_or_path": None, "vision_model_path": None, "text_model_path": None,
                  "model_config": None, "num_attribute_queries": 16, "use_sdm_loss": True, "use_refiner_loss": True,
                  "lora_rank": 0, **model_overrides},
        "data": {"dataset": "chatpedes", "data_dir": "/data/chatpedes", "eval_split": "validation", "max_length": 400,
                 "round_retaining": True, "token_masking": 0.15, "image_augmentation": True, "image_size": [384, 192]},
        "training": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 2, "num_train_epochs": 10,
                     "learning_rate": 1.7e-5, "lr_scheduler_type": "cosine", "warmup_steps": 50, "optim": "adamw_torch",
                     "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.05, "max_grad_norm": 1.0, "bf16": True,
                     "seed": 1234, "load_best_model_at_end": True, "metric_for_best_model": "eval_global/full/R@1"},
        "versions": {"torch": torch.__version__},
    }
    path = tmp_path / "run_args.json"
    path.write_text(json.dumps(record))
    return load_run_args(path)


def test_card_metadata_tables_and_round_trip(tmp_path):
    report = _eval_report(0)
    results_file = tmp_path / "eval_results.json"
    results_file.write_text(json.dumps(report))
    run_args = _run_args(tmp_path, vision_model_path="microsoft/swinv2-base-patch4-window12-192-22k",
                         text_model_path="meta-llama/Llama-3.2-1B")
    evaluation = load_evaluation(results_file, run_args, curve="per_round_curves.png")
    assert (evaluation.dataset, evaluation.split) == ("chatpedes", "validation")  # from the run arguments
    card = render_model_card(evaluation, run_args, config=tiny_config(), repo_id="someone/diana-tiny", revision="0123abcd")
    check_model_card(card)

    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    data = loaded.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "llama3.2"
    assert data["base_model"] == list(PAPER_BASE_MODELS) and data["datasets"] == ["chatpedes"]
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "diana-tiny"
    values = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in results}
    full = report["global"]["full"]  # the config's score mode
    assert values == {("chatpedes", "validation", t): round(full[k], 2)
                      for k, t in (("R@1", "recall@1"), ("R@5", "recall@5"), ("R@10", "recall@10"), ("mAP", "map"))}

    text = loaded.text
    for mode in ("global", "fused"):
        for k in range(1, ROUNDS + 1):
            m = report[mode][f"round_{k}"]
            row = (f"| {k} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['mAP']:.2f} | {m['mINP']:.2f} "
                   f"| {m['mFR']:.2f} | {report[mode]['cumulative_hits@10'][k - 1]:.2f} |")
            assert row in text
    assert "![Retrieval per dialogue round" in text and "(per_round_curves.png)" in text
    oracle = report["reference"]["rounds"][1]
    assert "**Reference: oracle**" in text
    assert f"| 2 | {oracle['R@1']:.2f} | {oracle['R@5']:.2f} | {oracle['R@10']:.2f} | {oracle['mAP']:.2f} | – | – |" in text
    assert 'revision = "someone/diana-tiny", "0123abcd"' in text
    assert "trust_remote_code=True, revision=revision" in text and "AutoProcessor.from_pretrained" in text
    assert "| peak learning rate | 1.7e-05 |" in text and "| global batch | 64 (32 per device x 1 process(es) x 2 accumulation) |" in text
    assert "| seed | 1234 |" in text and "| precision | bf16 |" in text
    for phrase in ("Surveillance", "Consent", "Bias", "@inproceedings", "Bai, Yang", "CVPR"):
        assert phrase in text


def test_random_initialisation_and_chained_stages_name_their_origin(tmp_path):
    stage1_dir = tmp_path / "stage1"
    stage1_dir.mkdir()
    _run_args(stage1_dir, model_config={"projection_dim": 24})
    stage2 = _run_args(tmp_path, model_name_or_path=str(stage1_dir))
    card = render_model_card(parse_eval_results(_eval_report(1)), stage2, repo_id="a/b")
    check_model_card(card)
    assert card.data.base_model is None  # no pretrained tower weights anywhere in the chain
    assert "an earlier stage (stage1), itself initialised from random initialisation" in card.text

    unrecorded = _run_args(tmp_path, model_name_or_path=str(tmp_path / "elsewhere"))
    card = render_model_card(parse_eval_results(_eval_report(1)), unrecorded, config=tiny_config())
    assert card.data.base_model is None and "their own origin is not recorded" in card.text

    # The main job's chain: stage 0 pretrains the image tower, stages 1 and 2 keep it fixed.
    stage0_dir, stage1_dir = tmp_path / "s0", tmp_path / "s1"
    stage0_dir.mkdir()
    stage1_dir.mkdir()
    _run_args(stage0_dir, model_config={"projection_dim": 24})
    record = json.loads((stage0_dir / "run_args.json").read_text())
    record["data"]["objective"] = "image_attributes"
    (stage0_dir / "run_args.json").write_text(json.dumps(record))
    _run_args(stage1_dir, model_name_or_path=str(stage0_dir), freeze_vision_model=True)
    stage2 = _run_args(tmp_path, model_name_or_path=str(stage1_dir), freeze_vision_model=True)
    card = render_model_card(parse_eval_results(_eval_report(1)), stage2, repo_id="a/b")
    check_model_card(card)
    assert ("an earlier stage (s1), itself initialised from an earlier stage (s0: image-tower pretraining on its "
            "MALS captions' n-grams and labels), itself initialised from random initialisation") in card.text
    assert "| image tower | fixed in this stage (--freeze_vision_model) |" in card.text
    card = render_model_card(parse_eval_results(_eval_report(1)), _run_args(tmp_path), repo_id="a/b")
    assert "| image tower |" not in card.text and "image-tower pretraining" not in card.text

    synth = _run_args(tmp_path, model_config={"projection_dim": 24})
    synth["data"]["data_dir"] = "/runs/synthpedes/chatpedes"
    card = render_model_card(parse_eval_results(_eval_report(2), dataset="synthpedes"), synth)
    assert card.data.datasets == ["synthpedes"] and "Trained on: SynthPedes" in card.text
    assert "trained on SynthPedes, procedurally drawn" in card.text
    assert "| data set | SynthPedes (synthetic, ChatPedes layout) (/runs/synthpedes/chatpedes) |" in card.text


def test_card_without_results_or_recipe_still_checks():
    card = render_model_card(None, None, repo_id="a/b")
    check_model_card(card)
    assert card.data.eval_results is None and "No evaluation results" in card.text


def test_architecture_line_names_the_vision_stem_and_the_text_pooling():
    from diana.modeling_diana import DiaNAConfig

    plain = render_model_card(None, None, config=tiny_config(), repo_id="a/b").text
    assert "Swin Transformer V2 (embed 16, depths [1, 2], window 4), input [64, 32]" in plain
    assert "last-token pooling" in plain and "mean pooling" not in plain
    mean = render_model_card(None, None, config=tiny_config(text_pooling="mean"), repo_id="a/b").text
    assert "mean pooling (`text_pooling: mean`)" in mean and "last-token pooling" not in mean
    conv = render_model_card(None, None, config=tiny_config(vision_stem="conv"), repo_id="a/b").text
    assert "Swin Transformer V2 (embed 16, depths [1, 2], window 4, convolutional stem (`vision_stem: conv`))" in conv
    # The paper's shapes name the paper's towers as base models, but not with another stem: that tower
    # cannot have come from the Swinv2-B checkpoint.
    assert render_model_card(None, None, config=DiaNAConfig(), repo_id="a/b").data.base_model == list(PAPER_BASE_MODELS)
    assert render_model_card(None, None, config=DiaNAConfig(vision_stem="conv"), repo_id="a/b").data.base_model is None


def test_bad_reports_are_named(tmp_path):
    report = _eval_report(3, modes=("global",))
    del report["global"]["full"]
    with pytest.raises(ValueError, match=r"'global' has no full-dialogue metrics"):
        parse_eval_results(report, source="x.json")
    with pytest.raises(ValueError, match="no score mode"):
        parse_eval_results({"meta": {}}, source="x.json")
    report = _eval_report(3, modes=("global",))
    report["global"]["round_x"] = {}
    with pytest.raises(ValueError, match="global/round_x"):
        parse_eval_results(report)
    broken = tmp_path / "run_args.json"
    broken.write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="run_args.json.*'data'"):
        load_run_args(broken)


def test_check_model_card_catches_a_broken_card(tmp_path):
    card = render_model_card(parse_eval_results(_eval_report(4)), repo_id="a/b")
    card.data.license = None
    with pytest.raises(ValueError, match="license"):
        check_model_card(card)


def test_training_data_and_consent_come_from_the_recipe_never_from_the_evaluation(tmp_path):
    synthetic_eval = parse_eval_results(_eval_report(5), dataset="synthpedes")
    # No recipe: a SynthPedes evaluation says nothing of what the weights were trained on.
    card = render_model_card(synthetic_eval, None, repo_id="a/b")
    check_model_card(card)
    assert "Trained on: not recorded" in card.text and "procedurally drawn" not in card.text
    assert "makes no claim about them or their subjects' consent" in card.text
    assert card.data.datasets is None and card.data.eval_results[0].dataset_type == "synthpedes"

    # Trained on real ChatPedes, evaluated on SynthPedes: the consent statement is ChatPedes'.
    real = _run_args(tmp_path, model_config={"projection_dim": 24})
    card = render_model_card(synthetic_eval, real, repo_id="a/b")
    assert "Trained on: ChatPedes" in card.text and card.data.datasets == ["chatpedes"]
    assert "include, via ChatPedes, CUHK-PEDES images" in card.text and "trained on SynthPedes" not in card.text

    # SynthPedes from weights whose own run is not recorded: no claim that no real person was seen.
    stage = tmp_path / "stage"
    stage.mkdir()
    unrecorded = _run_args(stage, model_name_or_path=str(tmp_path / "elsewhere"))
    unrecorded["data"]["data_dir"] = "/runs/synthpedes/chatpedes"
    card = render_model_card(synthetic_eval, unrecorded, repo_id="a/b")
    assert "procedurally drawn, with no real person" in card.text and "trained on SynthPedes, procedurally" not in card.text
    assert f"started from ({tmp_path / 'elsewhere'}) were trained on data this card does not record" in card.text

    # The main job's chain, all SynthPedes from a random start: the synthetic claim holds, both layouts named.
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    s0.mkdir()
    s1.mkdir()
    first = _run_args(s0, model_config={"projection_dim": 24})
    first["data"].update(dataset="mals", data_dir="/runs/synthpedes/mals")
    (s0 / "run_args.json").write_text(json.dumps({k: v for k, v in first.items() if k != "_path"}))
    last = _run_args(s1, model_name_or_path=str(s0))
    last["data"]["data_dir"] = "/runs/synthpedes/chatpedes"
    card = render_model_card(synthetic_eval, last, repo_id="a/b")
    assert ("Trained on: SynthPedes (synthetic, MALS layout), then SynthPedes (synthetic, ChatPedes layout)"
            in card.text)
    assert "This model was trained on SynthPedes, procedurally drawn figures with no real person" in card.text
    assert card.data.datasets == ["synthpedes"]
