"""Which SynthPedes attributes does a trained DiaNA carry? Linear probes on its embeddings.

Retrieval R@1 says how far a model is from the attribute oracle, not why. This fits one
multinomial logistic regression per attribute on frozen embeddings of training persons and reports
its accuracy on the test persons, for the image embeddings (every test image) and the dialogue
embeddings (full dialogues that state the attribute), beside the majority-class rate. An attribute
near its majority rate on both sides is one the model cannot use to rank, whatever the oracle says.

    python -m diana.training.evaluation.attribute_probe --model_name_or_path outputs/main_job/stage2 \\
        --data_dir outputs/main_job/synthpedes/chatpedes --output_dir outputs/main_job/attribute_probe

Writes attribute_probe.json and attribute_probe.png (bars per attribute). SynthPedes only: it
reads the per-entry `synthpedes` record (attributes, what each round revealed) of the annotations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diana.processing.cli_errors import ArgumentParser, require_model_folder, require_path, require_range, run_cli
from diana.processing.data.annotations import load_json_list
from diana.processing.data.chatpedes import find_images_dir, parse_entries
from diana.processing.image_loading import load_rgb_image
from diana.processing.model_loading import load_model_and_processor

from .protocol import encode_queries, tokenize_dialogues

logger = logging.getLogger("diana.attribute_probe")


def fit_probe(train_x: torch.Tensor, train_y: Sequence[str], test_x: torch.Tensor, test_y: Sequence[str],
              *, weight_decay: float = 1e-4, max_iter: int = 300) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression on L2-normalised features.

    A class seen only at test time can never be predicted: it counts as an error, as it should.
    """
    classes = sorted(set(train_y) | set(test_y))
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[y] for y in train_y])
    yte = torch.tensor([index[y] for y in test_y])
    xtr, xte = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    weight = torch.zeros(xtr.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    # Unit-norm features: a fixed scale of 10 lets the weights stay small (well-conditioned L-BFGS).
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(xtr @ weight * 10 + bias, ytr) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    with torch.no_grad():
        return float(((xte @ weight * 10 + bias).argmax(1) == yte).float().mean())


def majority_rate(train_y: Sequence[str], test_y: Sequence[str]) -> float:
    """Accuracy on test of always answering the most frequent training class (ties: the first name
    in sorted order, so the figure does not depend on the process's string hashing)."""
    values = list(train_y)
    top = max(sorted(set(values)), key=values.count)
    return sum(y == top for y in test_y) / len(test_y)


def load_synthpedes_split(data_dir: str | os.PathLike, split: str, max_entries: int | None) -> list[dict[str, Any]]:
    """Entries of `{split}_reid.json` with their SynthPedes record, dialogues as question/answer lists."""

    path = os.path.join(data_dir, f"{split}_reid.json")
    raw = load_json_list(path)  # read once: validated by parse_entries, the 'synthpedes' records kept here
    entries = parse_entries(path, raw)[:max_entries]
    for entry in entries:
        record = raw[entry["entry_index"]].get("synthpedes")
        if not isinstance(record, dict) or "attributes" not in record or "revealed" not in record:
            raise ValueError(f"{path}: entry {entry['entry_index']} has no 'synthpedes' attributes/revealed record "
                             "(the attribute probe needs SynthPedes annotations)")
        if len(record["revealed"]) != len(entry["dialogues"]):
            raise ValueError(f"{path}: entry {entry['entry_index']}: {len(entry['dialogues'])} dialogues but "
                             f"{len(record['revealed'])} 'revealed' lists")
        entry["attributes"], entry["revealed"] = record["attributes"], record["revealed"]
    return entries


@torch.inference_mode()
def embed(model, processor, data_dir, entries, *, batch_size: int = 128, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings (E, D) one per entry, full-dialogue embeddings (N, D) in entry/dialogue order)."""

    param = next(model.parameters())
    images_dir = find_images_dir(os.fspath(data_dir))
    images = []
    for start in tqdm(range(0, len(entries), batch_size), desc=f"{desc} images", leave=False):
        batch = [load_rgb_image(os.path.join(images_dir, e["file_path"]), where=f"entry {e['entry_index']}")
                 for e in entries[start : start + batch_size]]
        pixel_values = processor(images=batch)["pixel_values"].to(param.device, param.dtype)
        images.append(model.encode_images(pixel_values).image_embeds.float().cpu())
    dialogues = [d for e in entries for d in e["dialogues"]]
    tokens = tokenize_dialogues(processor, dialogues)
    text = encode_queries(model, tokens, batch_size=batch_size, pad_token_id=processor.tokenizer.pad_token_id,
                          keep_attributes=False, desc=f"{desc} dialogues")["embeds"][:, -1]  # (N, D) full dialogue
    return torch.cat(images), text.float()


def probe_model(model, processor, data_dir: str | os.PathLike, *, train_entries: int | None = 2000,
                batch_size: int = 128) -> dict[str, dict[str, float | int]]:
    """Per attribute: image / dialogue probe accuracy on the test persons and their majority rates."""
    train = load_synthpedes_split(data_dir, "train", train_entries)
    test = load_synthpedes_split(data_dir, "test", None)
    train_images, train_text = embed(model, processor, data_dir, train, batch_size=batch_size, desc="train")
    test_images, test_text = embed(model, processor, data_dir, test, batch_size=batch_size, desc="test")

    def dialogue_rows(entries, name):
        """(dialogue positions, labels) of the dialogues that state attribute `name`."""
        rows, labels, position = [], [], 0
        for e in entries:
            for revealed in e["revealed"]:
                if any(name in stated for stated in revealed):
                    rows.append(position)
                    labels.append(str(e["attributes"][name]))
                position += 1
        return rows, labels

    report = {}
    for name in train[0]["attributes"]:
        ytr = [str(e["attributes"][name]) for e in train]
        yte = [str(e["attributes"][name]) for e in test]
        row = {"image": fit_probe(train_images, ytr, test_images, yte), "image_majority": majority_rate(ytr, yte)}
        tr_rows, tr_labels = dialogue_rows(train, name)
        te_rows, te_labels = dialogue_rows(test, name)
        row["dialogues"] = len(te_rows)
        if tr_rows and te_rows:
            row["text"] = fit_probe(train_text[tr_rows], tr_labels, test_text[te_rows], te_labels)
            row["text_majority"] = majority_rate(tr_labels, te_labels)
        report[name] = row
    return report


def format_table(report: dict[str, dict[str, float | int]]) -> str:
    lines = ["| attribute | image | majority | dialogue | majority | dialogues |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in report.items():
        text = f"{r['text']:.2f} | {r['text_majority']:.2f}" if "text" in r else "– | –"
        lines.append(f"| {name} | {r['image']:.2f} | {r['image_majority']:.2f} | {text} | {r['dialogues']} |")
    return "\n".join(lines)


def plot_probe(report: dict[str, dict[str, float | int]], path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report)
    fig = Figure(figsize=(1.0 * len(names) + 2, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = torch.arange(len(names)).float()
    ax.bar(x - 0.2, [report[n]["image"] for n in names], 0.4, label="image", color="tab:blue")
    ax.bar(x + 0.2, [report[n].get("text", 0.0) for n in names], 0.4, label="dialogue", color="tab:orange")
    for i, n in enumerate(names):
        ax.hlines(report[n]["image_majority"], i - 0.4, i, colors="k", linestyles="dashed")
        if "text_majority" in report[n]:
            ax.hlines(report[n]["text_majority"], i, i + 0.4, colors="k", linestyles="dashed")
    ax.set_xticks(x.tolist(), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("probe accuracy (test persons)")
    ax.set_title("linear probes per attribute (dashed: majority class)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)


def run(model_dir: str | os.PathLike, data_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
        train_entries: int | None = 2000, batch_size: int = 128, device: str | None = None) -> dict[str, Any]:
    """Loads a model folder, probes it on a SynthPedes ChatPedes-layout folder and, with `output_dir`,
    writes attribute_probe.json and attribute_probe.png there. Returns the report."""

    model, processor = load_model_and_processor(model_dir, device=device, dtype="auto")
    report = probe_model(model, processor, data_dir, train_entries=train_entries, batch_size=batch_size)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attribute_probe.json").write_text(json.dumps(report, indent=2))
        plot_probe(report, out / "attribute_probe.png")
        logger.info("wrote %s", out)
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(prog="python -m diana.training.evaluation.attribute_probe", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a saved DiaNA folder or a Hub repository id")
    parser.add_argument("--data_dir", required=True, help="a SynthPedes ChatPedes-layout folder")
    parser.add_argument("--output_dir", default=None, help="folder for attribute_probe.json / .png")
    parser.add_argument("--train_entries", type=int, default=2000, help="training images (with their dialogues) to fit on")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    require_model_folder("--model_name_or_path", args.model_name_or_path, allow_hub_id=True)
    require_path("--data_dir", args.data_dir, "folder")
    require_range("--train_entries", args.train_entries, 1)
    require_range("--batch_size", args.batch_size, 1)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    report = run(args.model_name_or_path, args.data_dir, args.output_dir, train_entries=args.train_entries, batch_size=args.batch_size,
                 device=args.device)
    print(format_table(report))
    return report


if __name__ == "__main__":
    run_cli(main)
