"""Argument dataclasses of `run_stage.py`, parsed by `HfArgumentParser` from a YAML preset plus
command-line overrides (`--config stage2.yaml --learning_rate 2e-5`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from diana.processing.cli_errors import OneLineArgumentErrors, UserInputError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelArguments:
    """Where the model comes from. Exactly one source is used, in this order: `model_name_or_path`
    (a DiaNA folder: a stage 1 output, a checkpoint, a converted official checkpoint), then
    `vision_model_path` + `text_model_path` (real tower checkpoints), then `model_config` (random
    initialisation from a config dict, used by the SynthPedes presets)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "DiaNA folder to start from (e.g. the stage 1 output)."}
    )
    vision_model_path: str | None = field(default=None, metadata={"help": "Swinv2 checkpoint folder."})
    text_model_path: str | None = field(default=None, metadata={"help": "Llama / LlamaForCausalLM folder."})
    model_config: str | None = field(
        default=None,
        metadata={"help": "DiaNAConfig keyword arguments (with vision_config / text_config mappings) for a "
                          "randomly initialised model: a mapping in the YAML preset, or a JSON/YAML file."},
    )
    num_attribute_queries: int | None = field(
        default=None,
        metadata={"help": "K; when it differs from the loaded model the attribute queries are re-initialised."},
    )
    use_sdm_loss: bool | None = field(default=None, metadata={"help": "SDM terms on (stage 2) or off (stage 1)."})
    use_refiner_loss: bool | None = field(default=None, metadata={"help": "Attribute-refiner loss terms."})
    attribute_reduction: str | None = field(
        default=None, metadata={"help": "mean | max | min | logsumexp | neg_logsumexp"}
    )
    score_mode: str | None = field(default=None, metadata={"help": "Default retrieval score: global | attribute | fused."})
    text_attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention of the Llama tower (sdpa, eager, flash_attention_2)."}
    )
    compile_vision: bool = field(
        default=False,
        metadata={"help": "torch.compile the Swinv2 tower (eager Swinv2 runs at ~6%% of an H100's peak; "
                          "compiling nearly doubles its training throughput). GPU runs; not on a CPU."},
    )
    freeze_vision_model: bool = field(
        default=False,
        metadata={"help": "Keep the image tower's weights fixed (stages 1 and 2 after stage 0: the random dialogue "
                          "tower's first gradients would otherwise wear its features down). Needs a trained tower "
                          "(--model_name_or_path or --vision_model_path)."},
    )
    tokenizer_dir: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder; default: the model folder's own, else the converted Llama-3.2 one."},
    )
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the dialogue tower; 0 = full fine-tuning."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})


@dataclass
class DataArguments:
    dataset: str = field(default="chatpedes", metadata={"help": "chatpedes | mals"})
    objective: str = field(
        default="retrieval",
        metadata={"help": "retrieval (stages 1 and 2) | image_attributes (stage 0, MALS only: the image tower alone "
                          "learns its captions' n-grams and labels; vision_pretraining.py)"},
    )
    pretraining_readouts: list[str] = field(
        default_factory=lambda: ["mean"],
        metadata={"help": "image_attributes only: heads over the tower's final tokens, out of mean (the pooled "
                          "vector), tokens (all tokens side by side, position-keeping), token_max (best token "
                          "per target); their losses add up (vision_pretraining.py)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Dataset root (ChatPedes or MALS layout)."})
    eval_data_dir: str | None = field(
        default=None,
        metadata={"help": "ChatPedes-layout folder for retrieval evaluation when training on MALS "
                          "(stage 1); default: no evaluation for MALS."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})
    validation_persons: int = field(default=1000, metadata={"help": "Persons held out of train for validation."})
    validation_seed: int = field(default=0, metadata={"help": "Seed of the validation carve-out."})
    on_missing_image: str = field(default="error", metadata={"help": (
        "error | skip: images missing or unreadable when the dataset is built, or failing to load later in "
        "training or evaluation, are skipped, counted and logged.")})
    mals_files: list[str] | None = field(default=None, metadata={"help": "Subset of MALS gene_attrs/*.json files."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    processor_profile: str = field(default="finetune", metadata={"help": (
        "Normalisation statistics and token limit of the processor: finetune (CUHK-PEDES statistics, 400 tokens) | "
        "pretrain (MALS statistics, 128 tokens).")})
    image_size: list[int] | None = field(
        default=None, metadata={"help": "Image (height, width); default: the model's vision_config.image_size."}
    )
    max_length: int = field(default=400, metadata={"help": "Token limit (right truncation, counted)."})
    round_retaining: bool = field(default=True, metadata={"help": "Random round retaining (R3), training only."})
    token_masking: float = field(default=0.15, metadata={"help": "Fraction of tokens masked (80/10/10), training only."})
    image_augmentation: bool = field(default=True, metadata={"help": "Flip / pad-crop / random erasing, training only."})
    random_erasing: float = field(
        default=0.5,
        metadata={"help": "Probability of the augmentation's random erasing (IRRA's and the paper's 0.5; 0 = off). "
                          "The SynthPedes stage 0 preset turns it off: on a 64x32 drawing a rectangle of up to 40%% "
                          "hides the very attribute (a bag, the top's stripes) a label names."},
    )
    image_cache: bool = field(
        default=False,
        metadata={"help": "Decode and resize each training image once and keep it in memory (3*H*W bytes each; "
                          "off without image_augmentation; same batches, less time per step). For data that fits "
                          "in memory."},
    )
    eval_split: str = field(default="validation", metadata={"help": "validation | test (test only when asked)."})
    eval_score_modes: list[str] = field(
        default_factory=lambda: ["global", "attribute", "fused"], metadata={"help": "Score modes evaluated."}
    )
    eval_max_samples: int | None = field(default=None, metadata={"help": "Limit evaluation dialogues (debugging)."})


class OneLineHfArgumentParser(OneLineArgumentErrors, HfArgumentParser):
    """`HfArgumentParser` whose parsing errors are one line (`diana.processing.cli_errors`)."""


@dataclass
class DiaNATrainingArguments(TrainingArguments):
    """`TrainingArguments` with the DiaNA defaults: our collator runs the processor (keep all
    columns), person ids are not labels, and the best checkpoint is chosen on validation R@1."""

    do_train: bool = field(default=True, metadata={"help": "Train (set false to only evaluate a model)."})
    remove_unused_columns: bool = field(default=False)
    label_names: list[str] | None = field(default_factory=list)
    metric_for_best_model: str | None = field(default="eval_global/full/R@1")
    greater_is_better: bool | None = field(default=True)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, DiaNATrainingArguments]:
    """`--config FILE.yaml` gives the defaults, every other flag overrides them. A bare preset name
    (`--config stage2_synthpedes_small`) is looked up in training/configs/."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults: dict[str, Any] = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 == len(argv) or argv[i + 1].startswith("--"):
            raise UserInputError(f"--config needs a preset name or YAML file (presets: {', '.join(preset_names())})")
        defaults = load_yaml_preset(argv[i + 1])
        del argv[i : i + 2]
    parser = OneLineHfArgumentParser((ModelArguments, DataArguments, DiaNATrainingArguments),
                                     prog="training/run_stage.py --config PRESET")
    # A nested mapping cannot be a command-line flag: it bypasses the parser.
    model_config = defaults.pop("model_config", None) if isinstance(defaults.get("model_config"), dict) else None
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"unknown keys in the YAML preset: {unknown}")
    parser.set_defaults(**defaults)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_config is not None and model_args.model_config is None:
        model_args.model_config = model_config
    elif isinstance(model_args.model_config, str):
        model_args.model_config = load_model_config(model_args.model_config)
    return model_args, data_args, training_args


def load_yaml_preset(name_or_path: str, flag: str = "--config") -> dict[str, Any]:
    """A YAML preset by path, or by name from training/configs/; `flag` names the option in errors."""
    path = Path(name_or_path)
    if not path.exists():
        candidate = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
        if not candidate.exists():
            raise UserInputError(f"{flag} {name_or_path!r}: no such file, nor a preset (presets: "
                                 f"{', '.join(preset_names())})")
        path = candidate
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UserInputError(f"{flag} {path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the preset must be a YAML mapping, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    """The presets of training/configs/ that `--config NAME` finds."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_model_config(value: str) -> dict[str, Any]:
    """`--model_config` as an inline JSON object or a JSON/YAML file (a relative path not found from the
    working directory is looked up in training/configs/, e.g. `models/synthpedes_small.yaml`)."""
    if value.lstrip().startswith("{"):
        text = value  # inline: a long one is no file name (the OS refuses names over 255 bytes)
    elif Path(value).is_file():
        text = Path(value).read_text()
    elif not Path(value).is_absolute() and (CONFIG_DIR / value).is_file():
        text = (CONFIG_DIR / value).read_text()
    else:
        raise FileNotFoundError(f"--model_config {value!r}: no such file, nor under {CONFIG_DIR} (give a JSON/YAML "
                                "file or an inline JSON object)")
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise ValueError(f"--model_config {value[:80]!r}: not valid JSON/YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--model_config must be a mapping of DiaNAConfig arguments, got {value!r}")
    return data
