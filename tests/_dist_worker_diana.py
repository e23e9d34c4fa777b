"""Worker of the 2-process (gloo, CPU) gather test: each rank sees half of a union batch, computes the
loss, back-propagates, averages gradients as DDP does, and saves loss + gradients for the parent test."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


def union_batch(seed: int = 1):
    """The union batch: 6 pairs of 4 persons, positives spread over both ranks' halves."""
    from tests.helpers import TINY_IMAGE_SIZE

    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(6, 3, *TINY_IMAGE_SIZE, generator=g)
    input_ids = torch.randint(0, 5000, (6, 7), generator=g)
    attention_mask = torch.ones(6, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[4, 3:] = 0
    person_ids = torch.tensor([0, 1, 2, 0, 1, 3])
    return pixel_values, input_ids, attention_mask, person_ids


def build_model(**config_overrides):
    from diana.modeling_diana import DiaNAModel
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    return DiaNAModel(tiny_config(**config_overrides)).train()


def worker(rank: int, world_size: int, init_file: str, out_dir: str, config_overrides: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = build_model(**config_overrides)
        pixel_values, input_ids, attention_mask, person_ids = union_batch()
        per_rank = pixel_values.shape[0] // world_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        out = model(pixel_values[part], input_ids[part], attention_mask[part], person_ids=person_ids[part])
        out.loss.backward()
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)  # DDP averages gradients over processes
            grads[name] = grad / world_size
        terms = {k: getattr(out, k).detach() for k in ("loss", "itc_loss", "sdm_loss", "refiner_loss")}
        torch.save({"terms": terms, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
