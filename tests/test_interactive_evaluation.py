"""Interactive evaluation: simulated witnesses, the per-round metrics (BRI included), the two ways dialogues are
encoded, the command and the main job's step, on tiny data and a tiny model."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch

from diana.modeling_diana import DiaNAModel
from diana.processing.data import synthpedes, synthpedes_attributes
from diana.processing.search import GalleryIndex
from diana.processing.search.questioner import DONT_REMEMBER, ProposedQuestion, QuestionBank
from diana.training import main_job
from diana.training.evaluation import interactive
from diana.training.evaluation.interactive import (
    build_questioners,
    encode_written_dialogues,
    run_sessions,
    write_dialogues,
)
from diana.training.evaluation.metrics import best_log_rank_integral, interactive_metrics
from diana.training.evaluation.witness import (
    DialogueWitness,
    SynthPedesWitness,
    Target,
    load_split_entries,
    make_witness,
    pick_targets,
)
from tests.helpers import tiny_config, tiny_text_config
from tests.test_cli_errors import one_line_exit

PERSON = {"hair_colour": "gray", "hair_length": "long", "hat": "green", "upper_colour": "white", "sleeves": "long",
          "pattern": "plain", "lower_colour": "brown", "lower_type": "shorts", "shoes": "white", "bag": "none",
          "bag_colour": None}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny SynthPedes: 6 test persons x 2 images, 3-round dialogues."""
    root = tmp_path_factory.mktemp("synth")
    synthpedes.generate(root, persons=12, images_per_person=2, rounds=3, seed=1, mals_images=1, image_size=(64, 32),
                        test_fraction=0.5, progress=False)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_processor):
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config(text_config=tiny_text_config(num_key_value_heads=4), vision_stem="conv",
                                   text_pooling="mean")).eval()
    folder = tmp_path_factory.mktemp("stage2")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder, model


# -------------------------------------------------------------------------------------------- witnesses


def _question(attribute, text=None):
    return ProposedQuestion(text or synthpedes_attributes.QUESTIONS[attribute][0], (), attribute, "test")


def test_synthpedes_witness_answers_in_the_generators_templates():
    witness = SynthPedesWitness(PERSON, seed=0)
    for attribute in synthpedes.ATTRIBUTE_NAMES:
        value = PERSON[attribute]
        if value is None:
            assert witness.answer(_question(attribute)) == DONT_REMEMBER  # a bag colour without a bag
            continue
        table = synthpedes_attributes.ANSWERS[attribute]
        templates = table.get(value, table.get("*"))
        allowed = {t.format(v=value, V=value[:1].upper() + value[1:]) for t in templates}
        answers = {witness.answer(_question(attribute)) for _ in range(20)}
        assert answers <= allowed and (len(answers) > 1) == (len(allowed) > 1)  # the template varies
        # A bare question string of the generator names its attribute too.
        assert witness.answer(synthpedes_attributes.QUESTIONS[attribute][-1]) in allowed
    assert witness.answer("What was the weather like?") == DONT_REMEMBER
    assert witness.answer(ProposedQuestion("Weather?", (), None, "x")) == DONT_REMEMBER


def test_dialogue_witness_answers_from_the_targets_own_rounds():
    witness = DialogueWitness([
        [("Please describe the person you saw.", "A man."), ("What colour was the top?", "Red."), ("Shoes?", "Black.")],
        [("Please describe the person you saw.", "A tall man."), ("Hat?", "A cap.")],
    ])
    assert witness.answer("what colour was the TOP") == "Red."
    assert witness.answer(ProposedQuestion("Hat?", ("No.",), None, "random")) == "A cap."
    assert witness.answer("Please describe the person you saw.") == DONT_REMEMBER  # round 1 is the description
    assert witness.answer("Bag?") == DONT_REMEMBER
    target = Target(1, "a.png", [[("Please describe the person you saw.", "A man.")]], None)
    assert isinstance(make_witness(target), DialogueWitness)
    assert isinstance(make_witness(Target(1, "a.png", target.dialogues, PERSON)), SynthPedesWitness)


# -------------------------------------------------------------------------------------------- metrics


def test_bri_on_a_hand_checkable_case():
    # One target ranked 4, 2, 8 (best so far 4, 2, 2); another always first.
    ranks = torch.tensor([[4, 1], [2, 1], [8, 1]])
    log4, log2 = math.log(4), math.log(2)
    expected = [log4 / 2, ((log4 + log2) / 2) / 2, (((log4 + log2) / 2 + (log2 + log2) / 2) / 2) / 2]
    assert best_log_rank_integral(ranks).tolist() == pytest.approx(expected, abs=1e-12)


def test_metrics_match_a_brute_force_computation():
    rng = np.random.default_rng(0)
    first_hits = torch.from_numpy(rng.integers(0, 30, size=(6, 50)))  # (R, T) 0-based
    rows = interactive_metrics(first_hits)
    for r, row in enumerate(rows):
        ranks = [int(first_hits[r, t]) + 1 for t in range(50)]
        best = [min(int(first_hits[s, t]) + 1 for s in range(r + 1)) for t in range(50)]
        assert row["round"] == r + 1
        assert row["R@1"] == pytest.approx(100 * sum(x == 1 for x in ranks) / 50)
        assert row["R@10"] == pytest.approx(100 * sum(x <= 10 for x in ranks) / 50)
        assert row["Hits@10"] == pytest.approx(100 * sum(x <= 10 for x in best) / 50)
        assert row["mean_rank"] == pytest.approx(sum(ranks) / 50)
        bri = []
        for t in range(50):
            logs = [math.log(min(int(first_hits[s, t]) + 1 for s in range(q + 1))) for q in range(r + 1)]
            bri.append(logs[0] if r == 0 else sum((logs[q] + logs[q + 1]) / 2 for q in range(r)) / r)
        assert row["BRI"] == pytest.approx(sum(bri) / 50)


# -------------------------------------------------------------------------------------------- running


def test_written_dialogues_and_search_sessions_give_the_same_encodings(synth, model_dir, tiny_processor):
    """The two ways a policy's dialogues are encoded (all at once / a session per target, round by round)."""
    _, model = model_dir
    targets, gallery = load_split_entries(synth / "chatpedes", "test")
    targets = pick_targets(targets, "person")
    assert len(targets) == 6 and len({t.person_id for t in targets}) == 6
    index = GalleryIndex.build(gallery.paths, model, tiny_processor, with_attributes=True, ids=gallery.person_ids,
                               progress=False)
    bank = QuestionBank.from_synthpedes()
    questioners = build_questioners("random", bank, targets, gallery, seed=0, top_n=5, temperature=None)
    witnesses = [make_witness(t, i) for i, t in enumerate(targets)]
    written = write_dialogues(questioners, targets, witnesses, rounds=4)
    encoded = encode_written_dialogues(model, tiny_processor, written, rounds=4, with_attributes=True)
    witnesses = [make_witness(t, i) for i, t in enumerate(targets)]
    dialogues, in_sessions = run_sessions(questioners, targets, witnesses, model, tiny_processor, index, 4, "fused")
    assert dialogues == written
    for name in ("embeds", "attributes"):
        torch.testing.assert_close(in_sessions[name], encoded[name], atol=1e-5, rtol=0)


def test_main_job_step_writes_the_table_for_every_policy(synth, model_dir, tmp_path, capsys):
    out = tmp_path / "job"
    shutil.copytree(model_dir[0], out / "stage2")
    shutil.copytree(synth / "chatpedes", out / "synthpedes" / "chatpedes")
    results = main_job.interactive_step(out, rounds=3)
    printed = capsys.readouterr().out
    assert "| round | random R@1" in printed and "info_gain BRI" in printed and "oracle Hits@10" in printed
    assert set(results["policies"]) == {"random", "info_gain", "oracle"}
    assert results["meta"]["num_targets"] == 6 and results["meta"]["num_gallery"] == 12
    folder = out / "interactive"
    assert json.loads((folder / "interactive_results.json").read_text())["policies"].keys() == results["policies"].keys()
    assert (folder / "interactive_curves.png").stat().st_size > 0
    assert (folder / "interactive_table.md").read_text().count("\n") == 2 + 3
    dialogues = json.loads((folder / "interactive_dialogues.json").read_text())
    bank = QuestionBank.from_synthpedes()
    for policy, searches in dialogues.items():
        for search in searches:
            rounds = search["dialogue"]
            assert len(rounds) == 3 and rounds[0][0] == synthpedes.DESCRIBE_QUESTION
            attributes = [bank.find(q).attribute for q, _ in rounds[1:]]
            assert len(set(attributes)) == len(attributes), (policy, rounds)
            assert not set(attributes) & set(bank.stated_values(rounds[:1])), (policy, rounds)
    for per_policy in results["policies"].values():
        hits = [row["Hits@10"] for row in per_policy["rounds"]]
        assert hits == sorted(hits) and per_policy["rounds"][0] == results["policies"]["random"]["rounds"][0]


def test_annotated_data_uses_its_own_rounds_and_refuses_the_oracle(synth, model_dir, tiny_processor, tmp_path):
    data = tmp_path / "plain"
    shutil.copytree(synth / "chatpedes", data)
    entries = json.loads((data / "test_reid.json").read_text())
    (data / "test_reid.json").write_text(json.dumps([{k: v for k, v in e.items() if k != "synthpedes"} for e in entries]))
    _, model = model_dir
    results = interactive.evaluate_interactive(model, tiny_processor, data, policies=["dataset"], rounds=3,
                                               output_dir=tmp_path / "report")
    assert results["meta"]["witness"] == "annotated rounds"
    searches = json.loads((tmp_path / "report" / "interactive_dialogues.json").read_text())["dataset"]
    for search, entry in zip(searches, entries):
        chats = entry["chats"] if isinstance(entry["chats"][0][0], list) else [entry["chats"]]
        # The dataset policy asks the annotated questions, and the witness answers them as annotated.
        assert search["dialogue"] == [[r[0]["value"], r[1]["value"]] for r in chats[0]]
    with pytest.raises(ValueError, match="oracle policy needs SynthPedes ground truth"):
        interactive.evaluate_interactive(model, tiny_processor, data, policies=["oracle"], rounds=2)


@pytest.mark.parametrize("argv, message", [
    (["--policies", "random", "entropy"], "--policies"),
    (["--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
])
def test_command_errors_are_one_line(synth, model_dir, capsys, argv, message):
    line = one_line_exit(capsys, interactive.main, ["--model_name_or_path", str(model_dir[0]), "--data_dir", str(synth / "chatpedes"), *argv])
    assert message in line


def test_questioner_benchmark_times_a_proposal_beside_a_cached_round(synth, model_dir):
    """The benchmark script runs on a saved model and a split's gallery and reports both timings per round
    (a check of the script; its figures are in BENCHMARKS.md)."""
    from diana.training.benchmarks import questioner as questioner_benchmark

    out = io.StringIO()
    rows = questioner_benchmark.main(["--model_name_or_path", str(model_dir[0]), "--data_dir", str(synth / "chatpedes"),
                                      "--rounds", "3", "--repeats", "2"], out=out)
    assert [row["round"] for row in rows] == [2, 3]
    assert all(row["hypotheses"] > 0 and row["propose_min_ms"] > 0 and row["round_min_ms"] > 0 for row in rows)
    assert [round(row["ratio"], 2) for row in rows] == [round(row["propose_min_ms"] / row["round_min_ms"], 2) for row in rows]
    assert "ratio (min/min)" in out.getvalue()
