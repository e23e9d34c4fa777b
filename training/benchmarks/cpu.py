"""CPU suite: what can be measured without a GPU, each figure beside its baseline in the same run.

1. Per-round evaluation cost: one causal pass read at every round end
   (`model.encode_dialogues(..., round_end_positions)`) against re-encoding every round prefix,
   padded to 400 (the official code) and padded to the prefix batch's longest (isolating the
   R passes), and against one pass without round ends (the "<= 1.3x one pass" goal).
   Real tokenizer, ChatPedes-length 10-round dialogues, a small real-shaped model (Llama layers
   at hidden 256 with the Llama-3.2-1B head layout and the real 128k vocabulary).
   The same with the official tokenisation (each prefix's text tokenised whole, as converted official
   weights need): one pass over packed rows (`round_token_mask`) against encoding every prefix's own
   ids; tokens run through the tower and wall time per dialogue.
2. Processor throughput per core: `DiaNAProcessor` against a plain `ViTImageProcessor` call and a
   plain tokenizer call on the rendered dialogue text.
3. Metric computation at ChatPedes size: ~6k dialogues x 10 rounds against 3,074 images with
   `training.metrics.retrieval_metrics` (and the scoring matmuls).
4. Padding efficiency of the three batching policies on ChatPedes-length dialogues.
5. Training collation as the Trainer runs it, for the SynthPedes CPU presets (128x64 PNG files read
   through a `datasets` table, resized to 64x32): decoded rows through the whole image pipeline,
   against undecoded rows with `DiaNACollator(image_cache=True)` once every image is kept; the two
   give the same batches (checked).
6. The dataset builders' image checks on ChatPedes-like files (photo-like 384x128 JPEGs): "exists"
   (a stat) and "header" (header + end marker) against "full" (a decode with the shared loader, the
   ChatPedes default), per image and extrapolated to ChatPedes' 37,128 images.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.modeling_diana.configuration_diana import DEFAULT_TEXT_CONFIG
from diana.processing import build_processor
from diana.processing.data.annotations import IMAGE_CHECKS, check_image
from diana.processing.tokenizer_setup import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID
from diana.training.benchmarks import harness, naive, workloads
from diana.training.benchmarks.harness import fmt
from diana.training.data.collator import DiaNACollator
from diana.training.data.dataset_columns import with_undecoded_images
from diana.training.evaluation.metrics import retrieval_metrics


@dataclass
class CpuSettings:
    """Sizes of the CPU run; `tiny()` shrinks everything for the test suite."""

    eval_dialogues: int = 16
    eval_batch: int = 16
    rounds: int = workloads.CHATPEDES_ROUNDS
    text_hidden: int = 256
    text_layers: int = 4
    eval_repeats: int = 3
    processor_images: int = 128
    processor_dialogues: int = 256
    processor_repeats: int = 5
    metric_queries: int = workloads.CHATPEDES_TEST_DIALOGUES
    metric_gallery: int = workloads.CHATPEDES_TEST_IMAGES
    metric_persons: int = workloads.CHATPEDES_TEST_PERSONS
    metric_rounds: int = workloads.CHATPEDES_ROUNDS
    metric_dim: int = 768
    padding_dialogues: int = 2048
    padding_batch: int = 32
    collate_rows: int = 512
    collate_batch: int = 64
    check_images: int = 2000
    max_seconds: float = 100.0

    @classmethod
    def tiny(cls) -> "CpuSettings":
        return cls(
            eval_dialogues=4, eval_batch=2, rounds=3, text_hidden=32, text_layers=2, eval_repeats=1,
            processor_images=4, processor_dialogues=8, processor_repeats=1, metric_queries=40, metric_gallery=20,
            metric_persons=10, metric_rounds=2, metric_dim=16, padding_dialogues=16, padding_batch=4, collate_rows=8,
            collate_batch=4, check_images=8, max_seconds=5.0,
        )


def tiny_model_config(**overrides) -> DiaNAConfig:
    """The test suite's tiny shapes (hidden 32, odd sizes, 64x32 images) with the real vocabulary."""
    from transformers import LlamaConfig, Swinv2Config


    vision = Swinv2Config(image_size=[64, 32], patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4],
                          window_size=4, mlp_ratio=2.0, drop_path_rate=0.0)
    text = LlamaConfig(vocab_size=128256, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
                       tie_word_embeddings=False)
    kwargs = dict(vision_config=vision, text_config=text, projection_dim=24, num_attribute_queries=3,
                  refiner_num_layers=2, refiner_num_heads=4)
    kwargs.update(overrides)
    return DiaNAConfig(**kwargs)


def small_text_config(hidden: int, layers: int) -> DiaNAConfig:
    """Llama-3.2-1B's layout scaled to `hidden` (head dim 64, 4 query heads per KV head, MLP 4x,
    real vocabulary and RoPE), refiner as the paper (K = 16), a tiny image tower (unused here)."""
    from transformers import LlamaConfig, Swinv2Config


    heads = max(1, hidden // 64)
    text = dict(DEFAULT_TEXT_CONFIG)
    text.pop("model_type")
    text.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 4), head_dim=hidden // heads, tie_word_embeddings=False)
    vision = Swinv2Config(image_size=[64, 32], patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4],
                          window_size=4, drop_path_rate=0.0)
    return DiaNAConfig(vision_config=vision, text_config=LlamaConfig(**text), projection_dim=hidden,
                       num_attribute_queries=16, refiner_num_heads=max(1, hidden // 64))


@contextlib.contextmanager
def single_core() -> Any:
    """One intra-op thread and no tokenizer thread pool: per-core figures."""
    threads = torch.get_num_threads()
    old_env = os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if old_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old_env


# ----------------------------------------------------------------------------------- 1. per-round eval
def _eval_model_and_dialogues(settings: CpuSettings, config: DiaNAConfig) -> tuple[DiaNAModel, list[Any]]:
    """The per-round benchmarks' model (seed 0, SDPA text tower, eval mode) and their dialogues."""
    torch.manual_seed(0)
    model = DiaNAModel(config).eval()
    model.text_model.set_attn_implementation("sdpa")
    return model, workloads.make_dialogues(settings.eval_dialogues, rounds=settings.rounds, seed=0)


def _batch_slices(n: int, size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]


@torch.no_grad()
def bench_per_round_eval(processor, settings: CpuSettings, config: DiaNAConfig) -> dict[str, Any]:
    """Per-round dialogue encoding: one pass with round ends vs re-encoding every prefix."""
    model, dialogues = _eval_model_and_dialogues(settings, config)
    enc = processor(dialogues=dialogues, return_round_ends=True, return_tensors="pt")
    ids, mask, ends = enc["input_ids"], enc["attention_mask"], enc["round_end_positions"]
    batches = _batch_slices(ids.shape[0], settings.eval_batch)

    def one_pass_rounds() -> None:
        for b in batches:
            model.encode_dialogues(ids[b], mask[b], round_end_positions=ends[b])

    def one_pass_full() -> None:
        for b in batches:
            model.encode_dialogues(ids[b], mask[b])

    def reencode(pad_to: int | None) -> Any:
        def run() -> None:
            for b in batches:
                naive.reencode_prefixes(model, ids[b], mask[b], ends[b], pad_to=pad_to)
        return run

    timings = harness.time_interleaved({
        "one_pass_with_round_ends": one_pass_rounds,
        "one_pass_full_dialogue_only": one_pass_full,
        "reencode_prefixes_dynamic_padding": reencode(None),
        "reencode_prefixes_padded_400": reencode(naive.NAIVE_MAX_LENGTH),
    }, warmup=1, repeats=settings.eval_repeats, max_seconds=settings.max_seconds)
    # Numerical agreement of the two methods on the same inputs (fp32).
    fast = model.encode_dialogues(ids, mask, round_end_positions=ends)
    slow_embeds, slow_attr = naive.reencode_prefixes(model, ids, mask, ends, pad_to=naive.NAIVE_MAX_LENGTH)
    # Ratios of the least disturbed calls (min): robust to other processes on a shared machine.
    base = timings["one_pass_with_round_ends"].min_s
    lengths = mask.sum(dim=1).float()
    return {
        "dialogues": settings.eval_dialogues,
        "rounds": settings.rounds,
        "batch": settings.eval_batch,
        "text_hidden": config.text_config.hidden_size,
        "text_layers": config.text_config.num_hidden_layers,
        "mean_tokens": float(lengths.mean()),
        "max_tokens": int(lengths.max()),
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "ratio_reencode_400_over_one_pass": timings["reencode_prefixes_padded_400"].min_s / base,
        "ratio_reencode_dynamic_over_one_pass": timings["reencode_prefixes_dynamic_padding"].min_s / base,
        "ratio_rounds_over_full_only": base / timings["one_pass_full_dialogue_only"].min_s,
        "max_abs_diff_text_embeds": float((fast.text_embeds - slow_embeds).abs().max()),
        "max_abs_diff_attribute_embeds": float((fast.text_attribute_embeds - slow_attr).abs().max()),
    }


@torch.no_grad()
def bench_official_per_round_eval(processor, settings: CpuSettings, config: DiaNAConfig) -> dict[str, Any]:
    """Per-round encoding with the official tokenisation (each prefix's whole text, as converted official
    weights need): one pass over rows packing each dialogue with its prefixes' differing last tokens
    (`round_token_mask`) vs encoding every prefix's own ids (the official code's R passes)."""
    import copy

    official = copy.copy(processor)
    official.tokenization = "official"
    model, dialogues = _eval_model_and_dialogues(settings, config)
    enc = official(dialogues=dialogues, return_round_ends=True, return_tensors="pt")
    ids, mask, views = enc["input_ids"], enc["attention_mask"], enc["round_token_mask"]
    batches = _batch_slices(ids.shape[0], settings.eval_batch)

    def one_pass_packed() -> None:
        for b in batches:
            model.encode_dialogues(ids[b], mask[b], round_token_mask=views[b])

    def reencode(pad_to: int | None) -> Any:
        return lambda: naive.encode_official_prefixes(model, official, dialogues, settings.eval_batch, pad_to)

    timings = harness.time_interleaved({
        "official_one_pass_packed": one_pass_packed,
        "official_reencode_prefixes_dynamic_padding": reencode(None),
        "official_reencode_prefixes_padded_400": reencode(naive.NAIVE_MAX_LENGTH),
    }, warmup=1, repeats=settings.eval_repeats, max_seconds=settings.max_seconds)
    fast = model.encode_dialogues(ids, mask, round_token_mask=views)
    slow_embeds, slow_attr, prefix_tokens = naive.encode_official_prefixes(model, official, dialogues, settings.eval_batch)
    full_tokens = int(official(dialogues=dialogues)["attention_mask"].sum())
    n = len(dialogues)
    base = timings["official_one_pass_packed"].min_s
    return {
        "dialogues": n,
        "rounds": settings.rounds,
        "tokens_per_dialogue_packed": int(mask.sum()) / n,
        "tokens_per_dialogue_full_dialogue": full_tokens / n,
        "tokens_per_dialogue_reencoded": prefix_tokens / n,
        "ms_per_dialogue_packed": 1000 * base / n,
        "ms_per_dialogue_reencode_dynamic": 1000 * timings["official_reencode_prefixes_dynamic_padding"].min_s / n,
        "ms_per_dialogue_reencode_400": 1000 * timings["official_reencode_prefixes_padded_400"].min_s / n,
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "ratio_reencode_dynamic_over_packed": timings["official_reencode_prefixes_dynamic_padding"].min_s / base,
        "ratio_reencode_400_over_packed": timings["official_reencode_prefixes_padded_400"].min_s / base,
        "max_abs_diff_text_embeds": float((fast.text_embeds - slow_embeds).abs().max()),
        "max_abs_diff_attribute_embeds": float((fast.text_attribute_embeds - slow_attr).abs().max()),
    }


# ---------------------------------------------------------------------------------- 2. processor speed
def bench_processor(processor, settings: CpuSettings) -> dict[str, Any]:
    """Images/s and dialogues/s on one core: DiaNAProcessor vs plain sub-processor calls."""
    from transformers import ViTImageProcessor

    images = workloads.make_pil_images(settings.processor_images, seed=0)
    dialogues = workloads.make_dialogues(settings.processor_dialogues, rounds=workloads.CHATPEDES_ROUNDS, seed=2)
    rendered = [processor.render_dialogue(d) for d in dialogues]
    ip = processor.image_processor
    # The same resize / rescale / normalise as the processor's, built fresh: the plain baseline.
    plain_images = ViTImageProcessor(size=dict(ip.size), resample=ip.resample, image_mean=ip.image_mean,
                                     image_std=ip.image_std)
    tokenizer = processor.tokenizer
    with single_core():
        timings = harness.time_interleaved({
            "diana_processor_images": lambda: processor(images=images),
            "plain_vit_image_processor": lambda: plain_images(images, return_tensors="pt"),
            "diana_processor_dialogues_round_ends": lambda: processor(dialogues=dialogues, return_round_ends=True),
            "plain_tokenizer_rendered_text": lambda: tokenizer(rendered, padding="longest", return_tensors="pt"),
        }, warmup=1, repeats=settings.processor_repeats, max_seconds=settings.max_seconds)
    # Same ids from both text paths: the processor's round-segment tokenisation must not change them.
    ids_proc = processor(dialogues=dialogues[:8])["input_ids"]
    ids_plain = tokenizer(rendered[:8], padding="longest", return_tensors="pt")["input_ids"]
    n_img, n_dlg = len(images), len(dialogues)
    per_s = {  # from the least disturbed call (min), as the ratios above
        "diana_processor_images_per_s": n_img / timings["diana_processor_images"].min_s,
        "plain_vit_images_per_s": n_img / timings["plain_vit_image_processor"].min_s,
        "diana_processor_dialogues_per_s": n_dlg / timings["diana_processor_dialogues_round_ends"].min_s,
        "plain_tokenizer_dialogues_per_s": n_dlg / timings["plain_tokenizer_rendered_text"].min_s,
    }
    return {
        "threads": 1,
        "images": n_img,
        "dialogues": n_dlg,
        "timings": {k: v.as_dict() for k, v in timings.items()},
        **per_s,
        "ids_equal_to_plain_tokenizer": bool(ids_proc.shape == ids_plain.shape and torch.equal(ids_proc, ids_plain)),
    }


# ---------------------------------------------------------------------------------- 5. collation
def bench_collation(settings: CpuSettings, tokenizer_dir: str | None = None) -> dict[str, Any]:
    """ms per training batch (row fetch + collation, both threads): decoded rows vs undecoded + image cache."""
    import tempfile

    import datasets
    import numpy as np
    from PIL import Image


    processor = build_processor(tokenizer_dir=tokenizer_dir, profile="finetune", image_size=(64, 32))
    dialogues = workloads.make_dialogues(settings.collate_rows, rounds=5, seed=4)
    rng = np.random.default_rng(4)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(settings.collate_rows):  # SynthPedes-like: flat colour regions compress like its drawings
            array = np.repeat(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8), 8, axis=0).repeat(8, axis=1)
            paths.append(os.path.join(folder, f"{i:05d}.png"))
            Image.fromarray(array).save(paths[-1])
        table = datasets.Dataset.from_dict(
            # row_index keys each batch's draws to (seed, epoch, rows), as in run_stage: comparable across collators.
            {"image": paths, "dialogue": dialogues, "person_id": list(range(len(paths))),
             "row_index": list(range(len(paths)))},
            features=datasets.Features({
                "image": datasets.Image(), "person_id": datasets.Value("int64"), "row_index": datasets.Value("int64"),
                "dialogue": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
            }),
        )
        undecoded = with_undecoded_images(table)
        options = dict(train=True, round_retaining=True, token_masking=0.0, image_augmentation=True, max_length=400,
                       seed=0)
        plain, cached = DiaNACollator(processor, **options), DiaNACollator(processor, image_cache=True, **options)
        plain.set_epoch(0), cached.set_epoch(0)
        batches = [list(range(start, min(start + settings.collate_batch, len(paths))))
                   for start in range(0, len(paths), settings.collate_batch)]
        first_epoch = time.perf_counter()
        for rows in batches:
            cached([undecoded[i] for i in rows])
        first_epoch = time.perf_counter() - first_epoch
        same = all(torch.equal(plain([table[i] for i in rows])["pixel_values"],
                               cached([undecoded[i] for i in rows])["pixel_values"]) for rows in batches[:2])

        def epoch(collator, source) -> Any:
            return lambda: [collator([source[i] for i in rows]) for rows in batches]

        timings = harness.time_interleaved({"decoded_rows_full_pipeline": epoch(plain, table),
                                            "undecoded_rows_image_cache": epoch(cached, undecoded)},
                                           warmup=0, repeats=3, max_seconds=settings.max_seconds)
    per_batch = {name: 1000 * t.min_s / len(batches) for name, t in timings.items()}
    return {
        "rows": len(paths), "batch": settings.collate_batch, "image_size": [64, 32], "source_size": [128, 64],
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "ms_per_batch_decoded": per_batch["decoded_rows_full_pipeline"],
        "ms_per_batch_cached": per_batch["undecoded_rows_image_cache"],
        "ms_per_batch_cache_filling": 1000 * first_epoch / len(batches),
        "same_pixel_values": bool(same),
    }


# ------------------------------------------------------------------------------ 6. builder image checks
def bench_image_check(settings: CpuSettings) -> dict[str, Any]:
    """ms per image of each `check_image` mode on photo-like 384x128 JPEGs (warm page cache)."""
    import tempfile

    import numpy as np
    from PIL import Image


    rng = np.random.default_rng(6)
    rows, cols = np.mgrid[0:384, 0:128]
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(settings.check_images):  # smooth gradients plus sensor-like noise: ~18 KB at quality 90
            base = np.stack([rows * 0.5, cols * 1.5, (rows + cols) * 0.3], axis=-1) + rng.uniform(0, 80, 3)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            paths.append(os.path.join(folder, f"{i:05d}.jpg"))
            Image.fromarray(pixels).save(paths[-1], quality=90)
        mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024

        def check_all(mode: str) -> Any:
            return lambda: [check_image(p, mode) for p in paths]

        timings = harness.time_interleaved({mode: check_all(mode) for mode in IMAGE_CHECKS}, warmup=1, repeats=2,
                                           max_seconds=settings.max_seconds)
    per_image = {mode: 1000 * t.min_s / len(paths) for mode, t in timings.items()}
    return {
        "images": len(paths), "image_size": [384, 128], "mean_file_kb": mean_kb,
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "ms_per_image": per_image,
        "chatpedes_s": {mode: ms * workloads.CHATPEDES_IMAGES / 1000 for mode, ms in per_image.items()},
    }


# -------------------------------------------------------------------------------------- 3. metrics
@torch.no_grad()
def bench_metrics(settings: CpuSettings) -> dict[str, Any]:
    """Scoring + `retrieval_metrics` for every round of a ChatPedes-sized test split."""

    gen = torch.Generator().manual_seed(0)
    q, g, r, d = settings.metric_queries, settings.metric_gallery, settings.metric_rounds, settings.metric_dim
    gallery = torch.nn.functional.normalize(torch.randn(g, d, generator=gen), dim=-1)
    gallery_ids = torch.arange(g) % settings.metric_persons
    query_ids = torch.arange(q) % settings.metric_persons
    # Queries near their person's images so the ranking is not pure noise (sorting cost is data-dependent).
    anchors = gallery[query_ids]  # (Q, D): an image of the same person (persons own images p, p+P, ...)
    text = torch.nn.functional.normalize(anchors[:, None, :] + torch.randn(q, r, d, generator=gen), dim=-1)  # (Q, R, D)

    start = time.perf_counter()
    sims = [text[:, k] @ gallery.t() for k in range(r)]  # R x (Q, G)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    per_round = [retrieval_metrics(s, query_ids, gallery_ids) for s in sims]
    metrics_s = time.perf_counter() - start
    return {
        "queries": q, "gallery": g, "rounds": r, "dim": d, "threads": torch.get_num_threads(),
        "score_s": score_s,
        "metrics_s": metrics_s,
        "metrics_s_per_round": metrics_s / r,
        "ranked_entries_per_s": q * g * r / metrics_s,
        "R@1_per_round": [m["R@1"] for m in per_round],
    }


# ------------------------------------------------------------------------------ 4. padding efficiency
def bench_padding(processor, settings: CpuSettings) -> dict[str, Any]:
    """Share of real tokens in the padded training batches of each policy, on full 10-round
    dialogues and under R3 (each draw keeps its first r rounds, r uniform in 1..R), where grouping
    by the full dialogue's length (the `length` column of `add_length_column`) is only an upper bound."""
    dialogues = workloads.make_dialogues(settings.padding_dialogues, rounds=workloads.CHATPEDES_ROUNDS, seed=3)
    ids, ends, _ = processor.dialogue_token_ids(dialogues)
    lengths = torch.tensor([len(x) for x in ids])
    b = settings.padding_batch
    gen = torch.Generator().manual_seed(0)

    def efficiency(token_counts: torch.Tensor, order: torch.Tensor) -> float:
        chunks = token_counts[order].split(b)
        return float(token_counts.sum()) / sum(int(c.max()) * len(c) for c in chunks)

    shuffled = torch.randperm(len(ids), generator=gen)
    by_full_length = torch.argsort(lengths, descending=True)
    # R3: one draw per dialogue; the kept prefix ends at round r's last token.
    kept = torch.randint(1, workloads.CHATPEDES_ROUNDS + 1, (len(ids),), generator=gen)
    r3_lengths = torch.tensor([row_ends[k - 1] + 1 for row_ends, k in zip(ends, kept.tolist())])
    return {
        "dialogues": len(ids),
        "batch": b,
        "mean_tokens": float(lengths.float().mean()),
        "min_tokens": int(lengths.min()),
        "max_tokens": int(lengths.max()),
        "efficiency_pad_to_400": float(lengths.sum()) / (naive.NAIVE_MAX_LENGTH * len(ids)),
        "efficiency_dynamic": efficiency(lengths, shuffled),
        "efficiency_length_grouped": efficiency(lengths, by_full_length),
        "r3_mean_tokens": float(r3_lengths.float().mean()),
        "r3_efficiency_pad_to_400": float(r3_lengths.sum()) / (naive.NAIVE_MAX_LENGTH * len(ids)),
        "r3_efficiency_dynamic": efficiency(r3_lengths, shuffled),
        "r3_efficiency_grouped_by_full_length": efficiency(r3_lengths, by_full_length),
        "r3_efficiency_grouped_by_drawn_length": efficiency(r3_lengths, torch.argsort(r3_lengths, descending=True)),
    }


def run_cpu_suite(*, tiny: bool = False, settings: CpuSettings | None = None, tokenizer_dir: str | None = None) -> dict[str, Any]:
    """Runs the CPU suite; returns JSON-ready results (see the module docstring)."""

    settings = settings or (CpuSettings.tiny() if tiny else CpuSettings())
    processor = build_processor(tokenizer_dir=tokenizer_dir)
    config = tiny_model_config() if tiny else small_text_config(settings.text_hidden, settings.text_layers)
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": harness.environment("cpu"), "settings": asdict(settings), "tiny": tiny}
    results["per_round_eval"] = bench_per_round_eval(processor, settings, config)
    results["official_per_round_eval"] = bench_official_per_round_eval(processor, settings, config)
    results["processor"] = bench_processor(processor, settings)
    results["metrics"] = bench_metrics(settings)
    results["padding"] = bench_padding(processor, settings)
    results["collation"] = bench_collation(settings, tokenizer_dir)
    results["image_check"] = bench_image_check(settings)
    results["suite_wall_s"] = time.perf_counter() - start
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    ev = results["per_round_eval"]
    t = ev["timings"]
    shape = f"{ev['dialogues']} dlg x {ev['rounds']} rounds, ~{ev['mean_tokens']:.0f} tok, L{ev['text_layers']} h{ev['text_hidden']}"
    rows.append(("per-round enc: one pass + round ends", fmt(t["one_pass_with_round_ends"]["min_s"], "s"), shape))
    rows.append(("per-round enc: one pass, full only", fmt(t["one_pass_full_dialogue_only"]["min_s"], "s"),
                 f"rounds/full = {fmt(ev['ratio_rounds_over_full_only'], 'x')}"))
    rows.append(("per-round enc: re-encode, pad 400 (naive)", fmt(t["reencode_prefixes_padded_400"]["min_s"], "s"),
                 f"{fmt(ev['ratio_reencode_400_over_one_pass'], 'x')} the one pass"))
    rows.append(("per-round enc: re-encode, dynamic pad", fmt(t["reencode_prefixes_dynamic_padding"]["min_s"], "s"),
                 f"{fmt(ev['ratio_reencode_dynamic_over_one_pass'], 'x')} the one pass"))
    rows.append(("one pass vs re-encode max |diff|", f"{ev['max_abs_diff_text_embeds']:.1e}",
                 f"attribute slots {ev['max_abs_diff_attribute_embeds']:.1e}"))
    o = results["official_per_round_eval"]
    rounds_ms = 1000 * t["one_pass_with_round_ends"]["min_s"] / ev["dialogues"]
    rows.append(("official ids, per-round enc: one packed pass", fmt(o["ms_per_dialogue_packed"], "ms/dlg"),
                 f"{o['tokens_per_dialogue_packed']:.0f} tok/dlg through the tower (the dialogue alone "
                 f"{o['tokens_per_dialogue_full_dialogue']:.0f}); round-by-round ids, one pass {fmt(rounds_ms, 'ms/dlg')}"))
    rows.append(("official ids, per-round enc: re-encode, dynamic pad", fmt(o["ms_per_dialogue_reencode_dynamic"], "ms/dlg"),
                 f"{fmt(o['ratio_reencode_dynamic_over_packed'], 'x')} the packed pass, "
                 f"{o['tokens_per_dialogue_reencoded']:.0f} tok/dlg"))
    rows.append(("official ids, per-round enc: re-encode, pad 400", fmt(o["ms_per_dialogue_reencode_400"], "ms/dlg"),
                 f"{fmt(o['ratio_reencode_400_over_packed'], 'x')} the packed pass; max |diff| "
                 f"{o['max_abs_diff_text_embeds']:.1e} (slots {o['max_abs_diff_attribute_embeds']:.1e})"))
    p = results["processor"]
    rows.append(("DiaNAProcessor images (1 core)", fmt(p["diana_processor_images_per_s"], "img/s"),
                 f"plain ViTImageProcessor {fmt(p['plain_vit_images_per_s'], 'img/s')}"))
    rows.append(("DiaNAProcessor dialogues + round ends (1 core)", fmt(p["diana_processor_dialogues_per_s"], "dlg/s"),
                 f"plain tokenizer {fmt(p['plain_tokenizer_dialogues_per_s'], 'dlg/s')}"))
    m = results["metrics"]
    rows.append((f"metrics {m['queries']} q x {m['rounds']} rounds vs {m['gallery']} img",
                 fmt(m["metrics_s"], "s"), f"{fmt(m['metrics_s_per_round'], 's')}/round, scoring {fmt(m['score_s'], 's')}"))
    pad = results["padding"]
    rows.append(("padding efficiency, full dialogues", fmt(100 * pad["efficiency_length_grouped"], "%"),
                 f"length-grouped; dynamic {fmt(100 * pad['efficiency_dynamic'], '%')}, pad-400 "
                 f"{fmt(100 * pad['efficiency_pad_to_400'], '%')}"))
    rows.append(("padding efficiency under R3", fmt(100 * pad["r3_efficiency_grouped_by_full_length"], "%"),
                 f"grouped by full length; by drawn length {fmt(100 * pad['r3_efficiency_grouped_by_drawn_length'], '%')}, "
                 f"dynamic {fmt(100 * pad['r3_efficiency_dynamic'], '%')}, pad-400 {fmt(100 * pad['r3_efficiency_pad_to_400'], '%')}"))
    c = results["collation"]
    rows.append((f"training collation, batch {c['batch']} (SynthPedes PNGs)", fmt(c["ms_per_batch_cached"], "ms"),
                 f"image cache (filling: {fmt(c['ms_per_batch_cache_filling'], 'ms')}); decoded rows "
                 f"{fmt(c['ms_per_batch_decoded'], 'ms')}; same pixels: {c['same_pixel_values']}"))
    check = results["image_check"]
    per, total = check["ms_per_image"], check["chatpedes_s"]
    rows.append(("ChatPedes image check 'full' (default)", fmt(per["full"], "ms/img"),
                 f"{fmt(total['full'], 's')} for ChatPedes; 'header' {fmt(per['header'], 'ms/img')} "
                 f"({fmt(total['header'], 's')}), 'exists' {fmt(per['exists'], 'ms/img')}"))
    rows.append(("suite wall time", fmt(results["suite_wall_s"], "s"), ""))
    return rows


__all__ = ["CpuSettings", "run_cpu_suite", "table_rows", "tiny_model_config", "small_text_config"]
