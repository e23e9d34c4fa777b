"""GPU suite: the paper-size model (random weights) trained and evaluated at ChatPedes scale.

Every figure is measured beside its naive baseline in the same run, on the same model object:

1. a measured bf16 matmul ceiling (and the card's data-sheet peak);
2. training steps (forward, DiaNA loss, backward, grad clip, AdamW) on ChatPedes-length
   dialogues, for the naive path and the fast path, plus the fast path with one optimisation
   switched off at a time (SDPA, compiled Swinv2, fused AdamW, dynamic padding): samples/s, MFU
   against the peak and against the measured ceiling, peak memory;
3. the largest per-GPU batch that fits 80 GB, without and with activation checkpointing;
4. gallery encoding images/s (eager and compiled Swinv2; the naive fp32 plain tower);
5. a ChatPedes-sized per-round evaluation (3,074 images, 6,148 dialogues x 10 rounds): one pass
   for all rounds vs re-encoding every prefix padded to 400 (the latter on a subset, scaled);
6. one query and a batch of queries against a 1M-image gallery.

MFU counts the FLOPs of the fast path's batch (dynamic padding) for every variant, so MFU ratios
equal throughput ratios; "hw_flops_util" uses each variant's own executed FLOPs (padding included).
The FLOPs are counted by `torch.utils.flop_counter` on the meta device (eager attention, causal
attention counted in full, activation recomputation not counted).

`--tiny` runs the same code on the CPU with a tiny config (a check that the script works, not a
measurement).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.processing import build_processor
from diana.training import evaluation
from diana.training.benchmarks import harness, naive, search, workloads
from diana.training.benchmarks.cpu import tiny_model_config
from diana.training.benchmarks.harness import fmt
from diana.training.evaluation.metrics import retrieval_metrics_and_first_hit_ranks

# The official fine-tuning batch is 128 over several GPUs; 32 per GPU fits without checkpointing.
DEFAULT_TRAIN_BATCH = 32


@dataclass(frozen=True)
class Optimisations:
    """Switches of the fast path; `naive()` is the official code's setting."""

    sdpa: bool = True  # Llama attention: SDPA (FlashAttention kernels) instead of eager
    compile_vision: bool = True  # torch.compile of the Swinv2 tower
    fused_adamw: bool = True  # one fused kernel per parameter group
    dynamic_padding: bool = True  # pad to the batch's longest (multiple of 8), not to 400
    bf16: bool = True  # bf16 autocast (fp32 master weights); off = fp32 with TF32 matmuls
    checkpointing: bool = False  # activation checkpointing on both towers

    @classmethod
    def naive(cls) -> "Optimisations":
        return cls(sdpa=False, compile_vision=False, fused_adamw=False, dynamic_padding=False)

    def name(self) -> str:
        """"naive" when every speed switch is off (the precision is in the options), else "fast"
        with the switches that are off, e.g. "fast-no-sdpa", "fast+ckpt"."""
        speed = ("sdpa", "compile_vision", "fused_adamw", "dynamic_padding")
        if not any(getattr(self, k) for k in speed):
            label = "naive"
        else:
            off = [k for k in (*speed, "bf16") if not getattr(self, k)]
            label = "fast" if not off else "fast-no-" + "-no-".join(off)
        return label + ("+ckpt" if self.checkpointing else "")


@dataclass
class GpuSettings:
    """Sizes of the run; `tiny()` shrinks everything for a CPU check."""

    train_batch: int = DEFAULT_TRAIN_BATCH
    warmup_steps: int = 3
    timed_steps: int = 8
    step_cap_s: float = 20.0
    batch_search_limit: int = 1024
    batch_search_start: int = 32
    batch_search_tolerance: float = 1 / 16  # the answer is exact to within 6 %, in fewer probes
    gallery_batch: int = 256
    gallery_images: int = workloads.CHATPEDES_TEST_IMAGES
    eval_dialogues: int = workloads.CHATPEDES_TEST_DIALOGUES
    eval_persons: int = workloads.CHATPEDES_TEST_PERSONS
    eval_batch: int = 128
    naive_eval_dialogues: int = 256  # the naive per-prefix re-encoding runs on a subset, then scales
    rounds: int = workloads.CHATPEDES_ROUNDS
    big_gallery: int = 1_000_000
    query_chunk: int = 4096
    max_length: int = naive.NAIVE_MAX_LENGTH
    ablations: bool = True
    batch_search: bool = True
    matmul_size: int = 8192
    repeats: int = 10  # timed calls of the inference measurements (each also capped in seconds)
    # Optional stages (ablations, batch search, the compiled gallery) are skipped once the suite has
    # run this long, so that one GPU run stays under ~8 minutes.
    time_budget_s: float = 390.0

    @classmethod
    def tiny(cls) -> "GpuSettings":
        return cls(
            train_batch=4, warmup_steps=1, timed_steps=1, step_cap_s=5.0, batch_search_limit=4,
            batch_search_start=2, gallery_batch=8, gallery_images=12, eval_dialogues=16, eval_persons=6,
            eval_batch=8, naive_eval_dialogues=4, rounds=3, big_gallery=2000, query_chunk=64, matmul_size=128,
            repeats=1,
        )


def build_model(config: DiaNAConfig, device: torch.device) -> DiaNAModel:
    """Random-weight model in fp32 (master weights) on `device`, built there directly."""
    with torch.device(device):
        model = DiaNAModel(config)
    return model.train()


def set_text_attention(model: DiaNAModel, sdpa: bool) -> None:
    model.text_model.set_attn_implementation("sdpa" if sdpa else "eager")


def set_vision_compiled(model: DiaNAModel, compiled: bool) -> None:
    """`nn.Module.compile` in place (parameters and state-dict keys unchanged); undone by clearing
    the compiled call. Only Swinv2 is compiled: its shapes never change, the text tower's do."""
    if compiled and model.vision_model._compiled_call_impl is None:
        model.vision_model.compile()
    elif not compiled:
        model.vision_model._compiled_call_impl = None


def set_checkpointing(model: DiaNAModel, enabled: bool) -> None:
    """Activation checkpointing on both towers through the composite, as the trainer enables it."""
    if enabled:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


def make_optimizer(model: DiaNAModel, fused: bool) -> torch.optim.Optimizer:
    if not fused:
        return naive.naive_optimizer(model)
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.05, fused=True)


class Inputs:
    """Tokenised ChatPedes-shaped dialogues and random pixels, sliced into batches on demand."""

    def __init__(self, processor, num_dialogues: int, rounds: int, image_size: tuple[int, int], device, seed: int = 0):
        dialogues = workloads.make_dialogues(num_dialogues, rounds=rounds, seed=seed)
        enc = processor(dialogues=dialogues, return_round_ends=True, padding="longest", return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.round_end_positions = enc["round_end_positions"]
        self.lengths = self.attention_mask.sum(dim=1)
        self.image_size = image_size
        self.device = device

    def text(self, rows: torch.Tensor, pad_to: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the given rows, padded to `pad_to` or to their longest (multiple of 8:
        tensor-core friendly shapes, fewer distinct shapes)."""
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        if pad_to is None:
            longest = int(mask.sum(dim=1).max())
            pad_to = -(-longest // 8) * 8  # ceil to a multiple of 8
            if pad_to <= ids.shape[1]:
                ids, mask = ids[:, :pad_to], mask[:, :pad_to]
        if ids.shape[1] != pad_to:
            ids, mask = naive.pad_to_length(ids, mask, pad_to)
        return ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    def pixels(self, batch: int, seed: int = 0) -> torch.Tensor:
        # Drawn on the device: a 1024-image probe of the batch search would spend seconds in a CPU randn.
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(batch, 3, *self.image_size, generator=gen, device=self.device)

    def train_batch(self, batch: int, pad_to: int | None, offset: int = 0) -> dict[str, torch.Tensor]:
        rows = (torch.arange(batch) + offset) % self.input_ids.shape[0]
        ids, mask = self.text(rows, pad_to)
        # Two dialogues per person (ChatPedes has ~2 per image): the multi-positive targets are exercised.
        person_ids = (torch.arange(batch) // 2).to(self.device)
        return {"pixel_values": self.pixels(batch, offset), "input_ids": ids, "attention_mask": mask, "person_ids": person_ids}


def train_step(model: DiaNAModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    """One optimisation step as the trainer runs it: forward + loss, backward, clip 1.0, AdamW."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    # foreach clip, no host sync (error_if_nonfinite=False).
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def count_train_flops(config: DiaNAConfig, batch: int, length: int, image_size: tuple[int, int]) -> int:
    """FLOPs of one training step's forward + backward on the meta device (no compute, no memory)."""
    # A copy: the towers share their sub-config objects with the composite, so switching the meta
    # model's attention to eager would switch a live model built from the same config too.
    config = copy.deepcopy(config)
    with torch.device("meta"):
        model = DiaNAModel(config)
    # transformers' SDPA mask path reads tensor values (impossible on meta); eager counts the same matmuls.
    model.text_model.set_attn_implementation("eager")
    model.train()

    def step() -> None:
        ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
        out = model(
            torch.zeros(batch, 3, *image_size, device="meta"), ids, torch.ones_like(ids),
            person_ids=torch.arange(batch, device="meta") // 2,
        )
        out.loss.backward()

    return harness.count_flops(step)


def _autocast(device: torch.device):
    """bf16 autocast on a GPU; none on the CPU, where bf16 matmuls are slow and the figures of a
    tiny CPU run only check the script."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_FLOP_CACHE: dict[tuple, int] = {}


def train_flops_cached(config: DiaNAConfig, batch: int, length: int, image_size: tuple[int, int]) -> int:
    """`count_train_flops`, memoised per (config, batch, length): a paper-size count takes seconds."""
    key = (id(config), batch, length, tuple(image_size))
    if key not in _FLOP_CACHE:
        _FLOP_CACHE[key] = count_train_flops(config, batch, length, image_size)
    return _FLOP_CACHE[key]


def measure_training(model, inputs: Inputs, settings: GpuSettings, opts: Optimisations, device, *,
                     peak_tflops: float | None, ceiling_tflops: float | None, batch: int | None = None) -> dict[str, Any]:
    """Samples/s, MFU and peak memory of the training step under `opts` (the model is reconfigured
    in place; a fresh optimizer each time so the fused/unfused states do not coexist).

    Two batches alternate (different lengths, as a real loader). "Model" FLOPs are those of the same
    samples padded dynamically, whatever `opts` pads to, so MFU ratios are throughput ratios;
    `hw_flops_util_vs_peak` counts what was executed (padding to 400 included).
    """
    batch = batch or settings.train_batch
    config = model.config
    image_size = tuple(config.vision_config.image_size)
    pad_to = None if opts.dynamic_padding else settings.max_length
    batches = [inputs.train_batch(batch, pad_to, offset=i * batch) for i in range(2)]
    dynamic_lengths = [inputs.train_batch(batch, None, offset=i * batch)["input_ids"].shape[1] for i in range(2)]
    useful_flops = sum(train_flops_cached(config, batch, n, image_size) for n in dynamic_lengths) / 2
    executed_flops = sum(train_flops_cached(config, batch, b["input_ids"].shape[1], image_size) for b in batches) / 2
    set_text_attention(model, opts.sdpa)
    set_vision_compiled(model, opts.compile_vision)
    set_checkpointing(model, opts.checkpointing)
    torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = make_optimizer(model, opts.fused_adamw)
    counter = {"i": 0}

    def step() -> None:
        counter["i"] += 1
        train_step(model, optimizer, batches[counter["i"] % 2], opts.bf16)

    attention_used = model.text_model.config._attn_implementation
    harness.reset_peak_memory(device)
    start = time.perf_counter()
    try:
        timing = harness.time_fn(step, device=device, warmup=settings.warmup_steps, repeats=settings.timed_steps,
                                 max_seconds=settings.step_cap_s)
    finally:
        # Also after an OOM: the caller retries with a smaller batch.
        wall = time.perf_counter() - start
        peak_mem = harness.peak_memory_bytes(device)
        optimizer.zero_grad(set_to_none=True)
        del optimizer, batches
        set_checkpointing(model, False)
        _cleanup(device)
    achieved_useful = useful_flops / timing.median_s / 1e12
    achieved_executed = executed_flops / timing.median_s / 1e12
    return {
        "options": asdict(opts),
        "text_attention_used": attention_used,
        "batch": batch,
        "padded_lengths": [pad_to] * 2 if pad_to else dynamic_lengths,
        "step": timing.as_dict(),
        "samples_per_s": batch / timing.median_s,
        "model_flops_per_step": useful_flops,
        "executed_flops_per_step": executed_flops,
        "model_tflops_per_s": achieved_useful,
        "mfu_vs_peak": achieved_useful / peak_tflops if peak_tflops else None,
        "mfu_vs_matmul_ceiling": achieved_useful / ceiling_tflops if ceiling_tflops else None,
        "hw_flops_util_vs_peak": achieved_executed / peak_tflops if peak_tflops else None,
        "peak_memory_bytes": peak_mem,
        "wall_s_incl_warmup": wall,
    }


def measure_training_fitting(model, inputs: Inputs, settings: GpuSettings, opts: Optimisations, device,
                             **kwargs) -> dict[str, Any]:
    """`measure_training` at `settings.train_batch`, halving the batch on OOM (the naive path's eager
    attention at 400 tokens may not fit where the fast path does); `oom_batches` lists the failures."""
    batch, failed = settings.train_batch, []
    while True:
        try:
            out = measure_training(model, inputs, settings, opts, device, batch=batch, **kwargs)
            out["oom_batches"] = failed
            return out
        except Exception as error:  # noqa: BLE001 - only OOM is retried
            if not harness.is_oom(error) or batch == 1:
                raise
            failed.append(batch)
            batch //= 2


def measure_batch_fit(model, inputs: Inputs, settings: GpuSettings, checkpointing: bool, device) -> dict[str, Any]:
    """Largest per-GPU batch of a full fast-path training step within 80 GB (eager Swinv2: a compiled
    tower would recompile for every probed batch size)."""
    set_text_attention(model, True)
    set_vision_compiled(model, False)
    set_checkpointing(model, checkpointing)
    optimizer = make_optimizer(model, fused=True)
    start = time.perf_counter()

    def try_batch(b: int) -> None:
        batch = inputs.train_batch(b, pad_to=None)
        train_step(model, optimizer, batch, bf16=device.type == "cuda")
        harness.synchronize(device)

    with harness.memory_cap(device) as fraction:
        result = harness.find_max_batch(try_batch, start=settings.batch_search_start, limit=settings.batch_search_limit,
                                        cleanup=lambda: (optimizer.zero_grad(set_to_none=True), _cleanup(device)),
                                        relative_tolerance=settings.batch_search_tolerance)
    set_checkpointing(model, False)
    del optimizer
    _cleanup(device)
    return {
        "checkpointing": checkpointing,
        "max_batch": result.max_batch,
        "first_batch_that_failed": min((b for b, ok in result.probes if not ok), default=None),
        "hit_search_limit": result.hit_limit,
        "probes": result.probes,
        "memory_fraction_cap": fraction,
        "wall_s": time.perf_counter() - start,
    }


@torch.no_grad()
def measure_gallery(model, inputs: Inputs, settings: GpuSettings, device, compiled: bool) -> dict[str, Any]:
    """Images/s of `encode_images` (bf16, eval mode), plus the naive plain tower in fp32."""
    model.eval()
    set_vision_compiled(model, compiled)
    pixels = inputs.pixels(settings.gallery_batch)

    def fast() -> None:
        with _autocast(device):
            model.encode_images(pixels)

    timing = harness.time_fn(fast, device=device, warmup=3 if compiled else 2,
                             repeats=settings.repeats, max_seconds=10.0)
    out = {"compiled": compiled, "precision": "bf16" if device.type == "cuda" else "fp32",
           "batch": settings.gallery_batch, "step": timing.as_dict(),
           "images_per_s": settings.gallery_batch / timing.median_s}
    model.train()
    return out


@torch.no_grad()
def measure_naive_gallery(model, inputs: Inputs, settings: GpuSettings, device) -> dict[str, Any]:
    model.eval()
    set_vision_compiled(model, False)
    batch = max(1, settings.gallery_batch // 4)  # the official evaluation batch is small
    pixels = inputs.pixels(batch)
    timing = harness.time_fn(lambda: naive.plain_image_embeds(model, pixels), device=device, warmup=1,
                             repeats=max(1, settings.repeats // 2), max_seconds=10.0)
    model.train()
    return {"precision": "fp32", "batch": batch, "step": timing.as_dict(), "images_per_s": batch / timing.median_s}


@torch.no_grad()
def measure_evaluation(model, processor, settings: GpuSettings, device, compiled: bool) -> dict[str, Any]:
    """Per-round retrieval evaluation at ChatPedes scale with `training.evaluation`'s own stages.

    Fast (the project's protocol): dialogues tokenised once (`tokenize_dialogues`), gallery encoded
    once (bf16; random pixels, so image decoding is not in the figure), every dialogue encoded once
    for all its rounds in length-grouped batches (`encode_queries`), then per round one scoring pass
    (`score`) and the metrics. Naive: every round prefix re-encoded at 400 tokens (eager attention),
    on `naive_eval_dialogues` dialogues, scaled linearly to the full count; its gallery and metric
    stages are the same as the fast path's.
    """

    model.eval()
    set_text_attention(model, True)
    set_vision_compiled(model, compiled)
    image_size = tuple(model.config.vision_config.image_size)
    stages: dict[str, float] = {}
    dialogues = workloads.make_dialogues(settings.eval_dialogues, rounds=settings.rounds, seed=1)

    start = time.perf_counter()
    tokens = evaluation.tokenize_dialogues(processor, dialogues)
    stages["tokenise_s"] = time.perf_counter() - start

    # Identities: person p owns gallery images p, p + P, ... and every dialogue has a gallery positive.
    gallery_ids = torch.arange(settings.gallery_images, device=device) % settings.eval_persons
    query_ids = torch.arange(settings.eval_dialogues, device=device) % settings.eval_persons
    gen = torch.Generator().manual_seed(0)
    pixel_block = torch.randn(settings.gallery_batch, 3, *image_size, generator=gen).to(device)

    harness.synchronize(device)
    start = time.perf_counter()
    image_embeds = []
    for first in range(0, settings.gallery_images, settings.gallery_batch):
        n = min(settings.gallery_batch, settings.gallery_images - first)
        # Always a full batch (the tail sliced off): a new batch shape would recompile a compiled tower.
        with _autocast(device):
            image_embeds.append(model.encode_images(pixel_block).image_embeds[:n].float())
    images = {"embeds": torch.cat(image_embeds)}  # (G, D)
    harness.synchronize(device)
    stages["encode_gallery_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with _autocast(device):
        text = evaluation.encode_queries(model, tokens, batch_size=settings.eval_batch,
                                         pad_token_id=processor.pad_token_id, keep_attributes=False)
    harness.synchronize(device)
    stages["encode_dialogues_all_rounds_s"] = time.perf_counter() - start

    start = time.perf_counter()
    per_round = []
    for r in range(settings.rounds):
        at_r = {"embeds": text["embeds"][:, r].float()}  # (Q, D)
        sims = evaluation.score(model, at_r, images, "global", device)  # (Q, G)
        per_round.append(retrieval_metrics_and_first_hit_ranks(sims, query_ids, gallery_ids)[0])
    harness.synchronize(device)
    stages["score_and_metrics_s"] = time.perf_counter() - start
    fast_total = sum(v for k, v in stages.items() if k != "tokenise_s")

    subset = min(settings.naive_eval_dialogues, settings.eval_dialogues)
    ids = torch.nn.utils.rnn.pad_sequence(tokens.input_ids[:subset], batch_first=True,
                                          padding_value=processor.pad_token_id).to(device)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in tokens.input_ids[:subset]],
                                           batch_first=True).to(device)
    ends = tokens.round_end_positions[:subset].to(device)
    naive_batch = max(1, settings.eval_batch // 2)
    set_text_attention(model, False)
    harness.synchronize(device)
    start = time.perf_counter()
    for first in range(0, subset, naive_batch):
        sl = slice(first, first + naive_batch)
        with _autocast(device):
            naive.reencode_prefixes(model, ids[sl], mask[sl], ends[sl], pad_to=settings.max_length)
    harness.synchronize(device)
    naive_subset_s = time.perf_counter() - start
    set_text_attention(model, True)
    naive_dialogue_s = naive_subset_s * settings.eval_dialogues / subset
    naive_total = naive_dialogue_s + stages["encode_gallery_s"] + stages["score_and_metrics_s"]
    lengths = tokens.lengths
    model.train()
    return {
        "gallery_images": settings.gallery_images,
        "dialogues": settings.eval_dialogues,
        "rounds": settings.rounds,
        "mean_dialogue_tokens": float(lengths.float().mean()),
        "stages_s": stages,
        "fast_total_s": fast_total,
        "naive_encode_dialogues_s_scaled": naive_dialogue_s,
        "naive_subset_dialogues": subset,
        "naive_total_s_scaled": naive_total,
        "speedup_vs_naive": naive_total / fast_total,
        "R@1_per_round_random_weights": [m["R@1"] for m in per_round],
    }


@torch.no_grad()
def measure_big_gallery(settings: GpuSettings, dim: int, device) -> dict[str, Any]:
    """Top-10 of one query and of a chunk of queries against `big_gallery` random unit vectors (bf16)."""
    gen = torch.Generator(device=device).manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(settings.big_gallery, dim, device=device, generator=gen), dim=-1)
    gallery = gallery.to(torch.bfloat16)
    one = torch.nn.functional.normalize(torch.randn(1, dim, device=device, generator=gen), dim=-1).to(torch.bfloat16)
    chunk = torch.nn.functional.normalize(torch.randn(settings.query_chunk, dim, device=device, generator=gen), dim=-1)
    chunk = chunk.to(torch.bfloat16)
    single = harness.time_fn(lambda: torch.topk(one @ gallery.t(), 10, dim=1), device=device, warmup=3,
                             repeats=2 * settings.repeats, max_seconds=5.0)
    batched = harness.time_fn(lambda: torch.topk(chunk @ gallery.t(), 10, dim=1), device=device, warmup=2,
                              repeats=max(1, settings.repeats // 2), max_seconds=10.0)
    del gallery
    _cleanup(device)
    return {
        "gallery": settings.big_gallery,
        "dim": dim,
        "single_query_latency_s": single.median_s,
        "query_chunk": settings.query_chunk,
        "chunk_s": batched.median_s,
        "queries_per_s": settings.query_chunk / batched.median_s,
    }


def run_gpu_suite(*, tiny: bool = False, device: str | None = None, settings: GpuSettings | None = None,
                  fast: Optimisations | None = None, tokenizer_dir: str | None = None,
                  checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs the GPU suite and returns its JSON-ready results (see the module docstring).

    Args:
        tiny: tiny model and sizes (runs on the CPU in seconds; checks the script, measures nothing).
        device: "cuda" by default when available, else "cpu".
        settings: run sizes (default: `GpuSettings()`, or `GpuSettings.tiny()` with `tiny`).
        fast: the fast path's switches (default all on; compilation off on the CPU, where it takes minutes).
        tokenizer_dir: Llama-3.2 tokenizer folder (default: the project's).
        checkpoint: called with the partial results after every stage (run.py rewrites its JSON, so
            a run cut short by a time limit keeps what it measured).
    """

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = settings or (GpuSettings.tiny() if tiny else GpuSettings())
    fast = fast or Optimisations()
    # Core (naive, fast) first, then the optional ones in order of interest.
    variants = [Optimisations.naive(), fast, replace(fast, checkpointing=True)]
    if settings.ablations:
        for field_name in ("compile_vision", "dynamic_padding", "sdpa", "fused_adamw"):
            if getattr(fast, field_name):
                variants.append(replace(fast, **{field_name: False}))
    if dev.type == "cpu":
        # Compilation takes minutes on a CPU and bf16 matmuls are slow there: a CPU run checks the script.
        variants = list(dict.fromkeys(replace(v, compile_vision=False, bf16=False) for v in variants))
        fast = replace(fast, compile_vision=False, bf16=False)
    if tiny:

        config = tiny_model_config()
    else:
        config = DiaNAConfig()  # the paper's full size: Swinv2-B 384x192 + Llama-3.2-1B, K = 16
    image_size = tuple(config.vision_config.image_size)
    processor = build_processor(tokenizer_dir=tokenizer_dir, image_size=image_size)
    suite_start = time.perf_counter()
    results: dict[str, Any] = {"environment": harness.environment(dev), "settings": asdict(settings), "tiny": tiny}

    peak, card = harness.bf16_peak_tflops(dev) if dev.type == "cuda" else (None, "cpu")
    ceiling = harness.matmul_ceiling_tflops(dev, size=settings.matmul_size,
                                            dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    results["hardware"] = {"card": card, "bf16_peak_tflops": peak, "matmul_ceiling_tflops": ceiling,
                           "matmul_size": settings.matmul_size}

    inputs = Inputs(processor, max(64, settings.train_batch * 2), settings.rounds, image_size, dev)
    fast_len = inputs.train_batch(settings.train_batch, pad_to=None)["input_ids"].shape[1]
    per_sample = train_flops_cached(config, settings.train_batch, fast_len, image_size) / settings.train_batch
    per_sample_400 = train_flops_cached(config, settings.train_batch, settings.max_length, image_size) / settings.train_batch
    results["flops"] = {"per_sample_fast": per_sample, "per_sample_padded_400": per_sample_400,
                        "fast_padded_length": fast_len, "mean_dialogue_tokens": float(inputs.lengths.float().mean())}

    model = build_model(config, dev)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    results["skipped"] = []
    results["errors"] = {}

    def stage(name: str, fn: Callable[[], Any], optional: bool = False) -> Any:
        """Runs one measurement; an optional one is skipped past the time budget, and a failure is
        recorded (with the partial results saved) instead of ending a run that cannot be repeated cheaply."""
        elapsed = time.perf_counter() - suite_start
        if optional and elapsed > settings.time_budget_s:
            results["skipped"].append(f"{name} (time budget: {elapsed:.0f} s > {settings.time_budget_s:.0f} s)")
            return None
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - recorded in the JSON, the next stage still runs
            results["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            _cleanup(dev)
            return None
        finally:
            if checkpoint is not None:
                checkpoint(results)

    def train(opts: Optimisations) -> dict[str, Any]:
        return measure_training_fitting(model, inputs, settings, opts, dev, peak_tflops=peak, ceiling_tflops=ceiling)

    # Core figures first, optional ones (ablations, checkpointing, batch search) while time is left.
    training: dict[str, Any] = {}
    results["training"] = training
    core, optional = variants[:2], variants[2:]
    for opts in core:
        out = stage(f"training {opts.name()}", lambda opts=opts: train(opts))
        if out is not None:
            training[opts.name()] = out
    if "naive" in training and fast.name() in training:
        results["training_speedup_fast_vs_naive"] = (
            training[fast.name()]["samples_per_s"] / training["naive"]["samples_per_s"]
        )

    gallery: dict[str, Any] = {}
    results["gallery_encoding"] = gallery
    for key, fn in (
        ("eager", lambda: measure_gallery(model, inputs, settings, dev, compiled=False)),
        ("compiled", lambda: measure_gallery(model, inputs, settings, dev, compiled=True)),
        ("naive_fp32_plain_tower", lambda: measure_naive_gallery(model, inputs, settings, dev)),
    ):
        if key == "compiled" and (not fast.compile_vision or f"training {fast.name()}" in results["errors"]):
            continue
        out = stage(f"gallery {key}", fn)
        if out is not None:
            gallery[key] = out

    # A compile failure is recorded once; the evaluation then runs eager.
    compiled_ok = fast.compile_vision and f"training {fast.name()}" not in results["errors"]
    results["evaluation_chatpedes"] = stage(
        "evaluation", lambda: measure_evaluation(model, processor, settings, dev, compiled=compiled_ok))
    results["big_gallery_query"] = stage(
        "big gallery", lambda: measure_big_gallery(settings, config.projection_dim, dev))

    if settings.batch_search:
        fits: dict[str, Any] = {}
        results["batch_fit_80GB"] = fits
        for key, ckpt in (("no_checkpointing", False), ("checkpointing", True)):
            out = stage(f"batch fit {key}", lambda ckpt=ckpt: measure_batch_fit(model, inputs, settings, ckpt, dev),
                        optional=True)
            if out is not None:
                fits[key] = out
    results["search"] = stage("search", lambda: search.run_search_suite(
        tiny=tiny, device=str(dev), tokenizer_dir=tokenizer_dir), optional=True)
    for opts in optional:
        out = stage(f"training {opts.name()}", lambda opts=opts: train(opts), optional=True)
        if out is not None:
            training[opts.name()] = out

    del model, inputs
    _cleanup(dev)
    results["suite_wall_s"] = time.perf_counter() - suite_start
    if checkpoint is not None:
        checkpoint(results)
    return results


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measurement, value, note) rows of the printed table; missing stages are left out."""
    rows: list[tuple[str, str, str]] = []
    hw = results["hardware"]
    rows.append(("bf16 peak (data sheet)", fmt(hw["bf16_peak_tflops"], "TFLOP/s"), hw["card"]))
    rows.append(("matmul ceiling (measured)", fmt(hw["matmul_ceiling_tflops"], "TFLOP/s"), f"{hw['matmul_size']}^3"))
    fl = results["flops"]
    rows.append(("train FLOPs per sample (fwd+bwd)", fmt(fl["per_sample_fast"] / 1e12, "TFLOP"),
                 f"padded to {fl['fast_padded_length']} tokens (mean dialogue {fl['mean_dialogue_tokens']:.0f}); "
                 f"{fmt(fl['per_sample_padded_400'] / 1e12, 'TFLOP')} at 400"))

    def pct(x: float | None) -> str:
        return fmt(100 * x if x is not None else None, "%")

    for name, t in results.get("training", {}).items():
        mem = t["peak_memory_bytes"] / 2**30 if t["peak_memory_bytes"] else None
        note = f"MFU {pct(t['mfu_vs_peak'])} of peak, {pct(t['mfu_vs_matmul_ceiling'])} of ceiling, mem {fmt(mem, 'GiB')}"
        if t.get("oom_batches"):
            note += f", OOM at B={t['oom_batches']}"
        rows.append((f"train {name} (B={t['batch']})", fmt(t["samples_per_s"], "samples/s"), note))
    if "training_speedup_fast_vs_naive" in results:
        rows.append(("train speed-up fast / naive", fmt(results["training_speedup_fast_vs_naive"], "x"), ""))
    for key, fit in results.get("batch_fit_80GB", {}).items():
        rows.append((f"max batch in 80 GB ({key})", str(fit["max_batch"]),
                     "search limit reached" if fit["hit_search_limit"] else f"{len(fit['probes'])} probes"))
    for key, g in results.get("gallery_encoding", {}).items():
        rows.append((f"gallery encoding {key}", fmt(g["images_per_s"], "images/s"), f"batch {g['batch']}"))
    ev = results.get("evaluation_chatpedes")
    if ev:
        rows.append((f"per-round eval {ev['dialogues']} dlg x {ev['rounds']} rounds vs {ev['gallery_images']} img",
                     fmt(ev["fast_total_s"], "s"), "one pass for all rounds (tokenisation excluded)"))
        rows.append(("per-round eval, naive (scaled)", fmt(ev["naive_total_s_scaled"], "s"),
                     f"prefixes re-encoded at 400, {ev['naive_subset_dialogues']} dialogues measured"))
        rows.append(("per-round eval speed-up", fmt(ev["speedup_vs_naive"], "x"), ""))
    bg = results.get("big_gallery_query")
    if bg:
        rows.append((f"1 query vs {bg['gallery']:,} images (top-10)", fmt(bg["single_query_latency_s"] * 1e3, "ms"), ""))
        rows.append((f"{bg['query_chunk']} queries vs {bg['gallery']:,} images", fmt(bg["queries_per_s"], "queries/s"), ""))
    if results.get("search"):
        rows += [(f"search: {name}", value, note) for name, value, note in search.table_rows(results["search"])]
    for name, error in results.get("errors", {}).items():
        rows.append((f"ERROR {name}", "failed", error[:100]))
    for skipped in results.get("skipped", []):
        rows.append(("skipped", skipped, ""))
    rows.append(("suite wall time", fmt(results.get("suite_wall_s"), "s"), ""))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The GPU suite's switches (shared with `run.py`)."""
    group = parser.add_argument_group("GPU suite")
    for name in ("sdpa", "compile_vision", "fused_adamw", "dynamic_padding", "bf16"):
        group.add_argument(f"--no_{name}", dest=f"opt_{name}", action="store_false",
                           help=f"switch off {name} in the fast path")
    group.add_argument("--train_batch_size", type=int, default=None, help="per-GPU training batch (default 32)")
    group.add_argument("--no_ablations", dest="ablations", action="store_false",
                       help="skip the fast-minus-one-optimisation variants")
    group.add_argument("--no_batch_search", dest="batch_search", action="store_false",
                       help="skip the search for the largest batch that fits 80 GB")
    group.add_argument("--tokenizer_dir", default=None, help="Llama-3.2 tokenizer folder")


def from_arguments(args: argparse.Namespace) -> tuple[GpuSettings, Optimisations]:
    settings = GpuSettings.tiny() if args.tiny else GpuSettings()
    if args.train_batch_size:
        settings = replace(settings, train_batch=args.train_batch_size)
    settings = replace(settings, ablations=args.ablations, batch_search=args.batch_search)
    fast = Optimisations(**{k: getattr(args, f"opt_{k}") for k in ("sdpa", "compile_vision", "fused_adamw",
                                                                   "dynamic_padding", "bf16")})
    return settings, fast


__all__ = ["GpuSettings", "Optimisations", "run_gpu_suite", "table_rows", "count_train_flops", "train_step"]
