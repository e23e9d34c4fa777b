"""PyTorch DiaNA: a Swinv2 image tower and a Llama dialogue tower projected into one joint space, plus an
attribute refiner shared by both modalities (Bai et al., CVPR 2025).

This file travels with the weights (trust_remote_code): it imports only torch, transformers and its
siblings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .configuration_diana import SCORE_MODES, DiaNAConfig
from .loss_diana import attribute_similarity, diana_loss, gather_no_grad, gather_with_grad

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------- outputs
@dataclass
class DiaNAOutput(ModelOutput):
    """Output of [`DiaNAModel.forward`].

    Args:
        loss: Total training loss (sum of the terms below that are on); only with `person_ids` / `return_loss`.
        itc_loss: Multi-positive image-text contrastive loss on the global vectors.
        sdm_loss: SDM loss on the global vectors (None when `config.use_sdm_loss` is off).
        refiner_loss: ITC (+ SDM) on the attribute similarity (None when `config.use_refiner_loss` is off).
        logits_per_text: (T, I) scaled cosine similarities of the local batch, dialogues x images.
        logits_per_image: (I, T) its transpose.
        text_embeds: (T, D) L2-normalised dialogue vectors.
        image_embeds: (I, D) L2-normalised image vectors.
        text_attribute_embeds: (T, K, D) refiner output for the dialogues, L2-normalised per slot.
        image_attribute_embeds: (I, K, D) refiner output for the images, L2-normalised per slot.
        logit_scale: The inverse temperature used, exp(logit_scale) clamped at `config.logit_scale_max`.
    """

    loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    sdm_loss: torch.FloatTensor | None = None
    refiner_loss: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_attribute_embeds: torch.FloatTensor | None = None
    image_attribute_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None


@dataclass
class DiaNAImageEncoding(ModelOutput):
    """What retrieval indexes for a gallery image (one tower pass).

    Args:
        image_embeds: (B, D) L2-normalised global vectors.
        image_attribute_embeds: (B, K, D) refiner slots, L2-normalised per slot.
    """

    image_embeds: torch.FloatTensor | None = None
    image_attribute_embeds: torch.FloatTensor | None = None


@dataclass
class DiaNATextEncoding(ModelOutput):
    """What retrieval scores for a dialogue query (one tower pass, every round when round ends are given).

    Args:
        text_embeds: (B, D), or (B, R, D) per round prefix, L2-normalised.
        text_attribute_embeds: (B, K, D), or (B, R, K, D) per round prefix, L2-normalised per slot (None when
            `encode_text_tokens` was asked for no attributes).
    """

    text_embeds: torch.FloatTensor | None = None
    text_attribute_embeds: torch.FloatTensor | None = None


# --------------------------------------------------------------------------------------------- refiner
class DiaNARefinerAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (bias), no dropout.

    The official checkpoint stores it as `torch.nn.MultiheadAttention` (`in_proj_weight` = q, k, v stacked);
    the converter splits that into the three projections.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (B, H, N, Dh)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attends `queries` (B or 1, Q, D) to `keys` (B, N, D), which are also the values.

        Args:
            attention_mask: bool (B, 1 or Q, N), True = may attend; None = every key.

        Returns:
            (B, Q, D).
        """
        batch = keys.shape[0]
        q = self._heads(self.q_proj(queries)).expand(batch, -1, -1, -1)  # (B, H, Q, Dh)
        k = self._heads(self.k_proj(keys))  # (B, H, N, Dh)
        v = self._heads(self.v_proj(keys))
        mask = attention_mask[:, None] if attention_mask is not None else None  # (B, 1, Q|1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, Dh)
        out = out.transpose(1, 2).reshape(batch, q.shape[2], self.num_heads * self.head_dim)  # (B, Q, D)
        return self.out_proj(out)


class DiaNARefinerMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        # QuickGELU x * sigmoid(1.702 x): what the released refiner was trained with (CLIP's resblocks).
        self.activation_fn = ACT2FN["quick_gelu"]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class DiaNARefinerLayer(nn.Module):
    """Pre-LN transformer block: x + SelfAttn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: DiaNAConfig):
        super().__init__()
        dim = config.projection_dim
        self.layer_norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = DiaNARefinerAttention(dim, config.refiner_num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = DiaNARefinerMLP(dim, int(dim * config.refiner_mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.layer_norm1(hidden_states)
        hidden_states = hidden_states + self.self_attn(normed, normed)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class DiaNAAttributeRefiner(nn.Module):
    """K learnable attribute queries cross-attend to one tower's projected dense tokens (no residual, no
    norm), then pass through pre-LN blocks. Shared by both modalities, queries included."""

    def __init__(self, config: DiaNAConfig):
        super().__init__()
        self.attribute_queries = nn.Parameter(torch.empty(1, config.num_attribute_queries, config.projection_dim))
        self.cross_attention = DiaNARefinerAttention(config.projection_dim, config.refiner_num_heads)
        self.layers = nn.ModuleList([DiaNARefinerLayer(config) for _ in range(config.refiner_num_layers)])

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Refines projected tokens into attribute slots.

        Args:
            hidden_states: (B, N, D) projected dense tokens of one tower.
            key_mask: None (every token), (B, N), or (B, M, N) for M views of the same tokens, e.g. one per
                dialogue round prefix; nonzero = the token may be attended to.

        Returns:
            (B, K, D), or (B, M, K, D) with a 3-d `key_mask`.
        """
        batch, _, dim = hidden_states.shape
        num_queries = self.attribute_queries.shape[1]
        queries = self.attribute_queries.to(hidden_states.dtype)
        if key_mask is None or key_mask.dim() == 2:
            mask = key_mask.bool()[:, None, :] if key_mask is not None else None  # (B, 1, N)
            slots = self.cross_attention(queries, hidden_states, mask)  # (B, K, D)
            num_views = None
        else:
            # M views share the keys: project them once and stack the views along the query axis, so
            # query row m*K + k sees view m's mask. (B, M, N) -> (B, M*K, N); queries (1, M*K, D).
            num_views = key_mask.shape[1]
            mask = key_mask.bool().repeat_interleave(num_queries, dim=1)
            slots = self.cross_attention(queries.repeat(1, num_views, 1), hidden_states, mask)  # (B, M*K, D)
            slots = slots.reshape(batch * num_views, num_queries, dim)  # (B*M, K, D)
        for layer in self.layers:
            slots = layer(slots)
        if num_views is not None:
            slots = slots.view(batch, num_views, num_queries, dim)  # (B, M, K, D)
        return slots


# --------------------------------------------------------------------------------------------- image stem
class DiaNAConvStem(nn.Module):
    """`vision_stem="conv"`: replaces the Swinv2 patch embedding's one 4x4 stride-4 convolution with two 3x3
    stride-2 convolutions (GroupNorm, GELU) and a 1x1 projection, same output grid and width (Xiao et al. 2021).

    A patch embedding sees each 4x4 cell alone, so an edge or a thin stripe across two cells is only seen by
    the attention blocks after it; overlapping 3x3 windows see it first. From scratch on SynthPedes the tower
    then learnt hair colour 0.81 -> 0.93, hair length 0.63 -> 0.79 and sleeves 0.79 -> 0.89 in the same
    2,400 pretraining steps (RESULTS.md, why the convolutional stem). GroupNorm(1, C) rather than BatchNorm:
    no running statistics, so it behaves the same in training, evaluation and across processes.
    """

    def __init__(self, num_channels: int, embed_dim: int):
        super().__init__()
        hidden = max(1, embed_dim // 2)
        self.conv1 = nn.Conv2d(num_channels, hidden, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(1, hidden)
        self.conv2 = nn.Conv2d(hidden, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(1, embed_dim)
        self.proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.norm1(self.conv1(pixel_values)))
        hidden = F.gelu(self.norm2(self.conv2(hidden)))
        return self.proj(hidden)


# --------------------------------------------------------------------------------------------- models
class DiaNAPreTrainedModel(PreTrainedModel):
    config: DiaNAConfig
    config_class = DiaNAConfig
    base_model_prefix = "diana"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # SDPA / FlashAttention reach the Llama tower only; Swinv2 has eager attention alone, so pick per tower:
    # attn_implementation={"text_config": "sdpa", "vision_config": "eager"}.
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["DiaNAAttributeRefiner"]

    def _init_weights(self, module: nn.Module) -> None:
        # The towers are PreTrainedModels and get their own `_init_weights`; this covers DiaNA's own modules.
        # `transformers.initialization` functions skip parameters that were loaded from a checkpoint.
        # Standard deviations scale with the width (CLIP's projections, the IRRA / CLIP cross-modal
        # transformer for the refiner): a fixed 0.02 is right at D = 768 but leaves a narrow refiner's
        # slots at ~1e-3, and LayerNorm / L2 normalisation of such vectors gave gradient norms of
        # 1e14 at D = 24.
        factor = self.config.initializer_factor
        dim = self.config.projection_dim
        attn_std = factor * dim**-0.5
        proj_std = factor * dim**-0.5 * (2 * max(1, self.config.refiner_num_layers)) ** -0.5
        fc_std = factor * (2 * dim) ** -0.5
        if isinstance(module, DiaNAModel):
            init.constant_(module.logit_scale, math.log(self.config.logit_scale_init_value))
            for projection in (module.visual_projection, module.text_projection):
                init.normal_(projection.weight, mean=0.0, std=factor * projection.in_features**-0.5)
                init.zeros_(projection.bias)
            # A from-scratch Swinv2 zeroes its patch-embedding bias, so a patch that random erasing filled with
            # the mean (0 after normalisation) embeds to the zero vector. Its LayerNorm then has zero variance
            # and scales the gradient by 1/sqrt(eps) = 316 at every norm it meets: 1e16 gradients at step 0,
            # which global clipping turns into almost no update for every other weight. PyTorch's default
            # conv bias (what a pretrained tower also has: non-zero) keeps that vector off zero. Runs after the
            # towers' own init (children first); skipped for weights loaded from a checkpoint.
            patch = getattr(module.vision_model.get_input_embeddings(), "projection", None)
            if isinstance(patch, nn.Conv2d) and patch.bias is not None:
                bound = patch.weight[0].numel() ** -0.5
                init.uniform_(patch.bias, -bound, bound)
            elif isinstance(patch, DiaNAConvStem):
                # PyTorch's own convolution init (what the stem was measured with): the tower's 0.02 normal
                # would make these norm-followed, scale-invariant weights take 10x larger relative steps.
                for conv in (patch.conv1, patch.conv2, patch.proj):
                    bound = conv.weight[0].numel() ** -0.5
                    init.uniform_(conv.weight, -bound, bound)
                    init.uniform_(conv.bias, -bound, bound)
                for norm in (patch.norm1, patch.norm2):
                    init.ones_(norm.weight)
                    init.zeros_(norm.bias)
        elif isinstance(module, DiaNAAttributeRefiner):
            # transformers calls this only for modules that own parameters, so the refiner (which owns
            # the queries) initialises its parameter-less attention / MLP wrappers itself.
            init.normal_(module.attribute_queries, mean=0.0, std=attn_std)
            for sub in module.modules():
                if isinstance(sub, DiaNARefinerAttention):
                    for projection in (sub.q_proj, sub.k_proj, sub.v_proj):
                        init.normal_(projection.weight, mean=0.0, std=attn_std)
                        init.zeros_(projection.bias)
                    init.normal_(sub.out_proj.weight, mean=0.0, std=proj_std)
                    init.zeros_(sub.out_proj.bias)
                elif isinstance(sub, DiaNARefinerMLP):
                    init.normal_(sub.fc1.weight, mean=0.0, std=fc_std)
                    init.zeros_(sub.fc1.bias)
                    init.normal_(sub.fc2.weight, mean=0.0, std=proj_std)
                    init.zeros_(sub.fc2.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _last_token_index(token_mask: torch.Tensor) -> torch.Tensor:
    """Index (...,) of the last selected token of every row of a (..., L) mask.

    `attention_mask.sum(1) - 1` (the official pooling) is only right for right padding; a Llama tokenizer
    pads on the LEFT by default, where that index would land on a pad. The largest selected position is
    right for either side, for a mask with holes and for a packed round view (`round_attention_mask`).
    """
    positions = torch.arange(token_mask.shape[-1], device=token_mask.device)  # (L,)
    return (token_mask.long() * positions).argmax(dim=-1)


def pool_text_tokens(tokens: torch.Tensor, token_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pools dialogue token states into dialogue vectors (`DiaNAConfig.text_pooling`).

    Args:
        tokens: (B, L, H) token states.
        token_mask: (B, L) or (B, R, L) bool, the tokens each dialogue is made of (attended tokens, BOS and
            system prompt included; one view per round prefix for a 3-d mask).
        pooling: "last" (the state of the last selected token: the tower is causal, so it saw the whole
            view) or "mean" (the mean of the selected tokens' states).

    Returns:
        (B, H), or (B, R, H) for a 3-d mask.
    """
    views = token_mask.bool() if token_mask.dim() == 3 else token_mask.bool()[:, None, :]  # (B, R, L)
    if pooling == "mean":
        # Summed in float32 (a bf16 sum over hundreds of tokens loses the late rounds).
        weights = views.float()
        sums = torch.bmm(weights, tokens.float())  # (B, R, H)
        pooled = (sums / weights.sum(-1, keepdim=True).clamp(min=1)).to(tokens.dtype)
    elif pooling == "last":
        index = _last_token_index(views)[..., None].expand(-1, -1, tokens.shape[-1])  # (B, R, H)
        pooled = tokens.gather(1, index)
    else:
        raise ValueError(f"Unknown text pooling {pooling!r}; expected 'last' or 'mean'.")
    return pooled if token_mask.dim() == 3 else pooled[:, 0]


def prefix_token_mask(attention_mask: torch.Tensor, round_end_positions: torch.Tensor) -> torch.Tensor:
    """(B, R, L) bool: round r's prefix is every attended token up to its end position."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask.bool()[:, None, :] & (positions[None, None, :] <= round_end_positions[..., None])


def round_attention_mask(round_token_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool tower mask of rows that pack several dialogues sharing a head (tree attention).

    Token i may see token j iff j <= i, j is attended, and j belongs to every view (round prefix) that i
    belongs to. For a dialogue packed with the differing last tokens of its prefixes, a shared token sees
    the causal past of the whole dialogue and a prefix's own token sees the shared head up to where the
    prefix leaves it plus its own earlier tokens, so each view's states equal those of the view alone.
    Every token sees itself (padding included, which keeps its softmax finite).
    """
    views = (round_token_mask.bool() & attention_mask.bool()[:, None, :]).float()  # (B, R, L)
    shared = torch.bmm(views.transpose(1, 2), views)  # (B, L, L): views holding both i and j
    own = views.sum(1)  # (B, L): views holding i
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = (shared == own[:, :, None]) & causal & attention_mask.bool()[:, None, :]
    return allowed | torch.eye(length, dtype=torch.bool, device=attention_mask.device)


class DiaNAModel(DiaNAPreTrainedModel):
    """DiaNA dual encoder: `vision_model` (Swinv2Model), `text_model` (LlamaModel), `visual_projection`,
    `text_projection`, the attribute `refiner` and one learnable `logit_scale` (log of the inverse temperature).
    """

    def __init__(
        self,
        config: DiaNAConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        # Built from the sub-configs only; pretrained towers come in through `from_vision_text_pretrained`.
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        if config.vision_stem == "conv":
            # Rebuilt from the config on every construction, so a saved folder loads into the same modules;
            # Swinv2PatchEmbeddings pads the pixels to a multiple of 4 before calling it, as before.
            patches = self.vision_model.embeddings.patch_embeddings
            if vision_model is not None:
                logger.warning(
                    "vision_stem='conv': the given image tower's patch embedding is replaced by a new, randomly "
                    "initialised convolutional stem; the rest of the tower keeps its weights."
                )
            patches.projection = DiaNAConvStem(config.vision_config.num_channels, config.vision_config.embed_dim)
        self.text_model = text_model if text_model is not None else AutoModel.from_config(config.text_config)
        # One config object per tower, shared with the composite, so edits (attn implementation, pad ids the
        # Trainer rewrites) stay in sync.
        self.config.vision_config = self.vision_model.config
        self.config.text_config = self.text_model.config
        for tower in (self.vision_model, self.text_model):
            if tower.config._attn_implementation is None:
                # Building a DiaNAConfig around existing tower configs resets their attention implementation;
                # give a passed-in tower back its own default (SDPA for Llama, eager for Swinv2).
                tower.config._attn_implementation = tower.get_correct_attn_implementation(None)

        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim)
        self.refiner = DiaNAAttributeRefiner(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init_value)))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def enable_input_require_grads(self) -> None:
        """Makes both towers' embedding outputs require grad (activation checkpointing, adapters).

        The inherited version hooks every sub-model's `get_input_embeddings()` and calls `.requires_grad_` on its
        output, but Swinv2's patch embeddings return a tuple (embeddings, output size), which crashes it.
        """

        def make_output_require_grad(module: nn.Module, args: tuple, output) -> None:
            (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hooks = [
            tower.get_input_embeddings().register_forward_hook(make_output_require_grad)
            for tower in (self.text_model, self.vision_model)
        ]
        self._require_grads_hook = self._require_grads_hooks[0]

    # ---- towers
    def _image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the projected pooled vector (B, D) and projected final tokens (B, N, D)."""
        out = self.vision_model(pixel_values=pixel_values)
        # Swinv2's pooler = mean of the final tokens after the final LayerNorm; the same projection is applied
        # to the pooled vector and to every token (linear, so pooled == mean of projected tokens).
        return self.visual_projection(out.pooler_output), self.visual_projection(out.last_hidden_state)

    def _text_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        round_token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the Llama final hidden states (B, L, H) (after the final RMSNorm) and the mask (B, L).

        With `round_token_mask` (B, R, L) the row holds several dialogues that share a head (see
        `round_attention_mask`): the tower gets the matching 4-d mask and positions instead of the causal ones.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if round_token_mask is not None:
            self._check_round_token_mask(round_token_mask, attention_mask)
            if "flash" in str(self.text_model.config._attn_implementation):
                raise ValueError(
                    "round_token_mask needs a 4-d attention mask, which FlashAttention does not take: load the text "
                    "tower with attn_implementation 'sdpa' or 'eager'."
                )
            allowed = round_attention_mask(round_token_mask, attention_mask)  # (B, L, L)
            # Position of a token = how many tokens it sees, itself included, minus one.
            position_ids = allowed.sum(-1) - 1
            dtype = self.text_model.get_input_embeddings().weight.dtype
            tower_mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            tower_mask = tower_mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, L, L) additive
        else:
            # Positions counted over attended tokens only, so a left-padded row gets the same RoPE positions as
            # its right-padded twin (0 at its BOS); for right padding this equals the default positions.
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, L)
            tower_mask = attention_mask
        out = self.text_model(
            input_ids=input_ids, attention_mask=tower_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state, attention_mask

    @staticmethod
    def _check_round_ends(round_end_positions: torch.Tensor, attention_mask: torch.Tensor) -> None:
        # Host check on purpose: a bad index would silently pool a pad or wrap around.
        if round_end_positions.dim() != 2 or round_end_positions.shape[0] != attention_mask.shape[0]:
            raise ValueError(
                f"round_end_positions must be (B, R) with B = {attention_mask.shape[0]}, got {tuple(round_end_positions.shape)}."
            )
        length = attention_mask.shape[1]
        bad = (round_end_positions < 0) | (round_end_positions >= length)
        if not bad.any():
            bad = attention_mask.gather(1, round_end_positions.long()) == 0
        if bad.any():
            row, rnd = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"round_end_positions[{row}, {rnd}] = {int(round_end_positions[row, rnd])} is not an attended "
                f"token index of dialogue {row} (sequence length {length})."
            )

    @staticmethod
    def _check_round_token_mask(round_token_mask: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if round_token_mask.dim() != 3 or round_token_mask.shape[0] != attention_mask.shape[0] or (
            round_token_mask.shape[2] != attention_mask.shape[1]
        ):
            raise ValueError(
                f"round_token_mask must be (B, R, L) with (B, L) = {tuple(attention_mask.shape)}, got "
                f"{tuple(round_token_mask.shape)}."
            )
        bad = ~(round_token_mask.bool() & attention_mask.bool()[:, None, :]).any(-1)  # (B, R) empty views
        bad |= (round_token_mask.bool() & ~attention_mask.bool()[:, None, :]).any(-1)  # views holding padding
        if bad.any():
            row, rnd = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"round_token_mask[{row}, {rnd}] is empty or marks padding of dialogue {row}: every round "
                "must select at least one attended token and no padding."
            )

    def _text_views(
        self,
        attention_mask: torch.Tensor,
        round_end_positions: torch.Tensor | None,
        round_token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The tokens each pooled dialogue is made of: (B, L), or (B, R, L) one view per round prefix.
        A `round_token_mask` was checked by `_text_hidden`."""
        if round_token_mask is not None:
            return round_token_mask.bool()
        if round_end_positions is None:
            return attention_mask.bool()
        self._check_round_ends(round_end_positions, attention_mask)
        return prefix_token_mask(attention_mask, round_end_positions)

    # ---- public features (raw, not normalised)
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected pooled image vectors (B, D), not normalised."""
        pooled, _ = self._image_tokens(pixel_values)
        return pooled

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        round_end_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected dialogue vectors, not normalised.

        Args:
            input_ids: (B, L) token ids (either padding side).
            attention_mask: (B, L), 1 for tokens, 0 for padding.
            round_end_positions: optional (B, R) index of the last token of every round prefix.

        Returns:
            (B, D) pooled as `config.text_pooling` says (the last attended token, or the mean of the attended
            tokens), or (B, R, D) one per round prefix from one tower pass.
        """
        hidden, attention_mask = self._text_hidden(input_ids, attention_mask)
        views = self._text_views(attention_mask, round_end_positions)
        return self.text_projection(pool_text_tokens(hidden, views, self.config.text_pooling))

    def get_image_attribute_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Refiner slots (B, K, D) of the images, not normalised."""
        _, tokens = self._image_tokens(pixel_values)
        return self.refiner(tokens)

    def get_text_attribute_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        round_end_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Refiner slots of the dialogues, not normalised: (B, K, D), or (B, R, K, D) per round prefix."""
        hidden, attention_mask = self._text_hidden(input_ids, attention_mask)
        return self.refiner(self.text_projection(hidden), self._text_views(attention_mask, round_end_positions))

    # ---- retrieval encodings (normalised)
    def encode_images(self, pixel_values: torch.Tensor) -> DiaNAImageEncoding:
        """One tower pass: L2-normalised global vectors (B, D) and attribute slots (B, K, D)."""
        pooled, tokens = self._image_tokens(pixel_values)
        return DiaNAImageEncoding(
            image_embeds=F.normalize(pooled, dim=-1), image_attribute_embeds=F.normalize(self.refiner(tokens), dim=-1)
        )

    def encode_dialogues(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        round_end_positions: torch.Tensor | None = None,
        round_token_mask: torch.Tensor | None = None,
    ) -> DiaNATextEncoding:
        """One tower pass: L2-normalised dialogue vectors (B, [R,] D) and attribute slots (B, [R,] K, D).

        Args:
            input_ids: (B, L) token ids (either padding side).
            attention_mask: (B, L), 1 for tokens, 0 for padding.
            round_end_positions: optional (B, R) index of the last token of every round prefix, when every
                prefix's ids are a prefix of the row.
            round_token_mask: optional (B, R, L) bool, which tokens of the row make round r's prefix, for rows
                that pack a dialogue with the differing last tokens of its shorter prefixes (the processor's
                official tokenisation); the tower then runs with `round_attention_mask`. Not for
                FlashAttention, which takes no 4-d mask.
        """
        hidden, attention_mask = self._text_hidden(input_ids, attention_mask, round_token_mask)
        views = self._text_views(attention_mask, round_end_positions, round_token_mask)
        # Projecting before pooling is the same (linear).
        return self.encode_text_tokens(self.text_projection(hidden), views)

    def encode_text_tokens(
        self, tokens: torch.Tensor, token_mask: torch.Tensor, with_attributes: bool = True
    ) -> DiaNATextEncoding:
        """Retrieval encodings of dialogues from their projected tower states: THE pooling of the model,
        shared by `encode_dialogues` and callers that run the tower themselves (e.g. with a key/value cache).

        Args:
            tokens: (B, L, D) `text_projection` of the tower's final hidden states.
            token_mask: (B, L) or (B, R, L) bool, the tokens each dialogue (round prefix) is made of.
            with_attributes: Also run the refiner (the "attribute" / "fused" scores need it).

        Returns:
            L2-normalised `text_embeds` (B, [R,] D) and `text_attribute_embeds` (B, [R,] K, D) or None.
        """
        pooled = pool_text_tokens(tokens, token_mask, self.config.text_pooling)
        attributes = F.normalize(self.refiner(tokens, token_mask), dim=-1) if with_attributes else None
        return DiaNATextEncoding(text_embeds=F.normalize(pooled, dim=-1), text_attribute_embeds=attributes)

    def similarity(
        self,
        text_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        text_attribute_embeds: torch.Tensor | None = None,
        image_attribute_embeds: torch.Tensor | None = None,
        mode: str | None = None,
    ) -> torch.Tensor:
        """Retrieval scores (T, G) from normalised encodings (no temperature).

        Args:
            mode: "global" (cosine of the global vectors), "attribute" (refiner similarity reduced with
                `config.attribute_reduction`) or "fused" (their sum); None = `config.score_mode`.
        """
        mode = mode or self.config.score_mode
        if mode not in SCORE_MODES:
            raise ValueError(f"Unknown similarity mode {mode!r}; expected one of {SCORE_MODES}.")
        scores = None
        if mode in ("global", "fused"):
            scores = text_embeds @ image_embeds.t()
        if mode in ("attribute", "fused"):
            if text_attribute_embeds is None or image_attribute_embeds is None:
                raise ValueError(f"similarity(mode={mode!r}) needs text_attribute_embeds and image_attribute_embeds.")
            attr = attribute_similarity(text_attribute_embeds, image_attribute_embeds, self.config.attribute_reduction)
            scores = attr if scores is None else scores + attr
        return scores

    def get_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at `config.logit_scale_max` (clamped in log space, as the official model)."""
        return self.logit_scale.clamp(max=math.log(self.config.logit_scale_max)).exp()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        person_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
    ) -> DiaNAOutput:
        """Encodes a batch of (image, dialogue) pairs and, with `person_ids` or `return_loss=True`, the losses.

        Args:
            pixel_values: (B, 3, H, W).
            input_ids: (B, L) dialogue tokens; `attention_mask` (B, L).
            person_ids: (B,) identity of each pair; every pair of the same person (across processes too) is a
                positive. Without them, `return_loss=True` treats each pair as its own person.
            return_loss: Force (True) or suppress (False) the loss; None = loss iff `person_ids` is given.
        """
        pooled_image, image_tokens = self._image_tokens(pixel_values)
        hidden, attention_mask = self._text_hidden(input_ids, attention_mask)
        text = self.encode_text_tokens(self.text_projection(hidden), attention_mask.bool())  # from (B, L, D)

        image_embeds = F.normalize(pooled_image, dim=-1)
        text_embeds = text.text_embeds
        image_attribute_embeds = F.normalize(self.refiner(image_tokens), dim=-1)
        text_attribute_embeds = text.text_attribute_embeds

        logit_scale = self.get_logit_scale()
        logits_per_text = logit_scale * text_embeds @ image_embeds.t()  # (T, I)

        losses: dict[str, torch.Tensor | None] = {"loss": None, "itc_loss": None, "sdm_loss": None, "refiner_loss": None}
        if return_loss is None:
            return_loss = person_ids is not None
        if return_loss:
            if person_ids is None:
                # Each pair is its own person; offset by rank so ids stay distinct after the gather.
                distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
                rank = torch.distributed.get_rank() if distributed else 0
                person_ids = torch.arange(input_ids.shape[0], device=input_ids.device) + rank * input_ids.shape[0]
            ids = gather_no_grad(person_ids.to(text_embeds.device))
            losses = diana_loss(
                gather_with_grad(text_embeds),
                gather_with_grad(image_embeds),
                ids,
                ids,
                logit_scale,
                gather_with_grad(text_attribute_embeds),
                gather_with_grad(image_attribute_embeds),
                attribute_reduction=self.config.attribute_reduction,
                use_sdm_loss=self.config.use_sdm_loss,
                use_refiner_loss=self.config.use_refiner_loss,
                sdm_epsilon=self.config.sdm_epsilon,
            )

        return DiaNAOutput(
            **losses,
            logits_per_text=logits_per_text,
            logits_per_image=logits_per_text.t(),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_attribute_embeds=text_attribute_embeds,
            image_attribute_embeds=image_attribute_embeds,
            logit_scale=logit_scale,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_path: str, text_path: str, **kwargs
    ) -> "DiaNAModel":
        """Assembles DiaNA from a local Swinv2 checkpoint and a local Llama checkpoint (`LlamaModel` or
        `LlamaForCausalLM`, whose `model.` prefix is dropped); projections, refiner and temperature are new.

        Args:
            vision_path: Folder of a Swinv2 checkpoint (any Swinv2 head; the backbone is kept).
            text_path: Folder of a Llama checkpoint.
            kwargs: `DiaNAConfig` fields (`projection_dim`, `num_attribute_queries`, `vision_stem`, ...); other
                `vision_*` go to the vision tower's `from_pretrained` (e.g. `vision_image_size=[384, 192]` is a
                config override there), `text_*` to the text tower's; `dtype` to both.
        """
        # DiaNAConfig's own fields first: `vision_stem` is one, not a tower override.
        fields = set(DiaNAConfig.__dataclass_fields__) - {"vision_config", "text_config"}
        config_kwargs = {k: v for k, v in kwargs.items() if k in fields or not k.startswith(("vision_", "text_"))}
        vision_kwargs = {k[len("vision_"):]: v for k, v in kwargs.items() if k.startswith("vision_") and k not in fields}
        text_kwargs = {k[len("text_"):]: v for k, v in kwargs.items() if k.startswith("text_") and k not in fields}
        dtype = config_kwargs.pop("dtype", None)
        if dtype is not None:
            vision_kwargs.setdefault("dtype", dtype)
            text_kwargs.setdefault("dtype", dtype)
        # AutoModel maps a task-head checkpoint (Swinv2ForImageClassification, LlamaForCausalLM) onto the bare
        # backbone by dropping its base-model prefix.
        vision_model = AutoModel.from_pretrained(vision_path, **vision_kwargs)
        text_model = AutoModel.from_pretrained(text_path, **text_kwargs)
        if hasattr(text_model, "get_decoder") and text_model.__class__.__name__.endswith("ForCausalLM"):
            text_model = text_model.get_decoder()
        config = DiaNAConfig(vision_config=vision_model.config, text_config=text_model.config, **config_kwargs)
        model = cls(config, vision_model=vision_model, text_model=text_model)
        if dtype is not None:
            model = model.to(dtype)
        return model


DiaNAConfig.register_for_auto_class()
DiaNAModel.register_for_auto_class("AutoModel")

__all__ = [
    "DiaNAAttributeRefiner",
    "DiaNAConvStem",
    "DiaNAImageEncoding",
    "DiaNAModel",
    "DiaNAOutput",
    "DiaNAPreTrainedModel",
    "DiaNATextEncoding",
    "pool_text_tokens",
    "prefix_token_mask",
    "round_attention_mask",
]
