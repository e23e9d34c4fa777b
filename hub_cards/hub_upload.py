"""Upload an exported folder to the Hub, or list what would be uploaded (`--dry_run`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diana.hub_cards.model_card import render_model_card, write_model_card


@dataclass
class UploadPlan:
    """Files that would be uploaded (relative path, bytes)."""

    repo_id: str
    files: list[tuple[str, int]]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def __str__(self) -> str:
        lines = [f"would upload {len(self.files)} files ({_human(self.total_bytes)}) to https://huggingface.co/{self.repo_id}:"]
        lines += [f"  {size:>12,d}  {name}" for name, size in self.files]
        lines.append("then re-upload README.md with the usage example pinned to the new commit")
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


def upload_plan(folder: str | os.PathLike, repo_id: str) -> UploadPlan:
    """List what ``push_to_hub`` would upload, without the network."""
    root = Path(folder)
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    )
    return UploadPlan(repo_id, files)


def push_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
    commit_message: str = "Upload DiaNA model", card_kwargs: dict[str, Any] | None = None,
) -> str:
    """Upload the folder with ``huggingface_hub.upload_folder``; returns the pinned commit.

    After the upload the card's usage example is re-rendered with ``revision=<that commit>`` and
    README.md alone is uploaded again, so the card points at code a reader can review.
    """
    from huggingface_hub import create_repo, upload_file, upload_folder

    create_repo(repo_id, private=private, exist_ok=True, token=token)
    commit = upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token,
        ignore_patterns=["__pycache__/*", ".*"],
    )
    revision = commit.oid
    if card_kwargs is not None:
        card = render_model_card(**card_kwargs, repo_id=repo_id, revision=revision)
        readme = Path(folder) / "README.md"
        write_model_card(card, Path(folder))
        upload_file(path_or_fileobj=str(readme), path_in_repo="README.md", repo_id=repo_id, token=token,
                    commit_message=f"Model card: pin the usage example to {revision[:10]}")
    return revision
