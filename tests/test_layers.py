"""plumbing/ has two layers, and imports run one way: plumbing/base/ (what the lesson files stand on)
imports neither the lesson nor the layer above; the lesson imports only plumbing/base/, and the
layer above (plumbing/*.py: the gate, the run folder, ...) imports both."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = ("omoe", "model", "data")  # what the layers may import; train.py and generate.py are doors
BASE = sorted(p.stem for p in (ROOT / "plumbing" / "base").glob("*.py") if p.stem != "__init__")
ABOVE = sorted(p.stem for p in (ROOT / "plumbing").glob("*.py") if p.stem != "__init__")


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as dotted names (`from plumbing import
    cli` gives plumbing.cli)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def layer(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] in LESSON + ("train", "generate", "evaluate"):
        return "lesson"
    if parts[0] != "plumbing" or len(parts) == 1:
        return None
    if parts[1] == "base":
        return "base"
    return "above" if parts[1] in ABOVE else None


def test_the_layers_are_what_the_readme_says():
    assert BASE == ["checks", "config", "datafiles", "errors", "files", "hub", "tokenizer", "weights"]
    assert ABOVE == ["adapters", "cli", "diagnostics", "gate", "parallel", "peft_format", "run_folder"]
    table = (ROOT / "plumbing" / "README.md").read_text()
    for name in BASE:
        assert f"`base/{name}.py`" in table
    for name in ABOVE:
        assert f"`{name}.py`" in table


@pytest.mark.parametrize("name", BASE)
def test_the_base_layer_imports_neither_the_lesson_nor_the_layer_above(name):
    wrong = {m for m in imported(ROOT / "plumbing" / "base" / f"{name}.py")
             if layer(m) in ("lesson", "above")}
    assert not wrong


@pytest.mark.parametrize("name", LESSON)
def test_the_lesson_imports_only_the_base_layer(name):
    wrong = {m for m in imported(ROOT / f"{name}.py") if layer(m) == "above"}
    assert not wrong
