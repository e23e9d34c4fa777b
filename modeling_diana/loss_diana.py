"""DiaNA's training losses as small pure functions (as in the paper).

Every sample of the same person in the whole (gathered) batch is a positive: the targets are the
identity-equality matrix, row-normalised. All terms share one inverse temperature.

- multi-positive ITC: cross-entropy against the soft targets, averaged over text->image and image->text;
- SDM (IRRA, Jiang & Ye, CVPR 2023): KL(softmax(logits) || targets) with an epsilon inside the log,
  averaged over both directions;
- the same terms on the refiner's attribute similarity.

Nothing here synchronises with the host (no `.item()`, no branching on tensor values), so the loss can
run inside compiled / overlapped training steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every process the SUM over processes of the gradient of its slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        # all_reduce + slice = reduce_scatter, which gloo lacks; the tensors are (W*B, D)-small.
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` (B, ...) from every process along dim 0, keeping the gradient.

    The identity when `torch.distributed` is not initialised or has one process. Every process must pass
    the same shape. The backward sums the gradients that all processes send to each slice; since every
    process computes the same loss over the gathered batch, each process's local gradient is `world_size`
    times its share, and DDP's gradient averaging turns that into exactly the gradient of one process
    seeing the union batch.

    Returns:
        (world_size * B, ...) tensor, rank 0's rows first.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like `gather_with_grad` for tensors without gradient (person ids)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    # The softmax runs in fp32 even under bf16 autocast; float64 (reference checks) is kept.
    return logits if logits.dtype == torch.float64 else logits.float()


def identity_targets(row_ids: torch.Tensor, column_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row-normalised identity-equality matrix (R, C): row r spreads mass 1 over the columns of its person.

    A row without any positive column would be all zeros; the clamp keeps it finite (it cannot happen in
    DiaNA's batches, where every text has its own image).
    """
    same = (row_ids[:, None] == column_ids[None, :]).to(torch.float64 if dtype == torch.float64 else torch.float32)  # (R, C)
    return same / same.sum(dim=1, keepdim=True).clamp_min(1.0)


def multi_positive_itc_loss(logits_per_text: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each direction's softmax against its row-normalised identity targets, averaged.

    Args:
        logits_per_text: (T, I) scaled similarities.
        text_ids: (T,) person ids of the rows.
        image_ids: (I,) person ids of the columns.
    """
    logits = _at_least_fp32(logits_per_text)
    t2i = -(identity_targets(text_ids, image_ids, logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    i2t = -(identity_targets(image_ids, text_ids, logits.dtype) * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (t2i + i2t) / 2


def sdm_loss(
    logits_per_text: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor, epsilon: float = 1e-6
) -> torch.Tensor:
    """Similarity Distribution Matching: KL(softmax(logits) || targets), epsilon inside the log, averaged
    over both directions.

    Args:
        logits_per_text: (T, I) scaled similarities.
        text_ids: (T,) person ids of the rows.
        image_ids: (I,) person ids of the columns.
        epsilon: Keeps log(target) finite where the target is 0.
    """
    logits = _at_least_fp32(logits_per_text)

    def one_direction(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(scores, dim=1)
        return (log_p.exp() * (log_p - torch.log(targets + epsilon))).sum(dim=1).mean()

    t2i = one_direction(logits, identity_targets(text_ids, image_ids, logits.dtype))
    i2t = one_direction(logits.t(), identity_targets(image_ids, text_ids, logits.dtype))
    return (t2i + i2t) / 2


def attribute_similarity(
    text_attribute_embeds: torch.Tensor, image_attribute_embeds: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Refiner similarity: cosine of slot k with slot k, reduced over the K slots.

    Args:
        text_attribute_embeds: (T, K, D), L2-normalised per slot.
        image_attribute_embeds: (G, K, D), L2-normalised per slot.
        reduction: "mean", "max", "min", "logsumexp" or "neg_logsumexp" (= -logsumexp(-x)).

    Returns:
        (T, G) similarities.
    """
    num_slots = text_attribute_embeds.shape[1]
    if reduction == "mean":
        # mean_k <t_k, g_k> = <flatten(t), flatten(g)> / K: one matrix product, no (T, G, K) intermediate.
        flat_text = text_attribute_embeds.flatten(1)  # (T, K*D)
        flat_image = image_attribute_embeds.flatten(1)  # (G, K*D)
        return flat_text @ flat_image.t() / num_slots
    per_slot = torch.einsum("tkd,gkd->tgk", text_attribute_embeds, image_attribute_embeds)  # (T, G, K)
    if reduction == "max":
        return per_slot.amax(dim=-1)
    if reduction == "min":
        return per_slot.amin(dim=-1)
    if reduction == "logsumexp":
        return torch.logsumexp(per_slot, dim=-1)
    if reduction == "neg_logsumexp":
        return -torch.logsumexp(-per_slot, dim=-1)
    raise ValueError(f"Unknown attribute reduction {reduction!r}.")


def diana_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    image_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    text_attribute_embeds: torch.Tensor | None = None,
    image_attribute_embeds: torch.Tensor | None = None,
    attribute_reduction: str = "mean",
    use_sdm_loss: bool = True,
    use_refiner_loss: bool = True,
    sdm_epsilon: float = 1e-6,
) -> dict[str, torch.Tensor | None]:
    """All of DiaNA's loss terms on one (already gathered) batch, every weight 1.

    Args:
        text_embeds: (T, D) L2-normalised dialogue vectors.
        image_embeds: (I, D) L2-normalised image vectors.
        text_ids: (T,) person ids.
        image_ids: (I,) person ids.
        logit_scale: scalar inverse temperature (already exponentiated and clamped).
        text_attribute_embeds: (T, K, D) per-slot normalised, needed when `use_refiner_loss`.
        image_attribute_embeds: (I, K, D) per-slot normalised, needed when `use_refiner_loss`.

    Returns:
        dict with "loss" (the total), "itc_loss" (global ITC), "sdm_loss" (global SDM, None when off) and
        "refiner_loss" (ITC (+ SDM) on the attribute similarity, None when off).
    """
    logits = logit_scale * (text_embeds @ image_embeds.t())  # (T, I)
    itc = multi_positive_itc_loss(logits, text_ids, image_ids)
    total = itc
    sdm = None
    if use_sdm_loss:
        sdm = sdm_loss(logits, text_ids, image_ids, sdm_epsilon)
        total = total + sdm
    refiner = None
    if use_refiner_loss:
        if text_attribute_embeds is None or image_attribute_embeds is None:
            raise ValueError("use_refiner_loss needs text_attribute_embeds and image_attribute_embeds.")
        attribute_logits = logit_scale * attribute_similarity(
            text_attribute_embeds, image_attribute_embeds, attribute_reduction
        )  # (T, I)
        refiner = multi_positive_itc_loss(attribute_logits, text_ids, image_ids)
        if use_sdm_loss:
            refiner = refiner + sdm_loss(attribute_logits, text_ids, image_ids, sdm_epsilon)
        total = total + refiner
    return {"loss": total, "itc_loss": itc, "sdm_loss": sdm, "refiner_loss": refiner}


__all__ = [
    "attribute_similarity",
    "diana_loss",
    "gather_no_grad",
    "gather_with_grad",
    "identity_targets",
    "multi_positive_itc_loss",
    "sdm_loss",
]
