"""The official-checkpoint converter: a state dict in the official layout (the released
checkpoints'), produced by a small slow re-implementation of the official computation written
here, must give the same features, attribute embeddings, similarities and losses after conversion."""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel, Swinv2Model

from diana.processing.model_loading import load_model_and_processor
from diana.hub_cards.convert_official_checkpoint import convert, main
from tests.helpers import PAD_ID, TINY_IMAGE_SIZE, slow_attribute_similarity, slow_diana_losses, tiny_vision_config

DIM, NUM_QUERY = 128, 3  # D = 128 gives the official D / 64 = 2 heads


# --------------------------------------------------------------------------- the official computation
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP-style block, sequence-first (L, N, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, dim // 64)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(dim, 4 * dim), gelu=QuickGELU(), c_proj=nn.Linear(4 * dim, dim)))
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(dim) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OfficialRefiner(nn.Module):
    def __init__(self, dim: int, num_query: int, layers: int):
        super().__init__()
        self.attr_query_token = nn.Parameter(torch.randn(1, num_query, dim) * 0.02)
        self.cross_attn = nn.MultiheadAttention(dim, dim // 64, batch_first=True)
        self.transformer = Transformer(dim, layers)

    def forward(self, x, mask=None):
        queries = self.attr_query_token.expand(x.shape[0], -1, -1)
        padding = None if mask is None else ~mask.bool()
        a = self.cross_attn(queries, x, x, key_padding_mask=padding, need_weights=False)[0]  # no residual, no norm
        return self.transformer(a.permute(1, 0, 2)).permute(1, 0, 2)


class OfficialDiaNA(nn.Module):
    def __init__(self, vision_config, llama_config, dim: int, num_query: int):
        super().__init__()
        self.vision_model = Swinv2Model(vision_config)
        self.llama = LlamaModel(llama_config)
        self.vision_projection = nn.Linear(vision_config.hidden_size, dim)
        self.text_projection = nn.Linear(llama_config.hidden_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(50.0)))
        self.refiner = OfficialRefiner(dim, num_query, 2)

    def encode_image(self, pixel_values):
        out = self.vision_model(pixel_values=pixel_values)
        return self.vision_projection(out.pooler_output), self.refiner(self.vision_projection(out.last_hidden_state))

    def encode_text(self, input_ids, attention_mask):
        hidden = self.llama(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0]), attention_mask.sum(1) - 1]  # right padding
        return self.text_projection(pooled), self.refiner(self.text_projection(hidden), attention_mask)


def llama_config_dict() -> dict:
    """A Llama-3.2 style config.json (old `rope_theta` / `rope_scaling` keys), tiny sizes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 32,
        "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001, "pretrained": "/home/author/ckpt/Llama-3.2-1B",
    }


def write_official_folder(folder, sim_type="lsp_min", query_name="attr_query_token", fmt="safetensors", seed=0):
    """Builds the official model with random weights and writes config.json + weights in the official layout."""
    torch.manual_seed(seed)
    vision_dict = {**tiny_vision_config().to_dict(), "pretrained": "/home/author/ckpt/swinv2-base-22k"}
    official = OfficialDiaNA(tiny_vision_config(), LlamaConfig(**llama_config_dict()), DIM, NUM_QUERY).eval()
    with torch.no_grad():  # nothing left at its default (LayerNorm ones, zero biases) so a swapped key shows
        for name, param in official.named_parameters():
            if not name.startswith(("vision_model", "llama")):
                param.add_(0.05 * torch.randn_like(param))
    state = {k: v.detach().clone().contiguous() for k, v in official.named_parameters()}  # no buffers
    if query_name != "attr_query_token":
        state[f"refiner.{query_name}"] = state.pop("refiner.attr_query_token")
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    config = {
        "model_type": "main", "embed_dim": DIM, "vision_config": vision_dict, "llama_config": llama_config_dict(),
        "refiner_config": {"enable": True, "num_query": NUM_QUERY, "num_hidden_layers": 2, "sim_type": sim_type},
        "logit_scale": 50, "force_image_size": list(TINY_IMAGE_SIZE), "use_llama_lora": False,
        "use_vision_lora": False, "label_smoothing": 0.0,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return official, state


def batch():
    g = torch.Generator().manual_seed(7)
    pixel_values = torch.randn(4, 3, *TINY_IMAGE_SIZE, generator=g)
    input_ids = torch.randint(0, 5000, (4, 8), generator=g)
    mask = torch.ones(4, 8, dtype=torch.long)
    for row, length in enumerate([8, 5, 3, 6]):
        mask[row, length:] = 0
        input_ids[row, length:] = PAD_ID
    return pixel_values, input_ids, mask, torch.tensor([2, 5, 2, 2])  # three positives of person 2


SIM_TYPES = {"avg": "mean", "max": "max", "min": "min", "lsp_max": "logsumexp", "lsp_min": "neg_logsumexp"}


@pytest.mark.parametrize("sim_type", ["lsp_min", "avg"])
def test_converted_model_reproduces_the_official_computation(tmp_path, sim_type, tokenizer_dir):
    official, _ = write_official_folder(tmp_path / "official", sim_type=sim_type)
    main(["--official_dir", str(tmp_path / "official"), "--output_dir", str(tmp_path / "hf"),
          "--tokenizer_dir", str(tokenizer_dir)])
    # The converted folder loads through the one loader; its processor gives the ids the official weights
    # were trained on, at the model's image size.
    model, processor = load_model_and_processor(tmp_path / "hf", device="cpu", dtype="auto")
    assert processor.tokenization == "official"
    assert processor(images=[torch.zeros(3, 5, 7)])["pixel_values"].shape[-2:] == TINY_IMAGE_SIZE
    assert model.config.attribute_reduction == SIM_TYPES[sim_type]
    assert (model.config.projection_dim, model.config.num_attribute_queries, model.config.refiner_num_heads) == (DIM, NUM_QUERY, 2)
    assert model.config.use_sdm_loss and model.config.use_refiner_loss
    assert list(model.config.vision_config.image_size) == list(TINY_IMAGE_SIZE)
    assert model.config.text_config.rope_parameters["rope_type"] == "llama3"
    assert not hasattr(model.config.vision_config, "pretrained") and not hasattr(model.config.text_config, "pretrained")

    pixel_values, input_ids, mask, person_ids = batch()
    with torch.no_grad():
        ref_image, ref_image_attr = official.encode_image(pixel_values)
        ref_text, ref_text_attr = official.encode_text(input_ids, mask)
        out = model(pixel_values, input_ids, mask, person_ids=person_ids)
        images, texts = model.encode_images(pixel_values), model.encode_dialogues(input_ids, mask)
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.get_image_features(pixel_values), ref_image, **tol)
        torch.testing.assert_close(model.get_text_features(input_ids, mask), ref_text, **tol)
        torch.testing.assert_close(model.get_image_attribute_features(pixel_values), ref_image_attr, **tol)
        torch.testing.assert_close(model.get_text_attribute_features(input_ids, mask), ref_text_attr, **tol)

        t, i = F.normalize(ref_text, dim=-1), F.normalize(ref_image, dim=-1)
        ta, ia = F.normalize(ref_text_attr, dim=-1), F.normalize(ref_image_attr, dim=-1)
        ref_global = t @ i.t()
        ref_attr = slow_attribute_similarity(ta, ia, SIM_TYPES[sim_type]).float()
        sims = {m: model.similarity(texts.text_embeds, images.image_embeds, texts.text_attribute_embeds, images.image_attribute_embeds, mode=m)
                for m in ("global", "attribute", "fused")}
        torch.testing.assert_close(sims["global"], ref_global, **tol)
        torch.testing.assert_close(sims["attribute"], ref_attr, **tol)
        torch.testing.assert_close(sims["fused"], ref_global + ref_attr, **tol)
        torch.testing.assert_close(out.logits_per_text, official.logit_scale.exp() * ref_global, rtol=1e-5, atol=1e-4)

    ref_losses = slow_diana_losses(t, i, ta, ia, person_ids, float(official.logit_scale.exp()), SIM_TYPES[sim_type])
    for key in ("loss", "itc_loss", "sdm_loss", "refiner_loss"):
        assert float(getattr(out, key)) == pytest.approx(ref_losses[key], rel=1e-5, abs=1e-5), key


def test_bin_with_old_query_name_and_a_new_number_of_queries(tmp_path, caplog, tokenizer_dir):
    _, state = write_official_folder(tmp_path / "official", query_name="query_token", fmt="bin")
    assert not (tmp_path / "official" / "model.safetensors").exists()
    with caplog.at_level(logging.WARNING):
        model = convert(
            tmp_path / "official", tmp_path / "hf", enable_sdm=False, num_attribute_queries=5, tokenizer_dir=tokenizer_dir
        )
    assert "re-initialised" in caplog.text
    assert model.refiner.attribute_queries.shape == (1, 5, DIM)
    assert not model.config.use_sdm_loss and model.config.num_attribute_queries == 5
    # Everything else is carried over unchanged.
    torch.testing.assert_close(model.refiner.cross_attention.k_proj.weight, state["refiner.cross_attn.in_proj_weight"][DIM : 2 * DIM])
    torch.testing.assert_close(model.refiner.layers[1].mlp.fc2.bias, state["refiner.transformer.resblocks.1.mlp.c_proj.bias"])
    torch.testing.assert_close(model.text_model.norm.weight, state["llama.norm.weight"])
    pixel_values, input_ids, mask, person_ids = batch()
    with torch.no_grad():
        out = model(pixel_values, input_ids, mask, person_ids=person_ids)
    assert out.sdm_loss is None and torch.isfinite(out.loss)


def test_same_number_of_queries_keeps_the_old_query_name(tmp_path):
    _, state = write_official_folder(tmp_path / "official", query_name="query_token")
    model = convert(tmp_path / "official")
    torch.testing.assert_close(model.refiner.attribute_queries, state["refiner.query_token"])


def test_bad_official_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path)
    write_official_folder(tmp_path / "official")
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    config["refiner_config"]["sim_type"] = "median"
    (tmp_path / "official" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sim_type 'median'"):
        convert(tmp_path / "official")
    (tmp_path / "official" / "model.safetensors").unlink()
    config["refiner_config"]["sim_type"] = "avg"
    (tmp_path / "official" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        convert(tmp_path / "official")
    _, state = write_official_folder(tmp_path / "extra")
    state["refiner.mystery.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(ValueError, match="refiner.mystery.weight"):
        convert(tmp_path / "extra")
