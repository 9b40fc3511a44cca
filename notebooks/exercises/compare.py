"""How the exercises' checks compare: a report of one line per comparison, and the comparisons.

`compare` puts your tensor beside the project's and says "exact", "close" (within the tolerance, which
scales with the size of the expected values) or how they differ: the largest difference, where, the two
values there, and a common factor if yours is a multiple of the expected one. `compare_gradients` does
the same for the gradients of one fixed random loss. `call` runs your function and turns an error into
one report line, never a traceback; NotImplementedError means "not written yet" (see `run`).
"""
import torch

TOL = 1e-9  # float64 cases: a correct answer differs by rounding only (1e-15 or so)


RAISED = object()  # what call returns when your function raised (None is a result it can report on)


class NotWritten(Exception):
    """Your function raised NotImplementedError: the exercise is not done yet."""


class Report:
    """What one check found: a line per comparison, then a summary. `passed` is True when all agree."""

    def __init__(self, title: str, name: str):
        self.title, self.name, self.lines, self.failures, self.count = title, name, [], 0, 0
        self.not_written = False

    def ok(self, case: str, what: str, how: str):
        self.count += 1
        self.lines.append(f"  ok    [{case}] {what}: {how}")

    def fail(self, case: str, what: str, how: str):
        self.count += 1
        self.failures += 1
        self.lines.append(f"  WRONG [{case}] {what}: {how}")

    def note(self, text: str):
        self.lines.append(f"        {text}")

    @property
    def passed(self) -> bool:
        return not self.not_written and self.failures == 0 and self.count > 0

    def __repr__(self):
        if self.not_written:
            summary = (f"not written yet: `{self.name}` still raises NotImplementedError. Write its body in "
                       f"the cell above, run that cell, then run this one again.")
        elif self.passed:
            summary = f"all {self.count} checks passed."
        else:
            summary = f"{self.failures} of {self.count} checks failed (WRONG below)."
        return "\n".join([f"{self.title}: {summary}", *self.lines])


def run(title, name, cases):
    """Run the cases (a function of the report) with the random state put back afterwards."""
    report = Report(title, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            cases(report)
        except NotWritten:
            report.lines, report.not_written = [], True
    return report


def call(report, case, fn, *args):
    """Your function's result, or RAISED after a one-line report of what it raised."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise NotWritten from None
    except Exception as error:  # anything else is the student's bug, reported in one line
        message = (str(error).strip().splitlines() or [""])[0]
        report.fail(case, f"calling {fn.__name__}", f"it raised {type(error).__name__}: {message}")
        return RAISED


def _where(index, shape):
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(index), shape))


def compare(report, case, what, got, want, tol=TOL) -> bool:
    """One line: `got` (yours) against `want` (the project's): exact, close within tol, or how they differ."""
    if not isinstance(got, torch.Tensor):
        report.fail(case, what, f"yours is a {type(got).__name__}, not a tensor")
        return False
    if got.shape != want.shape:
        report.fail(case, what, f"yours has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return False
    if got.dtype != want.dtype:
        report.fail(case, what, f"yours has dtype {got.dtype}, expected {want.dtype} (the inputs' dtype)")
        return False
    got, want = got.detach(), want.detach()
    if torch.equal(got, want):
        report.ok(case, what, "exact")
        return True
    bad = ~torch.isfinite(got) & torch.isfinite(want)
    if bad.any():
        first = _where(int(bad.flatten().nonzero()[0]), got.shape)
        report.fail(case, what, f"yours has {int(bad.sum())} NaN or inf entries of {got.numel()} "
                                f"(the first at index {first}); expected finite values")
        return False
    diff = (got.double() - want.double()).abs()
    worst, tol = float(diff.max()), tol * max(1.0, float(want.abs().max()))  # tol is relative to large values
    if worst <= tol:
        report.ok(case, what, f"close, max abs difference {worst:.1e} (tol {tol:.0e})")
        return True
    at = _where(int(diff.argmax()), got.shape)
    how = (f"max abs difference {worst:.3g} (tol {tol:.0e}) at index {at}: yours {float(got[at]):.10g}, "
           f"expected {float(want[at]):.10g}")
    c = factor(got.double(), want.double(), tol)
    report.fail(case, what, how + ("" if c is None else f"; yours is {c:.6g} x expected everywhere"))
    if worst <= 1e4 * tol and want.dtype == torch.float64:
        report.note("a float32-sized error in float64: did a tensor made without dtype= (torch.eye, torch.zeros, "
                    "torch.tensor) enter your computation?")
    return False


def factor(got, want, tol):
    """c when got = c·want (c != 1) to within tol: a missing or extra factor; else None."""
    if not want.abs().max() > 0:
        return None
    c = float((got * want).sum() / (want * want).sum())
    ok = abs(c - 1) > 1e-6 and (got - c * want).abs().max() <= tol * max(1.0, float(want.abs().max()))
    return c if ok else None


def compare_gradients(report, case, got_out, want_out, got_inputs, want_inputs, names, tol=TOL):
    """The gradients of one fixed random loss, sum(w * output), with respect to each named input."""
    if not isinstance(got_out, torch.Tensor) or got_out.shape != want_out.shape:
        return  # compare() has said what is wrong with the output
    w = torch.randn(want_out.shape, dtype=want_out.dtype)
    want = torch.autograd.grad((want_out * w).sum(), want_inputs, allow_unused=True)
    if not got_out.requires_grad:
        report.fail(case, "gradients", "your output is not connected to the inputs in autograd (did you use "
                                       ".detach(), .item(), .data or numpy?)")
        return
    try:
        got = torch.autograd.grad((got_out * w).sum(), got_inputs, allow_unused=True)
    except Exception as error:
        message = (str(error).strip().splitlines() or [""])[0]
        report.fail(case, "gradients", f"backward through your function raised {type(error).__name__}: {message}")
        return
    for name, g, h, x in zip(names, got, want, want_inputs):
        h = torch.zeros_like(x) if h is None else h
        if g is None and h.abs().max() > 0:
            report.fail(case, f"gradient wrt {name}", f"none reaches {name} from your output (is it computed "
                                                      f"from {name} with torch operations?)")
        else:
            compare(report, case, f"gradient wrt {name}", torch.zeros_like(h) if g is None else g, h, tol)


def leaves(*tensors):
    """Fresh copies that require grad: one set for your function, one for the project's."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]
