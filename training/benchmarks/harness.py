"""Measurement tools shared by the CPU and GPU suites.

Timing rules (METHOD of every figure in BENCHMARKS.md): a few untimed warm-up calls (allocator,
autotuning, `torch.compile`), then repeated timed calls, each bracketed by
`torch.cuda.synchronize()` on a GPU because kernel launches return before the work is done; the
median is reported. Every measurement has a wall-clock cap so the whole suite fits its budget.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# Dense bf16 tensor-core peak (no 2:4 sparsity) from NVIDIA's data sheets, in TFLOP/s. The H200 has
# the H100 SXM's compute (same GH100 die, more HBM); the PCIe H100 is clocked lower.
_BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
)

# The paper's per-GPU memory budget, an "80 GB" card (the H100 SXM reports 79.6 GiB); an H200 is
# capped to it so that the "batch that fits" figure means the same thing on both cards.
MEMORY_BUDGET_BYTES = 80 * 2**30


@dataclass
class Timing:
    """Result of `time_fn`: seconds per call."""

    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    capped: bool = False  # the time cap stopped the repeats early

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device | str | None = None) -> None:
    """Waits for queued GPU work (a no-op on the CPU) so that wall-clock time covers it."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    max_seconds: float = 30.0,
) -> Timing:
    """Times `fn()`: `warmup` untimed calls, then up to `repeats` timed ones.

    Args:
        fn: the work; its result is discarded.
        device: where the work runs (CUDA work is synchronised before and after each call).
        warmup: untimed calls first (allocator warm-up, cuDNN/cuBLAS autotuning, compilation).
        repeats: timed calls wanted; at least one is always made.
        max_seconds: stop repeating once this much time was spent in timed calls.

    Returns:
        The median, mean, min and max seconds per call.
    """
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times: list[float] = []
    capped = False
    spent = 0.0
    for i in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if spent > max_seconds and i + 1 < repeats:
            capped = True
            break
    return Timing(
        median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
        max_s=max(times), repeats=len(times), warmup=warmup, capped=capped,
    )


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    max_seconds: float = 120.0,
) -> dict[str, Timing]:
    """Times several alternatives round-robin (A B C A B C ...), so that a change of machine load
    hits them alike; compare them by `min_s`, the least disturbed call, on a shared machine.

    Args:
        fns: name -> work.
        warmup: untimed rounds first.
        repeats: timed rounds wanted (at least one).
        max_seconds: stop after the round in which the total timed time passed this.
    """
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent, capped = 0.0, False
    for i in range(max(1, repeats)):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        if spent > max_seconds and i + 1 < repeats:
            capped = True
            break
    return {
        name: Timing(median_s=statistics.median(t), mean_s=statistics.fmean(t), min_s=min(t), max_s=max(t),
                     repeats=len(t), warmup=warmup, capped=capped)
        for name, t in times.items()
    }


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations (multiply-add = 2) that `fn()` dispatches, by
    `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; the backward pass
    too when `fn` calls `.backward()`). Run it on meta tensors to count a large model for free."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def bf16_peak_tflops(device: torch.device | str | None = None) -> tuple[float | None, str]:
    """The card's dense bf16 peak in TFLOP/s from its name (None when unknown or on the CPU)."""
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for key, peak in _BF16_PEAK_TFLOPS:
        if key in upper:
            return peak, name
    return None, name


def matmul_ceiling_tflops(
    device: torch.device | str, *, size: int = 8192, dtype: torch.dtype = torch.bfloat16, max_seconds: float = 5.0
) -> float:
    """Measured throughput of one large square matmul (TFLOP/s): the best a real kernel reaches
    on this card, a more honest MFU denominator than the data sheet (throttling, clocks)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    timing = time_fn(lambda: a @ b, device=device, warmup=3, repeats=20, max_seconds=max_seconds)
    del a, b
    return 2.0 * size**3 / timing.median_s / 1e12


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak bytes allocated by PyTorch on a GPU since the last reset (None on the CPU, where
    PyTorch keeps no such counter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def is_oom(error: BaseException) -> bool:
    """True for an out-of-memory error of any backend (CUDA raises a subclass of RuntimeError)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@dataclass
class BatchSearch:
    """Result of `find_max_batch`: the largest batch that ran, and every probe made."""

    max_batch: int
    hit_limit: bool  # the search stopped at `limit` without meeting an OOM
    probes: list[tuple[int, bool]] = field(default_factory=list)  # (batch, fitted)


def find_max_batch(try_batch: Callable[[int], Any], *, start: int = 8, limit: int = 1024,
                   cleanup: Callable[[], None] | None = None, relative_tolerance: float = 0.0) -> BatchSearch:
    """Largest batch size for which `try_batch(b)` runs without running out of memory.

    Doubles from `start` until an OOM (or `limit`), then bisects between the last batch that
    fitted and the first that did not. Memory use is monotonic in the batch size, so this is exact
    up to the allocator's fragmentation. Errors other than OOM propagate.

    Args:
        try_batch: runs one full step (forward, backward, optimizer) at batch size b.
        start: first batch tried (>= 1).
        limit: never try more than this.
        cleanup: called after every probe (free the failed step's tensors, empty the cache).
        relative_tolerance: stop bisecting once the gap between the batch that fitted and the one
            that did not is at most this fraction of the former (each probe of a large model costs
            seconds); 0 = exact.

    Returns:
        `BatchSearch`; when `start` does not fit the search bisects below it, and `max_batch`
        is 0 when not even a batch of 1 fits.
    """
    probes: list[tuple[int, bool]] = []

    def fits(b: int) -> bool:
        try:
            try_batch(b)
            ok = True
        except Exception as error:  # noqa: BLE001 - only OOM is swallowed, see below
            if not is_oom(error):
                raise
            ok = False
        # The failed step's frames hold tensors through the traceback; free them before the next probe.
        if cleanup is not None:
            cleanup()
        probes.append((b, ok))
        return ok

    start = max(1, min(start, limit))
    if fits(start):
        good, bad = start, None
        while bad is None:
            nxt = min(good * 2, limit)
            if nxt == good:
                return BatchSearch(good, True, probes)
            if fits(nxt):
                good = nxt
            else:
                bad = nxt
    else:
        good, bad = 0, start
    while bad - good > max(1, int(good * relative_tolerance)):
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return BatchSearch(good, False, probes)


@contextlib.contextmanager
def memory_cap(device: torch.device | str, budget_bytes: int = MEMORY_BUDGET_BYTES) -> Iterator[float | None]:
    """Caps PyTorch's allocator on a card with more than `budget_bytes` (an H200 measured as an
    80 GB card). Yields the fraction set (None when no cap was needed)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield None
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if total <= budget_bytes:
        yield None
        return
    fraction = budget_bytes / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine and versions for the JSON header and BENCHMARKS.md."""
    import transformers

    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes compete for a small machine's cores: figures taken under load are slower.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda, gpu_sm_count=props.multi_processor_count)
    return info


def format_table(rows: list[tuple[str, str, str]], title: str) -> str:
    """Three-column text table: (measurement, value, note)."""
    header = ("measurement", "value", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [title, line, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    out.append(line)
    return "\n".join(out)


def fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    """A number with `digits` significant digits and a unit ('n/a' for None)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if value == 0:
        return f"0 {unit}".strip()
    magnitude = int(math.floor(math.log10(abs(value))))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f} {unit}".strip()


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
