"""Render a DiaNA model card from a run's ``eval_results.json`` and ``run_args.json``.

The card is a ``huggingface_hub.ModelCard``: YAML metadata built with ``ModelCardData`` (library
``transformers``, base models, data sets, licence, tags, a ``model-index`` of ``EvalResult`` with
R@1/5/10 and mAP of the full dialogue per data set and split) and a Jinja body
(``templates/model_card.md``) with the per-round tables, the curve picture, usage with a pinned
revision, the training recipe actually used, intended use, risks and the citation.

``ModelCard.validate()`` asks the Hub; :func:`check_model_card` runs the checks that work
offline instead: YAML parses, ``ModelCardData`` round-trips, ``model-index`` converts back to
the same ``EvalResult`` list, and ``ModelCard.load`` gives the same card.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from diana.modeling_diana.configuration_diana import SCORE_MODES

from .evaluation_report import CUMULATIVE_KEY, TABLE_METRICS

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
PAPER_BASE_MODELS = ("microsoft/swinv2-base-patch4-window12-192-22k", "meta-llama/Llama-3.2-1B")
# The shipped tokenizer (and any Llama-initialised weights) fall under Meta's licence.
DEFAULT_LICENSE = "llama3.2"
DEFAULT_TAGS = (
    "diana", "person-retrieval", "text-to-image-retrieval", "chat-based-retrieval", "dialogue",
    "swinv2", "llama", "custom_code",
)
INDEX_METRICS = (("R@1", "recall@1"), ("R@5", "recall@5"), ("R@10", "recall@10"), ("mAP", "map"))
# Display names and Hub data set ids of the data sets a run can name (run_args data.dataset).
DATASETS = {
    "chatpedes": ("ChatPedes", "chatpedes"),
    "mals": ("MALS", "mals"),
    "synthpedes": ("SynthPedes (synthetic, ChatPedes layout)", "synthpedes"),
}
TASK_TYPE = "text-to-image-retrieval"
TASK_NAME = "Chat-based person retrieval"


# --------------------------------------------------------------------------------------------
# Evaluation results
# --------------------------------------------------------------------------------------------


@dataclass
class ModeResults:
    """One score mode's metrics: per round (1-based, independent) and the full dialogue."""

    name: str
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)
    full: dict[str, float] = field(default_factory=dict)
    cumulative: dict[int, float] = field(default_factory=dict)  # cumulative Hits@10 per round


@dataclass
class Evaluation:
    """The evaluation of one model on one data set split."""

    dataset: str  # key of DATASETS (or a free id)
    split: str
    modes: dict[str, ModeResults]
    num_queries: int | None = None
    num_gallery: int | None = None
    curve: str | None = None  # picture path relative to the card
    reference: ModeResults | None = None  # another ranker on the same split (e.g. SynthPedes' oracle)
    num_processes: int | None = None  # processes of the run that evaluated (= its training world size)

    @property
    def dataset_name(self) -> str:
        return DATASETS.get(self.dataset, (self.dataset, self.dataset))[0]

    @property
    def dataset_id(self) -> str:
        return DATASETS.get(self.dataset, (self.dataset, self.dataset))[1]


_ROUND = re.compile(r"^round_(\d+)$")


def parse_eval_results(
    results: Mapping[str, Any], *, dataset: str = "chatpedes", split: str = "test", curve: str | None = None,
    source: str = "eval_results",
) -> Evaluation:
    """Read an evaluation report (``eval_results.json``) into :class:`Evaluation`.

    Layout: ``{mode: {"round_1": {"R@1", …}, …, "full": {…}, "cumulative_hits@10": [per round]},
    "meta": {"num_queries", "num_gallery", …}}`` for the evaluated modes of global / attribute /
    fused (a ``flat`` copy, if present, is ignored). The report does not name its data set or
    split: the run arguments do (see :func:`evaluation_from_run`).

    Args:
        results: the parsed JSON.
        dataset: data set key (see ``DATASETS``).
        split: split name.
        curve: the per-round curve picture, relative to the card.
        source: file name used in error messages.

    Raises:
        ValueError: naming the mode / entry that is missing or malformed.
    """
    modes: dict[str, ModeResults] = {}
    for name in SCORE_MODES:
        per_mode = results.get(name)
        if per_mode is None:
            continue
        if not isinstance(per_mode, Mapping):
            raise ValueError(f"{source}: entry {name!r} must be a mapping of rounds to metrics")
        mode = ModeResults(name)
        for key, metrics in per_mode.items():
            match = _ROUND.match(key)
            if key == CUMULATIVE_KEY:
                if not isinstance(metrics, list):
                    raise ValueError(f"{source}: {name}/{key} must be a list (one value per round)")
                mode.cumulative = {r + 1: float(v) for r, v in enumerate(metrics)}
                continue
            if not isinstance(metrics, Mapping):
                raise ValueError(f"{source}: {name}/{key} must map metric names to numbers")
            if key == "full":
                mode.full = {m: float(v) for m, v in metrics.items()}
            elif match:
                mode.rounds[int(match.group(1))] = {m: float(v) for m, v in metrics.items()}
            else:
                raise ValueError(f"{source}: unknown entry {name}/{key} (expected round_<k>, full or {CUMULATIVE_KEY})")
        if not mode.full:
            raise ValueError(f"{source}: score mode {name!r} has no full-dialogue metrics ({name}/full)")
        modes[name] = mode
    if not modes:
        raise ValueError(f"{source}: no score mode among {SCORE_MODES} (top-level keys: {sorted(results)})")
    meta = results.get("meta", {})
    reference = None
    if isinstance(results.get("reference"), Mapping):
        # evaluation.write_results stores {"label": ..., **reference}: one mode's layout
        # ({"round_1": {...}, ..., "full": {...}}) or the SynthPedes oracle's ({"rounds": [{"round": k, ...}]}).
        entries = dict(results["reference"])
        reference = ModeResults(str(entries.pop("label", "reference")))
        for row in entries.pop("rounds", None) or []:
            if isinstance(row, Mapping) and "round" in row:
                entries[f"round_{int(row['round'])}"] = {m: v for m, v in row.items() if m != "round"}
        for key, metrics in entries.items():
            match = _ROUND.match(key)
            if not isinstance(metrics, Mapping):
                continue
            if key == "full":
                reference.full = {m: float(v) for m, v in metrics.items() if isinstance(v, (int, float))}
            elif match:
                reference.rounds[int(match.group(1))] = {
                    m: float(v) for m, v in metrics.items() if isinstance(v, (int, float))
                }
    return Evaluation(
        dataset=dataset, split=split, modes=modes, num_queries=meta.get("num_queries"),
        num_gallery=meta.get("num_gallery"), curve=curve, reference=reference,
        num_processes=meta.get("num_processes"),
    )


def load_evaluation(
    path: str | Path, run_args: Mapping[str, Any] | None = None, *, dataset: str | None = None,
    split: str | None = None, curve: str | None = None,
) -> Evaluation:
    """Read an ``eval_results.json`` file; data set and split default to the run's arguments."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read evaluation results {str(path)!r}: {error}") from error
    data = (run_args or {}).get("data", {})
    return parse_eval_results(
        results, dataset=dataset or _evaluation_dataset_of(run_args) or "chatpedes",
        split=split or str(data.get("eval_split", "test")), curve=curve, source=str(path),
    )


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}"


def _table_rows(mode: ModeResults) -> list[dict[str, str]]:
    rows = []
    for number in sorted(mode.rounds):
        row = {"label": str(number), **{m: _fmt(mode.rounds[number].get(m), m) for m in TABLE_METRICS}}
        row["cumulative"] = _fmt(mode.cumulative.get(number), "Hits@10")
        rows.append(row)
    full = {"label": "full dialogue", **{m: _fmt(mode.full.get(m), m) for m in TABLE_METRICS}, "cumulative": "–"}
    rows.append(full)
    return rows


# --------------------------------------------------------------------------------------------
# Run arguments
# --------------------------------------------------------------------------------------------


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
        if not source or not (Path(source) / "run_args.json").is_file():
            break
        stages.append(load_run_args(Path(source) / "run_args.json"))
    return stages


def _initialisation(run_args: Mapping[str, Any] | None, config: Any = None) -> tuple[str, list[str] | None]:
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


def _evaluation_dataset_of(run_args: Mapping[str, Any] | None) -> str | None:
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

    add("initialisation", _initialisation(run_args, config)[0])
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


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def build_card_data(
    evaluations: Sequence[Evaluation],
    *,
    model_name: str,
    score_mode: str = "global",
    base_models: Sequence[str] | None = PAPER_BASE_MODELS,
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = DEFAULT_TAGS,
    training_datasets: Sequence[str] | None = None,
) -> ModelCardData:
    """YAML metadata with a ``model-index``: R@1/5/10 and mAP of the full dialogue per data set/split.

    The ``model-index`` reports the model's default score mode (the one inference uses); the
    body's tables report every evaluated mode. ``datasets`` (the Hub's "trained on" field) lists
    ``training_datasets`` only: None when the training data are not recorded.
    """
    eval_results: list[EvalResult] = []
    for evaluation in evaluations:
        mode = evaluation.modes.get(score_mode) or next(iter(evaluation.modes.values()))
        for key, metric_type in INDEX_METRICS:
            value = mode.full.get(key)
            if value is None:
                raise ValueError(
                    f"{evaluation.dataset_name} {evaluation.split}: score mode {mode.name!r} has no full-dialogue {key}"
                )
            eval_results.append(EvalResult(
                task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=evaluation.dataset_id,
                dataset_name=evaluation.dataset_name, dataset_split=evaluation.split, metric_type=metric_type,
                metric_name=f"{key} (full dialogue, {mode.name} score)", metric_value=round(value, 2),
                metric_config=mode.name,
            ))
    datasets = list(dict.fromkeys(training_datasets or []))
    return ModelCardData(
        model_name=model_name, library_name="transformers", license=license,
        base_model=list(base_models) if base_models else None, datasets=datasets or None,
        tags=list(tags), metrics=["recall", "map"], eval_results=eval_results or None,
    )


def render_model_card(
    evaluations: Sequence[Evaluation] | Evaluation | None = None,
    run_args: Mapping[str, Any] | None = None,
    *,
    config: Any = None,
    repo_id: str = "your-name/diana",
    revision: str = "main",
    model_name: str | None = None,
    base_models: Sequence[str] | None | str = "auto",
    license: str = DEFAULT_LICENSE,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """Render the card.

    Args:
        evaluations: parsed ``eval_results.json`` reports (:func:`parse_eval_results`).
        run_args: the run's ``run_args.json`` (:func:`load_run_args`), for the recipe and the
            initialisation; None leaves the recipe out.
        config: the model's ``DiaNAConfig`` (tower sizes, projection width, score mode).
        repo_id: Hub repository the usage example loads.
        revision: revision the usage example pins (a commit hash once pushed).
        model_name: card title and ``model-index`` name (default: the repo name).
        base_models: Hub ids of the initial towers; ``"auto"`` derives them from ``run_args``
            (none for a randomly initialised run).
        license: Hub licence id.
        template_path: the Jinja template.
    """
    if isinstance(evaluations, Evaluation):
        evaluations = [evaluations]
    evaluations = list(evaluations or [])
    model_name = model_name or repo_id.split("/")[-1]
    init_sentence, inferred_bases = _initialisation(run_args, config)
    bases = inferred_bases if base_models == "auto" else base_models
    score_mode = getattr(config, "score_mode", None) or "global"
    # What the weights learned from is the training recipe's to say, never the evaluation's.
    trained = training_data(run_args)
    card_data = build_card_data(
        evaluations, model_name=model_name, score_mode=score_mode, base_models=bases, license=license,
        training_datasets=None if trained is None else [DATASETS.get(d, (d, d))[1] for d in trained.datasets],
    )
    modes_view = []
    for evaluation in evaluations:
        modes_view.append({
            "dataset_name": evaluation.dataset_name, "split": evaluation.split,
            "num_queries": evaluation.num_queries if evaluation.num_queries is not None else "the",
            "num_gallery": evaluation.num_gallery if evaluation.num_gallery is not None else "the split's",
            "curve": evaluation.curve,
            "modes": [
                {"name": m.name, "rows": _table_rows(m), "has_cumulative": bool(m.cumulative)}
                for m in evaluation.modes.values()
            ],
            "reference": None if evaluation.reference is None else {
                "name": evaluation.reference.name, "rows": _table_rows(evaluation.reference),
            },
        })
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id,
        revision=revision,
        evaluations=modes_view,
        score_mode=score_mode,
        projection_dim=getattr(config, "projection_dim", 768),
        vision_summary=_vision_summary(config),
        text_summary=_text_summary(config),
        init_summary=init_sentence,
        trained_on=trained_on_summary(trained),
        consent=consent_statement(trained),
        recipe=recipe_rows(run_args, config, next((e.num_processes for e in evaluations if e.num_processes), None))
        if run_args else None,
    )
    return card


def _vision_summary(config: Any) -> str:
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return "Swin Transformer V2-B (patch 4, window 12), 384×192 input"
    size = getattr(vision, "image_size", None)
    stem = ", convolutional stem (`vision_stem: conv`)" if getattr(config, "vision_stem", "patch") == "conv" else ""
    return (f"Swin Transformer V2 (embed {vision.embed_dim}, depths {list(vision.depths)}, window "
            f"{vision.window_size}{stem}), input {size}")


def _text_summary(config: Any) -> str:
    text = getattr(config, "text_config", None)
    if text is None:
        return "Llama-3.2-1B (last-token pooling)"
    pooling = "mean pooling (`text_pooling: mean`)" if getattr(config, "text_pooling", "last") == "mean" else "last-token pooling"
    return (f"Llama (hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocabulary "
            f"{text.vocab_size}), {pooling}")


def check_model_card(card: ModelCard) -> None:
    """The library's offline checks of a card (``validate()`` needs the Hub).

    Raises:
        ValueError: saying which check failed.
    """
    data = card.data
    if not isinstance(data, ModelCardData):
        raise ValueError(f"card metadata is a {type(data).__name__}, not ModelCardData")
    as_dict = data.to_dict()
    for key in ("library_name", "license", "tags"):
        if not as_dict.get(key):
            raise ValueError(f"card metadata lacks {key!r}")
    again = ModelCardData(**as_dict)
    if again.to_dict() != as_dict:
        raise ValueError("ModelCardData does not round-trip through to_dict()")
    if data.eval_results:
        model_index = eval_results_to_model_index(data.model_name, data.eval_results)
        name, parsed = model_index_to_eval_results(model_index)
        if name != data.model_name or [r.__dict__ for r in parsed] != [r.__dict__ for r in data.eval_results]:
            raise ValueError("model-index does not convert back to the same EvalResult list")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "README.md"
        card.save(path)
        loaded = ModelCard.load(path)
    if loaded.data.to_dict() != as_dict or loaded.text.strip() != card.text.strip():
        raise ValueError("the card does not round-trip through ModelCard.save / ModelCard.load")


def write_model_card(card: ModelCard, output_dir: str | Path) -> Path:
    """Check the card and save it as ``README.md`` in ``output_dir``."""
    check_model_card(card)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


__all__ = [
    "Evaluation", "ModeResults", "TrainingData", "build_card_data", "check_model_card", "consent_statement",
    "load_evaluation", "load_run_args", "parse_eval_results", "recorded_stages", "trained_on_summary", "training_data",
    "recipe_rows", "render_model_card", "write_model_card",
]
