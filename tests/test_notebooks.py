"""The teaching notebooks: each one runs headlessly without an error, and each is stored with its outputs.

Executing a notebook takes a Jupyter kernel (nbclient + ipykernel, in requirements-dev.txt); the notebooks
run in notebooks/, as a reader would run them, and import the project from one folder up.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
NAMES = [p.name for p in PATHS]
CELL_TIMEOUT = 600  # seconds: generous, for a slow or busy machine (the longest cell trains a model for 3 epochs)


def test_the_five_notebooks_are_there():
    assert NAMES == ["01_lora_from_scratch.ipynb", "02_experts_and_router.ipynb", "03_gram_schmidt.ipynb",
                     "04_expert_collapse.ipynb", "05_end_to_end.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_stored_with_outputs(name):
    """They must read well on a code host without running: every code cell carries its output."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    empty = [i for i, c in enumerate(code) if not c.outputs]
    assert not empty, f"{name}: code cells {empty} (0-based, code cells only) are stored without outputs"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name} was not stored from one run from top to bottom: {counts}"
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name} is stored with errors: {errors}"


@pytest.mark.xdist_group("notebooks")  # one worker runs them all: they rewrite notebooks/figures/ and restore it
@pytest.mark.parametrize("name", NAMES)
def test_executes(name):
    """Run every cell in a fresh python3 kernel, in notebooks/; any cell error fails the test.

    The stored notebook is not rewritten, and the figures a notebook saves (notebook 4 writes the one the
    README shows) are put back as they were, so running the tests leaves the working tree unchanged."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    figures = {p: p.read_bytes() for p in (NOTEBOOKS / "figures").glob("*.png")}
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name}: a cell failed:\n{error}", pytrace=False)
    finally:
        for path, content in figures.items():
            path.write_bytes(content)


def test_architecture_figure_is_drawn_by_its_script(tmp_path):
    """The README's figure of one OMoE layer comes from notebooks/figures/draw_architecture.py: the script runs."""
    pytest.importorskip("matplotlib")
    import importlib.util
    spec = importlib.util.spec_from_file_location("draw_architecture", NOTEBOOKS / "figures" / "draw_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.draw(tmp_path / "omoe_layer.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (NOTEBOOKS / "figures" / "omoe_layer.png").is_file(), "the README shows notebooks/figures/omoe_layer.png"
