"""DiaNA chat-based person retrieval demo (Gradio): pick or upload a gallery, describe the person,
answer follow-up questions, watch the ranking change after every round.

On a Hugging Face Space this file runs as is: the model comes from the Hub repository named by
the ``MODEL_ID`` variable (pinned by ``MODEL_REVISION``) through ``trust_remote_code``, and the
example galleries are the sub-folders of ``examples/`` next to it. Locally:

    python hub_cards/space/app.py --model path/to/exported_folder --examples path/to/galleries
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

# The installed project (local runs, tests), or on the Space the `diana/processing/` copy that
# `diana export --space` puts next to this file (Python puts the script's folder first on sys.path).
from diana.processing.image_loading import load_rgb_pil
from diana.processing.processing_diana import DEFAULT_FIRST_QUESTION
from diana.processing.search import ChatSearchSession, GalleryIndex, list_images

HERE = Path(__file__).resolve().parent
FIRST_QUESTION = DEFAULT_FIRST_QUESTION
UPLOADED = "(my uploaded images)"


def find_example_galleries(root: str | os.PathLike | None) -> dict[str, list[str]]:
    """Every sub-folder of ``root`` holding images is one example gallery."""
    if root is None or not Path(root).is_dir():
        return {}
    galleries = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        images = list_images(folder)
        if images:
            galleries[folder.name] = images
    return galleries


class DemoBackend:
    """Model, processor, and the gallery indexes (each example encoded once, then shared)."""

    def __init__(self, model: Any, processor: Any, galleries: dict[str, list[str]], k: int = 8) -> None:
        self.model = model.eval()
        self.processor = processor
        self.galleries = galleries
        self.k = k
        self._indexes: dict[str, GalleryIndex] = {}

    def index_for(self, name: str, uploads: list[str] | None) -> GalleryIndex:
        if name == UPLOADED:
            if not uploads:
                raise gr.Error("Upload some images first (or pick an example gallery).")
            # Uploaded galleries are per session: never cached across users.
            return GalleryIndex.build(list(uploads), self.model, self.processor, on_bad_image="skip", progress=False)
        if name not in self.galleries:
            raise gr.Error(f"Unknown gallery {name!r}.")
        if name not in self._indexes:
            self._indexes[name] = GalleryIndex.build(self.galleries[name], self.model, self.processor, progress=False)
        return self._indexes[name]


def _gallery_items(result) -> list[tuple[Image.Image, str]]:
    items = []
    for rank, (path, score) in enumerate(zip(result.paths, result.scores), start=1):
        # Shown as the model saw it: upright (EXIF), transparency on white.
        items.append((load_rgb_pil(path), f"#{rank} · {score:.3f}"))
    return items


def build_demo(backend: DemoBackend) -> gr.Blocks:
    """The Gradio app around a :class:`DemoBackend`."""
    choices = list(backend.galleries) + [UPLOADED]

    def load_gallery(name: str, uploads: list[str] | None):
        index = backend.index_for(name, uploads)
        session = ChatSearchSession(backend.model, backend.processor, index, k=backend.k, check_index=False)
        status = f"Gallery **{name}**: {len(index)} images. Describe the person you saw."
        return session, status, [], [], gr.update(value=FIRST_QUESTION), gr.update(value="")

    def add_round(session: ChatSearchSession | None, question: str, answer: str, chat: list[dict]):
        if session is None:
            raise gr.Error("Load a gallery first.")
        if not answer or not answer.strip():
            raise gr.Error("Type an answer (the description, in the first round).")
        question = question.strip() or FIRST_QUESTION
        result = session.add_round(question, answer.strip())
        chat = list(chat or []) + [
            {"role": "assistant", "content": question}, {"role": "user", "content": answer.strip()},
        ]
        status = (f"Round {result.round_index}: top {len(result.paths)} of {len(session.index)} "
                  f"(+{result.new_tokens} tokens this round).")
        return session, chat, _gallery_items(result), status, gr.update(value=""), gr.update(value="")

    def new_search(session: ChatSearchSession | None):
        if session is not None:
            session.reset()
        return session, [], [], "New search: describe the person you saw.", gr.update(value=FIRST_QUESTION), gr.update(value="")

    with gr.Blocks(title="DiaNA: chat-based person retrieval") as demo:
        gr.Markdown(
            "# DiaNA — chat-based person retrieval\n"
            "Pick a gallery, describe the person you saw, then answer follow-up questions: the ranking "
            "is recomputed after every answer. Only search photos you are entitled to search."
        )
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                gallery_choice = gr.Dropdown(choices, value=choices[0], label="Gallery", elem_id="gallery-choice")
                uploads = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                  label="Or upload images", elem_id="uploads")
                load = gr.Button("Load gallery", elem_id="load")
                status = gr.Markdown("Load a gallery to start.", elem_id="status")
                chat = gr.Chatbot(label="Dialogue", height=260, elem_id="chat")
                question = gr.Textbox(value=FIRST_QUESTION, label="Question", elem_id="question")
                answer = gr.Textbox(label="Answer (the witness)", placeholder="A woman in a red coat...",
                                    elem_id="answer")
                with gr.Row():
                    submit = gr.Button("Add round", variant="primary", elem_id="submit")
                    reset = gr.Button("New search", elem_id="reset")
            with gr.Column(scale=2):
                ranking = gr.Gallery(label="Ranking", columns=min(backend.k, 4), height=640, object_fit="contain",
                                     elem_id="ranking")
        load.click(load_gallery, [gallery_choice, uploads], [session, status, chat, ranking, question, answer])
        submit.click(add_round, [session, question, answer, chat], [session, chat, ranking, status, question, answer])
        answer.submit(add_round, [session, question, answer, chat], [session, chat, ranking, status, question, answer])
        reset.click(new_search, [session], [session, chat, ranking, status, question, answer])
    return demo


def default_model_id(readme: Path = HERE / "README.md") -> str | None:
    """The first entry of ``models:`` in the Space README's YAML header (the Space's own metadata)."""
    import yaml

    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    header = yaml.safe_load(text.split("---", 2)[1]) or {}
    models = header.get("models") or []
    return models[0] if models else None


def load_backend(model_ref: str, revision: str | None, examples: str | None, k: int) -> DemoBackend:
    """Load the model (a local folder or a Hub id) with its remote code."""
    from transformers import AutoModel, AutoProcessor

    looks_local = model_ref.startswith((".", "/", "~")) or model_ref.count("/") != 1
    if looks_local and not Path(model_ref).expanduser().is_dir():
        raise FileNotFoundError(f"--model: model folder not found: {model_ref}")
    model = AutoModel.from_pretrained(model_ref, trust_remote_code=True, revision=revision)
    processor = AutoProcessor.from_pretrained(model_ref, trust_remote_code=True, revision=revision)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return DemoBackend(model, processor, find_example_galleries(examples), k=k)


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one `error: ...` line, exit status 2 (the project's commands do the same)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    parser = _OneLineParser(description="DiaNA chat search demo")
    parser.add_argument("--model", default=os.environ.get("MODEL_ID") or default_model_id(),
                        help="exported folder or Hub id (default: env MODEL_ID, else README models[0])")
    parser.add_argument("--revision", default=os.environ.get("MODEL_REVISION"), help="Hub revision (env MODEL_REVISION)")
    parser.add_argument("--examples", default=str(HERE / "examples"), help="folder of example galleries (sub-folders)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or the MODEL_ID variable, or models: in README.md) is required")
    demo = build_demo(load_backend(args.model, args.revision, args.examples, args.top_k))
    demo.launch(server_name=args.host, server_port=args.port)


def cli(argv: list[str] | None = None) -> None:
    """`main` with a user's mistake (a missing model or gallery folder, an unreadable image) as one
    `error: ...` line and exit status 2; DIANA_DEBUG=1 keeps the traceback."""
    try:
        main(argv)
    except (OSError, ValueError) as error:
        # The rule of diana.processing.cli_errors.debug_requested (this file cannot import the project).
        if os.environ.get("DIANA_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
