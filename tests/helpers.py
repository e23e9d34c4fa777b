"""Tiny, deliberately odd-sized DiaNA configurations shared by the tests (CLIP-test style:
hidden 32, 2 layers, 4 heads, intermediate 37, a non-square image) so shape bugs fail loudly."""

from __future__ import annotations

from transformers import LlamaConfig, Swinv2Config

from diana.modeling_diana import DiaNAConfig

# Real Llama-3.2 special ids (the processor's tokenizer uses them too).
BOS_ID, EOS_ID, PAD_ID = 128000, 128001, 128004
TINY_IMAGE_SIZE = (64, 32)  # (H, W), the paper's 2:1 pedestrian aspect


def tiny_vision_config(**overrides) -> Swinv2Config:
    kwargs = dict(
        image_size=list(TINY_IMAGE_SIZE), patch_size=4, num_channels=3, embed_dim=16,
        depths=[1, 2], num_heads=[2, 4], window_size=4, mlp_ratio=2.0, drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    return Swinv2Config(**kwargs)


def tiny_text_config(vocab_size: int = 128256, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_config(**overrides) -> DiaNAConfig:
    vision = overrides.pop("vision_config", None) or tiny_vision_config()
    text = overrides.pop("text_config", None) or tiny_text_config()
    kwargs = dict(
        vision_config=vision, text_config=text, projection_dim=24, num_attribute_queries=3,
        refiner_num_layers=2, refiner_num_heads=4,
    )
    kwargs.update(overrides)
    return DiaNAConfig(**kwargs)


# ---- slow, obviously-correct references of DiaNA's scores and losses (loops over pairs) -------------
import math  # noqa: E402

import torch  # noqa: E402


def slow_attribute_similarity(text_attr, image_attr, reduction):
    """(T, K, D) x (G, K, D) -> (T, G): per slot cosine of slot k with slot k, reduced over k."""
    out = torch.empty(text_attr.shape[0], image_attr.shape[0], dtype=torch.float64)
    for t in range(text_attr.shape[0]):
        for g in range(image_attr.shape[0]):
            cos = [float(torch.dot(text_attr[t, k].double(), image_attr[g, k].double())) for k in range(text_attr.shape[1])]
            if reduction == "mean":
                out[t, g] = sum(cos) / len(cos)
            elif reduction == "max":
                out[t, g] = max(cos)
            elif reduction == "min":
                out[t, g] = min(cos)
            elif reduction == "logsumexp":
                out[t, g] = math.log(sum(math.exp(c) for c in cos))
            elif reduction == "neg_logsumexp":
                out[t, g] = -math.log(sum(math.exp(-c) for c in cos))
    return out


def _slow_direction_terms(logits, row_ids, col_ids, epsilon):
    """Per direction: mean over rows of CE(soft targets) and of KL(softmax || targets + eps)."""
    ce_total, kl_total = 0.0, 0.0
    for r in range(logits.shape[0]):
        row = [float(x) for x in logits[r]]
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row))
        positives = [c for c in range(len(row)) if int(row_ids[r]) == int(col_ids[c])]
        q = [1.0 / len(positives) if c in positives else 0.0 for c in range(len(row))]
        ce_total += -sum(q[c] * (row[c] - log_z) for c in range(len(row)))
        kl_total += sum(math.exp(row[c] - log_z) * ((row[c] - log_z) - math.log(q[c] + epsilon)) for c in range(len(row)))
    return ce_total / logits.shape[0], kl_total / logits.shape[0]


def slow_itc_sdm(logits_per_text, text_ids, image_ids, epsilon=1e-6):
    """(multi-positive ITC, SDM) of a (T, I) logit matrix, both averaged over the two directions."""
    ce_t, kl_t = _slow_direction_terms(logits_per_text, text_ids, image_ids, epsilon)
    ce_i, kl_i = _slow_direction_terms(logits_per_text.t(), image_ids, text_ids, epsilon)
    return (ce_t + ce_i) / 2, (kl_t + kl_i) / 2


def slow_diana_losses(text, image, text_attr, image_attr, ids, scale, reduction="mean", use_sdm=True, use_refiner=True, eps=1e-6):
    """Every loss term from normalised embeddings, pair by pair."""
    glob = torch.tensor([[float(torch.dot(text[t].double(), image[i].double())) for i in range(image.shape[0])] for t in range(text.shape[0])])
    itc, sdm = slow_itc_sdm(scale * glob, ids, ids, eps)
    out = {"itc_loss": itc, "sdm_loss": sdm if use_sdm else None, "refiner_loss": None}
    total = itc + (sdm if use_sdm else 0.0)
    if use_refiner:
        a_itc, a_sdm = slow_itc_sdm(scale * slow_attribute_similarity(text_attr, image_attr, reduction), ids, ids, eps)
        out["refiner_loss"] = a_itc + (a_sdm if use_sdm else 0.0)
        total += out["refiner_loss"]
    out["loss"] = total
    return out


# ---- two-process CPU launches (accelerate) -------------------------------------------------------
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

# What a launch prints when its rendezvous port was taken between picking and binding it.
_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "address already in use")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600,
                             cwd: str | os.PathLike | None = None, attempts: int = 3) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 <args>`.

    A free port can be taken by another process (the other xdist worker launches too) before the
    launch binds it: only that failure is retried, on a new port; any other failure is returned.
    """
    env = {**os.environ, **(env or {}), "ACCELERATE_USE_CPU": "1"}
    for _ in range(attempts):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
        if proc.returncode == 0 or not any(text in proc.stderr for text in _PORT_TAKEN):
            return proc
    return proc


def write_png_bomb(path, width: int = 100_000, height: int = 100_000) -> None:
    """A ~100-byte PNG whose header claims width x height grey pixels (10^10 by default: decoding
    it would need 10 GB), the shape of a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
