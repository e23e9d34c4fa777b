"""The questioner: question banks, the policies, and the session's batched scoring of hypothetical rounds."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diana.modeling_diana import DiaNAModel
from diana.processing.data import synthpedes_attributes as synthpedes
from diana.processing.search import ChatSearchSession, GalleryIndex
from diana.processing.search import question_bank as question_bank_module
from diana.processing.search.questioner import (
    BankQuestion,
    QuestionBank,
    expected_entropies,
    make_policy,
    normalize_text,
)
from tests.helpers import tiny_config, tiny_text_config
from tests.test_cli_errors import one_line_exit

DESCRIBE = synthpedes.DESCRIBE_QUESTION
PERSON = {"hair_colour": "gray", "hair_length": "long", "hat": "green", "upper_colour": "white", "sleeves": "long",
          "pattern": "plain", "lower_colour": "brown", "lower_type": "shorts", "shoes": "white", "bag": "none",
          "bag_colour": None}


@pytest.fixture(scope="module")
def bank():
    return QuestionBank.from_synthpedes()


@pytest.fixture(scope="module")
def gallery_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _main_job_shaped_model(pooling):
    """The main job's model shape (conv stem, one K/V head per query head), tiny."""
    torch.manual_seed(0)
    return DiaNAModel(tiny_config(text_config=tiny_text_config(num_key_value_heads=4), vision_stem="conv",
                                  text_pooling=pooling)).eval()


@pytest.fixture(scope="module")
def models(tiny_processor, gallery_paths):
    """{pooling: (model, gallery index with attribute embeddings)}."""
    out = {}
    for pooling in ("last", "mean"):
        model = _main_job_shaped_model(pooling)
        out[pooling] = model, GalleryIndex.build(gallery_paths, model, tiny_processor, with_attributes=True,
                                                 progress=False)
    return out


class Transcript:
    def __init__(self, description):
        self.rounds = [(DESCRIBE, description)]


def _answer(attributes, proposal):
    value = attributes.get(proposal.attribute)
    if value is None:
        return "I don't remember."
    table = synthpedes.ANSWERS[proposal.attribute]
    return table.get(value, table.get("*"))[0].format(v=value, V=value.capitalize())


# -------------------------------------------------------------------------------------------- bank


def test_bank_round_trips_through_its_json_file(bank, tmp_path):
    path = tmp_path / "bank.json"
    bank.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "diana-question-bank" and data["version"] == 1
    loaded = QuestionBank.load(path)
    assert loaded.questions == bank.questions
    assert loaded.attribute_phrases == bank.attribute_phrases
    assert [q.attribute for q in bank.questions] == list(synthpedes.ATTRIBUTE_NAMES)
    # One candidate answer per value, each naming it.
    for q in bank.questions:
        assert len(q.answers) == len(synthpedes.ATTRIBUTES[q.attribute])


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "other", "version": 1, "questions": []}', "not a question bank"),
    ('{"format": "diana-question-bank", "version": 1, "questions": []}', "the question bank is empty"),
    ('{"format": "diana-question-bank", "version": 1, "questions": [{"question": "Hat?", "answers": ["No."]}, '
     '{"question": "Bag?", "answers": []}]}', "question 1: bank question 'Bag\\?': it has no candidate answers"),
    ('{"format": "diana-question-bank", "version": 1, "questions": [{"question": "Hat?", "answers": ["No."]}, '
     '{"question": "hat", "answers": ["No."]}]}', "bank questions 0 and 1 are the same question"),
    ('{"format": "diana-question-bank", "version": 1, "questions": [{"question": "Hat?", "answers": ["No."]}], '
     '"attribute_phrases": {"hat": {"red": ["red cap"], "blue": ["Red cap!"]}}}', "phrase 'Red cap!' states both"),
])
def test_bad_bank_files_are_refused_naming_the_file_and_item(tmp_path, content, message):
    path = tmp_path / "bank.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        QuestionBank.load(path)
    assert str(path) in str(error.value)


def test_bad_questions_and_policy_names_are_refused():
    with pytest.raises(ValueError, match="'Hat\\?': it has no candidate answers"):
        BankQuestion("Hat?", ())
    with pytest.raises(ValueError, match="answer ' ' is not a non-empty string"):
        BankQuestion("Hat?", ("No.", " "))
    with pytest.raises(ValueError, match="the question bank is empty"):
        QuestionBank([])
    with pytest.raises(ValueError, match="unknown questioner policy 'entropy': one of info_gain, random, dataset, oracle"):
        make_policy("entropy", QuestionBank.from_synthpedes())
    with pytest.raises(ValueError, match="the 'random' policy needs a question bank"):
        make_policy("random")


def test_synthpedes_descriptions_and_answers_state_exactly_their_attributes(bank):
    """The phrase rule reads back what the generator wrote: every attribute of every round, with its value,
    and nothing else (a "no bag" also rules out the bag colour)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        person = synthpedes.sample_attributes(rng)
        dialogue, revealed = synthpedes.make_dialogue(person, 8, rng)
        rounds = [(r[0]["value"], r[1]["value"]) for r in dialogue]
        for k in range(1, len(rounds) + 1):
            said = {a for stated in revealed[:k] for a in stated}
            expected = {a: person[a] for a in said}
            if person["bag"] == "none" and "bag" in said:
                expected["bag_colour"] = "none"
            stated = bank.stated_values(rounds[:k])
            assert stated == expected, rounds[:k]


def test_from_dialogues_groups_questions_and_keeps_the_most_frequent_answers():
    entries = [
        {"id": 1, "chats": [[{"from": "gpt", "value": DESCRIBE}, {"from": "user", "value": "A man."}],
                            [{"from": "gpt", "value": "What colour was the top?"}, {"from": "user", "value": "Red."}]],
         "synthpedes": {"revealed": [[["hat", "bag"], ["upper_colour"]]]}},
        {"id": 2, "chats": [[[{"from": "gpt", "value": DESCRIBE}, {"from": "user", "value": "A woman."}],
                             [{"from": "gpt", "value": "what colour was the TOP"}, {"from": "user", "value": "Blue."}],
                             [{"from": "gpt", "value": "Shoes?"}, {"from": "user", "value": "White."}]],
                            [[{"from": "gpt", "value": DESCRIBE}, {"from": "user", "value": "A woman."}],
                             [{"from": "gpt", "value": "What colour was the top?"}, {"from": "user", "value": "Blue."}]]]},
        {"dialogue": [{"question": DESCRIBE, "answer": "Someone."},
                      {"question": "What colour was the top?", "answer": "Green."}]},
    ]
    bank = QuestionBank.from_dialogues(entries, max_answers=2)
    by_text = {normalize_text(q.question): q for q in bank.questions}
    assert set(by_text) == {"what colour was the top", "shoes"}  # round 1 left out, case / punctuation merged
    top = by_text["what colour was the top"]
    assert top.question == "What colour was the top?" and top.answers == ("Blue.", "Red.")
    # Only one dialogue says which attribute the top question is about, and none contradicts it.
    assert top.attribute == "upper_colour" and by_text["shoes"].attribute is None
    with pytest.raises(ValueError, match="bank would be empty"):
        QuestionBank.from_dialogues([{"dialogue": [{"question": DESCRIBE, "answer": "A man."}]}])
    with pytest.raises(ValueError, match="entry 0, dialogue 0"):
        QuestionBank.from_dialogues([{"chats": [[{"from": "gpt", "value": DESCRIBE}, {"from": "robot", "value": "?"}]]}])


def test_build_command_writes_the_bank_and_fails_in_one_line(tmp_path, capsys):
    data = tmp_path / "chatpedes"
    data.mkdir()
    rounds = [[{"from": "gpt", "value": DESCRIBE}, {"from": "user", "value": "A man."}],
              [{"from": "gpt", "value": "Hat?"}, {"from": "user", "value": "No hat."}]]
    (data / "train_reid.json").write_text(json.dumps([{"id": 1, "file_path": "a.png", "chats": rounds}]))
    question_bank_module.main(["build", "--data_dir", str(data), "--output_file", str(tmp_path / "bank.json")])
    assert QuestionBank.load(tmp_path / "bank.json").questions == [BankQuestion("Hat?", ("No hat.",))]
    line = one_line_exit(capsys, question_bank_module.main,
                         ["build", "--data_dir", str(data), "--split", "test", "--output_file", str(tmp_path / "b.json")])
    assert "no test_reid.json" in line
    line = one_line_exit(capsys, question_bank_module.main, ["build", "--output_file", str(tmp_path / "b.json")])
    assert "--data_dir" in line and "--synthpedes" in line


# -------------------------------------------------------------------------------------------- policies


def test_random_and_oracle_never_repeat_and_skip_stated_attributes(bank):
    gallery = [PERSON, {**PERSON, "hat": "red"}, {**PERSON, "shoes": "black", "hat": "none"},
               {**PERSON, "upper_colour": "red"}]
    description = "The person had gray hair and wore a white top."
    for questioner in (make_policy("random", bank, seed=3), make_policy("oracle", bank, gallery_attributes=gallery)):
        transcript = Transcript(description)
        while (proposal := questioner.propose(transcript)) is not None:
            assert proposal.policy == questioner.name
            transcript.rounds.append((proposal.question, _answer(PERSON, proposal)))
        asked = [bank.find(q).attribute for q, _ in transcript.rounds[1:]]
        assert len(asked) == len(set(asked))
        # bag none: "No bag." also states the bag colour, which is then never asked.
        assert set(asked) == set(synthpedes.ATTRIBUTE_NAMES) - {"hair_colour", "upper_colour", "bag_colour"}


def test_oracle_asks_the_attribute_spread_most_evenly_among_consistent_persons(bank):
    base = dict(PERSON)
    gallery = [
        {**base, "upper_colour": "white", "shoes": s, "hat": "none"} for s in ("black", "white", "red", "brown")
    ] + [{**base, "upper_colour": "red", "hat": h} for h in ("red", "blue", "white", "green", "none")]
    oracle = make_policy("oracle", bank, gallery_attributes=gallery)
    # Among the white tops the shoes take 4 values, everything else 1.
    assert oracle.propose(Transcript("The person wore a white top and had gray hair.")).attribute == "shoes"
    # Among the red tops the hat takes 5 values.
    assert oracle.propose(Transcript("The person wore a red top and had gray hair.")).attribute == "hat"


def test_dataset_policy_follows_the_annotated_dialogue(bank):
    dialogue = [(DESCRIBE, "A man."), ("Did you notice the shoes?", "White shoes."), ("Were they wearing a hat?", "No.")]
    questioner = make_policy("dataset", bank, dialogue=dialogue)
    transcript = Transcript("A man.")
    first = questioner.propose(transcript)
    assert (first.question, first.answers, first.attribute) == ("Did you notice the shoes?", ("White shoes.",), None)
    transcript.rounds.append(("Did you notice the shoes?", "White shoes."))
    second = questioner.propose(transcript)
    assert second.question == "Were they wearing a hat?" and second.attribute == "hat"  # the bank knows it
    transcript.rounds.append(("Were they wearing a hat?", "No."))
    assert questioner.propose(transcript) is None


def test_callable_policy_gets_the_session_and_bank_answers(bank):
    seen = []

    def ask_about_shoes(session):
        seen.append(len(session.rounds))
        return "what colour were the SHOES" if len(session.rounds) == 1 else "Anything about the weather?"

    questioner = make_policy(ask_about_shoes, bank)
    transcript = Transcript("A man.")
    proposal = questioner.propose(transcript)
    assert proposal.attribute == "shoes" and proposal.answers == bank.find("What colour were the shoes?").answers
    assert proposal.policy == "ask_about_shoes"
    transcript.rounds.append(("What colour were the shoes?", "White shoes."))
    free = questioner.propose(transcript)
    assert (free.question, free.answers, free.attribute) == ("Anything about the weather?", (), None)
    assert seen == [1, 2]
    with pytest.raises(ValueError, match="returned 3"):
        make_policy(lambda session: 3, bank).propose(transcript)


# -------------------------------------------------------------------------------------------- info_gain


@pytest.mark.parametrize("tokenization", ["rounds", "official"])
@pytest.mark.parametrize("mode", ["global", "fused"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batched_cached_hypotheses_equal_each_dialogue_encoded_alone(models, tiny_processor, pooling, mode,
                                                                     tokenization):
    model, index = models[pooling]
    processor = copy.copy(tiny_processor)
    processor.tokenization = tokenization
    session = ChatSearchSession(model, processor, index, k=3, mode=mode, check_index=False)
    session.start("The person had gray hair and wore a white top.")
    session.add_round("Were they wearing a hat?", "A green hat.")
    # Answers to one question share a packed row (tree mask): short and long answers, one that begins
    # like another, one that does not.
    shoes = "What colour were the shoes?"
    hypotheses = [(shoes, "The shoes were red."), ("Did the person have a bag?", "No bag."), (shoes, "Red."),
                  ("Anything else?", "A long, long answer that is much longer than the others, with commas!"),
                  (shoes, "The shoes were red and white, with long laces.")]
    scores, candidates = session.candidates(5)
    assert candidates.shape == (5,) and torch.all(scores[:-1] >= scores[1:])
    rows = []
    hook = model.text_model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        batched = session.score_next_rounds(hypotheses, candidates)
    finally:
        hook.remove()
    assert rows == [3]  # one tower pass, one row per question
    assert batched.shape == (5, 5)
    for row, hypothesis in enumerate(hypotheses):
        with torch.no_grad():
            alone = model.encode_dialogues(**processor(dialogues=[[*session.rounds, hypothesis]], return_tensors="pt"))
            expected = model.similarity(alone.text_embeds, index.image_embeds[candidates], alone.text_attribute_embeds,
                                        index.image_attribute_embeds[candidates], mode=mode)[0]
        torch.testing.assert_close(batched[row], expected, atol=1e-5, rtol=0)
    assert len(session.rounds) == 2  # the session itself did not move


def test_hypotheses_past_max_length_are_cut_like_the_processor(models, tiny_processor):
    model, index = models["mean"]
    processor = copy.copy(tiny_processor)
    processor.max_length = 90  # round 1 is ~75 tokens: the hypothetical round 3 is cut
    session = ChatSearchSession(model, processor, index, check_index=False)
    session.start("The person had gray hair and wore a white top.")
    session.add_round("Hat?", "A green hat.")
    hypotheses = [("What colour were the shoes?", "The shoes were red."), ("Bag?", "No bag.")]
    batched = session.score_next_rounds(hypotheses, torch.arange(len(index)))
    for row, hypothesis in enumerate(hypotheses):
        with torch.no_grad():
            alone = model.encode_dialogues(**processor(dialogues=[[*session.rounds, hypothesis]], return_tensors="pt"))
        torch.testing.assert_close(batched[row], (alone.text_embeds @ index.image_embeds.T)[0], atol=1e-5, rtol=0)


def test_expected_entropies_match_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, generator=generator)
    next_scores = torch.randn(5, 4, generator=generator)
    counts, t = [2, 3], 3.0
    belief = [math.exp(t * float(s)) for s in scores]
    belief = [b / sum(belief) for b in belief]
    for posterior in ("bayes", "model"):
        expected, start = [], 0
        for count in counts:
            rows = [[t * float(x) for x in next_scores[start + a]] for a in range(count)]
            start += count
            total = 0.0
            for a in range(count):
                likelihood = [math.exp(rows[a][c]) / sum(math.exp(rows[b][c]) for b in range(count)) for c in range(4)]
                p_a = sum(belief[c] * likelihood[c] for c in range(4))
                if posterior == "bayes":
                    after = [belief[c] * likelihood[c] / p_a for c in range(4)]
                else:
                    after = [math.exp(rows[a][c]) / sum(math.exp(x) for x in rows[a]) for c in range(4)]
                total += p_a * -sum(p * math.log(p) for p in after)
            expected.append(total)
        got = expected_entropies(scores, next_scores, counts, t, posterior=posterior)
        assert got.tolist() == pytest.approx(expected, abs=1e-9)


def test_info_gain_asks_the_lowest_expected_entropy_and_never_repeats(models, tiny_processor, bank):
    model, index = models["mean"]
    session = ChatSearchSession(model, tiny_processor, index, check_index=False)
    session.start("The person had gray hair and wore a white top.")
    asks = ("hair_colour", "hat", "sleeves", "shoes", "bag", "bag_colour")
    bank = QuestionBank([q for q in bank.questions if q.attribute in asks], bank.attribute_phrases)
    questioner = make_policy("info_gain", bank, top_n=5)
    proposal = questioner.propose(session)
    # The brute-force choice: every open question's hypotheses scored one dialogue at a time.
    options = bank.open_questions(session.rounds)
    scores, candidates = session.candidates(5)
    rows = []
    for q in options:
        for a in q.answers:
            with torch.no_grad():
                alone = model.encode_dialogues(**tiny_processor(dialogues=[[*session.rounds, (q.question, a)]],
                                                                return_tensors="pt"))
            rows.append((alone.text_embeds @ index.image_embeds[candidates].T)[0])
    with torch.no_grad():
        scale = float(model.get_logit_scale())
    entropies = expected_entropies(scores, torch.stack(rows), [len(q.answers) for q in options], scale)
    assert proposal.question == options[int(torch.argmin(entropies))].question
    assert proposal.expected_entropy == pytest.approx(float(entropies.min()), abs=1e-6)
    asked = []
    while proposal is not None:
        assert proposal.attribute not in asked and proposal.attribute != "hair_colour"  # stated in the description
        asked.append(proposal.attribute)
        session.add_round(proposal.question, _answer(PERSON, proposal))
        proposal = questioner.propose(session)
    # Once "No bag." was said the bag colour is stated too and never asked.
    expected = ["hat", "sleeves", "shoes", "bag"] + (["bag_colour"] if "bag_colour" in asked[: asked.index("bag")] else [])
    assert sorted(asked) == sorted(expected)
