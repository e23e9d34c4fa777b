"""Convert an official DiaNA checkpoint folder (byougert/DiaNA, byougert/DiaNA-Pretrain) into a Hub-loadable
`DiaNAModel` folder (config.json + model.safetensors + the remote-code files).

    python -m diana.hub_cards.convert_official_checkpoint --official_dir OFFICIAL_DIR --output_dir DIR [--no_sdm]

The output folder also holds a `DiaNAProcessor` with the official tokenisation (`tokenization="official"`:
every round prefix tokenised as one string, the ids the official weights were trained on).

The official layout (the released `byougert/DiaNA` checkpoints): a `config.json` with
`model_type` "main" (`embed_dim`, `vision_config`, `llama_config`, `refiner_config`, `logit_scale`,
`force_image_size`) next to `model.safetensors` or `pytorch_model.bin`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from diana.modeling_diana import DiaNAConfig, DiaNAModel
from diana.processing import build_processor
from diana.processing.cli_errors import ArgumentParser, require_path, require_range, run_cli

logger = logging.getLogger(__name__)

# Official refiner `sim_type` -> DiaNAConfig.attribute_reduction.
SIM_TYPES = {"avg": "mean", "mean": "mean", "max": "max", "min": "min", "lsp_max": "logsumexp", "lsp_min": "neg_logsumexp"}
# Keys of the official tower configs that only make sense on the authors' machines or for the original tower
# checkpoints (their storage dtype would otherwise build a bf16 tower; the converted model is fp32).
_MACHINE_LOCAL_KEYS = ("pretrained", "pretrained_path", "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype")


def _tower_dict(entry: dict, name: str, model_type: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"official config.json: `{name}` must be a dict (a {model_type} config), got {type(entry).__name__}.")
    out = {k: v for k, v in entry.items() if k not in _MACHINE_LOCAL_KEYS}
    if out.get("model_type", model_type) != model_type:
        raise ValueError(f"official config.json: `{name}.model_type` is {out['model_type']!r}, expected {model_type!r}.")
    out["model_type"] = model_type
    return out


def config_from_official(
    official: dict,
    enable_sdm: bool | None = None,
    enable_refiner: bool | None = None,
    num_attribute_queries: int | None = None,
) -> DiaNAConfig:
    """Builds the `DiaNAConfig` of an official `config.json` dict.

    Args:
        official: the parsed official config.
        enable_sdm: SDM loss on/off; None = the config's `enable_sdm` if present, else on (fine-tuned checkpoint).
        enable_refiner: refiner loss on/off; None = `enable_refiner` / `refiner_config.enable`, else on.
        num_attribute_queries: K of the converted model; None = the checkpoint's `refiner_config.num_query`.
    """
    for field in ("embed_dim", "vision_config", "llama_config"):
        if field not in official:
            raise ValueError(f"official config.json has no `{field}` (is this an official DiaNA folder?).")
    if official.get("model_type", "main") != "main":
        logger.warning("official config.json has model_type %r (expected 'main'); converting anyway.", official["model_type"])
    refiner = official.get("refiner_config") or {}
    sim_type = refiner.get("sim_type", "avg")
    if sim_type not in SIM_TYPES:
        raise ValueError(f"official config.json: refiner_config.sim_type {sim_type!r} is not one of {sorted(SIM_TYPES)}.")
    vision = _tower_dict(official["vision_config"], "vision_config", "swinv2")
    if official.get("force_image_size"):
        size = official["force_image_size"]
        vision["image_size"] = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    text = _tower_dict(official["llama_config"], "llama_config", "llama")
    dim = int(official["embed_dim"])
    if enable_sdm is None:
        enable_sdm = bool(official.get("enable_sdm", True))
    if enable_refiner is None:
        enable_refiner = bool(official.get("enable_refiner", refiner.get("enable", True)))
    return DiaNAConfig(
        vision_config=vision,
        text_config=text,
        projection_dim=dim,
        num_attribute_queries=int(num_attribute_queries or refiner.get("num_query", 16)),
        refiner_num_layers=int(refiner.get("num_hidden_layers", 2)),
        # The official refiner uses D / 64 heads (nn.MultiheadAttention), at least one.
        refiner_num_heads=max(dim // 64, 1),
        refiner_mlp_ratio=4.0,
        attribute_reduction=SIM_TYPES[sim_type],
        logit_scale_init_value=float(official.get("logit_scale", 50.0)),
        logit_scale_max=100.0,
        use_sdm_loss=enable_sdm,
        use_refiner_loss=enable_refiner,
    )


def _split_in_proj(state: dict, src: str, dst: str, out: dict) -> None:
    """nn.MultiheadAttention `in_proj_*` (3D, D) / (3D,) stacks q, k, v in that order."""
    for suffix in ("weight", "bias"):
        q, k, v = state.pop(f"{src}.in_proj_{suffix}").chunk(3, dim=0)
        out[f"{dst}.q_proj.{suffix}"], out[f"{dst}.k_proj.{suffix}"], out[f"{dst}.v_proj.{suffix}"] = q, k, v
        out[f"{dst}.out_proj.{suffix}"] = state.pop(f"{src}.out_proj.{suffix}")


def convert_state_dict(official_state: dict[str, torch.Tensor], config: DiaNAConfig) -> tuple[dict, list[str]]:
    """Maps official keys onto `DiaNAModel` keys.

    Returns:
        (state dict, notes) where notes lists what could not be carried over (re-initialised parts).

    Raises:
        ValueError: on official keys that map nowhere.
    """
    state = dict(official_state)
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key in list(state):
        if key.startswith("vision_model."):
            out[key] = state.pop(key)
        elif key.startswith("llama."):
            out["text_model." + key[len("llama."):]] = state.pop(key)
    for src, dst in (("vision_projection", "visual_projection"), ("text_projection", "text_projection")):
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in state:
                out[f"{dst}.{suffix}"] = state.pop(f"{src}.{suffix}")
    if "logit_scale" in state:
        out["logit_scale"] = state.pop("logit_scale").reshape(())

    # Older releases call the queries `query_token`.
    query_key = next((k for k in ("refiner.attr_query_token", "refiner.query_token") if k in state), None)
    if query_key is not None:
        queries = state.pop(query_key)
        if queries.shape[1] == config.num_attribute_queries:
            out["refiner.attribute_queries"] = queries
        else:
            notes.append(
                f"the checkpoint has {queries.shape[1]} attribute queries, the converted model {config.num_attribute_queries}: "
                "the queries are re-initialised (as between the paper's stages)"
            )
    if "refiner.cross_attn.in_proj_weight" in state:
        _split_in_proj(state, "refiner.cross_attn", "refiner.cross_attention", out)
        for i in range(config.refiner_num_layers):
            src, dst = f"refiner.transformer.resblocks.{i}", f"refiner.layers.{i}"
            _split_in_proj(state, f"{src}.attn", f"{dst}.self_attn", out)
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for suffix in ("weight", "bias"):
                    out[f"{dst}.{b}.{suffix}"] = state.pop(f"{src}.{a}.{suffix}")
    # Buffers recomputed from the configs (rotary frequencies, relative-position tables) are not weights.
    leftovers = [k for k in state if not k.endswith(("inv_freq", "relative_coords_table", "relative_position_index"))]
    if leftovers:
        raise ValueError(f"official checkpoint keys with no DiaNAModel counterpart: {sorted(leftovers)[:10]}")
    return out, notes


def load_official_state(folder: Path) -> dict[str, torch.Tensor]:
    """Reads `model.safetensors`, else `pytorch_model.bin` (weights only, no pickled code)."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        # Some training scripts save {"model": state_dict}.
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        return state
    raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin found.")


def convert(
    input_dir: str | Path,
    output_dir: str | Path | None = None,
    enable_sdm: bool | None = None,
    enable_refiner: bool | None = None,
    num_attribute_queries: int | None = None,
    tokenizer_dir: str | Path | None = None,
) -> DiaNAModel:
    """Converts an official folder; writes a Hub-loadable folder when `output_dir` is given.

    The written folder holds the model and its processor, set to the official tokenisation; `tokenizer_dir`
    is the Llama-3.2 tokenizer folder it is built from (None = `default_tokenizer_dir()`).

    Returns:
        The converted model (fp32 unless the checkpoint was stored in another dtype).
    """
    folder = Path(input_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: an official DiaNA folder holds config.json next to the weights.")
    try:
        official = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err}).") from err
    config = config_from_official(official, enable_sdm, enable_refiner, num_attribute_queries)
    state, notes = convert_state_dict(load_official_state(folder), config)

    model = DiaNAModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Swinv2's relative-position buffers are recomputed at construction; only weights matter here.
    missing = [k for k in missing if not k.endswith(("relative_coords_table", "relative_position_index", "inv_freq"))]
    if unexpected:
        raise ValueError(f"converted keys unknown to DiaNAModel: {unexpected[:10]}")
    reinitialised = [k for k in missing if k == "refiner.attribute_queries" and notes]
    really_missing = [k for k in missing if k not in reinitialised]
    if really_missing:
        if all(k.startswith("refiner.") for k in really_missing) and not config.use_refiner_loss:
            notes.append("the checkpoint has no refiner weights (refiner disabled): the refiner is freshly initialised")
        else:
            raise ValueError(f"official checkpoint lacks weights for: {really_missing[:10]}")
    for note in notes:
        logger.warning("convert_official_checkpoint: %s.", note)
    if "logit_scale" in state and state["logit_scale"].item() > math.log(config.logit_scale_max) + 1e-6:
        logger.warning("checkpoint logit_scale exceeds log(%s); it stays clamped at use.", config.logit_scale_max)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        official_processor(config, tokenizer_dir).save_pretrained(output_dir)
    return model


def official_processor(config: DiaNAConfig, tokenizer_dir: str | Path | None = None):
    """The processor of a converted model: its image size, the fine-tuning processor profile, official tokenisation."""
    size = config.vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return build_processor(tokenizer_dir=tokenizer_dir, image_size=(height, width), tokenization="official")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m diana.hub_cards.convert_official_checkpoint",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--official_dir", required=True, help="official DiaNA folder (config.json + weights)")
    parser.add_argument("--output_dir", required=True, help="folder to write the Hub-loadable DiaNAModel to")
    sdm = parser.add_mutually_exclusive_group()
    sdm.add_argument("--enable_sdm", dest="enable_sdm", action="store_true", default=None, help="SDM loss on")
    sdm.add_argument("--no_sdm", dest="enable_sdm", action="store_false", help="SDM loss off (pretraining checkpoint)")
    refiner = parser.add_mutually_exclusive_group()
    refiner.add_argument("--enable_refiner", dest="enable_refiner", action="store_true", default=None)
    refiner.add_argument("--no_refiner", dest="enable_refiner", action="store_false")
    parser.add_argument(
        "--num_attribute_queries", type=int, default=None,
        help="K of the converted model; a K different from the checkpoint's re-initialises the queries",
    )
    parser.add_argument(
        "--tokenizer_dir", default=None,
        help="Llama-3.2 tokenizer folder for the saved processor (default: the one scripts/setup.sh makes)",
    )
    args = parser.parse_args(argv)
    require_path("--official_dir", args.official_dir, "folder")
    require_range("--num_attribute_queries", args.num_attribute_queries, 1)
    require_path("--tokenizer_dir", args.tokenizer_dir, "folder")
    if Path(args.output_dir).is_file():
        raise FileExistsError(f"--output_dir {args.output_dir} is a file, not a folder")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model = convert(
        args.official_dir, args.output_dir, args.enable_sdm, args.enable_refiner, args.num_attribute_queries, args.tokenizer_dir
    )
    logger.info(
        "wrote %s (projection_dim %d, K %d, reduction %s, sdm %s, refiner %s)", args.output_dir,
        model.config.projection_dim, model.config.num_attribute_queries, model.config.attribute_reduction,
        model.config.use_sdm_loss, model.config.use_refiner_loss,
    )


if __name__ == "__main__":
    run_cli(main)
