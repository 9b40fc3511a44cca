"""plumbing/ has two layers, and imports run one way: plumbing/base/ (what the lesson files stand on)
imports neither the lesson nor the layer above; the lesson imports only plumbing/base/, and the
layer above (plumbing/*.py: the gate, the run folder, ...) imports both. And across the whole
repository no module imports itself back through others."""
import ast
import os
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


# ── No import cycle, anywhere ──────────────────────────────────────────────────────────────────
# A cycle means a module runs while another is half-imported, and neither can be read alone. The
# scripts of benchmarks/, study/ and tests/ find their neighbours by putting a folder on sys.path
# first (`sys.path.insert(0, str(ROOT / "study"))`, then `import common`), so an import is looked
# up where that script would find it: the folders it puts first, its own folder, the root.

def python_files() -> list[Path]:
    """Every .py file of the repository, none of a virtual environment or a hidden folder."""
    out = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and not (Path(folder) / d / "pyvenv.cfg").is_file())
        out += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return out


def path_value(node, path: Path, names: dict):
    """A folder expression's value as the script computes it (`Path(__file__).resolve().parents[1]`,
    `ROOT / "study"`, `str(...)`, a name assigned one), or None where it is not that plain."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return path if node.id == "__file__" else names.get(node.id)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("str", "Path") and len(node.args) == 1:
        value = path_value(node.args[0], path, names)
        return None if value is None else Path(value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resolve":
        return path_value(node.func.value, path, names)
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        value = path_value(node.value, path, names)
        return value.parent if isinstance(value, Path) else None
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith(".parents"):
        value, i = path_value(node.value.value, path, names), ast.literal_eval(node.slice)
        return value.parents[i] if isinstance(value, Path) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        left, right = path_value(node.left, path, names), path_value(node.right, path, names)
        return left / right if isinstance(left, Path) and right is not None else None
    return None


def module_files(name: str, dirs: list[Path]) -> list[Path]:
    """The repository's files that `import name` runs (each package's __init__.py on the way, then the
    module), from the first folder of `dirs` that holds it; [] for a module from elsewhere."""
    first, *rest = name.split(".")
    regular = [d for d in dirs if (d / f"{first}.py").is_file() or (d / first / "__init__.py").is_file()]
    namespace = [d for d in dirs if (d / first).is_dir()]  # a folder without __init__.py comes last
    if not regular + namespace:
        return []
    here, files = (regular + namespace)[0] / first, []
    for part in [*rest, None]:
        if (here / "__init__.py").is_file():
            files.append(here / "__init__.py")
        elif here.with_suffix(".py").is_file():
            return files + [here.with_suffix(".py")]
        if part is None or not here.is_dir():
            return files
        here = here / part


def imports_of(path: Path) -> set[Path]:
    """The repository's files that `path` imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    names, inserted = {}, []
    for node in tree.body:  # the names a sys.path.insert may use: ROOT = Path(__file__)...
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = path_value(node.value, path, names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "sys.path.insert" and len(node.args) == 2:
            inserted.append((node.lineno, path_value(node.args[1], path, names)))
    dirs = [d for _, d in sorted(inserted, reverse=True) if isinstance(d, Path)] + [path.parent, ROOT]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(f for a in node.names for f in module_files(a.name, dirs))
        elif isinstance(node, ast.ImportFrom):  # the module, and each name that is a module of it
            where = [path.parents[node.level - 1]] if node.level else dirs
            prefix = f"{node.module}." if node.module else ""
            for name in [node.module] * bool(node.module) + [prefix + a.name for a in node.names]:
                found.update(module_files(name, where))
    return found


def import_cycle(graph: dict) -> list:
    """One cycle of the graph as [a, b, ..., a], or [] when it has none (depth first)."""
    done, stack = set(), []

    def visit(node) -> list:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return []
        stack.append(node)
        cycle = next((c for c in (visit(n) for n in sorted(graph.get(node, ()))) if c), [])
        stack.pop()
        done.add(node)
        return cycle

    return next((c for c in (visit(n) for n in sorted(graph)) if c), [])


def test_no_module_imports_itself_through_others():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = {path: imports_of(path) for path in python_files()}
    study = ROOT / "study"
    # The lookup sees through sys.path.insert: report.py's `import harness` is study/harness.py.
    assert {study / "harness.py", study / "common.py"} <= graph[study / "report.py"]
    assert ROOT / "plumbing" / "base" / "files.py" in graph[study / "common.py"]
    cycle = import_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(str(p.relative_to(ROOT)) for p in cycle)
