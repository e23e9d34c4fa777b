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
