"""The naive baseline: what the official DiaNA code does, so each speed-up is a ratio in one run.

- every dialogue padded to the maximum length (400 tokens) instead of the batch's longest;
- per-round evaluation re-encodes every k-round prefix (R tower passes for R rounds) instead of
  reading all rounds from one causal pass (`encode_dialogues(..., round_end_positions)`);
- plain towers: eager attention in Llama, an eager Swinv2, the default (for-each) AdamW.

The prefix of k rounds is cut from the full dialogue's ids: the processor's tokenisation is
prefix-consistent (the processor's contract), so this equals re-tokenising the prefix. With the
official tokenisation it is not, and `encode_official_prefixes` tokenises every prefix on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diana.processing.search.topk import chunked_topk
from diana.processing.tokenizer_setup import PAD_TOKEN_ID

# The official fine-tuning length (the official code's): every dialogue was padded to it.
NAIVE_MAX_LENGTH = 400


def pad_to_length(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int = NAIVE_MAX_LENGTH, pad_id: int = PAD_TOKEN_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads (B, L) ids and mask to (B, length); raises if a row is longer than `length`."""
    batch, current = input_ids.shape
    if current > length:
        if attention_mask[:, length:].any():
            raise ValueError(f"a dialogue has more than {length} tokens; the naive path pads, it does not cut")
        return input_ids[:, :length], attention_mask[:, :length]
    ids = input_ids.new_full((batch, length), pad_id)
    mask = attention_mask.new_zeros((batch, length))
    ids[:, :current] = input_ids
    mask[:, :current] = attention_mask
    return ids, mask


def prefix_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, round_ends: torch.Tensor, pad_to: int | None,
    pad_id: int = PAD_TOKEN_ID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and mask of one round prefix per row: tokens after `round_ends` (B,) become padding.

    Args:
        pad_to: the fixed length of the naive path (400), or None for the longest prefix in the batch
            (re-encoding with dynamic padding, to isolate the cost of the R passes themselves).
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
    keep = attention_mask.bool() & (positions[None, :] <= round_ends[:, None])  # (B, L)
    ids = torch.where(keep, input_ids, torch.full_like(input_ids, pad_id))
    mask = keep.long()
    if pad_to is None:
        return ids[:, : int(round_ends.max()) + 1], mask[:, : int(round_ends.max()) + 1]
    return pad_to_length(ids, mask, pad_to, pad_id)


@torch.no_grad()
def reencode_prefixes(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, round_end_positions: torch.Tensor,
    pad_to: int | None = NAIVE_MAX_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-round encodings the slow way: one `encode_dialogues` pass per round prefix.

    Args:
        model: a `DiaNAModel`.
        input_ids, attention_mask: (B, L) full dialogues.
        round_end_positions: (B, R) last token of every round prefix (the processor's output).
        pad_to: 400 for the official behaviour, None to pad each prefix batch to its longest.

    Returns:
        text_embeds (B, R, D) and text_attribute_embeds (B, R, K, D), L2-normalised, the layout of
        `model.encode_dialogues(..., round_end_positions=...)`.
    """
    embeds, attributes = [], []
    for r in range(round_end_positions.shape[1]):
        ids, mask = prefix_inputs(input_ids, attention_mask, round_end_positions[:, r], pad_to)
        out = model.encode_dialogues(ids, mask)
        embeds.append(out.text_embeds)
        attributes.append(out.text_attribute_embeds)
    return torch.stack(embeds, dim=1), torch.stack(attributes, dim=1)


@torch.no_grad()
def encode_official_prefixes(
    model, processor, dialogues: list, batch_size: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-round encodings of official-tokenisation dialogues the official way: every k-round prefix
    tokenised on its own (its whole text, `max_rounds=k`) and run through the tower on its own.

    Args:
        model: a `DiaNAModel`.
        processor: a `DiaNAProcessor` with `tokenization="official"`.
        dialogues: dialogues of equal round counts.
        batch_size: dialogues per tower pass.
        pad_to: 400 for the official padding, None for each prefix batch's longest.

    Returns:
        text_embeds (N, R, D), text_attribute_embeds (N, R, K, D) and how many real tokens went through
        the tower.
    """
    rounds = len(processor.normalize_dialogue(dialogues[0]))
    embeds, attributes, tokens = [], [], 0
    for start in range(0, len(dialogues), batch_size):
        chunk = dialogues[start : start + batch_size]
        per_round = []
        for k in range(1, rounds + 1):
            enc = processor(dialogues=chunk, max_rounds=k, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if pad_to is not None:
                ids, mask = pad_to_length(ids, mask, pad_to)
            tokens += int(mask.sum())
            per_round.append(model.encode_dialogues(ids, mask))
        embeds.append(torch.stack([out.text_embeds for out in per_round], dim=1))
        attributes.append(torch.stack([out.text_attribute_embeds for out in per_round], dim=1))
    return torch.cat(embeds), torch.cat(attributes), tokens


@torch.no_grad()
def plain_text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Global dialogue vectors from the bare towers, written independently of `DiaNAModel`: the
    official pooling (hidden state at `mask.sum() - 1`, right padding) -> projection -> L2 norm.

    Returns:
        (B, D) normalised vectors.
    """
    hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.long().sum(dim=1) - 1  # (B,) right padding only, as the official code
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return F.normalize(model.text_projection(pooled), dim=-1)


@torch.no_grad()
def plain_image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Global image vectors from the bare Swinv2 tower: pooled output -> projection -> L2 norm (B, D)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def naive_optimizer(model: torch.nn.Module, lr: float = 1e-5) -> torch.optim.Optimizer:
    """AdamW as the official recipe builds it (β = (0.9, 0.999), wd 0.05), PyTorch's default
    implementation (for-each on a GPU, not fused)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.05)


def plain_exact_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 65536):
    """The previous exact search: float32 chunked matrix products over the float32 gallery (4 bytes
    read per value), ties by gallery index; the baseline of the float16 scan + exact re-score."""
    def inner_products(batch: torch.Tensor, rows: slice) -> torch.Tensor:
        return batch.float() @ gallery[rows].to(batch.device, torch.float32).T

    return chunked_topk(queries, gallery.shape[0], k, chunk_size, inner_products)
