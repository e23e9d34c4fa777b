"""The benchmark suite runs on tiny configs and its naive and fast paths compute the same thing.

No timing is asserted anywhere (speed is measured by `python -m diana.training.benchmarks.run`,
never by a test).
"""

from __future__ import annotations

import json

import pytest
import torch

from diana.modeling_diana import DiaNAModel
from diana.training.benchmarks import gpu, harness, naive, run, search, workloads
from diana.training.benchmarks.cpu import tiny_model_config

pytestmark = pytest.mark.xdist_group("benchmarks")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on one thread: on a loaded 2-core machine, two OpenMP threads per tiny matmul
    spin-wait for each other and a training step takes 30x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model() -> DiaNAModel:
    torch.manual_seed(0)
    model = DiaNAModel(tiny_model_config()).eval()
    return model


@pytest.fixture(scope="module")
def dialogue_batch(tiny_processor):
    # Three dialogues of different round counts and lengths (shorter ones repeat their last round end).
    dialogues = workloads.make_dialogues(3, rounds=4, seed=5)
    dialogues[1] = dialogues[1][:2]
    dialogues[2] = dialogues[2][:1]
    return tiny_processor(dialogues=dialogues, return_round_ends=True)


# ------------------------------------------------------------------------- naive == fast numerically
@pytest.mark.parametrize("pad_to", [naive.NAIVE_MAX_LENGTH, None])
def test_one_pass_round_encodings_equal_reencoded_prefixes(tiny_model, dialogue_batch, pad_to):
    ids, mask, ends = dialogue_batch["input_ids"], dialogue_batch["attention_mask"], dialogue_batch["round_end_positions"]
    with torch.no_grad():
        fast = tiny_model.encode_dialogues(ids, mask, round_end_positions=ends)
    slow_embeds, slow_attributes = naive.reencode_prefixes(tiny_model, ids, mask, ends, pad_to=pad_to)
    assert slow_embeds.shape == fast.text_embeds.shape == (3, 4, tiny_model.config.projection_dim)
    assert slow_attributes.shape == fast.text_attribute_embeds.shape
    torch.testing.assert_close(fast.text_embeds, slow_embeds, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast.text_attribute_embeds, slow_attributes, atol=2e-5, rtol=1e-4)
    # Rounds really differ (a pooling bug that returned the full dialogue for every round would pass above
    # only if the prefixes were ignored on both sides).
    assert not torch.allclose(fast.text_embeds[0, 0], fast.text_embeds[0, 3], atol=1e-3)


def test_prefix_inputs_cut_each_row_at_its_round_end(dialogue_batch):
    ids, mask, ends = dialogue_batch["input_ids"], dialogue_batch["attention_mask"], dialogue_batch["round_end_positions"]
    cut_ids, cut_mask = naive.prefix_inputs(ids, mask, ends[:, 0], pad_to=naive.NAIVE_MAX_LENGTH)
    assert cut_ids.shape == (3, naive.NAIVE_MAX_LENGTH)
    for row in range(3):
        end = int(ends[row, 0])
        assert int(cut_mask[row].sum()) == end + 1
        assert torch.equal(cut_ids[row, : end + 1], ids[row, : end + 1])
        assert (cut_ids[row, end + 1 :] == naive.PAD_TOKEN_ID).all()
    dyn_ids, _ = naive.prefix_inputs(ids, mask, ends[:, 0], pad_to=None)
    assert dyn_ids.shape[1] == int(ends[:, 0].max()) + 1


def test_plain_towers_equal_model_encodings(tiny_model, dialogue_batch):
    ids, mask = dialogue_batch["input_ids"], dialogue_batch["attention_mask"]
    pixels = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = tiny_model.encode_dialogues(ids, mask).text_embeds
        image = tiny_model.encode_images(pixels).image_embeds
    torch.testing.assert_close(naive.plain_text_embeds(tiny_model, ids, mask), text, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(naive.plain_image_embeds(tiny_model, pixels), image, atol=2e-5, rtol=1e-4)


def test_fast_and_naive_training_step_give_the_same_loss_and_gradients(tiny_processor):
    """Dynamic padding + SDPA (fast) against padding to 400 + eager attention (naive), fp32."""
    torch.manual_seed(0)
    model = DiaNAModel(tiny_model_config()).train()
    inputs = gpu.Inputs(tiny_processor, 6, 3, (64, 32), torch.device("cpu"))
    results = {}
    for name, sdpa, pad_to in (("fast", True, None), ("naive", False, naive.NAIVE_MAX_LENGTH)):
        gpu.set_text_attention(model, sdpa)
        batch = inputs.train_batch(6, pad_to)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), grads, batch["input_ids"].shape[1])
    assert results["naive"][2] == naive.NAIVE_MAX_LENGTH > results["fast"][2]
    assert results["fast"][2] % 8 == 0
    torch.testing.assert_close(results["fast"][0], results["naive"][0], atol=1e-5, rtol=1e-5)
    assert results["fast"][1].keys() == results["naive"][1].keys()
    # Relative to each tensor's norm, plus a floor relative to the whole gradient: some gradients are
    # ~0 in exact arithmetic (softmax is invariant to a key bias) and hold only rounding noise.
    total = torch.stack([g.norm() for g in results["fast"][1].values()]).norm()
    for name, grad in results["fast"][1].items():
        diff = (grad - results["naive"][1][name]).norm()
        assert diff <= 1e-4 * grad.norm() + 1e-7 * total, f"{name}: |diff| {diff:.2e} vs |grad| {grad.norm():.2e}"


# ----------------------------------------------------------------------------------------- harness
def _fake_step(threshold: int, calls: list[int]):
    def try_batch(b: int) -> None:
        calls.append(b)
        if b > threshold:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return try_batch


@pytest.mark.parametrize("threshold,start,limit,expected", [
    (37, 8, 1024, 37), (5, 8, 1024, 5), (0, 8, 1024, 0), (2000, 8, 512, 512), (64, 8, 1024, 64), (1, 1, 1024, 1),
])
def test_find_max_batch_finds_the_oom_threshold(threshold, start, limit, expected):
    calls: list[int] = []
    result = harness.find_max_batch(_fake_step(threshold, calls), start=start, limit=limit)
    assert result.max_batch == expected
    assert result.hit_limit == (expected == limit)
    assert all(ok == (b <= threshold) for b, ok in result.probes)
    assert len(calls) <= 2 * max(1, limit).bit_length() + 2  # doubling then bisection, not a linear scan


def test_find_max_batch_relative_tolerance_brackets_the_threshold():
    calls: list[int] = []
    result = harness.find_max_batch(_fake_step(700, calls), start=32, limit=1024, relative_tolerance=1 / 16)
    failed = min(b for b, ok in result.probes if not ok)
    assert result.max_batch <= 700 < failed and failed - result.max_batch <= result.max_batch // 16
    assert len(calls) < 12


def test_find_max_batch_propagates_other_errors():
    def broken(b: int) -> None:
        raise RuntimeError("shape mismatch in layer 3")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        harness.find_max_batch(broken)


def test_count_flops_counts_matmul_forward_and_backward():
    m, k, n = 8, 16, 4
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(k, n, requires_grad=True)
    assert harness.count_flops(lambda: x @ w) == 2 * m * k * n
    # backward: one matmul for each input's gradient
    assert harness.count_flops(lambda: (x @ w).sum().backward()) == 3 * 2 * m * k * n


def test_counting_flops_leaves_a_live_model_from_the_same_config_alone():
    model = DiaNAModel(tiny_model_config())
    gpu.set_text_attention(model, True)
    gpu.count_train_flops(model.config, 2, 16, (64, 32))
    assert model.text_model.config._attn_implementation == "sdpa"


def test_train_flops_cover_the_text_tower_and_grow_with_batch_and_length():
    config = tiny_model_config()
    batch, length = 2, 40
    flops = gpu.count_train_flops(config, batch, length, (64, 32))
    # Forward + backward of every Llama linear layer is 6 FLOPs per weight per token: a lower bound.
    with torch.device("meta"):
        text = DiaNAModel(config).text_model
    linear = sum(p.numel() for n, p in text.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert flops > 6 * batch * length * linear
    assert gpu.count_train_flops(config, 2 * batch, length, (64, 32)) > 1.5 * flops
    assert gpu.count_train_flops(config, batch, 2 * length, (64, 32)) > flops


def test_time_fn_respects_repeats_and_cap():
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), warmup=2, repeats=4, max_seconds=10.0)
    assert len(calls) == 6 and timing.repeats == 4 and not timing.capped
    slow = harness.time_fn(lambda: torch.randn(200, 200) @ torch.randn(200, 200), warmup=0, repeats=1000,
                           max_seconds=0.0)
    assert slow.repeats == 1 and slow.capped
    assert slow.min_s <= slow.median_s <= slow.max_s


def test_optimisation_names():
    assert gpu.Optimisations.naive().name() == "naive"
    assert gpu.Optimisations().name() == "fast"
    assert gpu.Optimisations(sdpa=False).name() == "fast-no-sdpa"
    assert gpu.Optimisations(checkpointing=True).name() == "fast+ckpt"
    assert gpu.Optimisations(compile_vision=False, bf16=False).name() == "fast-no-compile_vision-no-bf16"
    assert gpu.Optimisations(sdpa=False, compile_vision=False, fused_adamw=False, dynamic_padding=False,
                             bf16=False).name() == "naive"


# ------------------------------------------------------------------------------- the whole command
def test_run_command_runs_both_suites_tiny_and_writes_json(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "bench.json"
    payload = run.main(["--suite", "all", "--tiny", "--output_file", str(out), "--device", "cpu",
                        "--tokenizer_dir", str(tokenizer_dir), "--no_ablations"])
    on_disk = json.loads(out.read_text())
    assert on_disk.keys() == payload.keys() >= {"command", "cpu", "gpu"}
    printed = capsys.readouterr().out
    assert "CPU suite (tiny)" in printed and "GPU suite (tiny)" in printed

    cpu_res = on_disk["cpu"]
    assert {"environment", "per_round_eval", "processor", "metrics", "padding", "collation", "image_check"} <= cpu_res.keys()
    check = cpu_res["image_check"]
    assert check["images"] == 8 and set(check["ms_per_image"]) == {"exists", "header", "full"}
    assert all(ms > 0 for ms in check["ms_per_image"].values())
    collation = cpu_res["collation"]
    assert collation["same_pixel_values"] is True and collation["rows"] == 8
    assert collation["ms_per_batch_cached"] > 0 and collation["ms_per_batch_decoded"] > 0
    ev = cpu_res["per_round_eval"]
    assert set(ev["timings"]) == {"one_pass_with_round_ends", "one_pass_full_dialogue_only",
                                  "reencode_prefixes_dynamic_padding", "reencode_prefixes_padded_400"}
    assert ev["ratio_reencode_400_over_one_pass"] > 0
    assert ev["max_abs_diff_text_embeds"] < 1e-4 and ev["max_abs_diff_attribute_embeds"] < 1e-4
    official = cpu_res["official_per_round_eval"]
    assert official["max_abs_diff_text_embeds"] < 1e-4 and official["max_abs_diff_attribute_embeds"] < 1e-4
    # One pass: the dialogue plus a few boundary tokens, far fewer than the R prefixes together.
    assert official["tokens_per_dialogue_full_dialogue"] < official["tokens_per_dialogue_packed"]
    assert official["tokens_per_dialogue_packed"] < official["tokens_per_dialogue_reencoded"] / 1.5
    for key in ("diana_processor_images_per_s", "plain_vit_images_per_s", "diana_processor_dialogues_per_s",
                "plain_tokenizer_dialogues_per_s"):
        assert cpu_res["processor"][key] > 0
    assert len(cpu_res["metrics"]["R@1_per_round"]) == cpu_res["metrics"]["rounds"]
    pad = cpu_res["padding"]
    assert 0 < pad["efficiency_pad_to_400"] <= pad["efficiency_dynamic"] <= pad["efficiency_length_grouped"] <= 1

    gpu_res = on_disk["gpu"]
    assert gpu_res["errors"] == {} and gpu_res["skipped"] == []
    assert {"hardware", "flops", "training", "batch_fit_80GB", "gallery_encoding", "evaluation_chatpedes",
            "big_gallery_query"} <= gpu_res.keys()
    # On the CPU compilation is off, so the fast path is named after it.
    fast_name = gpu.Optimisations(compile_vision=False, bf16=False).name()
    assert {"naive", fast_name, fast_name + "+ckpt"} <= gpu_res["training"].keys()
    for t in gpu_res["training"].values():
        assert t["samples_per_s"] > 0 and t["step"]["repeats"] >= 1
        assert t["text_attention_used"] == ("sdpa" if t["options"]["sdpa"] else "eager")
    assert gpu_res["training"]["naive"]["padded_lengths"] == [naive.NAIVE_MAX_LENGTH] * 2
    assert max(gpu_res["training"][fast_name]["padded_lengths"]) < naive.NAIVE_MAX_LENGTH
    assert gpu_res["flops"]["per_sample_padded_400"] > gpu_res["flops"]["per_sample_fast"] > 0
    naive_run, fast_run = gpu_res["training"]["naive"], gpu_res["training"][fast_name]
    # Same samples, same model FLOPs; the naive path executes more (padding to 400).
    assert naive_run["model_flops_per_step"] == fast_run["model_flops_per_step"]
    assert naive_run["executed_flops_per_step"] > naive_run["model_flops_per_step"]
    fits = gpu_res["batch_fit_80GB"]
    assert fits["no_checkpointing"]["max_batch"] >= 1 and fits["checkpointing"]["max_batch"] >= 1
    ev = gpu_res["evaluation_chatpedes"]
    assert len(ev["R@1_per_round_random_weights"]) == ev["rounds"]
    assert ev["naive_total_s_scaled"] > 0 and ev["fast_total_s"] > 0
    assert gpu_res["big_gallery_query"]["queries_per_s"] > 0
    # The search figures ride along: exact fp16 + re-score equals the naive float32 search, recall is a
    # fraction, indexing ran under accelerate launch with 1 and 2 (CPU) processes.
    found = gpu_res["search"]
    assert found["exact"]["same_ranking"] is True and found["bandwidth"]["read_bytes_per_s"] > 0
    if "ann" in found:
        assert 0 <= found["ann"]["recall_at_10"] <= 1 and found["ann"]["query_s"] > 0
    assert len(found["chat_round"]["rounds"]) == len(search.ROUNDS)
    assert found["indexing"]["1_process_images_per_s"] > 0 and found["indexing"]["2_process_images_per_s"] > 0
    assert "search: exact top-10, fp16 scan + fp32 re-score" in printed


def test_clustered_gallery_puts_each_person_images_nearest_their_queries():
    gallery, centres = search.clustered_gallery(400, 768, per_person=4)
    assert gallery.shape == (400, 768) and centres.shape == (100, 768)
    torch.testing.assert_close(gallery.norm(dim=-1), torch.ones(400))
    queries = search.person_queries(centres, 30)
    persons = torch.topk(queries @ centres.T, 1).indices[:, 0]
    nearest_images = torch.topk(queries @ gallery.T, 2).indices // 4  # image row -> its person
    assert (nearest_images == persons[:, None]).float().mean() > 0.9
