"""Interactive evaluation: a questioner asks, a simulated witness answers, the model re-ranks.

For every target (a gallery image's person) round 1 is the witness's description from the data;
in every later round the questioner policy (`diana.processing.search.questioner`) asks and a
simulated witness answers about the target:

- SynthPedes data (entries carry the generator's ground truth): exactly from the person's attributes,
  in the generator's answer templates (the template drawn with a per-target seed); "I don't
  remember." when the question asks about nothing the person has (a bag colour without a bag) or
  about no attribute;
- other ChatPedes-layout data: from the target's own annotated rounds: the answer of the round whose
  question is the asked question (compared after `normalize_text`, the bank's grouping), else
  "I don't remember.".

Metrics per policy and round r (the gallery is every image of the split, a hit is any image of the
target's person, ties by gallery index as in the evaluation protocol):

- R@1, R@10: the first hit within the top 1 / 10 after round r (percent);
- Hits@10: ChatIR's cumulative Hits@10 (Levy et al. 2023): within the top 10 at ANY round <= r;
- mean rank: mean 1-based rank of the first hit after round r;
- BRI: PlugIR's Best log Rank Integral (Lee et al. 2024, "Interactive Text-to-Image Retrieval with
  Large Language Models: A Plug-and-Play Approach"): with b_t the best 1-based rank reached in rounds
  1..t, BRI(r) = (1 / (r - 1)) * sum_{t=1}^{r-1} (log b_t + log b_{t+1}) / 2 (the trapezoid rule for
  the mean of log b over rounds 1..r; BRI(1) = log b_1), averaged over targets. Lower is better; 0
  means the target was first from the description on.

Cost: the gallery is encoded once. Policies that do not read the model (random, dataset, oracle) only
need the dialogue text, so their dialogues are written first and then encoded all together (one tower
pass per dialogue, every round read at its end, as the evaluation protocol); info_gain runs one
`ChatSearchSession` per target (each round encodes only its new tokens; the hypotheses of a question
go through the tower in one batched pass). The ranks of all targets and rounds are computed together.

    diana evaluate-interactive --model outputs/main_job/stage2 --data outputs/main_job/synthpedes/chatpedes \\
        --policies random info_gain oracle --rounds 10
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diana.processing.cli_errors import (
    ArgumentParser,
    UserInputError,
    require_choices,
    require_model_folder,
    require_path,
    require_range,
    run_cli,
)
from diana.processing.model_loading import load_model_and_processor
from diana.processing.processing_diana import DEFAULT_FIRST_QUESTION
from diana.processing.search import ChatSearchSession, GalleryIndex
from diana.processing.search.questioner import (
    POLICIES,
    QuestionBank,
    Questioner,
    make_policy,
)

from .metrics import first_hit_ranks, interactive_metrics
from .protocol import encode_queries, score, tokenize_dialogues
from .witness import Gallery, Target, load_split_entries, make_witness, pick_targets

logger = logging.getLogger(__name__)

RESULTS_FILE, TABLE_FILE, PLOT_FILE, DIALOGUES_FILE = (
    "interactive_results.json", "interactive_table.md", "interactive_curves.png", "interactive_dialogues.json",
)
TABLE_COLUMNS = ("R@1", "R@10", "Hits@10", "mean_rank", "BRI")
# Policies whose questions depend on the model's scores: they run a real search session per target.
MODEL_POLICIES = ("info_gain",)


# ------------------------------------------------------------------------------------------ targets


@dataclass
class _Transcript:
    """The dialogue so far: what a policy that does not read the model sees of a session."""

    rounds: list[tuple[str, str]]


def _ask(questioner: Questioner, session: Any, witness: Any) -> tuple[str, str] | None:
    proposal = questioner.propose(session)
    return None if proposal is None else (proposal.question, witness.answer(proposal))


def write_dialogues(questioner_for: Callable[[int], Questioner], targets: Sequence[Target], witnesses: Sequence[Any],
                    rounds: int) -> list[list[tuple[str, str]]]:
    """Each target's dialogue with a policy that reads only the dialogue (no model): up to `rounds` rounds,
    fewer when the policy has nothing left to ask."""
    dialogues = []
    for i, (target, witness) in enumerate(zip(targets, witnesses)):
        questioner, transcript = questioner_for(i), _Transcript([(DEFAULT_FIRST_QUESTION, target.description)])
        while len(transcript.rounds) < rounds and (step := _ask(questioner, transcript, witness)) is not None:
            transcript.rounds.append(step)
        dialogues.append(transcript.rounds)
    return dialogues


def encode_written_dialogues(model: Any, processor: Any, dialogues: Sequence[Sequence[tuple[str, str]]], rounds: int,
                             with_attributes: bool, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{"embeds": (T, R, D), "attributes": (T, R, K, D)} after each round; a dialogue that ended early
    keeps its last encoding (the processor repeats its last round)."""
    tokens = tokenize_dialogues(processor, list(dialogues), desc="interactive: tokenise")
    text = encode_queries(model, tokens, batch_size=batch_size, pad_token_id=processor.pad_token_id,
                          keep_attributes=with_attributes, desc="interactive: dialogues")
    return {name: _pad_to_rounds(value, rounds) for name, value in text.items()}


def _pad_to_rounds(x: torch.Tensor, rounds: int) -> torch.Tensor:
    if x.shape[1] >= rounds:
        return x[:, :rounds]
    return torch.cat([x, x[:, -1:].expand(-1, rounds - x.shape[1], *x.shape[2:])], dim=1)


def run_sessions(questioner_for: Callable[[int], Questioner], targets: Sequence[Target], witnesses: Sequence[Any],
                 model: Any, processor: Any, index: GalleryIndex, rounds: int, mode: str
                 ) -> tuple[list[list[tuple[str, str]]], dict[str, torch.Tensor]]:
    """Each target's search with a policy that reads the model: a `ChatSearchSession` per target.

    Returns:
        (dialogues, {"embeds": (T, R, D), "attributes": (T, R, K, D) unless mode is global}).
    """
    with one_torch_thread():
        return _run_sessions(questioner_for, targets, witnesses, model, processor, index, rounds, mode)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Runs the block with one intra-op thread, then restores the setting. A search round's ops are a few
    hundred tokens wide, too small to split: on the shared 2-core CPU 27 info_gain proposals took 18 s with
    two threads (waiting on each other) and 1.5 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_sessions(questioner_for: Callable[[int], Questioner], targets: Sequence[Target], witnesses: Sequence[Any],
                  model: Any, processor: Any, index: GalleryIndex, rounds: int, mode: str
                  ) -> tuple[list[list[tuple[str, str]]], dict[str, torch.Tensor]]:
    dialogues, embeds, attributes = [], [], []
    for i, (target, witness) in enumerate(zip(targets, witnesses)):
        questioner = questioner_for(i)
        session = ChatSearchSession(model, processor, index, k=1, mode=mode, check_index=False)
        session.start(target.description)
        per_round = [(session.text_embeds[0], session.text_attribute_embeds)]
        while len(session.rounds) < rounds:
            step = _ask(questioner, session, witness)
            if step is None:
                break
            session.add_round(*step)
            per_round.append((session.text_embeds[0], session.text_attribute_embeds))
        per_round += [per_round[-1]] * (rounds - len(per_round))
        dialogues.append(list(session.rounds))
        embeds.append(torch.stack([e for e, _ in per_round]))
        if mode != "global":
            attributes.append(torch.stack([a[0] for _, a in per_round]))
    out = {"embeds": torch.stack(embeds)}
    if mode != "global":
        out["attributes"] = torch.stack(attributes)
    return dialogues, out


def first_hits_per_round(model: Any, text: Mapping[str, torch.Tensor], index: GalleryIndex, target_ids: torch.Tensor,
                         mode: str) -> torch.Tensor:
    """(R, T) 0-based rank of each target's first hit after each round (protocol's scores and tie rule)."""
    device = next(model.parameters()).device
    images = {"embeds": index.image_embeds.to(device)}
    if mode != "global":
        images["attributes"] = index.image_attribute_embeds.to(device)
    out = []
    for r in range(text["embeds"].shape[1]):
        at_r = {name: value[:, r] for name, value in text.items()}
        with torch.no_grad():
            similarity = score(model, at_r, images, mode, device)
        out.append(first_hit_ranks(similarity, target_ids.to(device), index.ids.to(device)).cpu())
    return torch.stack(out)


def build_questioners(policy: str, bank: QuestionBank, targets: Sequence[Target], gallery: Gallery, *, seed: int,
                      top_n: int, temperature: float | None) -> Callable[[int], Questioner]:
    """Target index -> its questioner for `policy` (random: seeded per target; dataset: its own dialogue)."""
    if policy == "random":
        return lambda i: make_policy("random", bank, seed=seed * 100003 + i)
    if policy == "dataset":
        return lambda i: make_policy("dataset", bank, dialogue=targets[i].dialogues[0])
    if policy == "oracle":
        persons = gallery.person_attributes()
        if not persons:
            raise ValueError("the oracle policy needs SynthPedes ground truth ('synthpedes' attributes in the entries)")
        shared = make_policy("oracle", bank, gallery_attributes=persons)
        return lambda i: shared
    if policy == "info_gain":
        shared = make_policy("info_gain", bank, top_n=top_n, temperature=temperature)
        return lambda i: shared
    raise ValueError(f"unknown questioner policy {policy!r}: one of {', '.join(POLICIES)}")


def evaluate_interactive(
    model: Any,
    processor: Any,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    policies: Sequence[str] = ("random", "info_gain", "oracle"),
    rounds: int = 10,
    bank: QuestionBank | None = None,
    targets_per: str = "image",
    max_targets: int | None = None,
    top_n: int = 50,
    temperature: float | None = None,
    mode: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Simulated interactive retrieval on one split, per policy and round (see the module docstring).

    Args:
        model, processor: a DiaNA model (eval mode) and its processor.
        data_dir: ChatPedes-layout folder.
        split: annotation file (`{split}_reid.json`); the gallery is its images.
        policies: questioner policies (`diana.processing.search.questioner.POLICIES`).
        rounds: rounds per search, the description included.
        bank: the questions (default: SynthPedes' when the data is SynthPedes, else the split's own).
        targets_per: "image" (every entry) or "person" (each person's first entry).
        max_targets: evaluate the first N targets only.
        top_n, temperature: the info_gain policy's candidates and temperature.
        mode: score mode (default `model.config.score_mode`).
        seed: witnesses' template draws and the random policy.
        batch_size: dialogues per encoder call.
        output_dir: where to write the JSON, the Markdown table, the plot and the dialogues.

    Returns:
        {"policies": {name: {"rounds": [per-round metrics], "asked_per_round": [...], "seconds": ...}},
        "meta": {...}}.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"policies must be a non-empty subset of {POLICIES}, got {list(policies)}")
    require_range("rounds", rounds, 1)
    mode = mode or getattr(model.config, "score_mode", "global")
    start = time.perf_counter()
    all_targets, gallery = load_split_entries(data_dir, split)
    targets = pick_targets(all_targets, targets_per, max_targets)
    synthetic = all(t.attributes is not None for t in targets)
    if bank is None:
        bank = QuestionBank.from_synthpedes() if synthetic else QuestionBank.from_dialogues(
            [{"dialogue": d} for t in all_targets for d in t.dialogues])
    index = GalleryIndex.build(gallery.paths, model, processor, with_attributes=mode != "global",
                               batch_size=batch_size, ids=gallery.person_ids, progress=False)
    gallery_seconds = time.perf_counter() - start
    target_ids = torch.tensor([t.person_id for t in targets])
    results: dict[str, Any] = {"policies": {}}
    transcripts: dict[str, list] = {}
    for policy in policies:
        policy_start = time.perf_counter()
        questioner_for = build_questioners(policy, bank, targets, gallery, seed=seed, top_n=top_n,
                                           temperature=temperature)
        witnesses = [make_witness(t, seed * 100003 + i) for i, t in enumerate(targets)]
        if policy in MODEL_POLICIES:
            dialogues, text = run_sessions(questioner_for, targets, witnesses, model, processor, index, rounds, mode)
        else:
            dialogues = write_dialogues(questioner_for, targets, witnesses, rounds)
            text = encode_written_dialogues(model, processor, dialogues, rounds, mode != "global", batch_size)
        first_hits = first_hits_per_round(model, text, index, target_ids, mode)  # (R, T)
        results["policies"][policy] = {
            "rounds": interactive_metrics(first_hits),
            "asked_per_round": [sum(len(d) >= r for d in dialogues) for r in range(1, rounds + 1)],
            "seconds": round(time.perf_counter() - policy_start, 2),
        }
        transcripts[policy] = [{"person_id": t.person_id, "file_path": t.file_path, "dialogue": d}
                               for t, d in zip(targets, dialogues)]
        logger.info("interactive %s: %.1f s", policy, time.perf_counter() - policy_start)
    results["meta"] = {
        "data": str(data_dir), "split": split, "num_targets": len(targets), "targets_per": targets_per,
        "num_gallery": len(gallery.paths), "num_persons": len(set(gallery.person_ids)), "rounds": rounds,
        "score_mode": mode, "bank_questions": len(bank), "top_n": top_n,
        "witness": "synthpedes attributes" if synthetic else "annotated rounds", "seed": seed,
        "gallery_seconds": round(gallery_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
    }
    if output_dir is not None:
        write_interactive_report(results, output_dir, transcripts)
    return results


def evaluate_interactive_folder(model_dir: str | os.PathLike, data_dir: str | os.PathLike, *, device: str | None = None,
                                **kwargs: Any) -> dict[str, Any]:
    """`evaluate_interactive` of a saved model folder (keyword arguments as there)."""
    model, processor = load_model_and_processor(str(model_dir), device=device)
    results = evaluate_interactive(model, processor, data_dir, **kwargs)
    results["meta"]["model"] = str(model_dir)
    return results


# ------------------------------------------------------------------------------------------ report


def format_interactive_table(results: Mapping[str, Any], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A Markdown table: one row per round, one column group per policy."""
    policies = list(results["policies"])
    header = "| round | " + " | ".join(f"{p} {c}" for p in policies for c in columns) + " |"
    lines = [header, "|---" * (1 + len(policies) * len(columns)) + "|"]
    for r in range(len(results["policies"][policies[0]]["rounds"])):
        cells = [f"{results['policies'][p]['rounds'][r][c]:.2f}" for p in policies for c in columns]
        lines.append(f"| {r + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_interactive(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """One curve per policy: R@1, cumulative Hits@10 and BRI against the round."""
    panels = ("R@1", "Hits@10", "BRI")
    fig = Figure(figsize=(3.6 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        for policy, per_policy in results["policies"].items():
            rows = per_policy["rounds"]
            ax.plot([row["round"] for row in rows], [row[metric] for row in rows], marker="o", label=policy)
        ax.set_title(metric + (" (cumulative)" if metric == "Hits@10" else " (lower is better)" if metric == "BRI" else ""))
        ax.set_xlabel("round (1 = the description)")
        ax.set_ylabel("log rank" if metric == "BRI" else "%")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(loc="best", fontsize="small")
    meta = results.get("meta", {})
    fig.suptitle(f"interactive retrieval, simulated witness ({meta.get('num_targets')} targets, "
                 f"{meta.get('num_gallery')} images)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def write_interactive_report(results: Mapping[str, Any], output_dir: str | os.PathLike,
                             transcripts: Mapping[str, Any] | None = None) -> None:
    """`interactive_results.json`, `interactive_table.md`, `interactive_curves.png` (and the dialogues)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    (folder / TABLE_FILE).write_text(format_interactive_table(results) + "\n")
    plot_interactive(results, folder / PLOT_FILE)
    if transcripts is not None:
        (folder / DIALOGUES_FILE).write_text(json.dumps(transcripts, indent=1, ensure_ascii=False))


# ------------------------------------------------------------------------------------------ command


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`diana evaluate-interactive`: parses, checks every flag, evaluates, prints the table."""
    parser = ArgumentParser(prog="diana evaluate-interactive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="saved DiaNA folder (or Hub id)")
    parser.add_argument("--data_dir", required=True, help="ChatPedes-layout folder")
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--policies", nargs="+", default=["random", "info_gain", "oracle"],
                        help=f"questioner policies, of {', '.join(POLICIES)}")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per search, the description included")
    parser.add_argument("--question_bank", default=None, help="question bank JSON (default: SynthPedes' or the split's own)")
    parser.add_argument("--targets", default="image", choices=["image", "person"],
                        help="one search per image entry or per person")
    parser.add_argument("--max_targets", type=int, default=None)
    parser.add_argument("--top_n", type=int, default=50, help="info_gain: candidates the belief is over")
    parser.add_argument("--temperature", type=float, default=None,
                        help="info_gain: softmax temperature (default 1 / the model's logit scale)")
    parser.add_argument("--score_mode", default=None, choices=["global", "attribute", "fused"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output_dir", default=None, help="default: interactive_<model folder name>_<split>")
    args = parser.parse_args(argv)
    require_model_folder("--model_name_or_path", args.model_name_or_path, allow_hub_id=True)
    require_path("--data_dir", args.data_dir, "folder")
    require_choices("--policies", args.policies, POLICIES)
    require_range("--rounds", args.rounds, 1)
    require_range("--max_targets", args.max_targets, 1)
    require_range("--top_n", args.top_n, 2)
    if args.temperature is not None and not args.temperature > 0:
        raise UserInputError(f"--temperature {args.temperature!r}: must be > 0")
    require_range("--batch_size", args.batch_size, 1)
    require_path("--question_bank", args.question_bank, "file")
    bank = None
    if args.question_bank:
        try:
            bank = QuestionBank.load(args.question_bank)
        except ValueError as error:
            raise UserInputError(str(error)) from error
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model, processor = load_model_and_processor(args.model_name_or_path, device=args.device)
    output_dir = args.output_dir or f"interactive_{Path(args.model_name_or_path).resolve().name}_{args.split}"
    results = evaluate_interactive(
        model, processor, args.data_dir, split=args.split, policies=args.policies, rounds=args.rounds, bank=bank,
        targets_per=args.targets, max_targets=args.max_targets, top_n=args.top_n, temperature=args.temperature,
        mode=args.score_mode, seed=args.seed, batch_size=args.batch_size, output_dir=output_dir,
    )
    meta = results["meta"]
    print(f"\n{args.model_name_or_path} on {args.data_dir} ({args.split}): {meta['num_targets']} targets, {meta['num_gallery']} images, "
          f"witness from {meta['witness']}, {meta['score_mode']} scores\n")
    print(format_interactive_table(results))
    print(f"report: {os.path.abspath(output_dir)}")
    return results


__all__ = [
    "evaluate_interactive", "evaluate_interactive_folder", "format_interactive_table", "main", "plot_interactive",
    "write_interactive_report",
]

if __name__ == "__main__":
    run_cli(main)
