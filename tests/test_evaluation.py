"""The retrieval protocol: one-pass per-round evaluation against encoding every
prefix separately, gallery de-duplication, sharding over two processes, report files and table."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diana.training.evaluation import CURVES_FILE, RESULTS_FILE, evaluate_retrieval, format_round_table
from diana.training.evaluation.metrics import cumulative_hits_at_k, retrieval_metrics_and_first_hit_ranks
from tests.helpers import launch_two_cpu_processes

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- Small stand-ins implementing the model / processor contracts ---------------------------------


class FakeProcessor:
    """Word-hash tokeniser with BOS, right padding and the `return_round_ends` contract; images
    are resized to 8x4 and scaled to [0, 1]."""

    class tokenizer:  # noqa: N801 (mirrors `processor.tokenizer.pad_token_id`)
        pad_token_id = 0

    def __init__(self, max_length: int = 40):
        self.max_length = max_length

    @staticmethod
    def _round_ids(question: str, answer: str) -> list[int]:
        return [2 + zlib.crc32(w.encode()) % 97 for w in f"{question} {answer}".split()]

    def __call__(self, images=None, dialogues=None, *, max_rounds=None, return_round_ends=False, **_):
        out = {}
        if images is not None:
            arrays = [np.asarray(im.convert("RGB").resize((4, 8)), dtype=np.float32) / 255 for im in images]
            out["pixel_values"] = torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, 8, 4)
        if dialogues is not None:
            rows, ends, cut = [], [], []
            for dialogue in dialogues:
                rounds = [(r["question"], r["answer"]) for r in dialogue][:max_rounds]
                ids, row_ends, row_cut = [1], [], []
                for q, a in rounds:
                    ids += self._round_ids(q, a)
                    row_cut.append(len(ids) > self.max_length)
                    row_ends.append(min(len(ids), self.max_length) - 1)
                rows.append(ids[: self.max_length])
                ends.append(row_ends)
                cut.append(row_cut)
            longest, most = max(map(len, rows)), max(map(len, ends))
            out["input_ids"] = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
            out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
            if return_round_ends:
                out["round_end_positions"] = torch.tensor([e + [e[-1]] * (most - len(e)) for e in ends])
                out["round_truncated"] = torch.tensor([c + [c[-1]] * (most - len(c)) for c in cut])
                out["num_rounds"] = torch.tensor([len(e) for e in ends])
        return out


class FakeModel(torch.nn.Module):
    """Causal (prefix-mean) dialogue encoder, linear image encoder, K attribute slots: the
    `encode_*` / `similarity` contract of `DiaNAModel`."""

    def __init__(self, dim: int = 6, slots: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.slots, self.dim = slots, dim
        self.embed = torch.nn.Embedding(100, dim * (1 + slots))
        self.image = torch.nn.Linear(3 * 8 * 4, dim * (1 + slots))

    def _split(self, x: torch.Tensor):
        glob, attr = x[..., : self.dim], x[..., self.dim :]
        attr = attr.unflatten(-1, (self.slots, self.dim))  # (..., K, D)
        return torch.nn.functional.normalize(glob, dim=-1), torch.nn.functional.normalize(attr, dim=-1)

    def encode_images(self, pixel_values):
        glob, attr = self._split(self.image(pixel_values.flatten(1)))
        return SimpleNamespace(image_embeds=glob, image_attribute_embeds=attr)

    def encode_dialogues(self, input_ids, attention_mask, round_end_positions=None):
        h = self.embed(input_ids) * attention_mask[..., None]  # (B, L, E)
        prefix_mean = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[None, :, None]  # (B, L, E) causal
        if round_end_positions is None:
            round_end_positions = attention_mask.sum(1, keepdim=True) - 1  # (B, 1): last token
            squeeze = True
        else:
            squeeze = False
        picked = torch.gather(prefix_mean, 1, round_end_positions[..., None].expand(-1, -1, h.shape[-1]))  # (B, R, E)
        glob, attr = self._split(picked[:, 0] if squeeze else picked)
        return SimpleNamespace(text_embeds=glob, text_attribute_embeds=attr)

    def similarity(self, text_embeds, image_embeds, text_attribute_embeds=None, image_attribute_embeds=None, mode=None):
        glob = text_embeds @ image_embeds.T
        if mode == "global":
            return glob
        attr = torch.einsum("tkd,gkd->tg", text_attribute_embeds, image_attribute_embeds) / self.slots
        return attr if mode == "attribute" else glob + attr


def make_split(root: Path, persons: int = 4, images_per_person: int = 2, seed: int = 0) -> datasets.Dataset:
    """Rows of (image, dialogue): every image has 1-2 dialogues of 1-4 rounds, so the gallery has
    fewer images than rows; the split's rows are shuffled so images repeat out of order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "black", "white", "grey"]
    rows = []
    for p in range(persons):
        for i in range(images_per_person):
            rel = f"p{p}/img{i}.png"
            (root / f"p{p}").mkdir(exist_ok=True)
            pixels = (rng.random((12, 6, 3)) * 80 + p * 40).astype(np.uint8)
            Image.fromarray(pixels).save(root / rel)
            for _ in range(1 + i % 2):
                n = int(rng.integers(1, 5))
                dialogue = [{"question": "Please describe the person you saw.", "answer": f"a person in {colours[p]}"}]
                dialogue += [
                    {"question": f"what about the {part}?", "answer": f"{colours[(p + r) % 6]} {part} {rng.integers(3)}"}
                    for r, part in enumerate(["shoes", "bag", "hat"][: n - 1])
                ]
                rows.append({"image": str(root / rel), "file_path": rel, "person_id": 100 + p, "dialogue": dialogue,
                             "num_rounds": len(dialogue)})
    order = rng.permutation(len(rows))
    columns = {k: [rows[i][k] for i in order] for k in rows[0]}
    features = datasets.Features({
        "image": datasets.Image(), "file_path": datasets.Value("string"), "person_id": datasets.Value("int64"),
        "dialogue": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
        "num_rounds": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


def separate_prefix_results(model, processor, dataset, modes, rounds):
    """The slow protocol: every gallery image and every k-round prefix encoded on its own."""
    seen, gallery, gallery_ids = set(), [], []
    for row in dataset:
        if row["file_path"] not in seen:
            seen.add(row["file_path"])
            gallery.append(model.encode_images(processor(images=[row["image"]])["pixel_values"]))
            gallery_ids.append(row["person_id"])
    image = {"embeds": torch.cat([g.image_embeds for g in gallery]),
             "attributes": torch.cat([g.image_attribute_embeds for g in gallery])}
    query_ids = torch.tensor(dataset["person_id"])
    texts = {}
    for k in list(range(1, rounds + 1)) + ["full"]:
        encs = []
        for d in dataset["dialogue"]:
            inputs = processor(dialogues=[d], max_rounds=None if k == "full" else k)
            encs.append(model.encode_dialogues(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        texts[k] = (torch.cat([e.text_embeds for e in encs]), torch.cat([e.text_attribute_embeds for e in encs]))
    out = {}
    for mode in modes:
        per_mode, ranks = {}, []
        for k, (text, attr) in texts.items():
            sim = model.similarity(text, image["embeds"], attr, image["attributes"], mode=mode)
            metrics, first = retrieval_metrics_and_first_hit_ranks(sim, query_ids, torch.tensor(gallery_ids))
            per_mode["full" if k == "full" else f"round_{k}"] = metrics
            if k != "full":
                ranks.append(first)
        per_mode["cumulative_hits@10"] = cumulative_hits_at_k(torch.stack(ranks), k=10)
        out[mode] = per_mode
    return out, len(gallery)


def assert_results_equal(got, want, modes):
    for mode in modes:
        assert set(got[mode]) == set(want[mode]), mode
        for key, value in want[mode].items():
            if isinstance(value, list):
                assert got[mode][key] == pytest.approx(value), (mode, key)
            else:
                for metric, v in value.items():
                    assert got[mode][key][metric] == pytest.approx(v, abs=1e-6), (mode, key, metric)


# --- Tests on the stand-ins -------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("split"))


MODES = ("global", "attribute", "fused")


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_one_pass_equals_separate_prefixes_with_stand_ins(split, batch_size):
    model, processor = FakeModel(), FakeProcessor()
    got = evaluate_retrieval(model, processor, split, batch_size=batch_size, score_modes=MODES)
    rounds = max(split["num_rounds"])
    want, gallery_size = separate_prefix_results(model, processor, split, MODES, rounds)
    assert got["meta"]["num_gallery"] == gallery_size < len(split)
    assert got["meta"]["num_queries"] == len(split)
    assert got["meta"]["num_rounds"] == rounds
    assert got["meta"]["queries_with_round"] == [sum(n >= k for n in split["num_rounds"]) for k in range(1, rounds + 1)]
    assert_results_equal(got, want, MODES)
    # The stand-in ranks differently per round and per mode, so the equality above is not vacuous.
    assert len({json.dumps(got[m][f"round_{k}"]) for m in MODES for k in range(1, rounds + 1)}) > 3
    assert got["flat"]["fused/round_2/mAP"] == got["fused"]["round_2"]["mAP"]
    assert got["flat"]["global/cumulative_hits@10/round_3"] == got["global"]["cumulative_hits@10"][2]


def test_max_rounds_limits_the_rounds_but_not_the_full_dialogue(split):
    model, processor = FakeModel(seed=1), FakeProcessor()
    full = evaluate_retrieval(model, processor, split, batch_size=4, score_modes=("global",))
    short = evaluate_retrieval(model, processor, split, batch_size=4, score_modes=("global",), max_rounds=2)
    assert set(short["global"]) == {"round_1", "round_2", "full", "cumulative_hits@10"}
    assert short["global"]["full"] == full["global"]["full"]
    assert short["global"]["round_2"] == full["global"]["round_2"]
    assert short["global"]["cumulative_hits@10"] == full["global"]["cumulative_hits@10"][:2]


def test_truncated_rounds_are_counted(split):
    # 12 tokens hold round 1 of every dialogue but cut every later round.
    processor = FakeProcessor(max_length=12)
    results = evaluate_retrieval(FakeModel(), processor, split, batch_size=5, score_modes=("global",))
    counts = results["meta"]["truncated_per_round"]
    expected = [0] * len(counts)
    for d in split["dialogue"]:
        tokens = 1
        for k, r in enumerate(d):
            tokens += len(FakeProcessor._round_ids(r["question"], r["answer"]))
            expected[k] += tokens > 12
        for k in range(len(d), len(counts)):
            expected[k] += tokens > 12
    assert counts == expected and sum(counts) > 0


def test_files_and_table(split, tmp_path):
    reference = {"round_1": {"R@1": 11.0, "R@10": 50.0, "mAP": 20.0}, "round_2": {"R@1": 22.5, "R@10": 60.0, "mAP": 30.0},
                 "full": {"R@1": 33.25, "R@10": 70.0, "mAP": 40.0}}
    results = evaluate_retrieval(FakeModel(), FakeProcessor(), split, batch_size=4, score_modes=("global", "fused"),
                                 output_dir=tmp_path / "eval", reference=reference)
    saved = json.loads((tmp_path / "eval" / RESULTS_FILE).read_text())
    assert saved["global"] == json.loads(json.dumps(results["global"]))
    assert saved["flat"] == results["flat"]
    assert saved["reference"]["full"]["R@1"] == 33.25 and "attribute" not in saved
    with Image.open(tmp_path / "eval" / CURVES_FILE) as picture:
        assert picture.width > 400 and picture.height > 200
    table = format_round_table(results, reference=reference)
    lines = table.splitlines()
    assert lines[0].startswith("**global**") and any(line.startswith("**fused**") for line in lines)
    full_row = next(line for line in lines if line.startswith("| full |"))
    assert f"{results['global']['full']['R@1']:.2f}" in full_row and "33.25" in full_row
    round_1 = next(line for line in lines if line.startswith("| 1 |"))
    assert f"{results['global']['cumulative_hits@10'][0]:.2f}" in round_1 and "11.00" in round_1
    assert "oracle R@1" in lines[2]


def test_bad_splits_are_errors(split, tmp_path):
    model, processor = FakeModel(), FakeProcessor()
    with pytest.raises(ValueError, match="score_modes"):
        evaluate_retrieval(model, processor, split, score_modes=("cosine",))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['dialogue'\]"):
        evaluate_retrieval(model, processor, split.remove_columns("dialogue"))
    # The same image under two persons: name it and both rows.
    rows = split.to_dict()
    rows["file_path"][1], rows["image"][1] = rows["file_path"][0], rows["image"][0]
    rows["person_id"][1] = rows["person_id"][0] + 1
    broken = datasets.Dataset.from_dict(rows, features=split.features)
    with pytest.raises(ValueError, match=rf"image '{rows['file_path'][0]}' is person {rows['person_id'][0]} in row 0 but person"):
        evaluate_retrieval(model, processor, broken)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])  # cut inside the pixel data: the header still opens


def test_a_gallery_image_broken_after_the_build_is_named_or_skipped_and_counted(tmp_path):
    from diana.processing.image_loading import ImageInputError

    split = make_split(tmp_path / "imgs", persons=3)
    model, processor = FakeModel(), FakeProcessor()
    _truncate(tmp_path / "imgs" / "p0" / "img1.png")
    with pytest.raises(ImageInputError, match=r"p0/img1\.png, evaluation row \d+\) could not be decoded"):
        evaluate_retrieval(model, processor, split, score_modes=("global",))

    results = evaluate_retrieval(model, processor, split, score_modes=("global",), on_bad_image="skip")
    meta = results["meta"]
    assert meta["skipped_gallery_images"] == ["p0/img1.png"] and meta["skipped_queries"] == 0
    assert (meta["num_gallery"], meta["num_queries"]) == (5, len(split))

    # With both of its images gone, person 100's dialogues have no positive left: they leave the
    # queries, counted, and the rest is scored exactly as the split without that person.
    _truncate(tmp_path / "imgs" / "p0" / "img0.png")
    results = evaluate_retrieval(model, processor, split, score_modes=("global",), on_bad_image="skip")
    without = split.filter(lambda person: person != 100, input_columns=["person_id"])
    assert sorted(results["meta"]["skipped_gallery_images"]) == ["p0/img0.png", "p0/img1.png"]
    assert results["meta"]["skipped_queries"] == len(split) - len(without)
    assert results["flat"] == evaluate_retrieval(model, processor, without, score_modes=("global",))["flat"]


class LeftPaddingProcessor(FakeProcessor):
    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if "attention_mask" in out:
            out["attention_mask"] = out["attention_mask"].flip(1)
        return out


def test_left_padding_is_refused(split):
    with pytest.raises(ValueError, match="not right padding"):
        evaluate_retrieval(FakeModel(), LeftPaddingProcessor(), split, score_modes=("global",))


_TWO_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import Accelerator
from tests.test_evaluation import FakeModel, FakeProcessor, make_split
from diana.training.evaluation import evaluate_retrieval

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
split = make_split(out / f"data{accelerator.process_index}", persons=5, images_per_person=3, seed=3)
model = FakeModel(seed=2)
results = evaluate_retrieval(model, FakeProcessor(), split, batch_size=2, accelerator=accelerator)
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(results["flat"]))
assert results["meta"]["num_processes"] == 2
# Tear the gloo group down before the interpreter does: left to exit, a loaded machine sometimes aborted
# a rank with "terminate called without an active exception" after its results were written.
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_give_the_single_process_numbers(tmp_path):
    script = tmp_path / "two_process_eval.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    done = launch_two_cpu_processes([str(script), str(tmp_path)], timeout=240,
                                    env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1]
    split = make_split(tmp_path / "single", persons=5, images_per_person=3, seed=3)
    single = evaluate_retrieval(FakeModel(seed=2), FakeProcessor(), split, batch_size=2)["flat"]
    assert ranks[0].keys() == single.keys()
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, abs=1e-6), key


# --- The real tiny DiaNA model and processor ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from diana.modeling_diana import DiaNAModel
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    return DiaNAModel(tiny_config()).eval()


def test_one_pass_equals_separate_prefixes_with_tiny_diana(tiny_model, tiny_processor, tmp_path):
    """The issue's explicit check: every round's numbers from ONE encoder pass per dialogue equal
    those of encoding each k-round prefix on its own (`max_rounds=k`)."""
    from diana.training.evaluation import encode_queries, tokenize_dialogues

    split = make_split(tmp_path, persons=3, images_per_person=2, seed=1)
    with torch.inference_mode():
        got = evaluate_retrieval(tiny_model, tiny_processor, split, batch_size=3, score_modes=MODES)
        rounds = max(split["num_rounds"])
        want, _ = separate_prefix_results(tiny_model, tiny_processor, split, MODES, rounds)
    assert got["meta"]["num_rounds"] == rounds
    assert_results_equal(got, want, MODES)

    # The same at the level of the vectors, batched and length-sorted vs one prefix at a time.
    tokens = tokenize_dialogues(tiny_processor, list(split["dialogue"]))
    one_pass = encode_queries(tiny_model, tokens, batch_size=4, pad_token_id=tiny_processor.tokenizer.pad_token_id,
                              keep_attributes=True)
    with torch.inference_mode():
        for i in (0, len(split) - 1):
            dialogue = split[i]["dialogue"]
            for k in range(1, rounds + 1):
                enc = tiny_processor(dialogues=[dialogue], max_rounds=k)
                alone = tiny_model.encode_dialogues(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                torch.testing.assert_close(one_pass["embeds"][i, k - 1], alone.text_embeds[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(one_pass["attributes"][i, k - 1], alone.text_attribute_embeds[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_official_tokenisation_one_pass_equals_each_prefix_encoded_alone(tiny_processor, tmp_path, pooling):
    """With the official tokenisation (each prefix's text tokenised whole, so "coat.\nASSISTANT" merges
    differently per prefix) the per-round numbers still come from one tower pass per dialogue and equal
    encoding every prefix's own official ids."""
    import copy

    from diana.modeling_diana import DiaNAModel
    from diana.training.evaluation import encode_queries, tokenize_dialogues
    from tests.helpers import tiny_config

    processor = copy.copy(tiny_processor)
    processor.tokenization = "official"
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config(text_pooling=pooling, vision_stem="conv")).eval()
    split = make_split(tmp_path, persons=2, images_per_person=2, seed=1)
    # Answers that end in "." as ChatPedes', so prefix ids leave the full dialogue's at every boundary.
    split = split.map(lambda row: {"dialogue": [{**turn, "answer": turn["answer"] + "."} for turn in row["dialogue"]]})
    tokens = tokenize_dialogues(processor, list(split["dialogue"]))
    assert tokens.round_token_masks is not None
    with torch.inference_mode():
        got = evaluate_retrieval(model, processor, split, batch_size=3, score_modes=MODES)
        rounds = max(split["num_rounds"])
        want, _ = separate_prefix_results(model, processor, split, MODES, rounds)
    assert_results_equal(got, want, MODES)

    one_pass = encode_queries(model, tokens, batch_size=4, pad_token_id=processor.pad_token_id, keep_attributes=True)
    prefix_tokens = 0
    with torch.inference_mode():
        for i, dialogue in enumerate(split["dialogue"]):
            for k in range(1, len(dialogue) + 1):
                enc = processor(dialogues=[dialogue], max_rounds=k)
                prefix_tokens += enc["input_ids"].shape[1]
                alone = model.encode_dialogues(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                torch.testing.assert_close(one_pass["embeds"][i, k - 1], alone.text_embeds[0], atol=1e-5, rtol=0)
                torch.testing.assert_close(one_pass["attributes"][i, k - 1], alone.text_attribute_embeds[0], atol=1e-5, rtol=0)
    # One pass per dialogue: the packed rows hold the full dialogues plus a few boundary tokens per round.
    packed, full = int(tokens.lengths.sum()), sum(len(processor(dialogues=[d])["input_ids"][0]) for d in split["dialogue"])
    assert full < packed <= full + 2 * int((tokens.num_rounds - 1).sum()) and packed < prefix_tokens / 2


def test_a_bad_dialogue_is_located_in_the_split(tiny_processor):
    from diana.training.evaluation import tokenize_dialogues

    good = [{"question": "Please describe the person you saw.", "answer": "a man in a red coat"}]
    bad = [*good, {"question": "Any bag?", "answer": 5}]
    with pytest.raises(ValueError, match=r"split rows 2-3 \(the processor numbers them from 0\): dialogue 1, round 2"):
        tokenize_dialogues(tiny_processor, [good, good, good, bad], chunk_size=2)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_model, tiny_processor):
    """A saved tiny model folder (weights, remote code, processor) and a tiny SynthPedes."""
    from diana.processing.data.synthpedes import generate

    root = tmp_path_factory.mktemp("evaluate_model")
    tiny_model.save_pretrained(root / "model")
    tiny_processor.save_pretrained(root / "model")
    summary = generate(str(root / "synth"), persons=12, images_per_person=2, rounds=3, seed=0, image_size=(64, 32),
                       mals_images=7, progress=False)
    return root, summary


def test_evaluate_model_command_end_to_end(saved_tiny, tiny_model, tiny_processor, capsys):
    from diana.processing.data.chatpedes import load_chatpedes
    from diana.training.evaluation.evaluate_model import main

    root, summary = saved_tiny
    out = root / "report"
    results = main(["--model_name_or_path", str(root / "model"), "--data_dir", str(root / "synth" / "chatpedes"),
                    "--batch_size", "4", "--cache_dir", str(root / "cache"), "--output_dir", str(out),
                    "--score_modes", "global", "fused",
                    "--reference", str(root / "synth" / "oracle.json"), "--device", "cpu"])
    printed = capsys.readouterr().out
    # The saved folder + the dataset builder give the numbers of the in-memory model on the same rows.
    test_rows = load_chatpedes(str(root / "synth" / "chatpedes"), cache_dir=str(root / "cache"), validation_persons=0)["test"]
    direct = evaluate_retrieval(tiny_model, tiny_processor, test_rows, batch_size=5, score_modes=("global", "fused"))
    assert results["meta"]["num_queries"] == summary["test"]["dialogues"] == len(test_rows)
    assert results["meta"]["num_gallery"] == summary["test"]["images"]
    for key, value in direct["flat"].items():
        assert results["flat"][key] == pytest.approx(value, abs=1e-6), key
    assert "attribute" not in results
    # The report: printed table with the oracle beside it, files on disk.
    oracle_full = json.loads((root / "synth" / "oracle.json").read_text())["full"]["R@1"]
    full_row = next(line for line in printed.splitlines() if line.startswith("| full |"))
    assert f"{results['global']['full']['R@1']:.2f}" in full_row and f"{oracle_full:.2f}" in full_row
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["meta"]["split"] == "test" and saved["meta"]["dataset"] == "chatpedes"
    assert saved["fused"]["full"] == pytest.approx(results["fused"]["full"])
    assert (out / CURVES_FILE).stat().st_size > 0
    assert (out / "round_table.md").read_text() == format_round_table(results, reference=saved["reference"])


def test_evaluate_folder_on_mals_with_remote_code_and_no_processor_files(saved_tiny, tiny_model, tokenizer_dir):
    from diana.training.evaluation.evaluate_model import evaluate_folder

    root, summary = saved_tiny
    # A bare weights folder (as a converter may write): the processor is built at the model's size.
    tiny_model.save_pretrained(root / "bare")
    assert not (root / "bare" / "processor_config.json").exists()
    results = evaluate_folder(root / "bare", root / "synth" / "mals", dataset="mals", batch_size=4,
                              score_modes=("global",), cache_dir=str(root / "cache"), trust_remote_code=True,
                              tokenizer_dir=str(tokenizer_dir), device="cpu")
    meta = results["meta"]
    # Every MALS image is its own person, queried by its caption as a one-round dialogue.
    assert meta["num_queries"] == meta["num_gallery"] == meta["num_persons"] == summary["mals"]["images"]
    assert meta["num_rounds"] == 1 and set(results["global"]) == {"round_1", "full", "cumulative_hits@10"}
    with pytest.raises(ValueError, match="no split 'test'"):
        evaluate_folder(root / "model", root / "synth" / "mals", dataset="mals", split="test",
                        cache_dir=str(root / "cache"))
