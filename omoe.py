"""OMoE: a mixture of LoRA experts whose outputs are made orthogonal by Gram–Schmidt (arXiv 2501.10062).

Legend: N tokens (batch and time flattened), D_in/D_out the wrapped layer's in/out features,
E experts, K active experts per token (top_k; K = E is soft routing), R LoRA rank.

One adapted linear layer (s = alpha / R; the router reads x, the experts read dropout(x)):

    x ─┬─ base_layer (frozen W0) ─────────────────────────────────────────────────────── W0 x ─┐
       ├─ router W_g ─ softmax ─ top-k, renormalise ─ g ─────────────────────────┐               │
       └─ dropout ─┬─ A_1 ─ h_1 ─ B_1 ─ e_1 = s·B_1 h_1 ─┐                       ▼               ▼
                   ├─ A_2 ─ h_2 ─ B_2 ─ e_2 ──────────────┼─ Gram–Schmidt ─ q ─ Σ_k g_k q_k ──── (+) ─> y
                   └─ ...               e_E ──────────────┘  (active experts, in index order)

    y = W0 x + Σ_k g_k q_k,   q_1..q_K = Gram–Schmidt(e_k of the K active experts)

Gram–Schmidt order: the active experts enter in expert index order, so the active expert with the
lowest index keeps its direction and each later one keeps only what is orthogonal to those before.
`orth` picks the flavour: "orthonormal" (the paper's; each q_k has unit length), "orthogonal"
(projections only, each q_k keeps its residual length), "normalized" (no projections, each q_k =
e_k scaled to unit length: the control that separates normalisation from orthogonality), "none"
(vanilla MoE-LoRA: q_k = e_k). With orthonormal q's the update Σ_k g_k q_k has length sqrt(Σ_k g_k²)
per token whatever B and alpha/R are (once past the ridge, below). A single expert is plain LoRA,
exactly as PEFT computes it (no router); with orth="normalized" it is a normalised LoRA (gate 1).

Two implementations of the same layer, selected by `layer.impl`:
  "reference"  computes every expert's output (N, K, D_out) and runs `gram_schmidt` on it: read this one.
  "fast"       (default) never builds (N, K, D_out): the Gram matrix of the expert outputs is
               G_ij = s² h_iᵀ (B_iᵀ B_j) h_j with h_i = A_i x (rank space); Gram–Schmidt is QR, so with
               the Cholesky factor G = RᵀR the orthonormal outputs are Q = E R⁻¹ and the mixed output is
               Σ_k g_k q_k = E (R⁻¹ g) = Σ_i c_i e_i: one product with the stacked B's, like vanilla MoE-LoRA.
               For K <= 4 the Cholesky factor and the solve are written out as elementwise ops over
               tokens (`_small_cholesky`, `_small_solve`): batched LAPACK on 2x2 matrices is slow, a
               launch per op on a GPU and hundreds of tiny triangular solves per step on a CPU.
               "normalized" needs only the diagonal of G: c_i = g_i / sqrt(G_ii + ridge).
"""
import functools
import inspect
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

import peft_format
from weights import load_safetensors, save_safetensors

ORTH_MODES = ("orthonormal", "orthogonal", "normalized", "none")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG, FORMAT_VERSION = "adapter_model.safetensors", "adapter_config.json", 1
OMOE_WEIGHTS = "omoe_model.safetensors"  # experts and routers: not PEFT's file name, so PEFT cannot load "nothing"

# The ridge. B starts at zero, so every expert output is 0 at step 0 and normalising it is 0/0.
# Both implementations add `ridge` to the diagonal of the per-token Gram matrix (fast path), which is
# exactly Gram–Schmidt on the experts augmented with private coordinates [e_k ; sqrt(ridge)·u_k],
# the extra coordinates dropped afterwards (reference path); so the two agree to rounding. The first
# active expert's "orthonormal" output has length |e_k| / sqrt(|e_k|² + ridge): ~1 once |e_k|² >> ridge,
# a smooth ramp from 0 below that; later experts follow a similar ramp (their residuals also carry
# the projections of the earlier experts' private coordinates).
# - RIDGE_ABS: at B = 0, R = sqrt(ridge)·I and c = g / sqrt(ridge), so the output is exactly the base
#   output and B_i's gradient is g_i / sqrt(RIDGE_ABS) = 100·g_i times plain LoRA's ("orthogonal":
#   g_i times, as in vanilla MoE-LoRA). A normalised output's gradient scales as 1/|e|, and |e| ≈ 0.01
#   is about where the first optimiser steps take it, so the step-0 gradient is of the same order as
#   the next ones: a far smaller ridge (say 1e-12) would give a step-0 gradient that dominates Adam's
#   second-moment average (decay 0.999) and slows B's learning for hundreds of steps. And an output
#   0.01 long is negligible beside the base outputs it is added to.
# - RIDGE_REL: forming G squares the condition number. A ridge of 1e-4 times the mean squared expert
#   length bounds cond(G + ridge·I) by about K·1e4, so float32 Cholesky (unit roundoff 6e-8) cannot
#   fail, and a residual shorter than 1% of a typical expert (a near-copy of an earlier expert, which
#   float32 could not resolve from the Gram anyway) is shrunk instead of blown up to unit length.
# - "normalized" uses the same ridge (from the same mean over the active experts) and scales every
#   expert as Gram–Schmidt scales the first: q_k = e_k / sqrt(|e_k|² + ridge).
RIDGE_ABS, RIDGE_REL = 1e-4, 1e-4
# Above this many active experts the coefficients come from LAPACK (cholesky_ex, solve_triangular);
# up to it, from the K-row loops of _small_cholesky and _small_solve, elementwise over tokens.
SMALL_K = 4
# Without a checkpoint, autograd keeps the Gram's (N, E, E, R) intermediate (see _expert_gram): E²·R
# numbers per token per adapted layer. It is recomputed in backward once it has GRAM_CHECKPOINT_MIN
# numbers per token (2 KiB in float32), where the memory matters and the recompute is cheap beside
# the layer. Measured (README): a 4096-wide layer with top-2 of 8 experts, rank 16 (E²·R = 1024)
# keeps 1.21x vanilla MoE-LoRA's bytes without it, 1.02x with it; on the embedded tiny LLaMA (R = 8)
# top-2 of 8 (512) keeps 284 MiB per step without it, 158 MiB with it, while 2 experts (32) would save
# 7 MiB of 112 MiB and pay for it with 9% of the step's time.
GRAM_CHECKPOINT_MIN = 512


def _ridge(mean_sq: Tensor) -> Tensor:
    return RIDGE_ABS + RIDGE_REL * mean_sq  # (N,) from the mean squared length of the active experts


def gram_schmidt(E: Tensor, normalize: bool = True, eps: float | Tensor = 0.0) -> Tensor:
    """Gram–Schmidt over the K vectors of each token, in index order: E (N, K, D) -> Q (N, K, D).

    Q[:, 0] keeps the direction of E[:, 0]; Q[:, k] is E[:, k] minus its projections on Q[:, :k].
    normalize=False keeps each residual's length (pairwise orthogonal, not unit). eps is the ridge
    (a float or an (N,) tensor): Gram–Schmidt runs on [e_k ; sqrt(eps)·u_k], u_k the k-th of K extra
    unit coordinates, which are dropped at the end. eps = 0 is textbook Gram–Schmidt (zero extra
    coordinates change no dot product); a zero vector then gives NaN.
    """
    N, K, D = E.shape
    eps = torch.as_tensor(eps, dtype=E.dtype, device=E.device).expand(N)              # (N,)
    private = eps.sqrt()[:, None, None] * torch.eye(K, dtype=E.dtype, device=E.device)  # (N, K, K)
    V = torch.cat([E, private], dim=-1)                                                # (N, K, D+K)
    residuals = []
    for k in range(K):
        v = V[:, k]                                                                    # (N, D+K)
        for u in residuals:  # subtract the projection on each earlier residual ("modified" Gram–Schmidt)
            v = v - (u * v).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True) * u
        residuals.append(v)
    Q = torch.stack(residuals, dim=1)                                                  # (N, K, D+K)
    if normalize:
        Q = Q / Q.norm(dim=-1, keepdim=True)
    return Q[..., :D]                                                                  # (N, K, D)


def _expert_gram(h: Tensor, B: Tensor, s: float) -> Tensor:
    """Gram matrix of the expert outputs e_i = s·B_i h_i, per token: h (N, E, R), B (E, D_out, R) -> (N, E, E)."""
    return _gram_from_products(h, _block_products(B), s)


def _block_products(B: Tensor) -> Tensor:
    return torch.einsum("eor,fot->efrt", B, B)        # (E, E, R, R) blocks B_iᵀ B_j, shared by all tokens


def _gram_from_products(h: Tensor, BtB: Tensor, s: float) -> Tensor:
    hBtB = torch.einsum("ner,efrt->neft", h, BtB)     # (N, E, E, R): one batched product over e
    return s * s * (hBtB * h[:, None]).sum(-1)        # (N, E, E): G_ef = s² (h_eᵀ B_eᵀ B_f) h_f


def _expert_sq_lengths(h: Tensor, B: Tensor, s: float) -> Tensor:
    """The Gram's diagonal alone, |e_i|² = s² |B_i h_i|²: h (N, E, R), B (E, D_out, R) -> (N, E)."""
    BtB = torch.einsum("eor,eot->ert", B, B)          # (E, R, R) blocks B_iᵀ B_i
    return s * s * (torch.einsum("ner,ert->net", h, BtB) * h).sum(-1)  # (N, E)


def _cholesky(G: Tensor, active: Tensor) -> Tensor:
    """Lower Cholesky factor L (N, E, E) of the ridged Gram of the active experts (G = L Lᵀ, so R = Lᵀ).

    Inactive rows and columns become the identity: the matrix is then block diagonal (active block,
    identity), so factoring all E in index order is Gram–Schmidt on the active experts alone."""
    K = active.sum(-1)                                                               # (N,)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)                     # (E, E)
    G = torch.where(active[:, :, None] & active[:, None, :], G, eye)                 # (N, E, E)
    mean_sq = (G.diagonal(dim1=-2, dim2=-1) * active).sum(-1) / K                    # (N,)
    # cholesky_ex: the ridge keeps G + ridge·I positive definite, and it does not synchronise on CUDA.
    return torch.linalg.cholesky_ex(G + _ridge(mean_sq)[:, None, None] * eye).L      # (N, E, E)


def _small_cholesky(G: Tensor) -> list[list[Tensor]]:
    """Cholesky of a ridged (N, K, K) Gram, row by row, each entry an (N,) tensor: L[i][j] for j <= i.

    L_ij = (G_ij - Σ_{k<j} L_ik L_jk) / L_jj and L_ii = sqrt(G_ii - Σ_{k<i} L_ik²): Gram–Schmidt's
    projection lengths (j < i) and residual lengths (i = i) read off the Gram."""
    K = G.shape[-1]
    L = [[None] * K for _ in range(K)]
    for i in range(K):
        for j in range(i + 1):
            t = G[:, i, j]                                                           # (N,)
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t.sqrt() if i == j else t / L[j][j]
    return L


def _small_solve(L: list[list[Tensor]], rhs: Tensor) -> Tensor:
    """Solve Lᵀ c = rhs (back substitution, last row first) for c (N, K); rhs (N, K)."""
    K = rhs.shape[-1]
    c = [None] * K
    for i in reversed(range(K)):
        t = rhs[:, i]                                                                # (N,)
        for k in range(i + 1, K):
            t = t - L[k][i] * c[k]
        c[i] = t / L[i][i]
    return torch.stack(c, dim=-1)                                                    # (N, K)


def _coefficients(G: Tensor, g: Tensor, orth: str) -> Tensor:
    """Mixing coefficients c (N, K) with Σ_k g_k q_k = Σ_k c_k e_k, from the active experts' Gram
    G (N, K, K) and their gates g (N, K), both in Gram–Schmidt order."""
    K = g.shape[-1]
    ridge = _ridge(G.diagonal(dim1=-2, dim2=-1).mean(-1))                            # (N,)
    Gr = G + ridge[:, None, None] * torch.eye(K, dtype=G.dtype, device=G.device)     # (N, K, K)
    if K <= SMALL_K:
        L = _small_cholesky(Gr)
        diag = torch.stack([L[i][i] for i in range(K)], dim=-1)                      # (N, K) = diag(R)
        # orthonormal: Q = E R⁻¹, c = R⁻¹ g. orthogonal: residuals V = Q·diag(R), c = R⁻¹ (diag(R)·g).
        return _small_solve(L, g if orth == "orthonormal" else g * diag)
    L = torch.linalg.cholesky_ex(Gr).L                                               # (N, K, K), R = Lᵀ
    rhs = g if orth == "orthonormal" else g * L.diagonal(dim1=-2, dim2=-1)
    return torch.linalg.solve_triangular(L.mT, rhs[:, :, None], upper=True)[:, :, 0]  # (N, K)


class OMoELinear(nn.Module):
    """A frozen nn.Linear (`base_layer`) plus E LoRA experts, a router and Gram–Schmidt (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, experts=2, top_k=None, rank=16, alpha=32, dropout=0.05,
                 orth="orthonormal", device=None):
        super().__init__()
        _check_args(experts, top_k, rank, dropout, orth)
        self.base_layer = base_layer
        self.experts, self.rank, self.alpha, self.dropout = experts, rank, alpha, dropout
        self.top_k = experts if top_k is None else top_k
        self.scaling = alpha / rank
        # One expert: plain LoRA (nothing to orthogonalise), unless it is to be normalised.
        self.orth = "none" if experts == 1 and orth != "normalized" else orth
        self.impl = "fast"                            # or "reference"
        self.target = None                            # the add_experts target that chose this layer
        self.role = "experts"                         # or "lora": plain LoRA beside experts (add_experts)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters are kept in float32 (float64 for a float64 base) even beside a bf16 base, like PEFT;
        # on the base's device unless told otherwise (a base still on the meta device, to be sharded).
        w = base_layer.weight
        kw = dict(dtype=torch.promote_types(w.dtype, torch.float32), device=device or w.device)
        self.lora_A = nn.Parameter(torch.empty(experts, rank, base_layer.in_features, **kw))   # (E, R, D_in)
        self.lora_B = nn.Parameter(torch.empty(experts, base_layer.out_features, rank, **kw))  # (E, D_out, R)
        self.router = nn.Linear(base_layer.in_features, experts, bias=False, **kw) if experts > 1 else None
        self._recorder = None       # set by record_diagnostics
        self._balance_loss = None   # from the last forward, for load_balancing_loss
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # PEFT: kaiming_uniform_(a=sqrt(5)) on each (R, D_in) matrix, i.e. U(±1/sqrt(D_in)). Calling it on
        # the stacked (E, R, D_in) tensor would take fan_in = R·D_in and give a bound sqrt(R) too small.
        self.lora_A.uniform_(-1 / math.sqrt(self.lora_A.shape[-1]), 1 / math.sqrt(self.lora_A.shape[-1]))
        self.lora_B.zero_()  # so that at step 0 the adapted layer equals the base layer
        if self.router is not None:
            self.router.weight.normal_(std=0.02)  # LLaMA's initializer_range, like the routers of MoE LLMs

    def route(self, x: Tensor):
        """x (N, D_in) -> probs (N, E) softmax, gates (N, E) renormalised top-k (0 elsewhere),
        active (N, E) bool, top (N, K) active expert indices in increasing (Gram–Schmidt) order."""
        probs = self._probs(x)                                                       # (N, E)
        top = probs.topk(self.top_k, dim=-1).indices.sort(dim=-1).values             # (N, K)
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)    # (N, E)
        gates = torch.where(active, probs, 0.0)
        return probs, gates / gates.sum(-1, keepdim=True), active, top

    def _probs(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the router is always float32
            logits = x.to(self.router.weight.dtype) @ self.router.weight.T          # (N, E)
            return logits.softmax(dim=-1)                                            # (N, E)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)                                                       # (..., D_out)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.lora_A.dtype)                           # (N, D_in)
        h = self.lora_dropout(x) @ self.lora_A.flatten(0, 1).T                       # (N, E*R)
        h = h.view(x.shape[0], self.experts, self.rank)                             # (N, E, R)
        if self.router is None and self.orth == "none":  # plain LoRA: y = base(x) + s·B(A(dropout(x)))
            delta = self.scaling * (h[:, 0] @ self.lora_B[0].T)                      # (N, D_out)
        else:
            if self.router is None:  # normalised LoRA: one expert, gate 1
                probs = gates = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
                active = top = None
            elif self.top_k == self.experts:  # soft routing: every expert active, gates = probs
                probs = gates = self._probs(x)                                       # (N, E)
                active = top = None
            else:
                probs, gates, active, top = self.route(x)
                f = active.float().mean(0) / self.top_k  # Switch-style balance: E·Σ_e f_e·P_e (1 when balanced)
                self._balance_loss = self.experts * (f * probs.mean(0)).sum()
            if self._recorder is not None:
                self._recorder.observe(self, h, probs, torch.ones_like(probs, dtype=torch.bool)
                                       if active is None else active)
            mix = self._mix_reference if self.impl == "reference" else self._mix_fast
            delta = mix(h, gates, top)                                               # (N, D_out)
        return y + delta.view(*shape[:-1], -1).to(y.dtype)

    def _mix_reference(self, h, gates, top):
        """Readable: every expert's output, Gram–Schmidt on the active ones, gate-weighted sum.
        top (N, K) the active experts in order, or None when all are active."""
        e = self.scaling * torch.einsum("ner,eor->neo", h, self.lora_B)              # (N, E, D_out)
        g = gates
        if top is not None:
            e = e.gather(1, top[:, :, None].expand(-1, -1, e.shape[-1]))             # (N, K, D_out)
            g = gates.gather(1, top)                                                 # (N, K)
        if self.orth != "none":
            with torch.autocast(h.device.type, enabled=False):
                e = e.to(gates.dtype)
                ridge = _ridge(e.pow(2).sum(-1).mean(-1))                            # (N,)
                if self.orth == "normalized":  # what gram_schmidt does to its first vector, to each one
                    e = e / (e.pow(2).sum(-1, keepdim=True) + ridge[:, None, None]).sqrt()
                else:
                    e = gram_schmidt(e, normalize=self.orth == "orthonormal", eps=ridge)  # (N, K, D_out)
        return torch.einsum("nk,nko->no", g.to(e.dtype), e)                          # (N, D_out)

    def _mix_fast(self, h, gates, top):
        """Σ_k g_k q_k = Σ_i c_i e_i with per-token coefficients c (N, E): never builds (N, K, D_out)."""
        if self.orth == "none":
            c = gates                                                                # vanilla MoE-LoRA
        else:
            with torch.autocast(h.device.type, enabled=False):
                hf, B = h.to(gates.dtype), self.lora_B.to(gates.dtype)
                g = gates if top is None else gates.gather(1, top)                   # (N, K)
                if self.orth == "normalized":  # the Gram's diagonal is all it needs
                    sq = _expert_sq_lengths(hf, B, self.scaling)                     # (N, E)
                    sq = sq if top is None else sq.gather(1, top)                    # (N, K)
                    c = g / (sq + _ridge(sq.mean(-1))[:, None]).sqrt()               # (N, K)
                else:
                    G = self._gram(hf, B)                                            # (N, E, E)
                    if top is not None:  # the active experts' block, in Gram–Schmidt order
                        G = G.gather(1, top[:, :, None].expand(-1, -1, G.shape[-1]))  # (N, K, E)
                        G = G.gather(2, top[:, None, :].expand(-1, top.shape[1], -1))  # (N, K, K)
                    c = _coefficients(G, g, self.orth)                               # (N, K)
                if top is not None:
                    c = torch.zeros_like(gates).scatter(1, top, c)                   # (N, E)
        ch = c.to(h.dtype)[:, :, None] * h                                           # (N, E, R)
        return self.scaling * torch.einsum("ner,eor->no", ch, self.lora_B.to(h.dtype))  # (N, D_out)

    def _gram(self, h: Tensor, B: Tensor) -> Tensor:
        """_expert_gram, with what autograd would keep of it recomputed in backward where that pays:
        B_iᵀ B_j always (a few MFLOP, while its einsum would keep two reshaped copies of B, E·D_out·R
        numbers each), the (N, E, E, R) product when E²·R >= GRAM_CHECKPOINT_MIN."""
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        BtB = checkpoint(_block_products, B)                                         # (E, E, R, R)
        if self.experts ** 2 * self.rank >= GRAM_CHECKPOINT_MIN:
            return checkpoint(_gram_from_products, h, BtB, self.scaling)
        return _gram_from_products(h, BtB, self.scaling)

    def extra_repr(self):
        return (f"experts={self.experts}, top_k={self.top_k}, rank={self.rank}, alpha={self.alpha}, "
                f"orth={self.orth!r}, impl={self.impl!r}")


def _check_args(experts, top_k, rank, dropout, orth):
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts must be an integer >= 1, got {experts!r}")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= experts):
        raise ValueError(f"top_k must be None (soft routing) or an integer in 1..experts={experts}, got {top_k!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if orth not in ORTH_MODES:
        raise ValueError(f"orth must be one of {', '.join(map(repr, ORTH_MODES))}, got {orth!r}")


def _adapted(model: nn.Module) -> dict[str, OMoELinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OMoELinear)}


def check_targets(model: nn.Module, targets=TARGETS, lora_targets=()) -> dict[str, tuple[str, str]]:
    """{layer name: (target, "experts" or "lora")} for every nn.Linear that a target names (the layer's
    name is the target, or ends with ".<target>"); a target naming none, or a layer named by both lists,
    is a ValueError. add_experts calls it; a caller can too, to refuse bad targets before any work."""
    targets, lora_targets = (tuple([t] if isinstance(t, str) else t) for t in (targets, lora_targets))
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = {}
    for t, role in [(t, "experts") for t in targets] + [(t, "lora") for t in lora_targets]:
        hits = [name for name in linears if name == t or name.endswith("." + t)]
        if not hits:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"target {t!r} matches no nn.Linear in the model; its linear layers are named "
                             f"{', '.join(leaves) or '(none)'}")
        both = [name for name in hits if chosen.get(name, (None, role))[1] != role]
        if both:
            raise ValueError(f"lora target {t!r} names layers that targets also name ({both[0]}, ...): "
                             "a layer gets experts or plain LoRA, not both")
        chosen.update(dict.fromkeys(hits, (t, role)))
    return chosen


def add_experts(model: nn.Module, targets=TARGETS, experts=2, top_k=None, rank=16, alpha=32, dropout=0.05,
                orth="orthonormal", lora_targets=(), device=None) -> nn.Module:
    """Replace every nn.Linear whose name is, or ends with ".<target>", by an OMoELinear; freeze the rest.

    Call it after the base weights are loaded (or on a base on the meta device, with the adapters' `device`,
    to shard the model before its weights are loaded: see parallel.py). experts=1 is plain LoRA (with orth="normalized": a normalised LoRA).
    The layers of lora_targets get plain LoRA instead (one expert of the same rank, alpha and dropout, no
    router): layouts with experts on some projections and LoRA on the others, such as MixLoRA's experts on
    gate/up/down_proj and LoRA on the attention projections."""
    _check_args(experts, top_k, rank, dropout, orth)
    if _adapted(model):
        raise ValueError("model already has experts: call add_experts once, on a freshly loaded model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = check_targets(model, targets, lora_targets)
    for name, (t, role) in chosen.items():
        parent, _, leaf = name.rpartition(".")
        layer = (OMoELinear(linears[name], experts, top_k, rank, alpha, dropout, orth, device) if role == "experts"
                 else OMoELinear(linears[name], 1, None, rank, alpha, dropout, "none", device))
        layer.target, layer.role = t, role
        setattr(model.get_submodule(parent), leaf, layer)
    mark_only_adapters_trainable(model)
    return model


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Experts and routers train; everything else (the base model) is frozen."""
    model.requires_grad_(False)
    for p in _adapter_parameters(model).values():
        p.requires_grad_(True)


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


def adapter_config(model: nn.Module) -> dict:
    """The add_experts arguments that rebuild this model's adapter layout: add_experts(model, **config).
    A plain dict; "lora_targets" appears only when some layers have plain LoRA beside the experts."""
    def settings(m):
        return dict(experts=m.experts, top_k=None if m.top_k == m.experts else m.top_k, rank=m.rank,
                    alpha=m.alpha, dropout=m.dropout, orth=m.orth)

    layers = list(_adapted(model).values())
    if not layers:
        raise ValueError("model has no experts: call add_experts first")
    experts, lora = ([m for m in layers if m.role == role] for role in ("experts", "lora"))
    configs = [settings(m) for m in experts] or [settings(lora[0])]
    plain = {**configs[0], "experts": 1, "top_k": None, "orth": "none"}
    if any(c != configs[0] for c in configs) or any(settings(m) != plain for m in lora):
        raise ValueError("adapted layers have different settings; one adapter config cannot describe them")
    config = {"targets": list(dict.fromkeys(m.target for m in experts)), **configs[0]}
    if lora:
        config["lora_targets"] = list(dict.fromkeys(m.target for m in lora))
    return config


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{path}.{name}": p for path, m in _adapted(model).items()
            for name, p in m.named_parameters() if not name.startswith("base_layer.")}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights only, detached but sharing storage, keyed like the model's state_dict:
    "<path>.lora_A" (E, R, D_in), "<path>.lora_B" (E, D_out, R), "<path>.router.weight" (E, D_in)."""
    return {k: p.detach() for k, p in _adapter_parameters(model).items()}


def load_adapters(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter weights into the model's adapters; every key and shape must match (no strict=False)."""
    check_adapter_state(model, state)
    with torch.no_grad():
        for k, p in adapter_state_dict(model).items():
            p.copy_(state[k])  # copy_ converts dtype and device


def check_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Refuse adapter weights that do not fit the model's adapters, naming every key that does not."""
    own = adapter_state_dict(model)
    if not own:
        raise ValueError("model has no experts: call add_experts (with the saved adapter config) first")
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [f"{k}: given {tuple(state[k].shape)}, model has {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
    if problems:
        raise ValueError("adapter weights do not fit this model; " + "; ".join(problems))
    for k in own:  # copy_ would silently turn integers into floats and carry NaN into every output
        if not state[k].is_floating_point():
            raise ValueError(f"adapter weight {k} has dtype {state[k].dtype}, not a floating-point dtype")
        if not torch.isfinite(state[k]).all():
            raise ValueError(f"adapter weight {k} is not finite (it holds NaN or infinity)")


def save_adapters(model: nn.Module, directory, base_model: str | None = None, state: dict | None = None) -> None:
    """Write the adapters into directory: exactly PEFT's files for plain LoRA (one expert without
    normalisation, one rank, alpha and dropout everywhere), else ours: adapter_config.json with
    format_version and the add_experts arguments, and omoe_model.safetensors keyed like adapter_state_dict. PEFT refuses ours (its config
    has no peft_type, and a config edited to look like PEFT's still finds no adapter_model.safetensors),
    instead of silently running the base model. base_model is recorded as base_model_name_or_path.
    state: the adapter weights, if not the model's own (those of a sharded model, gathered: parallel.py)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in (adapter_state_dict(model) if state is None else state).items()}
    layers = list(_adapted(model).values())
    settings = {(m.rank, m.alpha, m.dropout) for m in layers}
    plain = all(m.experts == 1 and m.orth == "none" for m in layers)  # a normalised LoRA is not PEFT's
    if plain and len(settings) == 1:
        targets = list(dict.fromkeys(m.target for m in layers))
        config, state = peft_format.to_peft(targets, *settings.pop(), state, base_model)
        weights = ADAPTER_WEIGHTS
    else:
        config, weights = {"format_version": FORMAT_VERSION, **adapter_config(model)}, OMOE_WEIGHTS
    save_safetensors(state, directory / weights, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter_files(directory) -> tuple[dict, dict[str, Tensor]]:
    """Read an adapter directory, ours or a PEFT LoRA's: (config for add_experts(model, **config),
    state for load_adapters). Errors name the file and the key."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{path} not found: {directory} is not an adapter directory (save_adapters or PEFT)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "peft_type" in config:
        config = peft_format.from_peft_config(path, config, TARGETS)
        return config, peft_format.from_peft_state(directory / ADAPTER_WEIGHTS)
    version = config.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not {FORMAT_VERSION}")
    known = [name for name in inspect.signature(add_experts).parameters if name != "model"]
    unknown = [key for key in config if key not in known]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (an adapter config has {', '.join(known)})")
    weights = directory / OMOE_WEIGHTS
    if not weights.is_file() and (directory / ADAPTER_WEIGHTS).is_file():
        weights = directory / ADAPTER_WEIGHTS  # written before the experts' file was renamed
    return config, load_safetensors(weights)


def load_balancing_loss(model: nn.Module) -> Tensor:
    """Sum over top-k routed layers of E·Σ_e f_e·P_e from their last forward (f_e: share of routed token
    slots, P_e: mean router probability). 1 per layer when balanced. Soft-routed layers add nothing
    (every expert gets every token: the loss would be a constant 1)."""
    losses = [m._balance_loss for m in _adapted(model).values() if m._balance_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


class DiagnosticsRecorder:
    """Per routed layer, averages over the tokens seen while recording:
    load (E,) share of tokens for which each expert is active; prob (E,) mean router probability;
    entropy, mean router entropy in nats (log E is uniform); cos_before / cos_after, mean |cos| over
    pairs of active experts of their outputs before and after orthogonalisation (from the Gram;
    "normalized" only rescales, so its cosines after equal those before). Layers with one expert have
    no router and no pairs, and are not recorded.

    Padding: set `recorder.mask` to the (B, T) attention mask before each forward; layers see the
    B·T tokens flattened in the same order and skip those where the mask is 0."""

    def __init__(self, names: dict):
        self.names, self.mask, self.sums = names, None, {}
        # Host-side bookkeeping (boolean indexing, .cpu()): kept out of compiled graphs. Wrapped here,
        # not by a decorator, since torch.compiler.disable imports the compiler (seconds) when called.
        self.observe = torch.compiler.disable(self.observe)

    @torch.no_grad()
    def observe(self, layer: OMoELinear, h: Tensor, probs: Tensor, active: Tensor):
        keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)             # (N,)
        if self.mask is not None:
            if self.mask.numel() != h.shape[0]:
                raise ValueError(f"recorder.mask has {self.mask.numel()} entries but the layer "
                                 f"{self.names[layer]} sees {h.shape[0]} tokens")
            keep = self.mask.reshape(-1).to(device=h.device, dtype=torch.bool)
        h, probs, active = h[keep].float(), probs[keep], active[keep]
        G = _expert_gram(h, layer.lora_B.float(), layer.scaling)                    # (N, E, E)
        after = G  # "none", and "normalized": scaling each output by a positive number leaves its cosines
        if layer.orth in ("orthonormal", "orthogonal"):  # Gram of Q = E R⁻¹ is L⁻¹ G L⁻ᵀ (orthogonal: same cosines)
            L = _cholesky(G, active)
            X = torch.linalg.solve_triangular(L, G, upper=False)                     # L⁻¹ G
            after = torch.linalg.solve_triangular(L, X.mT, upper=False)              # L⁻¹ G L⁻ᵀ (symmetric)
        pairs = (active[:, :, None] & active[:, None, :]).triu(diagonal=1)           # (N, E, E), i < j
        s = self.sums.setdefault(self.names[layer], dict(tokens=0, pairs=0, load=0, prob=0, entropy=0,
                                                         cos_before=0, cos_after=0))
        s["tokens"] += h.shape[0]
        s["pairs"] += int(pairs.sum())
        s["load"] = s["load"] + active.float().sum(0).cpu()
        s["prob"] = s["prob"] + probs.sum(0).cpu()
        s["entropy"] += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        for key, M in (("cos_before", G), ("cos_after", after)):
            d = M.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()                 # (N, E) lengths
            s[key] += float((M / (d[:, :, None] * d[:, None, :])).abs()[pairs].sum())

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, s in self.sums.items():
            t, p = max(s["tokens"], 1), s["pairs"]
            out[name] = dict(tokens=s["tokens"], load=(s["load"] / t).tolist(), prob=(s["prob"] / t).tolist(),
                             entropy=s["entropy"] / t, cos_before=s["cos_before"] / p if p else float("nan"),
                             cos_after=s["cos_after"] / p if p else float("nan"))
        return out


def mean_diagnostics(stats: dict[str, dict]) -> dict:
    """DiagnosticsRecorder.summary() -> the means over its layers of prob, load, cos_before, cos_after."""
    rows = list(stats.values())
    return {k: torch.tensor([r[k] for r in rows]).mean(0).tolist() for k in ("prob", "load", "cos_before",
                                                                           "cos_after")} if rows else {}


def diagnostics_by_block(stats: dict[str, dict]) -> dict[str, dict]:
    """DiagnosticsRecorder.summary() -> {block: mean_diagnostics of its layers}; "layers.3.mlp.up_proj" is in "3"."""
    blocks: dict[str, dict] = {}
    for name, s in stats.items():
        blocks.setdefault(name.split(".")[1] if name.startswith("layers.") else name, {})[name] = s
    return {block: mean_diagnostics(layers) for block, layers in blocks.items()}


@contextmanager
def record_diagnostics(model: nn.Module):
    """with record_diagnostics(model) as rec: model(tokens); rec.summary(). Costs nothing outside the block."""
    layers = {m: name for name, m in _adapted(model).items() if m.router is not None}
    recorder = DiagnosticsRecorder(layers)
    for m in layers:
        m._recorder = recorder
    try:
        yield recorder
    finally:
        for m in layers:
            m._recorder = None
