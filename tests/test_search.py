"""Gallery index, chat search session, exact / FAISS top-k and the search command, on a tiny model."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diana.modeling_diana import DiaNAModel
from diana.processing.search import (
    ChatSearchSession,
    GalleryIndex,
    IndexMismatchError,
    config_hash,
    exact_topk,
    list_images,
    model_fingerprint,
)
from diana.processing.search import cli as search_cli
from diana.processing.search.questioner import QuestionBank, make_policy
from diana.processing.search.session import CANDIDATE_POOL, _common_prefix
from diana.training.benchmarks.search import clustered_gallery, person_queries
from tests.helpers import tiny_config, tiny_text_config

DIALOGUE = [
    ("Please describe the person you saw.", "A woman in a long red coat with black boots."),
    ("Is she carrying a bag?", "Yes, a small black backpack on her left shoulder."),
    ("What about her hair?", "Long brown hair in a ponytail."),
    ("Anything on her head?", "No hat, but white headphones."),
]


def _write_images(folder, count, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (70 + i, 30 + i, 3), dtype=np.uint8)  # odd sizes: resize is exercised
        Image.fromarray(pixels).save(folder / f"img_{seed}_{i:02d}.png")
    return sorted(str(p.resolve()) for p in folder.iterdir())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiaNAModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def model_dir(model, tiny_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    first = _write_images(root / "first", 6, seed=1)
    second = _write_images(root / "second", 4, seed=2)
    return root, first, second


@pytest.fixture(scope="module")
def index(model, tiny_processor, gallery):
    root, first, second = gallery
    return GalleryIndex.build(first + second, model, tiny_processor, with_attributes=True, batch_size=4, progress=False)


def _reference_topk(scores, k):
    """Obviously correct: a full stable sort (ties by gallery index)."""
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


# ---------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("num_gallery,k,chunk", [(1, 1, 1), (7, 3, 2), (50, 10, 7), (50, 60, 16), (200, 5, 64)])
@pytest.mark.parametrize("with_ties", [False, True])
def test_exact_topk_matches_sorted_reference(num_gallery, k, chunk, with_ties):
    generator = torch.Generator().manual_seed(num_gallery * 31 + k)
    queries = torch.randn(5, 8, generator=generator)
    gallery = torch.randn(num_gallery, 8, generator=generator)
    if with_ties:
        # Integer vectors: many exactly equal inner products, across chunk boundaries too.
        queries, gallery = queries.round().clamp(-1, 1), gallery.round().clamp(-1, 1)
    values, indices = exact_topk(queries, gallery, k, chunk_size=chunk)
    ref_values, ref_indices = _reference_topk(queries @ gallery.T, k)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)


def test_faiss_flat_equals_exact_search():
    faiss_module = pytest.importorskip("faiss")  # optional back end (installed with the test extras)
    assert faiss_module is not None
    generator = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(300, 24, generator=generator), dim=-1)
    index = GalleryIndex(embeds, [f"p{i}" for i in range(300)], "m", "p")
    queries = torch.nn.functional.normalize(torch.randn(6, 24, generator=generator), dim=-1)
    exact_values, exact_indices = index.search(queries, 15, backend="exact", chunk_size=64)
    faiss_values, faiss_indices = index.search(queries, 15, backend="faiss")
    assert torch.equal(faiss_indices, exact_indices)
    torch.testing.assert_close(faiss_values, exact_values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="global"):
        index.search(queries, 3, backend="faiss", mode="attribute")


# ---------------------------------------------------------------------------------------------- index


def test_index_holds_normalised_model_embeddings_and_round_trips(index, model, tiny_processor, gallery, tmp_path):
    root, first, second = gallery
    assert index.paths == first + second and len(index) == 10
    images = [Image.open(p).convert("RGB") for p in index.paths]
    with torch.no_grad():
        expected = model.encode_images(tiny_processor(images=images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(index.image_embeds, expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(index.image_attribute_embeds, expected.image_attribute_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(index.image_embeds.norm(dim=-1), torch.ones(10))

    path = tmp_path / "gallery.safetensors"
    index.save(path)
    loaded = GalleryIndex.load(path, model, tiny_processor)
    assert loaded.paths == index.paths and torch.equal(loaded.image_embeds, index.image_embeds)
    assert torch.equal(loaded.image_attribute_embeds, index.image_attribute_embeds)
    assert loaded.model_fingerprint == index.model_fingerprint


def test_fingerprint_survives_save_and_reload_but_not_other_weights(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    reloaded = DiaNAModel.from_pretrained(tmp_path / "m")
    assert model_fingerprint(reloaded) == model_fingerprint(model)
    assert model_fingerprint(DiaNAModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)) == model_fingerprint(model)
    with torch.no_grad():
        reloaded.refiner.attribute_queries.add_(1e-2)
    assert model_fingerprint(reloaded) != model_fingerprint(model)


def test_index_from_another_model_or_processor_is_refused(index, model, tiny_processor, processor, tmp_path):
    path = tmp_path / "gallery.safetensors"
    index.save(path)
    torch.manual_seed(1)
    other_weights = DiaNAModel(tiny_config()).eval()
    with pytest.raises(IndexMismatchError, match=r"another model \(its weights differ\)"):
        GalleryIndex.load(path, other_weights, tiny_processor)
    other_config = DiaNAModel(tiny_config(projection_dim=16)).eval()
    with pytest.raises(IndexMismatchError, match=r"another model \(its config differ"):
        GalleryIndex.load(path, other_config, tiny_processor)
    with pytest.raises(IndexMismatchError, match="another processor"):
        GalleryIndex.load(path, model, processor)  # 384x192 instead of the tiny image size
    with pytest.raises(IndexMismatchError):
        ChatSearchSession(other_weights, tiny_processor, GalleryIndex.load(path))
    with pytest.raises(IndexMismatchError):
        GalleryIndex.load(path).add_images(list_images(tmp_path), other_weights, tiny_processor)


def test_incremental_add_skips_duplicates_and_equals_one_build(index, model, tiny_processor, gallery):
    root, first, second = gallery
    partial = GalleryIndex.build(root / "first", model, tiny_processor, with_attributes=True, progress=False)
    assert partial.paths == first
    report = partial.add_images(root, model, tiny_processor, batch_size=3, progress=False)  # whole tree again
    assert (report.added, report.skipped_duplicates) == (4, 6)
    assert "added 4 image(s), skipped 6 already indexed (or repeated)" in str(report)
    assert partial.paths == index.paths
    torch.testing.assert_close(partial.image_embeds, index.image_embeds, atol=1e-5, rtol=0)
    repeat = partial.add_images([second[0], second[0]], model, tiny_processor, progress=False)
    assert (repeat.added, repeat.skipped_duplicates, len(partial)) == (0, 2, 10)


def test_unreadable_image_is_named_or_skipped_and_counted(model, tiny_processor, gallery, tmp_path):
    root, first, _ = gallery
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        GalleryIndex.build([first[0], str(broken)], model, tiny_processor, progress=False)
    index = GalleryIndex.build([first[0], str(broken), first[1]], model, tiny_processor, on_bad_image="skip", progress=False)
    assert index.paths == first[:2]
    report = index.add_images([str(broken)], model, tiny_processor, on_bad_image="skip", progress=False)
    assert report.skipped_unreadable == [str(broken)] and report.added == 0


def test_index_from_a_dataset_split_dedupes_images_and_keeps_person_ids(model, tiny_processor, gallery):
    datasets = pytest.importorskip("datasets")
    root, first, _ = gallery
    rows = {"image": [first[0], first[1], first[0], first[2]], "person_id": [7, 8, 7, 9]}  # one row per dialogue
    split = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    index = GalleryIndex.build_from_dataset(split, model, tiny_processor, progress=False)
    assert index.paths == first[:3] and index.ids.tolist() == [7, 8, 9]


# ---------------------------------------------------------------------------------------------- session


def _from_scratch(model, processor, rounds):
    batch = processor(dialogues=[rounds], return_round_ends=True, return_tensors="pt")
    with torch.no_grad():
        encoding = model.encode_dialogues(batch["input_ids"], batch["attention_mask"], batch["round_end_positions"])
    return batch, encoding


def _main_job_shaped_model(pooling):
    """The main job's model shape (conv stem, one K/V head per query head), tiny; `pooling` as given."""
    torch.manual_seed(0)
    text = tiny_text_config(num_key_value_heads=4)
    return DiaNAModel(tiny_config(text_config=text, vision_stem="conv", text_pooling=pooling)).eval()


@pytest.fixture(scope="module")
def pooled_models(tiny_processor, gallery):
    """{pooling: (model, its gallery index with attribute embeddings)}."""
    root, first, second = gallery
    out = {}
    for pooling in ("last", "mean"):
        model = _main_job_shaped_model(pooling)
        out[pooling] = model, GalleryIndex.build(
            first + second, model, tiny_processor, with_attributes=True, batch_size=5, progress=False
        )
    return out


@pytest.mark.parametrize("tokenization", ["rounds", "official"])
@pytest.mark.parametrize("mode", ["global", "attribute", "fused"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cached_rounds_equal_encoding_each_dialogue_alone(pooled_models, tiny_processor, pooling, mode, tokenization):
    model, index = pooled_models[pooling]
    processor = copy.copy(tiny_processor)
    processor.tokenization = tokenization
    session = ChatSearchSession(model, processor, index, k=5, mode=mode, check_index=False)
    tower_inputs = []
    hook = model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: tower_inputs.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        results = [session.start(DIALOGUE[0][1])] + [session.add_round(q, a) for q, a in DIALOGUE[1:]]
    finally:
        hook.remove()
    prefix_ids = [processor(dialogues=[DIALOGUE[: n + 1]], return_tensors=None)["input_ids"][0] for n in range(len(DIALOGUE))]
    # Each round runs only the tokens where its ids leave the previous round's through the tower.
    expected_new = [len(prefix_ids[0])] + [len(b) - _common_prefix(a, b) for a, b in zip(prefix_ids, prefix_ids[1:])]
    assert tower_inputs == expected_new == [r.new_tokens for r in results]
    prefix_property = all(b[: len(a)] == a for a, b in zip(prefix_ids, prefix_ids[1:]))
    # Round-by-round ids are prefixes; the official ones are not (every answer ends in "."), so the
    # cropped-cache path is exercised.
    assert prefix_property == (tokenization == "rounds")
    for number, result in enumerate(results):
        _, alone = _from_scratch(model, processor, DIALOGUE[: number + 1])
        text, attributes = alone.text_embeds[:, -1], alone.text_attribute_embeds[:, -1]  # the k-round dialogue alone
        scores = model.similarity(text, index.image_embeds, attributes, index.image_attribute_embeds, mode=mode)
        ref_values, ref_indices = _reference_topk(scores, 5)
        assert result.indices == ref_indices[0].tolist(), f"round {number + 1}"
        torch.testing.assert_close(torch.tensor(result.scores), ref_values[0], atol=1e-5, rtol=0)
    with torch.no_grad():  # the last round's dialogue, encoded alone without round ends
        alone = model.encode_dialogues(**processor(dialogues=[DIALOGUE], return_tensors="pt"))
    torch.testing.assert_close(session.text_embeds, alone.text_embeds, atol=1e-5, rtol=0)
    if mode != "global":
        torch.testing.assert_close(session.text_attribute_embeds, alone.text_attribute_embeds, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokenization", ["rounds", "official"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_one_pass_reads_every_prefix_as_if_encoded_alone(pooled_models, tiny_processor, pooling, tokenization):
    """encode_dialogues of the whole dialogue with the processor's round fields gives, for every k, the
    encodings of the k-round dialogue encoded alone; for a batch of dialogues of different lengths."""
    model, _ = pooled_models[pooling]
    processor = copy.copy(tiny_processor)
    processor.tokenization = tokenization
    dialogues = [DIALOGUE, DIALOGUE[:2], [("Please describe the person you saw.", "A tall man!"), ("Shoes?", "White.")]]
    batch = processor(dialogues=dialogues, return_round_ends=True, return_tensors="pt")
    assert ("round_token_mask" in batch) == (tokenization == "official")
    with torch.no_grad():
        together = model.encode_dialogues(
            batch["input_ids"], batch["attention_mask"], round_end_positions=batch["round_end_positions"],
            round_token_mask=batch.get("round_token_mask"),
        )
        for row, dialogue in enumerate(dialogues):
            for k in range(len(DIALOGUE)):
                alone = model.encode_dialogues(**processor(dialogues=[dialogue[: k + 1]], return_tensors="pt"))
                torch.testing.assert_close(together.text_embeds[row, k], alone.text_embeds[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(
                    together.text_attribute_embeds[row, k], alone.text_attribute_embeds[0], atol=1e-5, rtol=0
                )


def test_session_truncates_like_the_processor(model, tiny_processor, index):
    short = copy.copy(tiny_processor)
    short.max_length = 80  # round 1 is ~70 tokens: round 2 is cut, round 3 adds nothing
    session = ChatSearchSession(model, short, index, k=3, check_index=False)
    results = [session.add_round(q, a) for q, a in DIALOGUE[:3]]
    assert [r.truncated for r in results] == [False, True, True]
    assert results[2].new_tokens == 0 and sum(r.new_tokens for r in results) == 80
    batch, encoding = _from_scratch(model, short, DIALOGUE[:3])
    assert batch["input_ids"].shape[1] == 80
    torch.testing.assert_close(session.text_embeds[0], encoding.text_embeds[0, -1], atol=1e-5, rtol=0)


def test_session_rejects_empty_answers_with_the_round(model, tiny_processor, index):
    session = ChatSearchSession(model, tiny_processor, index, check_index=False)
    session.start("A man in a blue shirt.")
    with pytest.raises(ValueError, match="round 2"):
        session.add_round("Anything else?", "   ")


# ------------------------------------------------------------------------------- "not this person"


def _moved_by_hand(query, rejected, weight):
    """The documented rule written out: v = q - w * mean(rejected); v / |v| (per row / slot)."""
    v = query.double() - weight * rejected.double().sum(0) / rejected.shape[0]
    return (v / v.pow(2).sum(-1, keepdim=True).sqrt()).float()


def _reference_ranking(model, index, session, mode, excluded):
    """All gallery scores of the session's dialogue, its query moved by hand from the excluded photos,
    scored by `model.similarity`, the excluded photos dropped, a full stable sort."""
    text, attributes = session.text_embeds, session.text_attribute_embeds
    if excluded:
        rows = torch.tensor(excluded)
        text = _moved_by_hand(text, index.image_embeds[rows], session.rejection_weight)
        if attributes is not None:
            attributes = _moved_by_hand(attributes, index.image_attribute_embeds[rows], session.rejection_weight)
    scores = model.similarity(text, index.image_embeds, attributes, index.image_attribute_embeds, mode=mode)[0]
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    kept = [i for i in order if i not in set(excluded)]
    return scores[kept], kept


@pytest.mark.parametrize("mode,backend", [("global", "exact"), ("attribute", "exact"), ("fused", "exact"),
                                          ("global", "faiss")])
def test_rejected_photos_never_come_back_and_the_query_moves_by_the_rule(pooled_models, tiny_processor, mode, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    model, index = pooled_models["mean"]
    session = ChatSearchSession(model, tiny_processor, index, k=4, mode=mode, backend=backend,
                                check_index=False, rejection_weight=0.4)
    steps = [("round", DIALOGUE[0]), ("reject", [1, 3]), ("round", DIALOGUE[1]), ("reject", [2]),
             ("round", DIALOGUE[2]), ("reject", [4, 1]), ("round", DIALOGUE[3])]
    excluded = []
    for kind, value in steps:
        if kind == "round":
            result = session.add_round(*value)
        else:
            shown = session.results[-1].indices
            result = session.reject(value)
            assert result.rejected == [shown[r - 1] for r in value] and result.new_tokens == 0
            excluded += result.rejected
        assert session.rejected == excluded
        assert not set(result.indices) & set(excluded)  # never shown again
        scores, indices = session.candidates(len(index))
        assert len(indices) == len(index) - len(excluded) and not set(indices.tolist()) & set(excluded)
        ref_scores, ref_order = _reference_ranking(model, index, session, mode, excluded)
        assert result.indices == ref_order[:4] and indices.tolist() == ref_order
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    rows = torch.tensor(excluded)
    torch.testing.assert_close(session.query_embeds, _moved_by_hand(session.text_embeds, index.image_embeds[rows], 0.4))
    if mode != "global":
        torch.testing.assert_close(session.query_attribute_embeds, _moved_by_hand(
            session.text_attribute_embeds, index.image_attribute_embeds[rows], 0.4))
    torch.testing.assert_close(session.query_embeds.norm(dim=-1), torch.ones(1))
    assert [r.is_rejection for r in session.results] == [kind == "reject" for kind, _ in steps]
    assert [r.round_index for r in session.results] == [1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("mode", ["global", "fused"])
def test_without_rejections_the_search_is_exactly_the_plain_one(pooled_models, tiny_processor, mode):
    model, index = pooled_models["last"]
    session = ChatSearchSession(model, tiny_processor, index, k=5, mode=mode, check_index=False, rejection_weight=1.0)
    for question, answer in DIALOGUE[:2]:
        result = session.add_round(question, answer)
        assert session.query_embeds is session.text_embeds
        plain_scores, plain_indices = index.search(
            session.text_embeds, 5, text_attribute_embeds=session.text_attribute_embeds, mode=mode, model=model)
        assert result.indices == plain_indices[0].tolist() and result.scores == plain_scores[0].tolist()
        scores, indices = session.candidates(5)
        assert torch.equal(indices, plain_indices[0]) and torch.equal(scores, plain_scores[0])
    # Weight 0: the rejected photos only leave; everyone else keeps the exact plain score and order.
    still = ChatSearchSession(model, tiny_processor, index, k=5, mode=mode, check_index=False, rejection_weight=0)
    still.add_round(*DIALOGUE[0])
    plain = still.candidates(len(index))
    after = still.reject([2])
    keep = plain[1] != still.rejected[0]
    assert torch.equal(still.candidates(len(index))[1], plain[1][keep])
    assert torch.equal(still.candidates(len(index))[0], plain[0][keep]) and after.indices == plain[1][keep][:5].tolist()
    session.reset()
    assert session.rejected == [] and session.query_embeds is None


def test_rejection_weight_comes_from_the_config_and_a_session_may_override_it(tiny_processor, index):
    from diana.modeling_diana import DiaNAConfig
    from diana.processing.search.session import DEFAULT_REJECTION_WEIGHT

    assert DiaNAConfig().rejection_weight == DEFAULT_REJECTION_WEIGHT  # the fallback for older configs
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config(rejection_weight=0.6)).eval()
    assert config_hash(model.config) == config_hash(tiny_config())  # a search setting: an index stays valid
    assert config_hash(model.config) != config_hash(tiny_config(score_mode="fused"))
    assert ChatSearchSession(model, tiny_processor, index, check_index=False).rejection_weight == 0.6
    assert ChatSearchSession(model, tiny_processor, index, check_index=False, rejection_weight=0.1).rejection_weight == 0.1
    for bad in (-0.1, 1.5, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="rejection_weight"):
            ChatSearchSession(model, tiny_processor, index, check_index=False, rejection_weight=bad)


@pytest.mark.parametrize("mode", ["global", "fused"])
def test_hypothetical_next_rounds_are_scored_under_the_rejections(pooled_models, tiny_processor, mode):
    """What the questioner scores for a hypothetical round is what add_round would rank after it."""
    model, index = pooled_models["mean"]
    session = ChatSearchSession(model, tiny_processor, index, k=4, mode=mode, check_index=False, rejection_weight=0.5)
    session.start(DIALOGUE[0][1])
    session.reject([1, 2])
    _, candidates = session.candidates(6)
    hypotheses = [DIALOGUE[1], DIALOGUE[2]]
    predicted = session.score_next_rounds(hypotheses, candidates)  # (2, 6)
    for row, (question, answer) in enumerate(hypotheses):
        replay = ChatSearchSession(model, tiny_processor, index, k=4, mode=mode, check_index=False, rejection_weight=0.5)
        replay.start(DIALOGUE[0][1])
        replay.reject([1, 2])
        replay.add_round(question, answer)
        scores, indices = replay.candidates(len(index))
        by_index = dict(zip(indices.tolist(), scores.tolist()))
        torch.testing.assert_close(predicted[row], torch.tensor([by_index[i] for i in candidates.tolist()]),
                                   atol=1e-5, rtol=0)


def test_rejecting_a_rank_that_was_not_shown_names_it(model, tiny_processor, index):
    session = ChatSearchSession(model, tiny_processor, index, k=3, check_index=False)
    with pytest.raises(ValueError, match="describe the person first"):
        session.reject([1])
    session.start("A man in a blue shirt.")
    for ranks, says in (([4], "rank 4 was not shown: the latest ranking shows ranks 1-3"), ([0], "rank 0 was not"),
                        ([1, "2"], "rank '2' was not"), ([], "no rank")):
        with pytest.raises(ValueError, match=says):
            session.reject(ranks)
    assert session.rejected == [] and len(session.results) == 1  # a refused rejection changes nothing
    session.reject([3, 3])
    assert len(session.rejected) == 1


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_index_add_and_search_a_json_dialogue(model, model_dir, tiny_processor, gallery, tmp_path):
    root, first, second = gallery
    index_file = tmp_path / "g_index"
    out = io.StringIO()
    index_argv = ["index", "--model_name_or_path", str(model_dir), "--index_path", str(index_file)]
    search_cli.main([*index_argv, "--images_dir", str(root / "first"), "--ann", "build"], out=out)
    search_cli.main([*index_argv, "--images_dir", str(root), "--add", "--num_workers", "1"], out=out)
    assert "added 6 image(s), skipped 0" in out.getvalue() and "added 4 image(s), skipped 6" in out.getvalue()
    with pytest.raises(FileExistsError, match="--add"):
        search_cli.main([*index_argv, "--images_dir", str(root)], out=out)
    # Two shards (one per run), the ANN grown with the added rows and saved beside them.
    manifest = json.loads((index_file / "index.json").read_text())
    assert [s["num_images"] for s in manifest["shards"]] == [6, 4] and manifest["ann"]["num_images"] == 10

    dialogue_file = tmp_path / "dialogue.json"
    chatpedes_rounds = [[{"from": "gpt", "value": q}, {"from": "user", "value": a}] for q, a in DIALOGUE[:3]]
    dialogue_file.write_text(json.dumps({"dialogues": [chatpedes_rounds, "A child in a yellow raincoat."]}))
    out = io.StringIO()
    sheet, rankings = tmp_path / "top.png", tmp_path / "rankings.json"
    search_cli.main(["search", "--model_name_or_path", str(model_dir), "--index_path", str(index_file),
                     "--dialogue_file", str(dialogue_file), "--top_k", "3", "--contact_sheet", str(sheet),
                     "--output_json", str(rankings)], out=out)
    printed = out.getvalue()
    saved = json.loads(rankings.read_text())
    assert [len(d) for d in saved] == [3, 1]
    index = GalleryIndex.load(index_file)
    session = ChatSearchSession(model, tiny_processor, index, k=3)
    for number, (question, answer) in enumerate(DIALOGUE[:3]):
        direct = session.add_round(question, answer)
        assert saved[0][number]["paths"] == direct.paths
        block = printed.split(f"round {number + 1} (")[1]
        assert f"1. {direct.scores[0]:+.4f}  {direct.paths[0]}" in block
    for number in (1, 2):
        picture = Image.open(tmp_path / f"top_{number}.png")
        assert picture.width > 200 and picture.height > 100
    assert np.asarray(Image.open(tmp_path / "top_1.png")).std() > 10  # photos drawn, not a blank canvas

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dialogues": [[{"question": "Q?"}]]}))
    with pytest.raises(ValueError, match="bad.json', dialogue 1"):
        search_cli.main(["search", "--model_name_or_path", str(model_dir), "--index_path", str(index_file),
                         "--dialogue_file", str(bad)], out=io.StringIO())


@pytest.mark.parametrize("line, kind, text, ranks", [
    ("A woman in a red coat.", "answer", "A woman in a red coat.", ()),
    ("not 2 5", "reject", "", (2, 5)),
    ("NOT 3, 1", "reject", "", (3, 1)),
    ("not sure", "answer", "not sure", ()),
    ("ask Is she wearing a hat?", "ask", "Is she wearing a hat?", ()),
    ("= not 2 of them", "answer", "not 2 of them", ()),
    ("= done", "answer", "done", ()),
    ("done", "done", "", ()),
    ("   ", "done", "", ()),
    ("done with the red coat", "answer", "done with the red coat", ()),
    ("help", "help", "", ()),
])
def test_witness_lines_parse_into_commands(line, kind, text, ranks):
    assert search_cli.parse_witness_line(line) == search_cli.WitnessInput(kind, text, ranks)


@pytest.mark.parametrize("line, says", [("not 2 of them", "give the ranks as numbers"), ("ask", "type your question")])
def test_witness_command_slips_are_named(line, says):
    with pytest.raises(ValueError, match=says):
        search_cli.parse_witness_line(line)


def test_cli_chat_where_the_system_asks(model, model_dir, tiny_processor, index, tmp_path):
    """A scripted witness: describe, answer the proposed question, reject two photos, mistype a rank, ask
    their own question, answer the next proposal. Every proposal and ranking printed is what a session
    and the info_gain questioner give for the same steps."""
    from diana.processing.search.questioner import QuestionBank, make_policy

    index_file = tmp_path / "g.safetensors"
    index.save(index_file)
    synthpedes_bank = QuestionBank.from_synthpedes()
    bank = QuestionBank(synthpedes_bank.questions[:6], synthpedes_bank.attribute_phrases)  # fewer hypotheses to score
    bank.save(tmp_path / "bank.json")
    own_question, own_answer = "Is she wearing a hat?", "No hat."
    lines = [DIALOGUE[0][1], "help", "Yes, a black backpack.", "not 1 3", "not 9", f"ask {own_question}", own_answer,
             "Long brown hair.", ""]
    out, rankings, sheet = io.StringIO(), tmp_path / "chat.json", tmp_path / "chat.png"
    search_cli.main(["search", "--model_name_or_path", str(model_dir), "--index_path", str(index_file), "--top_k", "3",
                     "--question_bank", str(tmp_path / "bank.json"), "--contact_sheet", str(sheet),
                     "--output_json", str(rankings)],
                    stdin=io.StringIO("\n".join(lines) + "\n"), out=out)
    printed = out.getvalue()

    session = ChatSearchSession(model, tiny_processor, index, k=3)
    questioner = make_policy("info_gain", bank)
    expected = [session.start(DIALOGUE[0][1])]
    proposals = [questioner.propose(session)] * 2  # "help" changes nothing: the same proposal again
    expected.append(session.add_round(proposals[0].question, "Yes, a black backpack."))
    proposals.append(questioner.propose(session))
    expected.append(session.reject([1, 3]))
    proposals += [questioner.propose(session)] * 2  # "not 9" is refused: the same proposal again
    expected.append(session.add_round(own_question, own_answer))
    proposals.append(questioner.propose(session))
    expected.append(session.add_round(proposals[-1].question, "Long brown hair."))
    proposals.append(questioner.propose(session))  # shown before the final empty line

    shown = [line for line in printed.splitlines() if line.startswith("Proposed question")]
    assert shown == [search_cli._describe_proposal(p) for p in proposals]
    assert proposals[0].policy == "info_gain" and proposals[0].answers  # a bank question with its answers
    assert "error: rank 9 was not shown: the latest ranking shows ranks 1-3" in printed
    assert "not N [N ...]" in printed  # the help
    for result in expected:
        assert search_cli.format_round(result) in printed
    saved = json.loads(rankings.read_text())[0]
    assert [step["indices"] for step in saved] == [r.indices for r in expected]
    assert [step["question"] for step in saved] == [r.question for r in expected]
    assert [step["new_tokens"] > 0 for step in saved] == [True, True, False, True, True]
    assert not set(expected[2].rejected) & {i for r in expected[2:] for i in r.indices}
    picture = Image.open(sheet)
    assert picture.height / picture.width > 2.5  # five rows of photos (one row is 0.55 as high as wide)


# ------------------------------------------------------------- float16 scan, shards, ANN, processes


def _near_tie_gallery(seed=0, count=600, dim=24):
    """Normalised rows plus exact duplicates and rows 1e-6..1e-4 away from others: float16 cannot
    tell them apart, float32 can (and duplicates must be ordered by gallery index)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)
    near = [base[i] + scale * torch.randn(dim, generator=generator) for i, scale in
            zip(range(0, 60, 2), [1e-6, 1e-5, 1e-4] * 10)]
    crowd = base[7] + 2e-5 * torch.randn(200, dim, generator=generator)  # 200 rows within float16 rounding
    gallery = torch.cat([base, torch.stack(near), base[:20], crowd])
    gallery = torch.nn.functional.normalize(gallery, dim=-1)
    return gallery[torch.randperm(gallery.shape[0], generator=generator)]


@pytest.mark.parametrize("shortlist, pool, chunk", [(64, 1024, 65536), (4, 8, 50), (12, 40, 333)])
def test_float16_scan_and_float32_rescore_equal_exact_topk(shortlist, pool, chunk):
    from diana.processing.search.topk import rescored_topk

    gallery = _near_tie_gallery()
    queries = torch.cat([gallery[:6], torch.nn.functional.normalize(torch.randn(4, gallery.shape[1]), dim=-1)])
    crowd_member = (gallery @ gallery[0]).argmax()  # any row; plus the crowd's centre below
    queries = torch.cat([queries, gallery[crowd_member][None], gallery[(gallery[:, :3] > 0).all(1)][:2]])
    blocks = [gallery[:100].half(), gallery[100:101].half(), gallery[101:].half()]
    exact_rows = lambda rows: gallery[rows]
    for k in (1, 10, 37):
        values, indices = rescored_topk(queries, blocks, exact_rows, k, shortlist=shortlist, pool=pool, chunk_size=chunk)
        want_values, want_indices = exact_topk(queries, gallery, k)
        assert torch.equal(indices, want_indices)
        torch.testing.assert_close(values, want_values, atol=0, rtol=0)


def test_rescore_grows_its_shortlist_through_a_crowd_of_float16_ties():
    """A crowd of 200 rows that float16 scores alike: the top-10 needs the whole crowd re-scored."""
    from diana.processing.search.topk import rescored_topk

    generator = torch.Generator().manual_seed(1)
    centre = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    crowd = torch.nn.functional.normalize(centre + 3e-5 * torch.randn(200, 16, generator=generator), dim=-1)
    gallery = torch.cat([torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=-1), crowd])
    read = []

    def exact_rows(rows):
        read.append(rows.numel())
        return gallery[rows]

    _, indices = rescored_topk(centre[None], [gallery.half()], exact_rows, 10, shortlist=8, pool=32)
    assert torch.equal(indices, exact_topk(centre[None], gallery, 10)[1])
    assert max(read) >= 200  # the pool had to grow past the crowd (rescan), not stop at a guess


def _index_of(embeds, seed=0):
    ids = torch.arange(embeds.shape[0]) % 7
    return GalleryIndex(embeds, [f"/g/{seed}_{i}.jpg" for i in range(embeds.shape[0])], "cfg-w", "proc", ids=ids)


def test_folder_of_shards_equals_single_file_and_memory(tmp_path):
    gallery = _near_tie_gallery(seed=3)
    attributes = torch.nn.functional.normalize(torch.randn(gallery.shape[0], 3, gallery.shape[1]), dim=-1)
    index = GalleryIndex(gallery, [f"/g/{i}.jpg" for i in range(len(gallery))], "cfg-w", "proc",
                         image_attribute_embeds=attributes, ids=torch.arange(len(gallery)) % 5)
    index.save(tmp_path / "sharded", shard_size=97)
    index.save(tmp_path / "single.safetensors")
    sharded, single = GalleryIndex.load(tmp_path / "sharded"), GalleryIndex.load(tmp_path / "single.safetensors")
    manifest = json.loads((tmp_path / "sharded" / "index.json").read_text())
    assert len(manifest["shards"]) == -(-len(gallery) // 97) and len(sharded.blocks) == len(manifest["shards"])
    mapped = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else None
    if mapped is not None:  # Linux: the shards are memory-mapped (read lazily), not loaded
        assert str((tmp_path / "sharded" / "shard-00000.safetensors").resolve()) in mapped
    queries = gallery[:5] + 0.01 * torch.randn(5, gallery.shape[1])
    want = exact_topk(queries, gallery, 10)
    for loaded in (sharded, single):
        assert loaded.paths == index.paths and torch.equal(loaded.ids, index.ids)
        assert torch.equal(loaded.image_embeds, gallery) and torch.equal(loaded.image_attribute_embeds, attributes)
        values, indices = loaded.search(queries, 10)
        assert torch.equal(indices, want[1]) and torch.equal(values, want[0])
    # Adding writes new shards only; the old ones stay as they are.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").glob("shard-*")}
    sharded.extend(GalleryIndex(gallery[:3] * -1, [f"/new/{i}" for i in range(3)], "cfg-w", "proc",
                                image_attribute_embeds=attributes[:3], ids=torch.tensor([1, 2, 3])))
    sharded.save(tmp_path / "sharded", shard_size=97)
    again = GalleryIndex.load(tmp_path / "sharded")
    assert len(again) == len(gallery) + 3 and again.paths[-1] == "/new/2"
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").glob("shard-*")}
    assert len(after) == len(before) + 1 and all(after[name] == time for name, time in before.items())
    with pytest.raises(IndexMismatchError):
        again.extend(GalleryIndex(gallery[:1], ["x"], "cfg-other", "proc"))


def test_single_file_index_of_the_previous_version_still_loads():
    """tests/data/gallery_index_v1.safetensors was written by the previous code (one float32 file)."""
    old = GalleryIndex.load(Path(__file__).parent / "data" / "gallery_index_v1.safetensors")
    assert old.paths == [f"/photos/p{i}.jpg" for i in range(5)] and old.ids.tolist() == [3, 3, 7, -1, 9]
    assert old.model_fingerprint == "cfg0-w0" and old.image_attribute_embeds.shape == (5, 3, 8)
    generator = torch.Generator().manual_seed(0)  # how the file's vectors were drawn
    expected = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    assert torch.equal(old.image_embeds, expected)
    assert old.search(expected[2:3], 2)[1][0, 0] == 2


def test_recall_at_k_counts_overlap_per_query():
    from diana.processing.search.ann import recall_at_k

    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(truth, truth) == 1.0
    assert recall_at_k(torch.tensor([[4, 3, 9, -1], [8, 0, 0, 0]]), truth) == pytest.approx((2 / 4 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="as many"):
        recall_at_k(truth[:1], truth)


def test_ann_rescores_exactly_finds_clustered_neighbours_and_is_saved_with_the_index(tmp_path):
    pytest.importorskip("faiss")
    from diana.processing.search.ann import recall_at_k

    generator = torch.Generator().manual_seed(0)
    persons = torch.nn.functional.normalize(torch.randn(300, 32, generator=generator), dim=-1)
    gallery = torch.nn.functional.normalize(persons.repeat_interleave(4, 0) + 0.3 * torch.randn(1200, 32, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(persons[:40] + 0.3 * torch.randn(40, 32, generator=generator), dim=-1)
    index = _index_of(gallery)
    truth_values, truth = exact_topk(queries, gallery, 10)
    index.build_ann("IVF16,SQfp16", nprobe=16)  # every list visited: the candidates hold the exact top-10
    values, found = index.search(queries, 10, backend="ann")
    assert torch.equal(found, truth) and torch.equal(values, truth_values)
    index.build_ann("IVF16,SQfp16", nprobe=1)  # one list of 16: recall drops, and is measured as such
    partial = index.search(queries, 10, backend="ann")[1]
    recall = recall_at_k(partial, truth)
    assert 0.2 < recall < 1.0
    index.save(tmp_path / "g")
    loaded = GalleryIndex.load(tmp_path / "g")
    assert loaded.ann is not None and loaded.ann.nprobe == 1
    assert torch.equal(loaded.search(queries, 10, backend="ann")[1], partial)


def test_indexing_in_two_processes_equals_one(model, tiny_processor, gallery, index, tmp_path):
    """Two simulated `accelerate launch` ranks (the later-merging main one last) give the one-process index."""
    from diana.processing.search.parallel_indexing import ProcessGroup, index_images, share_of

    assert [list(share_of(5, r, 2)) for r in (0, 1)] == [[0, 1, 2], [3, 4]]
    root, first, second = gallery
    paths = first + second
    target = tmp_path / "two"
    copies = [GalleryIndex.empty(model, tiny_processor, with_attributes=True) for _ in range(2)]
    reports = [index_images(copies[rank], paths, model, tiny_processor, ProcessGroup(rank, 2, lambda: None), target,
                            batch_size=3, num_workers=rank, progress=False) for rank in (1, 0)]
    assert reports[0] is None and reports[1].added == 10
    merged = GalleryIndex.load(target)
    assert merged.paths == index.paths
    torch.testing.assert_close(merged.image_embeds, index.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.image_attribute_embeds, index.image_attribute_embeds, atol=1e-6, rtol=0)
    assert not (tmp_path / "two.parts").exists()


def test_one_gallery_search_serves_the_round_and_the_questioners_top_n(model, tiny_processor, monkeypatch):
    """A round searches the gallery once, for at least CANDIDATE_POOL photos; its top-k and the proposal's
    top-N are prefixes of that search, equal to searching for them alone; a new query searches again."""
    generator = torch.Generator().manual_seed(3)
    embeds = torch.nn.functional.normalize(torch.randn(3 * CANDIDATE_POOL, model.config.projection_dim,
                                                       generator=generator), dim=-1)
    gallery = GalleryIndex(embeds, [str(i) for i in range(len(embeds))], model_fingerprint(model), "test")
    searches = []
    plain_search = gallery.search
    monkeypatch.setattr(gallery, "search", lambda *args, **kwargs: searches.append(args[1]) or plain_search(*args, **kwargs))
    session = ChatSearchSession(model, tiny_processor, gallery, k=5, mode="global", check_index=False)
    result = session.add_round(*DIALOGUE[0])
    make_policy("info_gain", QuestionBank.from_synthpedes(), top_n=CANDIDATE_POOL).propose(session)
    assert searches == [CANDIDATE_POOL]  # the round's search served the proposal too
    for n in (1, 5, CANDIDATE_POOL, len(gallery)):
        scores, indices = session.candidates(n)
        alone = plain_search(session.query_embeds, n)
        assert torch.equal(indices, alone[1][0]) and torch.equal(scores, alone[0][0])
    assert result.indices == session.candidates(5)[1].tolist()
    assert searches == [CANDIDATE_POOL, len(gallery)]  # a longer top searched once more
    session.reject([1])
    assert 0 < len(session.candidates(3)[1]) and searches[-1] == CANDIDATE_POOL + 1  # the moved query: a new search


def test_default_ann_has_about_four_sqrt_n_lists_and_finds_clustered_neighbours():
    pytest.importorskip("faiss")
    from diana.processing.search.ann import default_ann_factory, default_nprobe, recall_at_k

    assert [default_ann_factory(n) for n in (1_000_000, 250_000, 1_000, 500)] == [
        "IVF4096,SQfp16", "IVF2048,SQfp16", "IVF16,SQfp16", "SQfp16"]  # >= 40 training rows per list
    assert [default_nprobe(f) for f in ("IVF4096,SQfp16", "IVF2048,SQfp16", "IVF16,SQfp16", "SQfp16")] == [32, 16, 16, 0]
    # The search benchmark's clustered vectors (groups of look-alike persons, 4 images each), smaller:
    # the default index (256 lists, 16 probed) keeps nearly all of the exact top-10.
    gallery, centres = clustered_gallery(20_000, 64, 4)
    queries = person_queries(centres, 100)
    index = _index_of(gallery)
    ann = index.build_ann()
    assert (ann.factory, ann.nprobe) == ("IVF256,SQfp16", 16)
    recall = recall_at_k(index.search(queries, 10, backend="ann")[1], exact_topk(queries, gallery, 10)[1])
    assert recall >= 0.95, recall
