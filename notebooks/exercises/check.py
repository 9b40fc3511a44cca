"""Checks for the exercises: your function beside the project's own, case by case.

Each `check.<exercise>(your_function)` runs your function on a few small input cases, computes the
same thing with `omoe.py`, and returns a report (a notebook shows it as the cell's output; elsewhere,
print it): a line per case and per thing compared (an output, or a gradient), then hints where a
common mistake fits what differs. The cases are float64, so the tolerance is tight: a correct answer
written another way (another order of the sums, softmax of the kept logits instead of renormalised
probabilities) still passes; a missing factor does not. How the comparisons work: compare.py.

Legend: N tokens, D_in/D_out the layer's in/out features, E experts, K active experts, R the rank.
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]  # the repository: omoe.py is two folders up from this file
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import omoe  # noqa: E402  (after the path is set)

from compare import RAISED, TOL, Report, call, compare, compare_gradients, factor, leaves, run  # noqa: E402

F64 = torch.float64


# --- 1. LoRA ---------------------------------------------------------------------------------------

def _lora_layer(W0, A, B, alpha, r):
    """The project's plain LoRA (one expert, no dropout) holding these weights."""
    base = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=W0.dtype).requires_grad_(False)
    layer = omoe.OMoELinear(base, experts=1, rank=r, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        base.weight.copy_(W0)
        layer.lora_A[0], layer.lora_B[0] = A, B
    return layer


def lora_forward(fn) -> Report:
    """fn(x (N, D_in), W0 (D_out, D_in), A (r, D_in), B (D_out, r), alpha, r) -> y (N, D_out)."""
    def cases(report):
        for case, (N, D_in, D_out, r, alpha) in {"5 tokens, 7 -> 6, r=2, alpha=4": (5, 7, 6, 2, 4.0),
                                                 "9 tokens, 16 -> 12, r=4, alpha=2": (9, 16, 12, 4, 2.0),
                                                 "1 token, 3 -> 5, r=1, alpha=1": (1, 3, 5, 1, 1.0)}.items():
            x, W0 = torch.randn(N, D_in, dtype=F64), torch.randn(D_out, D_in, dtype=F64)
            A, B = torch.randn(r, D_in, dtype=F64), torch.randn(D_out, r, dtype=F64)  # a trained-looking B
            layer = _lora_layer(W0, A, B, alpha, r)
            xs = leaves(x)[0]
            y = call(report, case, fn, xs, W0, layer.lora_A[0], layer.lora_B[0], alpha, r)
            want = layer(xs)
            if y is RAISED:
                continue
            if not compare(report, case, "output y", y, want) and isinstance(y, torch.Tensor) \
                    and y.shape == want.shape:
                c = factor((y - x @ W0.T).detach(), (want - x @ W0.T).detach(), TOL)
                if c is not None:
                    report.note(f"your update y - W0 x is {c:.6g} x the expected one: check the factor alpha / r")
            compare_gradients(report, case, y, want, [xs, layer.lora_A, layer.lora_B],
                              [xs, layer.lora_A, layer.lora_B], ["x", "A", "B"])
    return run("Exercise 1a, the LoRA forward", "lora_forward", cases)


def lora_init(init, forward) -> Report:
    """init(D_in, D_out, r) -> (A (r, D_in), B (D_out, r)), as the project initialises them; forward as in 1a."""
    def cases(report):
        D_in, D_out, r, alpha = 64, 48, 4, 8.0
        case = f"init({D_in}, {D_out}, {r})"
        out = call(report, case, init, D_in, D_out, r)
        if out is RAISED:
            return
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            return report.fail(case, "result", f"expected a tuple (A, B) of two tensors, got {type(out).__name__}")
        A, B = (t.detach() for t in out)
        reference = _lora_layer(torch.zeros(D_out, D_in), torch.zeros(r, D_in), torch.zeros(D_out, r), alpha, r)
        reference.reset_parameters()  # the project's own initialisation, to compare with
        A_std = float(reference.lora_A.detach().std())
        bound = 1 / math.sqrt(D_in)
        for name, t, want in [("A", A, (r, D_in)), ("B", B, (D_out, r))]:
            if tuple(t.shape) != want:
                return report.fail(case, f"{name}'s shape", f"{tuple(t.shape)}, expected {want}")
        if B.abs().max() > 0:
            report.fail(case, "B", f"not zero (max |B| = {float(B.abs().max()):.3g}); the project's B starts at "
                                   f"zero, which makes the update s·B A x zero at step 0 whatever A is")
        else:
            report.ok(case, "B", "all zero, as the project's lora_B starts")
        if not A.abs().max() > 0:
            report.fail(case, "A", "all zero: with A = 0 and B = 0 neither gets a gradient, ever (a saddle point)")
        elif A.abs().max() > bound or A.std() < 0.5 * A_std:
            report.fail(case, "A", f"entries in ±{float(A.abs().max()):.3g} with std {float(A.std()):.3g}; the "
                                   f"project's are uniform in ±1/sqrt(D_in) = ±{bound:.3g} (std "
                                   f"{A_std:.3g})")
        else:
            report.ok(case, "A", f"random in ±{bound:.3g} (std {float(A.std()):.3g}; the project's "
                                 f"{A_std:.3g})")
        _step_zero(report, forward, A, B, alpha, r)
    return run("Exercise 1b, the LoRA initialisation", "lora_init", cases)


def _step_zero(report, forward, A, B, alpha, r):
    """With your A and B: the project's layer equals the frozen one, and only B gets a gradient."""
    case = "step 0, your A and B"
    W0, x = torch.randn(B.shape[0], A.shape[1]), torch.randn(10, A.shape[1])
    layer = _lora_layer(W0, A, B, alpha, r)
    y = call(report, case, forward, x, W0, layer.lora_A[0], layer.lora_B[0], alpha, r)
    if y is not RAISED:
        compare(report, case, "your forward's output against the frozen layer W0 x", y, x @ W0.T, tol=0.0)
    loss = (layer(x) - torch.randn(10, B.shape[0])).pow(2).mean()
    gA, gB = torch.autograd.grad(loss, [layer.lora_A, layer.lora_B])
    norms = f"|dL/dA| = {float(gA.norm()):.3g}, |dL/dB| = {float(gB.norm()):.3g}"
    if gA.abs().max() == 0 and gB.abs().max() > 0:
        report.ok(case, "the first gradients (project's layer)", f"{norms}: B moves first, A from step 1")
    else:
        report.fail(case, "the first gradients (project's layer)",
                    f"{norms}; at step 0 (B = 0, A random) only B should get a gradient")


# --- 2. Top-k routing ------------------------------------------------------------------------------

def route(fn) -> Report:
    """fn(x (N, D_in), W_g (E, D_in), k) -> (gates (N, E), top (N, k)), as OMoELinear.route gives them."""
    def cases(report):
        for case, (N, D_in, E, k) in {"6 tokens, 4 experts, top-1": (6, 5, 4, 1),
                                      "6 tokens, 4 experts, top-2": (6, 5, 4, 2),
                                      "6 tokens, 4 experts, k = E = 4 (soft routing)": (6, 5, 4, 4),
                                      "16 tokens, 8 experts, top-2": (16, 12, 8, 2)}.items():
            base = nn.Linear(D_in, 3, bias=False, dtype=F64).requires_grad_(False)
            layer = omoe.OMoELinear(base, experts=E, top_k=k, rank=2, dropout=0.0)
            with torch.no_grad():
                layer.router.weight.normal_(std=1.0)  # a trained-looking router: gates far from uniform
            x, W_g = leaves(torch.randn(N, D_in, dtype=F64), layer.router.weight)
            probs, gates, top = _route(layer, x)
            out = call(report, case, fn, x, W_g, k)
            if out is RAISED:
                continue
            if not (isinstance(out, tuple) and len(out) == 2):
                report.fail(case, "result", f"expected a tuple (gates, top), got {type(out).__name__}")
                continue
            got_gates, got_top = out
            if not compare(report, case, "gates", got_gates, gates):
                _routing_hints(report, got_gates, gates, probs, k)
            compare_gradients(report, case, got_gates, gates, [x, W_g], [x, layer.router.weight], ["x", "W_g"])
            if isinstance(got_top, torch.Tensor) and got_top.shape == top.shape and not torch.equal(got_top, top) \
                    and torch.equal(got_top.sort(-1).values, top):
                report.fail(case, "top", "the right experts, not in increasing index order: sort them "
                                         "(Gram–Schmidt takes the active experts in index order)")
            else:
                compare(report, case, "top", got_top, top, tol=0.0)
    return run("Exercise 2, top-k routing", "route", cases)


def _routing_hints(report, got, gates, probs, k):
    if not (isinstance(got, torch.Tensor) and got.shape == gates.shape):
        if isinstance(got, torch.Tensor) and got.shape == (gates.shape[0], k) and k < gates.shape[1]:
            report.note("gates are one per expert, (N, E), with 0 at the inactive experts, not (N, k)")
        return
    got = got.detach()
    sums = got.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums)):
        report.note(f"your gates' rows sum to {float(sums.min()):.3g}..{float(sums.max()):.3g}, not 1: "
                    f"renormalise the kept probabilities")
    if torch.allclose(got, probs.detach()) and k < gates.shape[1]:
        report.note("your gates are the full softmax: keep only the k largest, 0 elsewhere")


# --- 3. Gram–Schmidt -------------------------------------------------------------------------------

def _directions(N, K, D, cos=0.6):
    """N tokens of K vectors in D dims, pairwise similar (cosine about cos): what Gram–Schmidt has to undo."""
    shared = torch.randn(N, 1, D, dtype=F64)
    return cos ** 0.5 * shared + (1 - cos) ** 0.5 * torch.randn(N, K, D, dtype=F64)


def gram_schmidt(fn) -> Report:
    """fn(E (N, K, D), normalize: bool, eps: float or (N,) tensor) -> Q (N, K, D), as omoe.gram_schmidt."""
    def cases(report):
        E1 = _directions(20, 3, 8)
        small = 0.01 * _directions(20, 3, 8)  # outputs 0.01 long: where the ridge matters most
        ridge = omoe.ridge(small.pow(2).sum(-1))                     # (N,) the layer's ridge
        for case, (E, normalize, eps) in {
                "one token, 2 vectors in 3D, orthonormal, eps=0": (_directions(1, 2, 3), True, 0.0),
                "20 tokens, 3 vectors in 8D, orthonormal, eps=0": (E1, True, 0.0),
                "20 tokens, 3 vectors in 8D, orthogonal (normalize=False), eps=0": (E1, False, 0.0),
                "20 tokens, 5 vectors in 8D, orthonormal, eps=0": (_directions(20, 5, 8), True, 0.0),
                "20 tokens of 0.01-long vectors, orthonormal, the layer's ridge eps (N,)": (small, True, ridge),
                "20 tokens of 0.01-long vectors, orthogonal, the layer's ridge eps (N,)": (small, False, ridge),
                "step 0: 4 tokens of 3 zero vectors, orthonormal, eps=RIDGE_ABS":
                    (torch.zeros(4, 3, 8, dtype=F64), True, omoe.RIDGE_ABS)}.items():
            got_E, want_E = leaves(E, E)
            got = call(report, case, fn, got_E, normalize, eps)
            if got is RAISED:
                continue
            want = omoe.gram_schmidt(want_E, normalize=normalize, eps=eps)
            if not compare(report, case, "Q", got, want):
                _gram_schmidt_hints(report, got, E, normalize, eps)
            compare_gradients(report, case, got, want, [got_E], [want_E], ["E"])
    return run("Exercise 3, Gram–Schmidt", "gram_schmidt", cases)


def _gram_schmidt_hints(report, got, E, normalize, eps):
    if not (isinstance(got, torch.Tensor) and got.shape == E.shape and torch.isfinite(got).all()):
        if isinstance(got, torch.Tensor) and got.isnan().any() and not E.abs().max() > 0:
            report.note("NaN from zero vectors divided by their zero length: the ridge eps is what prevents it")
        return
    got = got.detach()
    if torch.allclose(got, omoe.gram_schmidt(E, normalize=not normalize, eps=eps), atol=1e-9):
        report.note("yours are the orthogonal residuals: normalize=True divides each by its length" if normalize
                    else "yours are unit vectors: normalize=False keeps each residual's length")
    if not isinstance(eps, float) or eps > 0:
        if torch.allclose(got, omoe.gram_schmidt(E, normalize=normalize, eps=0.0), atol=1e-9):
            report.note("yours equals Gram–Schmidt without the ridge: eps is ignored")
    if torch.allclose(got.flip(1), omoe.gram_schmidt(E.flip(1), normalize=normalize, eps=eps), atol=1e-9):
        report.note("yours runs from the last vector to the first: the project's goes in index order")


# --- 4. The Gram matrix in rank space --------------------------------------------------------------

class _WideTensors(TorchFunctionMode):
    """Records the shape of every tensor a torch call returns that has both an N-long and a D_out-long dim."""

    def __init__(self, N, D_out):
        super().__init__()
        self.N, self.D_out, self.seen = N, D_out, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and self.N in out.shape and self.D_out in out.shape:
            self.seen.append(tuple(out.shape))
        return out


def expert_gram(fn) -> Report:
    """fn(h (N, E, R), B (E, D_out, R), s) -> G (N, E, E), G_ij = <e_i, e_j>, e_i = s B_i h_i, never forming e."""
    def cases(report):
        for case, (N, E, R, D_out, s) in {"37 tokens, 3 experts, rank 4, D_out 53, s=2": (37, 3, 4, 53, 2.0),
                                          "37 tokens, 1 expert, rank 4, D_out 53, s=2": (37, 1, 4, 53, 2.0),
                                          "41 tokens, 4 experts, rank 2, D_out 59, s=0.5": (41, 4, 2, 59, 0.5)
                                          }.items():
            h, B = torch.randn(N, E, R, dtype=F64), torch.randn(E, D_out, R, dtype=F64) / math.sqrt(R)
            got_h, got_B, want_h, want_B = leaves(h, B, h, B)
            with _WideTensors(N, D_out) as wide:
                got = call(report, case, fn, got_h, got_B, s)
            if got is RAISED:
                continue
            want = omoe.expert_gram(want_h, want_B, s)
            e = s * torch.einsum("ner,eor->neo", h, B)                                  # (N, E, D_out)
            compare(report, case, "G against omoe.expert_gram", got, want)
            compare(report, case, "G against the direct Gram e @ e.mT", got, e @ e.mT)
            compare_gradients(report, case, got, want, [got_h, got_B], [want_h, want_B], ["h", "B"])
            if wide.seen:
                report.fail(case, "no D_out-wide tensor per token", f"your function made a tensor of shape "
                            f"{wide.seen[0]} (N = {N}, D_out = {D_out}): the experts' outputs, which the "
                            f"rank-space Gram exists to avoid; use the (R, R) blocks B_i^T B_j")
            else:
                report.ok(case, "no D_out-wide tensor per token", "none of your torch calls returned a tensor "
                                                                  "with both an N and a D_out dim")
    return run("Exercise 4, the Gram matrix in rank space", "expert_gram", cases)


# --- 5. The normalised mix and the length of the update --------------------------------------------

MIX_CASES = {  # case: (orth, experts, top_k, std of B)
    "orthonormal, soft routing over 3 experts": ("orthonormal", 3, None, 0.1),
    "orthonormal, top-2 of 4 experts": ("orthonormal", 4, 2, 0.1),
    "normalized, soft routing over 3 experts": ("normalized", 3, None, 0.1),
    "normalized, top-2 of 4 experts": ("normalized", 4, 2, 0.1),
    "orthonormal, step 0 (B = 0)": ("orthonormal", 3, None, 0.0),
    "orthonormal, B std 1e-4 (below the ridge)": ("orthonormal", 3, None, 1e-4),
}


def _route(layer, x):
    """The layer's probabilities (N, E), gates (N, E) and active experts top (N, K) in Gram–Schmidt
    order: with soft routing (k = E) the layer gives None for top, meaning every expert."""
    probs, gates, _, top = layer.route(x)
    if top is None:
        top = torch.arange(probs.shape[-1]).expand(probs.shape[0], -1)
    return probs, gates, top


def _active(layer, x):
    """The active experts' outputs e (N, K, D_out) in Gram–Schmidt order and their gates g (N, K)."""
    h = torch.einsum("nd,erd->ner", x, layer.lora_A)                                 # (N, E, R)
    e = layer.scaling * torch.einsum("ner,eor->neo", h, layer.lora_B)                # (N, E, D_out)
    _, gates, top = _route(layer, x)                                                 # (N, E), (N, K)
    return e.gather(1, top[:, :, None].expand(-1, -1, e.shape[-1])), gates.gather(1, top)


def mix(fn) -> Report:
    """fn(e (N, K, D_out), g (N, K), orth) -> Σ_k g_k q_k (N, D_out), as OMoELinear's reference path."""
    def cases(report):
        for case, (orth, E, top_k, std) in MIX_CASES.items():
            base = nn.Linear(10, 24, bias=False, dtype=F64).requires_grad_(False)
            layer = omoe.OMoELinear(base, experts=E, top_k=top_k, rank=4, alpha=8, dropout=0.0, orth=orth)
            layer.impl = "reference"
            with torch.no_grad():
                layer.lora_B.normal_(std=std)
                layer.router.weight.normal_(std=0.5)
            x = torch.randn(12, 10, dtype=F64)
            e, g = _active(layer, x)
            got = call(report, case, fn, e, g, orth)
            if got is RAISED:
                continue
            want = layer(x) - base(x)                                                 # (N, D_out)
            if not compare(report, case, "the update Σ_k g_k q_k", got, want):
                _mix_hints(report, got, e.detach(), g.detach(), orth)
            params = [layer.lora_A, layer.lora_B, layer.router.weight]
            compare_gradients(report, case, got, want, params, params, ["lora_A", "lora_B", "the router's W_g"])
    return run("Exercise 5, the normalised mix", "mix", cases)


def _reference_mix(e, g, orth, ridge=True):
    eps = omoe.ridge(e.pow(2).sum(-1)) if ridge else torch.zeros(e.shape[0], dtype=e.dtype)  # (N,)
    if orth == "orthonormal":
        q = omoe.gram_schmidt(e, eps=eps)
    elif orth == "normalized":
        q = e / (e.pow(2).sum(-1, keepdim=True) + eps[:, None, None]).sqrt()
    else:
        q = e
    return torch.einsum("nk,nkd->nd", g, q)


def _mix_hints(report, got, e, g, orth):
    if not (isinstance(got, torch.Tensor) and got.shape == (e.shape[0], e.shape[-1])):
        return
    other = "normalized" if orth == "orthonormal" else "orthonormal"
    guesses = [(_reference_mix(e, g, other), f"yours is the {other} mix: " + (
                   "orthonormal runs Gram–Schmidt over the experts" if orth == "orthonormal"
                   else "normalized scales each e_k to unit length on its own, no projections")),
               (_reference_mix(e, g, orth, ridge=False),
                "yours has no ridge: eps = omoe.ridge(|e_k|² of the active experts), per token, as in the layer"),
               (_reference_mix(e, g, "none"), "yours is the plain Σ_k g_k e_k: nothing is normalised")]
    for value, note in guesses:
        if torch.allclose(got.detach(), value, atol=1e-9):
            report.note(note)


def update_lengths(fn, N=200, K=3, D=64) -> Report:
    """The length of your mix per token, over 5 scales of B and 3 values of s = alpha/r, against sqrt(Σ g²).

    e_k = s B_k h_k, so scaling B by t scales every e_k by t: the cases are e = s·t·(fixed directions,
    |e_k| = 1, pairwise cosine about 0.6) with fixed soft gates."""
    def cases(report):
        directions = torch.nn.functional.normalize(_directions(N, K, D), dim=-1)     # (N, K, D), unit
        g = torch.randn(N, K, dtype=F64).mul(2).softmax(-1)                           # (N, K)
        scales, ss = [1e-3, 1e-2, 1e-1, 1.0, 10.0], [0.5, 2.0, 8.0]
        lengths = {}
        for orth in ("orthonormal", "normalized"):
            for t in scales:
                for s in ss:
                    got = call(report, f"{orth}, B x {t:g}, s = {s:g}", fn, s * t * directions, g, orth)
                    if not (isinstance(got, torch.Tensor) and got.shape == (N, D)):
                        return report.fail(orth, "the update", "no (N, D_out) tensor to measure: run check.mix")
                    lengths[orth, t, s] = got.detach().norm(dim=-1) / g.norm(dim=-1)  # (N,) |update| / sqrt(Σ g²)
        cos = directions @ directions.mT                                              # (N, K, K)
        mean_cos = float((cos.sum((-2, -1)) - K).mean() / (K * (K - 1)))
        report.note(f"{N} tokens, {K} experts, mean cosine between two experts' directions {mean_cos:.2f}")
        report.note("median over tokens of |Σ_k g_k q_k| / sqrt(Σ_k g_k²)")
        report.note("B scaled by   orthonormal: " + "".join(f"{f's={s:g}':>8}" for s in ss)
                    + "   normalized: " + "".join(f"{f's={s:g}':>8}" for s in ss))
        for t in scales:
            row = [[f"{float(lengths[o, t, s].median()):8.4f}" for s in ss] for o in ("orthonormal", "normalized")]
            report.note(f"{t:<14g}{'':13}" + "".join(row[0]) + f"{'':15}" + "".join(row[1]))
        above = [(t, s) for t in scales for s in ss if s * t >= 0.5]  # |e_k| = s·t, far above sqrt(ridge) = 0.01
        worst = max(float((lengths["orthonormal", t, s] - 1).abs().max()) for t, s in above)
        how = f"|update| = sqrt(Σ g²) to {worst:.1e} for every token, every B scale and s with s·t >= 0.5"
        (report.ok if worst < 1e-3 else report.fail)("orthonormal", "length", how)
        first = lengths[("normalized", *above[0])]
        spread = max(float((lengths["normalized", t, s] - first).abs().max()) for t, s in above)
        ratio = float(first.median())
        how = (f"the same per token for every B scale and s with s·t >= 0.5 (to {spread:.1e}), but not sqrt(Σ g²): "
               f"{ratio:.3f} x it at the median, as the experts' directions overlap")
        (report.ok if spread < 1e-3 else report.fail)("normalized", "length", how)
    return run("Exercise 5, the length of the update", "mix", cases)
