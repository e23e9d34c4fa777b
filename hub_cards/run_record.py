"""What a run's recorded arguments (``run_args.json``) say about the weights: the data they were
trained on, followed back through the earlier stages whose folders hold their own record, how the
earliest stage was initialised, and the training recipe. The model card states these and no more.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_ARGS_FILE = "run_args.json"  # what run_stage writes into every output folder
PAPER_BASE_MODELS = ("microsoft/swinv2-base-patch4-window12-192-22k", "meta-llama/Llama-3.2-1B")
# Display names and Hub data set ids of the data sets a run can name (run_args data.dataset).
DATASETS = {
    "chatpedes": ("ChatPedes", "chatpedes"),
    "mals": ("MALS", "mals"),
    "synthpedes": ("SynthPedes (synthetic, ChatPedes layout)", "synthpedes"),
}


def load_run_args(path: str | Path) -> dict[str, Any]:
    """Read ``run_args.json`` (``{"model": …, "data": …, "training": …}``) written by ``run_stage``."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read run arguments {str(path)!r}: {error}") from error
    if not isinstance(record, dict) or not {"model", "data", "training"} <= set(record):
        raise ValueError(f"{str(path)!r}: run arguments need the sections 'model', 'data' and 'training'")
    record["_path"] = str(path)
    return record


def _paper_sized(config: Any) -> bool:
    """Whether the towers have the paper's shapes (Swinv2-B, Llama-3.2-1B)."""
    vision, text = getattr(config, "vision_config", None), getattr(config, "text_config", None)
    if vision is None or text is None:
        return config is None  # no config given: describe the paper's model
    return (vision.embed_dim, list(vision.depths)) == (128, [2, 2, 18, 2]) and (
        text.hidden_size, text.num_hidden_layers, text.vocab_size) == (2048, 16, 128256) and (
        getattr(config, "vision_stem", "patch") == "patch")


# Stages followed back through `model_name_or_path` folders that hold a run_args.json.
MAX_RECORDED_STAGES = 5


def recorded_stages(run_args: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The run and the earlier stages it started from, latest first, as far as their folders hold a
    run_args.json (at most MAX_RECORDED_STAGES)."""
    stages = [run_args]
    while len(stages) < MAX_RECORDED_STAGES:
        source = stages[-1].get("model", {}).get("model_name_or_path")
        if not source or not (Path(source) / RUN_ARGS_FILE).is_file():
            break
        stages.append(load_run_args(Path(source) / RUN_ARGS_FILE))
    return stages


def initialisation(run_args: Mapping[str, Any] | None, config: Any = None) -> tuple[str, list[str] | None]:
    """(sentence, base models) following ``model_name_or_path`` back through earlier stages.

    Where the run does not record its origin, the paper's towers are named as base models only
    if the towers have their shapes (a randomly initialised full-size model is not a use case).
    """
    unknown_bases = list(PAPER_BASE_MODELS) if _paper_sized(config) else None
    if run_args is None:
        if unknown_bases:
            return "the paper's towers (Swinv2-B 22k, Llama-3.2-1B)", unknown_bases
        return "not recorded (no run arguments given)", None
    stages = recorded_stages(run_args)
    sentence, bases = _origin_of(stages[-1], unknown_bases)
    for later, earlier in zip(reversed(stages[:-1]), reversed(stages[1:])):
        # A stage 0 (--objective image_attributes) trained the image tower alone: say so.
        what = (": image-tower pretraining on its MALS captions' n-grams and labels"
                if earlier.get("data", {}).get("objective") == "image_attributes" else "")
        source = Path(later["model"]["model_name_or_path"]).name
        sentence = f"an earlier stage ({source}{what}), itself initialised from {sentence}"
    return sentence, bases


def _origin_of(earliest: Mapping[str, Any], unknown_bases: list[str] | None) -> tuple[str, list[str] | None]:
    """(sentence, base models) of how the earliest recorded stage started."""
    model = earliest.get("model", {})
    kind = _origin_kind(model)
    if kind == "unrecorded":
        return f"the DiaNA weights in {model['model_name_or_path']} (their own origin is not recorded)", unknown_bases
    if kind == "towers":
        names = [str(model.get("vision_model_path")), str(model.get("text_model_path"))]
        bases = [n for n in names if n and n != "None" and not Path(n).is_absolute()] or list(PAPER_BASE_MODELS)
        return f"pretrained towers {names[0]} and {names[1]}", bases
    if kind == "random":
        return "random initialisation from a config (no pretrained tower weights)", None
    return "the paper's towers (Swinv2-B 22k, Llama-3.2-1B)", list(PAPER_BASE_MODELS)


def _origin_kind(model: Mapping[str, Any]) -> str:
    """How a run's model section starts: "unrecorded" (a DiaNA folder), "towers" (pretrained
    towers), "random" (a config) or "paper" (nothing given: the paper's towers)."""
    if model.get("model_name_or_path"):
        return "unrecorded"
    if model.get("vision_model_path") or model.get("text_model_path"):
        return "towers"
    return "random" if model.get("model_config") is not None else "paper"


def _dataset_of(run_args: Mapping[str, Any] | None) -> str | None:
    """The data set key one run trained on (its `data.dataset`, or synthpedes when its folder is
    SynthPedes'); None without run arguments."""
    if run_args is None:
        return None
    data = run_args.get("data", {})
    return "synthpedes" if _is_synthpedes_folder(data.get("data_dir")) else str(data.get("dataset", "chatpedes")).lower()


def evaluation_dataset_of(run_args: Mapping[str, Any] | None) -> str | None:
    """The data set key a run evaluated on: its `eval_data_dir` (ChatPedes layout) when it has one,
    else its training data set's."""
    eval_dir = (run_args or {}).get("data", {}).get("eval_data_dir")
    if eval_dir:
        return "synthpedes" if _is_synthpedes_folder(eval_dir) else "chatpedes"
    return _dataset_of(run_args)


def _is_synthpedes_folder(data_dir: str | None) -> bool:
    """SynthPedes writes the ChatPedes / MALS layouts; its folders (and the oracle next to them) say so."""
    data_dir = str(data_dir or "")
    return "synthpedes" in data_dir.lower() or bool(data_dir and (Path(data_dir).parent / "oracle.json").is_file())


def _dataset_label(run_args: Mapping[str, Any]) -> str:
    """The display name of the data one run trained on (SynthPedes with the layout it was read in)."""
    key = _dataset_of(run_args) or "unknown"
    if key == "synthpedes":
        layout = "MALS" if str(run_args.get("data", {}).get("dataset")).lower() == "mals" else "ChatPedes"
        return f"SynthPedes (synthetic, {layout} layout)"
    return DATASETS.get(key, (key,))[0]


@dataclass
class TrainingData:
    """What the weights were trained on, followed back through the recorded earlier stages.

    Attributes:
        datasets: the data set key of every recorded stage, earliest first.
        labels: their display names, earliest first.
        origin: how the earliest recorded stage started: "random" (a config, no pretrained
            weights), "towers" (pretrained towers), "unrecorded" (weights whose own run is not
            recorded) or "paper" (the paper's towers by default).
        origin_detail: the towers' or weights' names for "towers" / "unrecorded".
    """

    datasets: list[str]
    labels: list[str]
    origin: str
    origin_detail: str = ""

    @property
    def synthetic_only(self) -> bool:
        """Every image the weights learned from was drawn by SynthPedes (no real person)."""
        return self.origin == "random" and all(d == "synthpedes" for d in self.datasets)


def training_data(run_args: Mapping[str, Any] | None) -> TrainingData | None:
    """The training data of a run and its recorded earlier stages (`recorded_stages`); None
    without run arguments: then nothing is known."""
    if run_args is None:
        return None
    stages = recorded_stages(run_args)[::-1]  # earliest first
    first = stages[0].get("model", {})
    origin = _origin_kind(first)
    detail = {"unrecorded": str(first.get("model_name_or_path")),
              "towers": f"{first.get('vision_model_path')} and {first.get('text_model_path')}"}.get(origin, "")
    return TrainingData([_dataset_of(a) or "unknown" for a in stages], [_dataset_label(a) for a in stages],
                        origin, detail)


def trained_on_summary(data: TrainingData | None) -> str:
    """The card's "Trained on" line."""
    if data is None:
        return "not recorded (the training run's arguments were not given, so its training data are unknown)"
    summary = ", then ".join(dict.fromkeys(data.labels))
    if data.origin == "unrecorded":
        summary += f", starting from the weights in {data.origin_detail}, whose own training data are not recorded"
    elif data.origin in ("towers", "paper"):
        towers = data.origin_detail or "the paper's towers (Swinv2-B 22k, Llama-3.2-1B)"
        summary += f", starting from pretrained towers {towers} (their own pretraining data: see their model cards)"
    return summary


def consent_statement(data: TrainingData | None) -> str:
    """The card's consent paragraph: what is known of the training images' subjects, and no more."""
    own = "Images you index stay on your machine with this code, but their subjects' consent is your responsibility."
    chatpedes = ("CUHK-PEDES images, collected from surveillance and re-identification data sets whose subjects "
                 "did not consent to this use")
    if data is None:
        return ("The training data of these weights were not recorded when this card was rendered, so it makes no "
                f"claim about them or their subjects' consent. Models trained on ChatPedes learn from {chatpedes}. "
                + own)
    if data.synthetic_only:
        return ("This model was trained on SynthPedes, procedurally drawn figures with no real person in them, from "
                f"a random initialisation. Models trained on ChatPedes learn from {chatpedes}. " + own)
    parts = []
    if "chatpedes" in data.datasets:
        parts.append(f"The training images include, via ChatPedes, {chatpedes}.")
    if "mals" in data.datasets:
        parts.append("MALS images are synthetic.")
    if "synthpedes" in data.datasets:
        parts.append("SynthPedes figures are procedurally drawn, with no real person in them.")
    others = sorted(set(data.datasets) - {"chatpedes", "mals", "synthpedes"})
    if others:
        parts.append(f"Whether the subjects of {', '.join(others)} consented is not recorded here.")
    if data.origin == "unrecorded":
        parts.append(f"The weights this training started from ({data.origin_detail}) were trained on data this card "
                     "does not record, whose subjects' consent is unknown.")
    elif data.origin in ("towers", "paper"):
        parts.append("The pretrained towers it started from learned from their own data sets (see their model cards).")
    return " ".join(parts + [own])


def recipe_rows(run_args: Mapping[str, Any], config: Any = None, num_processes: int | None = None) -> list[tuple[str, str]]:
    """The training settings that define the recipe, as (name, value) rows.

    ``num_processes`` (the evaluation report's, the same run's world size) makes the global
    batch exact; without it only the per-device batch is stated.
    """
    model, data, training = run_args.get("model", {}), run_args.get("data", {}), run_args.get("training", {})
    rows: list[tuple[str, str]] = []

    def add(name: str, value: Any) -> None:
        if value is not None and value != "":
            rows.append((name, str(value)))

    add("initialisation", initialisation(run_args, config)[0])
    add("data set", f"{_dataset_label(run_args)} ({data.get('data_dir')})")
    per_device = training.get("per_device_train_batch_size")
    accumulation = training.get("gradient_accumulation_steps", 1) or 1
    if per_device and num_processes:
        add("global batch", f"{int(per_device) * int(num_processes) * int(accumulation)} "
            f"({per_device} per device x {num_processes} process(es) x {accumulation} accumulation)")
    elif per_device:
        add("batch", f"{per_device} per device x {accumulation} accumulation (number of devices not recorded)")
    max_steps = training.get("max_steps") or -1
    if max_steps > 0:
        add("steps", max_steps)
    else:
        add("epochs", training.get("num_train_epochs"))
    add("peak learning rate", training.get("learning_rate"))
    add("schedule, warmup", f"{training.get('lr_scheduler_type')}, {training.get('warmup_steps') or training.get('warmup_ratio')}")
    add("optimizer", f"{training.get('optim')} (betas {training.get('adam_beta1')}, {training.get('adam_beta2')}, "
        f"weight decay {training.get('weight_decay')})")
    add("gradient clipping", training.get("max_grad_norm"))
    precision = "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"
    add("precision", precision)
    add("max tokens", data.get("max_length"))
    add("image size", data.get("image_size"))
    add("attribute queries (K)", model.get("num_attribute_queries"))
    add("SDM loss", model.get("use_sdm_loss"))
    add("refiner loss", model.get("use_refiner_loss"))
    add("random round retaining (R3)", data.get("round_retaining"))
    add("token masking", data.get("token_masking"))
    add("image augmentation", data.get("image_augmentation"))
    add("image tower", "fixed in this stage (--freeze_vision_model)" if model.get("freeze_vision_model") else None)
    add("LoRA rank on the dialogue tower", model.get("lora_rank") or "0 (full fine-tuning)")
    add("best checkpoint chosen on", training.get("metric_for_best_model") if training.get("load_best_model_at_end") else None)
    add("seed", training.get("seed"))
    versions = run_args.get("versions")
    if versions:
        add("software", ", ".join(f"{k} {v}" for k, v in versions.items()))
    return rows


__all__ = [
    "DATASETS", "MAX_RECORDED_STAGES", "PAPER_BASE_MODELS", "RUN_ARGS_FILE", "TrainingData", "consent_statement",
    "evaluation_dataset_of", "initialisation", "load_run_args", "recipe_rows", "recorded_stages",
    "trained_on_summary", "training_data",
]
