"""DiaNA's loss terms against slow loop-over-pairs references, and the cross-process gather."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from diana.modeling_diana import (
    DiaNAModel,
    attribute_similarity,
    diana_loss,
    gather_with_grad,
    identity_targets,
    multi_positive_itc_loss,
    sdm_loss,
)
from tests.helpers import slow_attribute_similarity, slow_diana_losses, slow_itc_sdm, tiny_config

REDUCTIONS = ["mean", "max", "min", "logsumexp", "neg_logsumexp"]


def _embeddings(n: int, k: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text_attr = F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)
    image_attr = F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)
    return text, image, text_attr, image_attr


def test_identity_targets_rows_sum_to_one_over_positives():
    targets = identity_targets(torch.tensor([3, 1, 3]), torch.tensor([3, 3, 1, 2]))
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0.5, 0.5, 0, 0]])
    torch.testing.assert_close(targets, expected)


@pytest.mark.parametrize("n,scale,seed", [(1, 10.0, 0), (5, 50.0, 1), (9, 100.0, 2)])
def test_itc_and_sdm_match_pairwise_reference(n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, n, generator=g, dtype=torch.float64).tanh()
    ids = torch.randint(0, max(n // 2, 1), (n,), generator=g)  # several positives per person
    ref_itc, ref_sdm = slow_itc_sdm(logits, ids, ids, 1e-6)
    assert float(multi_positive_itc_loss(logits, ids, ids)) == pytest.approx(ref_itc, rel=1e-5, abs=1e-6)
    assert float(sdm_loss(logits.double(), ids, ids, 1e-6)) == pytest.approx(ref_sdm, rel=1e-5, abs=1e-6)


def test_itc_with_distinct_text_and_image_ids():
    # Rectangular case (queries != gallery), each text has positives among several images.
    g = torch.Generator().manual_seed(3)
    logits = 5 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    text_ids, image_ids = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 2, 2, 3])
    ref_itc, ref_sdm = slow_itc_sdm(logits, text_ids, image_ids, 1e-6)
    assert float(multi_positive_itc_loss(logits, text_ids, image_ids)) == pytest.approx(ref_itc, rel=1e-6)
    assert float(sdm_loss(logits, text_ids, image_ids)) == pytest.approx(ref_sdm, rel=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_attribute_similarity_matches_slot_loop(reduction):
    text, image, text_attr, image_attr = _embeddings(4, 3, 5, seed=4)
    image_attr = image_attr[:3]  # T != G
    got = attribute_similarity(text_attr, image_attr, reduction)
    torch.testing.assert_close(got, slow_attribute_similarity(text_attr, image_attr, reduction), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("use_sdm,use_refiner,reduction", list(itertools.product([True, False], [True, False], ["mean", "neg_logsumexp"])))
def test_total_loss_and_gradients_match_reference(use_sdm, use_refiner, reduction):
    text, image, text_attr, image_attr = _embeddings(6, 3, 4, seed=5)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    leaves = [x.clone().requires_grad_(True) for x in (text, image, text_attr, image_attr)]
    got = diana_loss(*leaves[:2], ids, ids, torch.tensor(30.0, dtype=torch.float64), leaves[2], leaves[3],
                     attribute_reduction=reduction, use_sdm_loss=use_sdm, use_refiner_loss=use_refiner)
    ref = slow_diana_losses(text, image, text_attr, image_attr, ids, 30.0, reduction, use_sdm, use_refiner)
    for key in ("loss", "itc_loss", "sdm_loss", "refiner_loss"):
        if ref[key] is None:
            assert got[key] is None, key
        else:
            assert float(got[key].detach()) == pytest.approx(ref[key], rel=1e-6), key
    # Backward against the same formula written densely in float64 autograd (finite differences would be slow).
    got["loss"].backward()
    grad_text = leaves[0].grad.clone()
    eps = 1e-6
    probe = text.clone()
    probe[2, 1] += eps
    bumped = diana_loss(probe, image, ids, ids, torch.tensor(30.0, dtype=torch.float64), text_attr, image_attr,
                        attribute_reduction=reduction, use_sdm_loss=use_sdm, use_refiner_loss=use_refiner)["loss"]
    assert float((bumped - got["loss"].detach()) / eps) == pytest.approx(float(grad_text[2, 1]), rel=1e-3, abs=1e-5)


def test_loss_runs_in_float32_under_bfloat16_inputs():
    text, image, text_attr, image_attr = (x.to(torch.bfloat16) for x in _embeddings(4, 2, 8, seed=6))
    ids = torch.tensor([0, 1, 0, 1])
    out = diana_loss(text, image, ids, ids, torch.tensor(50.0), text_attr, image_attr)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_gather_is_identity_on_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_two_process_gather_equals_union_batch(tmp_path):
    """2 gloo processes, each with half of the batch, give the loss and the DDP-averaged gradients of one
    process that sees the whole batch (negatives and positives across processes included)."""
    import torch.multiprocessing as mp

    from tests import _dist_worker_diana as worker_module

    overrides = {"attribute_reduction": "logsumexp"}
    mp.spawn(worker_module.worker, args=(2, str(tmp_path / "init"), str(tmp_path), overrides), nprocs=2, join=True)

    model = worker_module.build_model(**overrides)
    pixel_values, input_ids, attention_mask, person_ids = worker_module.union_batch()
    out = model(pixel_values, input_ids, attention_mask, person_ids=person_ids)
    out.loss.backward()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in saved["terms"].items():
            torch.testing.assert_close(value, getattr(out, key).detach(), rtol=1e-5, atol=1e-5, msg=key)
    grads = torch.load(tmp_path / "rank0.pt", weights_only=True)["grads"]
    checked = 0
    for name, param in model.named_parameters():
        reference = param.grad if param.grad is not None else torch.zeros_like(param)
        # Gradients reach ~1e3 on this random tiny model: the tolerance follows each tensor's scale (floored at
        # 1, since e.g. the refiner's key bias has a mathematically zero gradient made of rounding noise).
        scale = max(float(reference.abs().max()), 1.0)
        torch.testing.assert_close(grads[name], reference, rtol=1e-4, atol=1e-5 * scale, msg=name)
        checked += int(reference.abs().sum() > 0)
    assert checked > 20  # the towers, projections, refiner and temperature all received gradient
