"""DiaNA chat-based person retrieval demo (Gradio): pick or upload a gallery, describe the person,
answer the questions the system proposes (or ask your own), click photos that are not the person,
watch the ranking change after every step.

On a Hugging Face Space this file runs as is: the model comes from the Hub repository named by
the ``MODEL_ID`` variable (pinned by ``MODEL_REVISION``) through ``trust_remote_code``, and the
example galleries are the sub-folders of ``examples/`` next to it. Locally:

    python hub_cards/space/app.py --model_name_or_path path/to/exported_folder --examples_dir path/to/galleries
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
from diana.processing.cli_errors import debug_requested
from diana.processing.image_loading import load_rgb_pil
from diana.processing.processing_diana import DEFAULT_FIRST_QUESTION
from diana.processing.search import ChatSearchSession, GalleryIndex, list_images
from diana.processing.search.questioner import QuestionBank, make_policy

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
    """Model, processor, the gallery indexes (each example encoded once, then shared) and the questioner.

    Args:
        questioner: proposes each next question (``propose(session)``); default: the info_gain policy
            over the SynthPedes question bank.
    """

    def __init__(self, model: Any, processor: Any, galleries: dict[str, list[str]], k: int = 8,
                 questioner: Any = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.galleries = galleries
        self.k = k
        self.questioner = questioner or make_policy("info_gain", QuestionBank.from_synthpedes())
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


def _new_ranking(result) -> dict:
    """The gallery update showing a new ranking, with no photo highlighted from the last click."""
    return gr.update(value=_gallery_items(result), selected_index=None)


def proposal_markdown(question: str, answers: tuple[str, ...] = (), policy: str | None = None) -> str:
    """The proposed question as the page shows it (with its suggested answers, and who proposed it)."""
    text = f"**{question}**"
    if answers:
        text += "  \n_e.g. " + " / ".join(answers) + "_"
    if policy:
        text += f"  \n<small>proposed by the {policy} questioner</small>"
    return text


def marked_markdown(marked: list[int]) -> str:
    """The ranks the witness clicked, waiting for "Not this person"."""
    if not marked:
        return "Click photos in the ranking that are *not* the person, then press **Not this person**."
    return "Marked: " + ", ".join(f"#{rank}" for rank in marked)


def build_demo(backend: DemoBackend) -> gr.Blocks:
    """The Gradio app around a :class:`DemoBackend`."""
    choices = list(backend.galleries) + [UPLOADED]
    first = proposal_markdown(FIRST_QUESTION)

    def next_question(session: ChatSearchSession) -> tuple[str, str]:
        """(question to answer next, its markdown): the questioner's proposal, or a prompt to ask one."""
        proposal = backend.questioner.propose(session)
        if proposal is None:
            return "", "_No more questions to propose: ask your own below._"
        return proposal.question, proposal_markdown(proposal.question, proposal.answers, proposal.policy)

    def load_gallery(name: str, uploads: list[str] | None):
        index = backend.index_for(name, uploads)
        session = ChatSearchSession(backend.model, backend.processor, index, k=backend.k, check_index=False)
        status = f"Gallery **{name}**: {len(index)} images. Describe the person you saw."
        return session, FIRST_QUESTION, first, [], status, [], [], marked_markdown([]), "", ""

    def add_round(session: ChatSearchSession | None, proposed: str, own: str, answer: str, chat: list[dict]):
        if session is None:
            raise gr.Error("Load a gallery first.")
        if not answer or not answer.strip():
            raise gr.Error("Type an answer (the description, in the first round).")
        question = (own or "").strip() or proposed
        if not question:
            raise gr.Error("Nothing was proposed: type your own question.")
        result = session.add_round(question, answer.strip())
        chat = list(chat or []) + [
            {"role": "assistant", "content": question}, {"role": "user", "content": answer.strip()},
        ]
        status = (f"Round {result.round_index}: top {len(result.paths)} of {len(session.index)} "
                  f"(+{result.new_tokens} tokens this round).")
        proposed, shown = next_question(session)
        return session, proposed, shown, chat, status, _new_ranking(result), [], marked_markdown([]), "", ""

    def mark(marked: list[int], event: gr.SelectData):
        rank = event.index + 1
        marked = [r for r in marked if r != rank] if rank in marked else sorted([*marked, rank])
        return marked, marked_markdown(marked)

    def reject(session: ChatSearchSession | None, marked: list[int], chat: list[dict]):
        if session is None or not session.results:
            raise gr.Error("Describe the person first.")
        if not marked:
            raise gr.Error("Click the photos that are not the person first.")
        try:
            result = session.reject(marked)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        chat = list(chat or []) + [{"role": "user", "content": "Not " + ", ".join(f"#{r}" for r in marked) + "."}]
        status = (f"Round {result.round_index}, not this person: {len(session.rejected)} photo(s) left out "
                  f"(+0 tokens).")
        proposed, shown = next_question(session)
        return session, proposed, shown, chat, status, _new_ranking(result), [], marked_markdown([])

    def new_search(session: ChatSearchSession | None):
        if session is not None:
            session.reset()
        return (session, FIRST_QUESTION, first, [], "New search: describe the person you saw.", [], [],
                marked_markdown([]), "", "")

    with gr.Blocks(title="DiaNA: chat-based person retrieval") as demo:
        gr.Markdown(
            "# DiaNA — chat-based person retrieval\n"
            "Pick a gallery, describe the person you saw, then answer the questions the system asks (or ask "
            "your own): the ranking is recomputed after every answer. Click photos that are not the person to "
            "leave them out. Only search photos you are entitled to search."
        )
        session = gr.State(None)
        proposed = gr.State(FIRST_QUESTION)  # the question the answer box answers unless one is typed
        marked = gr.State([])  # ranks clicked in the ranking, 1-based
        with gr.Row():
            with gr.Column(scale=1):
                gallery_choice = gr.Dropdown(choices, value=choices[0], label="Gallery", elem_id="gallery-choice")
                uploads = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                  label="Or upload images", elem_id="uploads")
                load = gr.Button("Load gallery", elem_id="load")
                status = gr.Markdown("Load a gallery to start.", elem_id="status")
                chat = gr.Chatbot(label="Dialogue", height=260, elem_id="chat")
                gr.Markdown("Question")
                question = gr.Markdown(first, elem_id="proposed")
                answer = gr.Textbox(label="Your answer", placeholder="A woman in a red coat...", elem_id="answer")
                own = gr.Textbox(label="Or ask your own question (the answer above answers it)",
                                 placeholder="Was she carrying anything?", elem_id="own-question")
                with gr.Row():
                    submit = gr.Button("Answer", variant="primary", elem_id="submit")
                    reset = gr.Button("New search", elem_id="reset")
            with gr.Column(scale=2):
                ranking = gr.Gallery(label="Ranking", columns=min(backend.k, 4), height=640, object_fit="contain",
                                     allow_preview=False, elem_id="ranking")
                marked_text = gr.Markdown(marked_markdown([]), elem_id="marked")
                not_this = gr.Button("Not this person", elem_id="reject")
        round_outputs = [session, proposed, question, chat, status, ranking, marked, marked_text, answer, own]
        load.click(load_gallery, [gallery_choice, uploads], [session, proposed, question, chat, status, ranking, marked,
                                                             marked_text, answer, own])
        submit.click(add_round, [session, proposed, own, answer, chat], round_outputs)
        answer.submit(add_round, [session, proposed, own, answer, chat], round_outputs)
        ranking.select(mark, [marked], [marked, marked_text])
        not_this.click(reject, [session, marked, chat], round_outputs[:-2])
        reset.click(new_search, [session], round_outputs)
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
        raise FileNotFoundError(f"--model_name_or_path: model folder not found: {model_ref}")
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
    parser.add_argument("--model_name_or_path", default=os.environ.get("MODEL_ID") or default_model_id(),
                        help="exported folder or Hub id (default: env MODEL_ID, else README models[0])")
    parser.add_argument("--revision", default=os.environ.get("MODEL_REVISION"), help="Hub revision (env MODEL_REVISION)")
    parser.add_argument("--examples_dir", default=str(HERE / "examples"), help="folder of example galleries (sub-folders)")
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    args = parser.parse_args(argv)
    if not args.model_name_or_path:
        parser.error("--model_name_or_path (or the MODEL_ID variable, or models: in README.md) is required")
    demo = build_demo(load_backend(args.model_name_or_path, args.revision, args.examples_dir, args.top_k))
    demo.launch(server_name=args.host, server_port=args.port)


def cli(argv: list[str] | None = None) -> None:
    """`main` with a user's mistake (a missing model or gallery folder, an unreadable image) as one
    `error: ...` line and exit status 2; DIANA_DEBUG=1 keeps the traceback."""
    try:
        main(argv)
    except (OSError, ValueError) as error:
        if debug_requested():
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
