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

from .evaluation_report import CUMULATIVE_KEY, TABLE_METRICS, reference_rounds
from .run_record import (
    DATASETS,
    PAPER_BASE_MODELS,
    consent_statement,
    evaluation_dataset_of,
    initialisation,
    load_run_args,
    recipe_rows,
    trained_on_summary,
    training_data,
)

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
# The shipped tokenizer (and any Llama-initialised weights) fall under Meta's licence.
DEFAULT_LICENSE = "llama3.2"
DEFAULT_TAGS = (
    "diana", "person-retrieval", "text-to-image-retrieval", "chat-based-retrieval", "dialogue",
    "swinv2", "llama", "custom_code",
)
INDEX_METRICS = (("R@1", "recall@1"), ("R@5", "recall@5"), ("R@10", "recall@10"), ("mAP", "map"))
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
    split: the run arguments do (see :func:`load_evaluation`).

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
        if results.get(name) is not None:
            modes[name] = _mode_results(name, results[name], source)
    if not modes:
        raise ValueError(f"{source}: no score mode among {SCORE_MODES} (top-level keys: {sorted(results)})")
    meta = results.get("meta", {})
    reference = _reference_results(results["reference"]) if isinstance(results.get("reference"), Mapping) else None
    return Evaluation(
        dataset=dataset, split=split, modes=modes, num_queries=meta.get("num_queries"),
        num_gallery=meta.get("num_gallery"), curve=curve, reference=reference,
        num_processes=meta.get("num_processes"),
    )


def _mode_results(name: str, per_mode: Any, source: str) -> ModeResults:
    """One score mode's entry of the report; a ValueError naming the entry that is malformed."""
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
    return mode


def _reference_results(reference: Mapping[str, Any]) -> ModeResults:
    """The reference ranker `write_results` stores as {"label": ..., **curve}, in either curve layout
    (`reference_rounds`); its numeric metrics only."""
    results = ModeResults(str(reference.get("label", "reference")))
    for key, metrics in reference_rounds(reference).items():
        numeric = {m: float(v) for m, v in metrics.items() if isinstance(v, (int, float))}
        match = _ROUND.match(key)
        if key == "full":
            results.full = numeric
        elif match:
            results.rounds[int(match.group(1))] = numeric
    return results


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
        results, dataset=dataset or evaluation_dataset_of(run_args) or "chatpedes",
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
    init_sentence, inferred_bases = initialisation(run_args, config)
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
    # load_run_args is run_record's, kept here for the callers that read a run's evaluation and arguments together.
    "Evaluation", "ModeResults", "build_card_data", "check_model_card", "load_evaluation", "load_run_args",
    "parse_eval_results", "render_model_card", "write_model_card",
]
