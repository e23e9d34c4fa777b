"""The package layering: imports point one way, at the top of files.

    modeling_diana  <-  processing  <-  hub_cards  <-  training

`modeling_diana` is the model that ships with the weights (torch and transformers only);
`processing` turns data into model inputs and searches galleries; `hub_cards` renders and
publishes what a run produced (evaluation report, cards, export, Space); `training` trains,
evaluates and ties the rest together (the main job, the `diana` command).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("modeling_diana", "processing", "hub_cards", "training")
# Besides the standard library, what the model code may import: it ships to the Hub as remote code.
MODEL_CODE_IMPORTS = {"torch", "transformers"}


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py") if ".venv" not in p.parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module as `layer.sub...` or a third-party name, line, at module level) of a file."""
    package = list(path.relative_to(REPO).parent.parts)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at module level count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            name = name.removeprefix("diana.")
            found.append((name, node.lineno, id(node) in top_level))
    return found


def test_imports_point_one_way_and_sit_at_the_top():
    problems = []
    for path in _modules():
        rel = path.relative_to(REPO)
        layer = LAYERS.index(rel.parts[0])
        for name, line, at_top in _imports(path):
            target = name.split(".")[0]
            if target in LAYERS:
                if LAYERS.index(target) > layer:
                    problems.append(f"{rel}:{line}: {rel.parts[0]} imports {name} (a layer above it)")
                if not at_top:
                    problems.append(f"{rel}:{line}: import of {name} inside a function")
    assert not problems, "\n".join(problems)


def test_model_code_imports_only_torch_and_transformers():
    allowed = set(sys.stdlib_module_names) | MODEL_CODE_IMPORTS | {"modeling_diana"}
    problems = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in (REPO / "modeling_diana").glob("*.py")
        for name, line, _ in _imports(path)
        if name.split(".")[0] not in allowed
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("from diana.training.run_stage import main\n", "processing imports training.run_stage"),
    ("def f():\n    from diana.modeling_diana import DiaNAModel\n", "import of modeling_diana inside a function"),
])
def test_the_walk_catches_a_forbidden_edge(tmp_path, monkeypatch, source, expected):
    """The check itself: an upward edge and a hidden function-level import are both reported."""
    fake_repo = tmp_path
    for layer in LAYERS:
        (fake_repo / layer).mkdir()
    (fake_repo / "processing" / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    with pytest.raises(AssertionError, match=expected):
        test_imports_point_one_way_and_sit_at_the_top()
