"""The exercises in notebooks/exercises/: the solutions pass their checks, and the checks fail helpfully.

With a kernel (nbclient, as tests/test_notebooks.py): each solution notebook runs in a fresh kernel, in its
own folder, and every check cell reports that all its checks passed. Without one (fast): the stubs and the
solutions are taken from the stored notebooks' exercise cells and given to the checker directly, beside
typical wrong answers, and the reports' messages are asserted. So neither the exercises nor the checker
can drift from the project's code unnoticed.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import omoe

EXERCISES = Path(__file__).resolve().parents[1] / "notebooks" / "exercises"
sys.path.insert(0, str(EXERCISES))
import check  # noqa: E402  (notebooks/exercises/check.py)

NAMES = ["01_lora", "02_topk_routing", "03_gram_schmidt", "04_rank_space_gram", "05_update_length"]
CHECKS = {"lora_forward": "01_lora", "lora_init": "01_lora", "route": "02_topk_routing",
          "gram_schmidt": "03_gram_schmidt", "expert_gram": "04_rank_space_gram", "mix": "05_update_length"}


def exercise_path(name: str, solution: bool) -> Path:
    return EXERCISES / "solutions" / f"{name}_solution.ipynb" if solution else EXERCISES / f"{name}.ipynb"


def code_cells(path: Path) -> list[dict]:
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def is_exercise(cell: dict) -> bool:
    return "exercise" in cell.get("metadata", {}).get("tags", [])


def functions(name: str, solution: bool) -> dict:
    """The functions the notebook's exercise cells define (the stubs, or the solutions)."""
    namespace = {"math": math, "torch": torch, "omoe": omoe}
    for cell in code_cells(exercise_path(name, solution)):
        if is_exercise(cell):
            exec(source(cell), namespace)
    return namespace


def output_text(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell["outputs"])


# --- the stored notebooks --------------------------------------------------------------------------

def test_the_exercises_and_solutions_are_there():
    assert sorted(p.stem for p in EXERCISES.glob("*.ipynb")) == NAMES
    assert sorted(p.stem for p in (EXERCISES / "solutions").glob("*.ipynb")) == [f"{n}_solution" for n in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_a_solution_is_its_exercise_with_the_functions_filled_in(name):
    exercise, solution = (json.loads(exercise_path(name, s).read_text())["cells"] for s in (False, True))
    assert [c["cell_type"] for c in exercise] == [c["cell_type"] for c in solution]
    for i, (e, s) in enumerate(zip(exercise, solution)):
        if i == 0:  # the title cell: its links point from the notebook's own folder
            continue
        assert is_exercise(e) == is_exercise(s), f"{name}: cell {i} is tagged in one notebook only"
        if is_exercise(e):
            assert "raise NotImplementedError" in source(e) and "NotImplementedError" not in source(s)
            assert source(e).splitlines()[:2] == source(s).splitlines()[:2], f"{name}: cell {i}'s signature"
        else:
            assert source(e) == source(s), f"{name}: cell {i} differs between the exercise and its solution"


@pytest.mark.parametrize("path", [exercise_path(n, s) for s in (False, True) for n in NAMES],
                         ids=lambda p: p.name)
def test_stored_from_one_run_with_outputs(path):
    """As tests/test_notebooks.py asks of the learning path: run top to bottom, no errors, every cell's
    output kept (a cell that only defines the exercise's function has none); the solutions' checks pass."""
    cells = code_cells(path)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not [i for i, c in enumerate(cells) if not c["outputs"] and not is_exercise(c)]
    for c in (c for c in cells if source(c).startswith("check.")):
        first = output_text(c).splitlines()[0]
        assert ("checks passed." if "solution" in path.name else "not written yet") in first, first


# --- the solutions, each in a fresh kernel ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_solution_runs_in_its_folder_and_passes_its_checks(name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it
    path = exercise_path(name, solution=True)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell failed:\n{error}", pytrace=False)
    reports = [output_text(c) for c in nb.cells if c.cell_type == "code" and c.source.startswith("check.")]
    assert reports and all(r.splitlines()[0].endswith("checks passed.") for r in reports), reports


# --- without a kernel: the exercise notebooks as stored, the stubs and the solutions ---------------

@pytest.mark.parametrize("name", NAMES)
def test_exercise_notebook_runs_and_its_checks_say_not_written_yet(name, monkeypatch):
    """Every code cell, in order, in notebooks/exercises/ as a student runs it; the check cells' reports
    are the ones stored in the notebook."""
    monkeypatch.chdir(EXERCISES)
    # As in a kernel started here: this folder first on sys.path, and its setup.py run afresh
    # (it prepends the project's folder and its own).
    monkeypatch.setattr(sys, "path", [str(EXERCISES), *sys.path])
    monkeypatch.delitem(sys.modules, "setup", raising=False)
    threads = torch.get_num_threads()                          # and sets one thread
    namespace = {}
    try:
        for cell in code_cells(exercise_path(name, solution=False)):
            if source(cell).startswith("check."):
                report = eval(source(cell), namespace)
                assert not report.passed and "not written yet: `" in repr(report)
                assert repr(report) == output_text(cell), "the stored output is not the report of today's checker"
            else:
                exec(source(cell), namespace)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("exercise", CHECKS)
def test_the_stub_is_not_written_yet(exercise):
    stubs, solutions = functions(CHECKS[exercise], False), functions(CHECKS[exercise], True)
    args = (stubs["lora_init"], solutions["lora_forward"]) if exercise == "lora_init" else (stubs[exercise],)
    report = getattr(check, exercise)(*args)
    assert not report.passed
    assert repr(report).endswith(f"not written yet: `{exercise}` still raises NotImplementedError. Write its "
                                 f"body in the cell above, run that cell, then run this one again.")


@pytest.mark.parametrize("exercise", [*CHECKS, "update_lengths"])
def test_the_solution_passes_and_the_random_state_is_left_alone(exercise):
    solutions = functions(CHECKS.get(exercise, "05_update_length"), True)
    args = ((solutions["lora_init"], solutions["lora_forward"]) if exercise == "lora_init"
            else (solutions["mix" if exercise == "update_lengths" else exercise],))
    state = torch.get_rng_state()
    report = getattr(check, exercise)(*args)
    assert report.passed, repr(report)
    assert "WRONG" not in repr(report) and report.count >= 2
    assert torch.equal(torch.get_rng_state(), state)


# --- without a kernel: typical wrong answers, and what the checker says about them ---------------------

def lines(report, case: str) -> str:
    """The report's lines about one input case, with the hint lines that follow them."""
    out, keep = [], False
    for line in repr(report).splitlines()[1:]:
        keep = f"[{case}]" in line or (keep and not line.lstrip().startswith(("ok", "WRONG")))
        out += [line] if keep else []
    return "\n".join(out)


def failed(report, failures: int, count: int):
    assert not report.passed
    text = repr(report)
    assert text.splitlines()[0].endswith(f": {failures} of {count} checks failed (WRONG below).")
    assert "Traceback" not in text
    return text


def test_lora_forward_without_alpha_over_r():
    def lora_forward(x, W0, A, B, alpha, r):
        return x @ W0.T + (x @ A.T) @ B.T
    report = check.lora_forward(lora_forward)
    failed(report, 8, 12)
    wrong = lines(report, "5 tokens, 7 -> 6, r=2, alpha=4")
    assert "WRONG [5 tokens, 7 -> 6, r=2, alpha=4] output y: max abs difference" in wrong
    assert "your update y - W0 x is 0.5 x the expected one: check the factor alpha / r" in wrong
    assert "gradient wrt B: max abs difference" in wrong and "yours is 0.5 x expected everywhere" in wrong
    assert "WRONG" not in lines(report, "1 token, 3 -> 5, r=1, alpha=1")  # alpha = r: the factor is 1


def test_lora_forward_with_a_shape_error_is_one_line():
    def lora_forward(x, W0, A, B, alpha, r):
        return x @ W0.T + (alpha / r) * (x @ A) @ B.T         # A, not A.T
    report = check.lora_forward(lora_forward)
    failed(report, 3, 3)
    assert ("WRONG [5 tokens, 7 -> 6, r=2, alpha=4] calling lora_forward: it raised RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied (5x7 and 2x7)") in repr(report)


def test_lora_forward_that_cuts_the_graph():
    def lora_forward(x, W0, A, B, alpha, r):
        return (x @ W0.T + (alpha / r) * (x @ A.T) @ B.T).detach()
    report = check.lora_forward(lora_forward)
    failed(report, 3, 6)
    assert "gradients: your output is not connected to the inputs in autograd" in repr(report)


def test_lora_init_with_the_roles_swapped_and_with_both_zero():
    solution = functions("01_lora", True)["lora_forward"]
    report = check.lora_init(lambda D_in, D_out, r: (torch.zeros(r, D_in), torch.randn(D_out, r)), solution)
    text = failed(report, 3, 4)
    assert "B: not zero (max |B| = " in text and "which makes the update s·B A x zero at step 0" in text
    assert "|dL/dB| = 0; at step 0 (B = 0, A random) only B should get a gradient" in text
    report = check.lora_init(lambda D_in, D_out, r: (torch.zeros(r, D_in), torch.zeros(D_out, r)), solution)
    text = failed(report, 2, 4)
    assert "A: all zero: with A = 0 and B = 0 neither gets a gradient, ever" in text
    assert "|dL/dA| = 0, |dL/dB| = 0;" in text


def test_lora_init_with_a_too_small_A():
    solution = functions("01_lora", True)["lora_forward"]
    report = check.lora_init(lambda D_in, D_out, r: (0.01 * torch.randn(r, D_in), torch.zeros(D_out, r)), solution)
    assert "the project's are uniform in ±1/sqrt(D_in) = ±0.125" in failed(report, 1, 4)


def test_route_without_renormalising():
    def route(x, W_g, k):
        probs = (x @ W_g.T).softmax(-1)
        top = probs.topk(k, dim=-1).indices.sort(-1).values
        return torch.zeros_like(probs).scatter(1, top, probs.gather(1, top)), top
    report = check.route(route)
    failed(report, 9, 16)
    assert "not 1: renormalise the kept probabilities" in lines(report, "6 tokens, 4 experts, top-2")
    assert "WRONG" not in lines(report, "6 tokens, 4 experts, k = E = 4 (soft routing)")  # nothing to renormalise


def test_route_with_unsorted_indices_and_with_gates_per_active_expert():
    solution = functions("02_topk_routing", True)["route"]
    report = check.route(lambda x, W_g, k: (solution(x, W_g, k)[0], (x @ W_g.T).topk(k, dim=-1).indices))
    assert ("WRONG [6 tokens, 4 experts, top-2] top: the right experts, not in increasing index order"
            in failed(report, 3, 16))

    def route(x, W_g, k):
        kept, top = (x @ W_g.T).softmax(-1).topk(k, dim=-1)
        return kept / kept.sum(-1, keepdim=True), top.sort(-1).values
    text = failed(check.route(route), 6, 10)
    assert "WRONG [6 tokens, 4 experts, top-2] gates: yours has shape (6, 2), expected (6, 4)" in text
    assert "gates are one per expert, (N, E), with 0 at the inactive experts, not (N, k)" in text


def test_gram_schmidt_orthogonal_where_orthonormal_was_asked():
    solution = functions("03_gram_schmidt", True)["gram_schmidt"]
    report = check.gram_schmidt(lambda E, normalize=True, eps=0.0: solution(E, False, eps))
    failed(report, 9, 14)
    wrong = lines(report, "20 tokens, 3 vectors in 8D, orthonormal, eps=0")
    assert "WRONG [20 tokens, 3 vectors in 8D, orthonormal, eps=0] Q: max abs difference" in wrong
    assert "yours are the orthogonal residuals: normalize=True divides each by its length" in wrong
    assert "WRONG" not in lines(report, "20 tokens, 3 vectors in 8D, orthogonal (normalize=False), eps=0")


def test_gram_schmidt_without_the_ridge():
    solution = functions("03_gram_schmidt", True)["gram_schmidt"]
    report = check.gram_schmidt(lambda E, normalize=True, eps=0.0: solution(E, normalize, 0.0))
    failed(report, 6, 14)
    assert "yours equals Gram–Schmidt without the ridge: eps is ignored" in lines(
        report, "20 tokens of 0.01-long vectors, orthonormal, the layer's ridge eps (N,)")
    zeros = lines(report, "step 0: 4 tokens of 3 zero vectors, orthonormal, eps=RIDGE_ABS")
    assert "Q: yours has 96 NaN or inf entries of 96 (the first at index (0, 0, 0)); expected finite" in zeros
    assert "NaN from zero vectors divided by their zero length: the ridge eps is what prevents it" in zeros


def test_gram_schmidt_in_reverse_order():
    solution = functions("03_gram_schmidt", True)["gram_schmidt"]
    report = check.gram_schmidt(lambda E, normalize=True, eps=0.0: solution(E.flip(1), normalize, eps).flip(1))
    assert "yours runs from the last vector to the first: the project's goes in index order" in repr(report)
    assert not report.passed


def test_expert_gram_with_B_Bt_instead_of_Bt_B():
    def expert_gram(h, B, s):
        BBt = torch.einsum("eor,fpr->efop", B, B)              # (E, E, D_out, D_out): the wrong blocks
        return s * s * torch.einsum("ner,efrt,nft->nef", h, BBt, h)
    text = failed(check.expert_gram(expert_gram), 3, 3)
    assert ("WRONG [37 tokens, 3 experts, rank 4, D_out 53, s=2] calling expert_gram: it raised RuntimeError: "
            "einsum(): subscript r has size 53 for operand 1 which does not broadcast with previously seen size 4"
            in text)


def test_expert_gram_that_forms_the_outputs_and_one_that_forgets_a_factor_s():
    def expert_gram(h, B, s):
        e = s * torch.einsum("ner,eor->neo", h, B)             # (N, E, D_out): what rank space avoids
        return e @ e.mT
    report = check.expert_gram(expert_gram)
    failed(report, 3, 15)
    assert ("WRONG [37 tokens, 3 experts, rank 4, D_out 53, s=2] no D_out-wide tensor per token: your function "
            "made a tensor of shape (37, 3, 53) (N = 37, D_out = 53)") in repr(report)
    assert "ok    [37 tokens, 3 experts, rank 4, D_out 53, s=2] G against the direct Gram e @ e.mT" in repr(report)
    solution = functions("04_rank_space_gram", True)["expert_gram"]
    report = check.expert_gram(lambda h, B, s: solution(h, B, s) / s)
    failed(report, 12, 15)
    assert "G against omoe.expert_gram: max abs difference" in repr(report)
    assert "yours is 0.5 x expected everywhere" in lines(report, "37 tokens, 3 experts, rank 4, D_out 53, s=2")


def test_mix_normalized_where_orthonormal_was_asked_and_without_the_ridge():
    solution = functions("05_update_length", True)["mix"]
    report = check.mix(lambda e, g, orth: solution(e, g, "normalized"))
    failed(report, 12, 24)
    assert "yours is the normalized mix: orthonormal runs Gram–Schmidt over the experts" in lines(
        report, "orthonormal, soft routing over 3 experts")
    assert "WRONG" not in lines(report, "normalized, top-2 of 4 experts")

    def mix(e, g, orth):
        q = omoe.gram_schmidt(e) if orth == "orthonormal" else e / e.norm(dim=-1, keepdim=True)
        return torch.einsum("nk,nkd->nd", g, q)
    report = check.mix(mix)
    failed(report, 24, 24)
    assert "yours has no ridge: eps = omoe.ridge(|e_k|² of the active experts), per token" in lines(
        report, "normalized, soft routing over 3 experts")
    assert "the update Σ_k g_k q_k: yours has 288 NaN or inf entries of 288" in lines(
        report, "orthonormal, step 0 (B = 0)")


def test_update_lengths_of_an_unnormalised_mix():
    report = check.update_lengths(lambda e, g, orth: torch.einsum("nk,nkd->nd", g, e))
    text = failed(report, 2, 2)
    assert "WRONG [orthonormal] length: |update| = sqrt(Σ g²) to " in text
    assert "median over tokens of |Σ_k g_k q_k| / sqrt(Σ_k g_k²)" in text
    assert "yours is the plain Σ_k g_k e_k: nothing is normalised" in repr(check.mix(
        lambda e, g, orth: torch.einsum("nk,nkd->nd", g, e)))


def test_a_function_that_returns_no_tensor():
    report = check.route(lambda x, W_g, k: None)
    assert "WRONG [6 tokens, 4 experts, top-1] result: expected a tuple (gates, top), got NoneType" in repr(report)
    report = check.expert_gram(lambda h, B, s: None)
    assert "G against omoe.expert_gram: yours is a NoneType, not a tensor" in repr(report)
    assert not report.passed


def test_the_ridge_the_text_quotes_is_the_projects():
    text = "".join(source(c) for c in json.loads(exercise_path("03_gram_schmidt", False).read_text())["cells"])
    assert r"$10^{-4} + 10^{-4}\,\overline{\lVert e\rVert^2}$" in text
    assert (omoe.RIDGE_ABS, omoe.RIDGE_REL) == (1e-4, 1e-4)


def test_gram_schmidt_with_a_float32_ridge():
    solution = functions("03_gram_schmidt", True)["gram_schmidt"]
    report = check.gram_schmidt(lambda E, normalize=True, eps=0.0: solution(
        E, normalize, torch.as_tensor(eps, dtype=torch.float32).double()))
    assert not report.passed
    assert ("a float32-sized error in float64: did a tensor made without dtype= (torch.eye, torch.zeros, "
            "torch.tensor) enter your computation?") in lines(report, "step 0: 4 tokens of 3 zero vectors, "
                                                                       "orthonormal, eps=RIDGE_ABS")
    assert "WRONG" not in lines(report, "20 tokens, 3 vectors in 8D, orthonormal, eps=0")
