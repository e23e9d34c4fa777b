"""DiaNAConfig / DiaNAModel on tiny odd-sized random configs (transformers CLIP-test style)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    LlamaConfig,
    LlamaForCausalLM,
    Swinv2Config,
    Swinv2ForImageClassification,
    Swinv2Model,
)

from diana.modeling_diana import (
    DiaNAConfig,
    DiaNAConvStem,
    DiaNAImageEncoding,
    DiaNAModel,
    DiaNAOutput,
    DiaNATextEncoding,
)
from tests.helpers import (
    PAD_ID,
    TINY_IMAGE_SIZE,
    slow_attribute_similarity,
    slow_diana_losses,
    tiny_config,
    tiny_text_config,
    tiny_vision_config,
)

K, D = 3, 24  # tiny_config's attribute queries and joint width


class DiaNAModelTester:
    """Random inputs of odd sizes: batch 3, 9 tokens with ragged right padding, a 64x32 image."""

    def __init__(self, batch_size: int = 3, seq_length: int = 9, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(batch_size, 3, *TINY_IMAGE_SIZE, generator=g)
        self.input_ids = torch.randint(0, 5000, (batch_size, seq_length), generator=g)
        self.input_ids[:, 0] = 128000  # BOS, as the processor writes it
        self.lengths = [seq_length, seq_length - 3, 4][:batch_size]
        self.attention_mask = torch.zeros(batch_size, seq_length, dtype=torch.long)
        for row, length in enumerate(self.lengths):
            self.attention_mask[row, :length] = 1
            self.input_ids[row, length:] = PAD_ID

    def left_padded(self):
        ids, mask = torch.full_like(self.input_ids, PAD_ID), torch.zeros_like(self.attention_mask)
        length = ids.shape[1]
        for row, n in enumerate(self.lengths):
            ids[row, length - n :] = self.input_ids[row, :n]
            mask[row, length - n :] = 1
        return ids, mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiaNAModel(tiny_config()).eval()


@pytest.fixture(scope="module", params=["last", "mean"])
def pooled_model(request):
    """The tiny model with each dialogue pooling (`DiaNAConfig.text_pooling`)."""
    torch.manual_seed(0)
    return DiaNAModel(tiny_config(text_pooling=request.param)).eval()


@pytest.fixture(scope="module")
def inputs():
    return DiaNAModelTester()


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_are_the_paper_model():
    config = DiaNAConfig()
    vision, text = config.vision_config, config.text_config
    assert (vision.model_type, vision.embed_dim, list(vision.depths), list(vision.num_heads), vision.window_size) == (
        "swinv2", 128, [2, 2, 18, 2], [4, 8, 16, 32], 12)
    assert list(vision.image_size) == [384, 192] and vision.patch_size == 4
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == ("llama", 2048, 16, 32)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (8, 8192, 128256)
    rope = text.rope_parameters
    assert (rope["rope_type"], rope["rope_theta"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]) == ("llama3", 500000.0, 32.0, 1.0, 4.0, 8192)
    assert (text.tie_word_embeddings, text.pad_token_id, text.bos_token_id, text.eos_token_id) == (True, 128004, 128000, 128001)
    assert (config.projection_dim, config.num_attribute_queries, config.refiner_num_layers, config.refiner_num_heads) == (768, 16, 2, 12)
    assert (config.logit_scale_init_value, config.logit_scale_max, config.attribute_reduction, config.score_mode) == (50.0, 100.0, "mean", "global")
    assert config.use_sdm_loss and config.use_refiner_loss and config.model_type == "diana"
    assert config.vision_stem == "patch"  # Swinv2's own patch embedding


def test_config_round_trip_and_auto_config(tmp_path):
    config = tiny_config(num_attribute_queries=5, attribute_reduction="max", use_sdm_loss=False)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DiaNAConfig)
    loaded_dict, saved_dict = loaded.to_dict(), config.to_dict()
    loaded_dict.pop("_name_or_path"), saved_dict.pop("_name_or_path")
    assert loaded_dict == saved_dict
    assert isinstance(loaded.vision_config, Swinv2Config) and isinstance(loaded.text_config, LlamaConfig)
    # Sub-configs as dicts (the JSON form) resolve to the tower classes too.
    from_dicts = DiaNAConfig(vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict())
    assert from_dicts.vision_config.embed_dim == 16 and from_dicts.text_config.hidden_size == 32


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"projection_dim": 25, "refiner_num_heads": 4}, "divisible by refiner_num_heads"),
        ({"attribute_reduction": "median"}, "attribute_reduction"),
        ({"score_mode": "both"}, "score_mode"),
        ({"num_attribute_queries": 0}, "num_attribute_queries"),
        ({"projection_dim": -8}, "projection_dim"),
        ({"refiner_num_heads": 0}, "refiner_num_heads"),
        ({"refiner_num_layers": -1}, "refiner_num_layers"),
        ({"refiner_mlp_ratio": 0.0}, "refiner_mlp_ratio"),
        ({"logit_scale_init_value": 200.0}, "exceeds logit_scale_max"),
        ({"logit_scale_init_value": 0.0}, "logit_scale_init_value"),
        ({"sdm_epsilon": 0.0}, "sdm_epsilon"),
        ({"vision_config": {"model_type": "vit"}}, "Swinv2"),
        ({"vision_stem": "resnet"}, "vision_stem"),
        ({"text_pooling": "max"}, "text_pooling"),
        ({"rejection_weight": -0.1}, "rejection_weight"),
        ({"rejection_weight": 1.5}, "rejection_weight"),
        ({"vision_stem": "conv", "vision_config": tiny_vision_config(patch_size=2)}, "patch_size 4"),
    ],
)
def test_config_rejects_impossible_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# ------------------------------------------------------------------------------------------------ model
def test_model_structure_and_init(model):
    assert isinstance(model.vision_model, Swinv2Model)
    assert model.text_model.__class__.__name__ == "LlamaModel"
    assert model.visual_projection.weight.shape == (D, 16 * 2)  # Swinv2 hidden = embed * 2**(stages-1)
    assert model.text_projection.weight.shape == (D, 32)
    assert model.refiner.attribute_queries.shape == (1, K, D)
    assert float(model.logit_scale) == pytest.approx(math.log(50.0))
    # Width-scaled init (CLIP projections, IRRA/CLIP refiner): std D^-0.5 for the queries and the
    # attention inputs, in_features^-0.5 for the projections, D^-0.5 (2L)^-0.5 for output projections.
    layers = model.config.refiner_num_layers
    assert float(model.refiner.attribute_queries.std()) == pytest.approx(D**-0.5, rel=0.5)
    assert float(model.visual_projection.weight.std()) == pytest.approx(32**-0.5, rel=0.2)
    assert float(model.text_projection.weight.std()) == pytest.approx(32**-0.5, rel=0.2)
    assert float(model.refiner.cross_attention.q_proj.weight.std()) == pytest.approx(D**-0.5, rel=0.2)
    assert float(model.refiner.cross_attention.out_proj.weight.std()) == pytest.approx(
        D**-0.5 * (2 * layers) ** -0.5, rel=0.2)
    assert float(model.refiner.layers[0].mlp.fc1.weight.std()) == pytest.approx((2 * D) ** -0.5, rel=0.2)
    assert not model.visual_projection.bias.any()
    assert model.text_model.config is model.config.text_config
    # SDPA for the Llama tower, eager for Swinv2 (which has no SDPA).
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "eager"


def test_erased_patch_keeps_from_scratch_gradients_finite(inputs):
    # Random erasing fills with the mean, i.e. 0 after normalisation. With Swinv2's zero-initialised
    # patch-embedding bias such a patch embeds to the zero vector, whose LayerNorm has zero variance: the
    # gradient grew by 1/sqrt(eps) per norm to ~1e16 at step 0 (the small SynthPedes preset), and global
    # clipping then froze every other weight. DiaNA gives a from-scratch tower PyTorch's default bias.
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config(logit_scale_init_value=10.0)).train()
    bias = model.vision_model.embeddings.patch_embeddings.projection.bias
    assert bias.abs().max() > 0
    assert bias.abs().max() <= 48**-0.5  # uniform(+-1/sqrt(fan_in)), fan_in = 3 * 4 * 4
    def vision_gradient_norm(pixel_values):
        model.zero_grad()
        model(pixel_values=pixel_values, input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
              person_ids=torch.tensor([0, 1, 2]), return_loss=True).loss.backward()
        return torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.vision_model.parameters() if p.grad is not None]))

    erased = inputs.pixel_values.clone()
    erased[:, :, 8:40, :] = 0.0  # an erased band covering whole patches and whole windows
    # Same order of magnitude as on the intact images (without the bias: 1e17 against 3e3).
    assert vision_gradient_norm(erased) < 10 * vision_gradient_norm(inputs.pixel_values)


def test_conv_stem_replaces_the_patch_embedding_with_the_same_grid(inputs, tmp_path):
    torch.manual_seed(0)
    model = DiaNAModel(tiny_config(vision_stem="conv")).eval()
    patches = model.vision_model.embeddings.patch_embeddings
    stem = patches.projection
    assert isinstance(stem, DiaNAConvStem)
    assert (stem.conv1.weight.shape, stem.conv2.weight.shape, stem.proj.weight.shape) == (
        (8, 3, 3, 3), (16, 8, 3, 3), (16, 16, 1, 1))
    # PyTorch's convolution init, uniform(+-1/sqrt(fan_in)) for weights and biases, not the tower's normal.
    for conv, fan_in in ((stem.conv1, 27), (stem.conv2, 72), (stem.proj, 16)):
        assert conv.weight.abs().max() <= fan_in**-0.5 and conv.bias.abs().max() > 0
        assert float(conv.weight.detach().std()) == pytest.approx(fan_in**-0.5 / math.sqrt(3), rel=0.25)
    # Same token grid as the 4x4 patch embedding, also for a size that Swinv2 pads to a multiple of 4.
    plain = DiaNAModel(tiny_config()).eval()
    with torch.no_grad():
        for size in (TINY_IMAGE_SIZE, (62, 30)):
            pixels = inputs.pixel_values[:, :, : size[0], : size[1]]
            got, want = model.vision_model(pixel_values=pixels), plain.vision_model(pixel_values=pixels)
            assert got.last_hidden_state.shape == want.last_hidden_state.shape
        # Overlapping windows: a pixel on the last row of patch row 0 moves the stem's token of patch row 1 too,
        # the patch embedding's (a 4x4 cell seen alone) not at all. (The stem's GroupNorm statistics span the
        # image, so a far token moves a little: the neighbour must move far more.)
        moved = inputs.pixel_values.clone()
        moved[:, :, 3, 5] += 5.0
        width = TINY_IMAGE_SIZE[1] // 4
        deltas = {}
        for name, tower in (("conv", model), ("patch", plain)):
            embed = tower.vision_model.embeddings.patch_embeddings
            deltas[name] = (embed(moved)[0] - embed(inputs.pixel_values)[0]).abs().sum(-1)  # (B, tokens)
            assert deltas[name][:, 1].min() > 0  # patch (0, 1) holds the pixel in both
        assert (deltas["patch"][:, width + 1] == 0).all() and (deltas["patch"][:, -1] == 0).all()
        assert (deltas["conv"][:, width + 1] > 10 * deltas["conv"][:, -1]).all()  # patch (1, 1) vs the last
    # Saved and loaded (the stem is rebuilt from the config, then its weights load): identical outputs.
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.vision_model.embeddings.patch_embeddings.projection, DiaNAConvStem)
    torch.testing.assert_close(loaded.vision_model.embeddings.patch_embeddings.projection.conv1.weight, stem.conv1.weight,
                               rtol=0, atol=0)
    with torch.no_grad():
        a = model.encode_images(inputs.pixel_values).image_embeds
        b = loaded.encode_images(inputs.pixel_values).image_embeds
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The stem trains with the tower.
    model.train()
    model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, person_ids=torch.tensor([0, 1, 2]),
          return_loss=True).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())


def test_auto_model_from_config_builds_diana():
    built = AutoModel.from_config(tiny_config())
    assert isinstance(built, DiaNAModel)


def test_feature_shapes(model, inputs):
    with torch.no_grad():
        assert model.get_image_features(inputs.pixel_values).shape == (3, D)
        assert model.get_text_features(inputs.input_ids, inputs.attention_mask).shape == (3, D)
        assert model.get_image_attribute_features(inputs.pixel_values).shape == (3, K, D)
        assert model.get_text_attribute_features(inputs.input_ids, inputs.attention_mask).shape == (3, K, D)
        images = model.encode_images(inputs.pixel_values)
        texts = model.encode_dialogues(inputs.input_ids, inputs.attention_mask)
    assert isinstance(images, DiaNAImageEncoding) and isinstance(texts, DiaNATextEncoding)
    torch.testing.assert_close(images.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(texts.text_attribute_embeds.norm(dim=-1), torch.ones(3, K))
    # The encodings are the normalised raw features.
    torch.testing.assert_close(images.image_embeds, F.normalize(model.get_image_features(inputs.pixel_values), dim=-1))
    torch.testing.assert_close(
        texts.text_attribute_embeds,
        F.normalize(model.get_text_attribute_features(inputs.input_ids, inputs.attention_mask), dim=-1),
    )


def test_text_features_pool_the_last_real_token(model, inputs):
    with torch.no_grad():
        hidden = model.text_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
        features = model.get_text_features(inputs.input_ids, inputs.attention_mask)
    for row, length in enumerate(inputs.lengths):
        torch.testing.assert_close(features[row], model.text_projection(hidden[row, length - 1]), rtol=1e-5, atol=1e-6)


def test_mean_text_pooling_averages_the_real_tokens(inputs):
    torch.manual_seed(0)
    mean_model = DiaNAModel(tiny_config(text_pooling="mean")).eval()
    with torch.no_grad():
        hidden = mean_model.text_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
        features = mean_model.get_text_features(inputs.input_ids, inputs.attention_mask)
        for row, length in enumerate(inputs.lengths):
            expected = mean_model.text_projection(hidden[row, :length].mean(0))
            torch.testing.assert_close(features[row], expected, rtol=1e-5, atol=1e-6)
        # The pads of the short rows have hidden states too: averaging the whole row would differ.
        assert not torch.allclose(features[2], mean_model.text_projection(hidden[2].mean(0)), atol=1e-3)
        bf16 = mean_model.to(torch.bfloat16).get_text_features(inputs.input_ids, inputs.attention_mask)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16.float(), features, rtol=0.05, atol=0.05)


def test_padding_side_does_not_change_anything(pooled_model, inputs):
    model = pooled_model
    left_ids, left_mask = inputs.left_padded()
    with torch.no_grad():
        right = model.encode_dialogues(inputs.input_ids, inputs.attention_mask)
        left = model.encode_dialogues(left_ids, left_mask)
        right_loss = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, person_ids=torch.tensor([0, 1, 0]))
        left_loss = model(inputs.pixel_values, left_ids, left_mask, person_ids=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(left.text_embeds, right.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left.text_attribute_embeds, right.text_attribute_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_loss.loss, right_loss.loss, rtol=1e-5, atol=1e-5)


def test_all_rounds_in_one_pass_equal_separate_prefixes(pooled_model, inputs):
    model = pooled_model
    ends = torch.tensor([[2, 5, 8], [1, 5, 5], [0, 3, 3]])  # repeated ends = dialogues with fewer rounds
    with torch.no_grad():
        one_pass = model.encode_dialogues(inputs.input_ids, inputs.attention_mask, round_end_positions=ends)
        raw = model.get_text_features(inputs.input_ids, inputs.attention_mask, round_end_positions=ends)
        raw_attr = model.get_text_attribute_features(inputs.input_ids, inputs.attention_mask, round_end_positions=ends)
    assert one_pass.text_embeds.shape == (3, 3, D) and one_pass.text_attribute_embeds.shape == (3, 3, K, D)
    assert raw.shape == (3, 3, D) and raw_attr.shape == (3, 3, K, D)
    for row in range(3):
        for rnd in range(3):
            end = int(ends[row, rnd]) + 1
            with torch.no_grad():
                alone = model.encode_dialogues(inputs.input_ids[row : row + 1, :end], inputs.attention_mask[row : row + 1, :end])
                alone_raw = model.get_text_features(inputs.input_ids[row : row + 1, :end], inputs.attention_mask[row : row + 1, :end])
            torch.testing.assert_close(one_pass.text_embeds[row, rnd], alone.text_embeds[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(one_pass.text_attribute_embeds[row, rnd], alone.text_attribute_embeds[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(raw[row, rnd], alone_raw[0], rtol=0, atol=1e-5)


def test_packed_rows_with_a_round_token_mask_equal_each_view_alone(pooled_model):
    """A row = a dialogue's ids + the tails of two shorter dialogues that leave it at tokens 4 and 7
    (what the official tokenisation packs); each view's encoding equals that dialogue encoded alone."""
    model = pooled_model
    generator = torch.Generator().manual_seed(3)
    full = torch.randint(0, 1000, (10,), generator=generator)
    tail_a, tail_b = torch.randint(0, 1000, (2,), generator=generator), torch.randint(0, 1000, (3,), generator=generator)
    alone = [torch.cat([full[:4], tail_a]), torch.cat([full[:7], tail_b]), full[:5], full]
    row = torch.cat([full, tail_a, tail_b, torch.full((2,), 128004)])[None]  # two pads at the end
    mask = torch.ones_like(row)
    mask[0, -2:] = 0
    positions = torch.arange(row.shape[1])
    views = torch.stack([
        (positions < 4) | ((positions >= 10) & (positions < 12)),
        (positions < 7) | ((positions >= 12) & (positions < 15)),
        positions < 5,
        positions < 10,
    ])[None]  # (1, 4, L)
    with torch.no_grad():
        packed = model.encode_dialogues(row, mask, round_token_mask=views)
        for k, ids in enumerate(alone):
            reference = model.encode_dialogues(ids[None], torch.ones_like(ids[None]))
            torch.testing.assert_close(packed.text_embeds[0, k], reference.text_embeds[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.text_attribute_embeds[0, k], reference.text_attribute_embeds[0], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"round_token_mask\[0, 1\] is empty or marks padding"):
            model.encode_dialogues(row, mask, round_token_mask=torch.stack([views[0, 0], positions >= 14])[None])
        attention = model.text_model.config._attn_implementation
        model.text_model.config._attn_implementation = "flash_attention_2"  # only read, never run: no GPU needed
        try:
            with pytest.raises(ValueError, match="FlashAttention"):
                model.encode_dialogues(row, mask, round_token_mask=views)
        finally:
            model.text_model.config._attn_implementation = attention


def test_round_end_outside_the_dialogue_is_an_error(model, inputs):
    with pytest.raises(ValueError, match=r"round_end_positions\[2, 1\]"):
        model.encode_dialogues(inputs.input_ids, inputs.attention_mask, round_end_positions=torch.tensor([[1, 2], [1, 2], [1, 6]]))
    with pytest.raises(ValueError, match=r"round_end_positions\[0, 1\]"):
        model.get_text_features(inputs.input_ids, inputs.attention_mask, round_end_positions=torch.tensor([[1, 9], [1, 2], [1, 2]]))


@pytest.mark.parametrize("reduction", ["mean", "max", "neg_logsumexp"])
def test_similarity_modes(inputs, reduction):
    torch.manual_seed(1)
    model = DiaNAModel(tiny_config(attribute_reduction=reduction)).eval()
    with torch.no_grad():
        images = model.encode_images(inputs.pixel_values[:2])
        texts = model.encode_dialogues(inputs.input_ids, inputs.attention_mask)
    t, ta, i, ia = texts.text_embeds, texts.text_attribute_embeds, images.image_embeds, images.image_attribute_embeds
    glob = model.similarity(t, i)
    assert glob.shape == (3, 2)
    torch.testing.assert_close(glob, F.cosine_similarity(t[:, None], i[None], dim=-1))
    attr = model.similarity(t, i, ta, ia, mode="attribute")
    torch.testing.assert_close(attr.double(), slow_attribute_similarity(ta, ia, reduction), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.similarity(t, i, ta, ia, mode="fused"), glob + attr)
    with pytest.raises(ValueError, match="needs text_attribute_embeds"):
        model.similarity(t, i, mode="attribute")
    with pytest.raises(ValueError, match="Unknown similarity mode"):
        model.similarity(t, i, ta, ia, mode="sum")


@pytest.mark.parametrize("use_sdm,use_refiner", [(True, True), (False, True), (True, False)])
def test_forward_loss_matches_reference(inputs, use_sdm, use_refiner):
    torch.manual_seed(2)
    model = DiaNAModel(tiny_config(use_sdm_loss=use_sdm, use_refiner_loss=use_refiner, attribute_reduction="logsumexp"))
    person_ids = torch.tensor([4, 9, 4])  # two positives for person 4
    out = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, person_ids=person_ids)
    assert isinstance(out, DiaNAOutput)
    ref = slow_diana_losses(out.text_embeds.detach(), out.image_embeds.detach(), out.text_attribute_embeds.detach(),
                            out.image_attribute_embeds.detach(), person_ids, float(out.logit_scale), "logsumexp", use_sdm, use_refiner)
    for key in ("loss", "itc_loss", "sdm_loss", "refiner_loss"):
        value = getattr(out, key)
        assert (value is None) == (ref[key] is None), key
        if value is not None:
            assert float(value.detach()) == pytest.approx(ref[key], rel=1e-5), key
    torch.testing.assert_close(out.logits_per_text, out.logit_scale * out.text_embeds @ out.image_embeds.t())
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.t())
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.text_projection.weight.grad.abs().sum() > 0
    assert (model.refiner.attribute_queries.grad is not None) == use_refiner


def test_loss_only_when_asked(model, inputs):
    with torch.no_grad():
        plain = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask)
        forced = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, return_loss=True)
        suppressed = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, person_ids=torch.arange(3), return_loss=False)
        distinct = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, person_ids=torch.tensor([7, 8, 9]))
    assert plain.loss is None and suppressed.loss is None
    # Without person ids every pair is its own person.
    torch.testing.assert_close(forced.loss, distinct.loss)


def test_logit_scale_is_clamped(inputs):
    model = DiaNAModel(tiny_config()).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
        out = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask)
    assert float(out.logit_scale) == pytest.approx(100.0)


def test_save_and_load_keep_outputs_and_write_safetensors_only(model, inputs, tmp_path):
    model.save_pretrained(tmp_path)
    weight_files = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    assert weight_files == ["model.safetensors"]
    loaded = DiaNAModel.from_pretrained(tmp_path).eval()
    # Loaded weights must not be re-initialised by `_init_weights` (refiner queries and logit scale included).
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        a = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, return_loss=True)
        b = loaded(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, return_loss=True)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.text_attribute_embeds, b.text_attribute_embeds, rtol=0, atol=1e-6)
    # The attention implementation is chosen per tower (Swinv2 has eager only); eager Llama = SDPA Llama.
    eager = DiaNAModel.from_pretrained(tmp_path, attn_implementation={"text_config": "eager", "vision_config": "eager"}).eval()
    assert eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        c = eager(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, return_loss=True)
    torch.testing.assert_close(c.text_embeds, a.text_embeds, rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_finite(inputs):
    torch.manual_seed(3)
    model = DiaNAModel(tiny_config()).to(torch.bfloat16)
    out = model(inputs.pixel_values.to(torch.bfloat16), inputs.input_ids, inputs.attention_mask, person_ids=torch.tensor([0, 1, 0]))
    assert out.text_embeds.dtype == torch.bfloat16
    for key in ("loss", "itc_loss", "sdm_loss", "refiner_loss", "logits_per_text", "text_attribute_embeds", "image_attribute_embeds"):
        assert torch.isfinite(getattr(out, key)).all(), key
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_activation_checkpointing_gives_the_same_gradients(inputs):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(4)
        model = DiaNAModel(tiny_config()).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
            assert model.vision_model.encoder.layers[0].gradient_checkpointing
            assert model.text_model.layers[0].gradient_checkpointing
        out = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, person_ids=torch.tensor([0, 1, 0]))
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_from_vision_text_pretrained_loads_both_towers(tmp_path, inputs, caplog):
    torch.manual_seed(5)
    classifier = Swinv2ForImageClassification(tiny_vision_config(num_labels=5))  # keys under `swinv2.`, like the 22k release
    causal_lm = LlamaForCausalLM(tiny_text_config())
    classifier.save_pretrained(tmp_path / "swinv2")
    causal_lm.save_pretrained(tmp_path / "llama")  # keys under `model.`, plus an lm_head

    model = DiaNAModel.from_vision_text_pretrained(
        str(tmp_path / "swinv2"), str(tmp_path / "llama"),
        vision_drop_path_rate=0.0, text_rms_norm_eps=1e-3,  # routed to the towers
        projection_dim=20, num_attribute_queries=2, refiner_num_heads=5,  # routed to DiaNAConfig
    )
    assert model.config.text_config.rms_norm_eps == 1e-3 and model.config.vision_config.drop_path_rate == 0.0
    assert model.config.projection_dim == 20 and model.refiner.attribute_queries.shape == (1, 2, 20)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "eager"
    for name, value in classifier.swinv2.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], value), name
    for name, value in causal_lm.model.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.isfinite(model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, return_loss=True).loss)

    # A convolutional stem cannot come from the checkpoint: new stem, the rest of the tower loaded, said in the log.
    with caplog.at_level(logging.WARNING):
        conv = DiaNAModel.from_vision_text_pretrained(str(tmp_path / "swinv2"), str(tmp_path / "llama"), vision_stem="conv",
                                                      projection_dim=20, num_attribute_queries=2, refiner_num_heads=5)
    assert "randomly initialised convolutional stem" in caplog.text
    assert isinstance(conv.vision_model.embeddings.patch_embeddings.projection, DiaNAConvStem)
    for name, value in classifier.swinv2.state_dict().items():
        if "patch_embeddings.projection" not in name:
            assert torch.equal(conv.vision_model.state_dict()[name], value), name
