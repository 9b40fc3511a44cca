"""OMoE: LoRA experts made orthonormal by Gram–Schmidt (arXiv 2501.10062).

Shapes: N tokens (batch and time flattened), D_in and D_out the layer's
features, E experts, K active experts per token (top_k; K = E is soft
routing), R the LoRA rank. Expert k's output is e_k = s·B_k A_k x, where
s = alpha / R. One adapted linear layer:

    x ─┬─ base_layer, frozen ────────────────────────────────── W0 x ─┐
       ├─ router ─ softmax ─ top k ─ gates g ────────────┐            │
       └─ dropout ─┬─ A_1 ─ B_1 ─ e_1 ─┐                 ▼            ▼
                   ├─ A_2 ─ B_2 ─ e_2 ─┼─ Gram–Schmidt ─ Σ g_k q_k ─ (+) ─> y
                   └─ ...         e_E ─┘

Gram–Schmidt runs over the active experts, in index order. `orth` says what
happens to their outputs:
- "orthonormal", the paper's: Gram–Schmidt, each q_k of unit length;
- "orthogonal": the projections only, each residual keeps its length;
- "normalized": each e_k scaled to unit length, with no projections, the
  control that tells the two effects apart;
- "none": vanilla MoE-LoRA; with one expert, plain LoRA exactly as PEFT's.

There are two implementations, `layer.impl`. "reference" builds the active
outputs (N, K, D_out) and runs `gram_schmidt` on them: read it first.
"fast", the default, never builds them. Gram–Schmidt is QR,
[e_1 … e_K] = [q_1 … q_K] U with U upper triangular, so U follows from the
Gram matrix G = UᵀU, whose entries G_ij = s² h_iᵀ B_iᵀ B_j h_j (h_i = A_i x)
live in rank space. Then Σ_k g_k q_k = [e_1 … e_K] U⁻¹ g = Σ_k c_k e_k, one
product with the stacked B's. Notebook 3 derives it.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from plumbing.base.checks import check_layer_args, check_target_hits, target_names

ORTH_MODES = ("orthonormal", "orthogonal", "normalized", "none")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj",
           "gate_proj", "up_proj", "down_proj")
# B starts at zero, so at step 0 normalising an expert's output is 0/0. The
# ridge prevents it: Gram–Schmidt runs on the outputs augmented by private
# coordinates of length sqrt(ridge), G + ridge·I in the fast path. Notebook 3
# shows why these values, and why a far smaller ridge would slow learning.
RIDGE_ABS, RIDGE_REL = 1e-4, 1e-4
# Up to this many active experts, Cholesky is written out over tokens.
SMALL_K = 4
# Autograd would keep the Gram's (N, E, E, R) intermediate for backward; from
# this many numbers per token, backward recomputes it instead.
# benchmarks/README.md has the measurements behind the value.
GRAM_CHECKPOINT_MIN = 512


def layer_settings(experts=2, top_k=None, rank=16, alpha=32, dropout=0.05,
                   orth=None) -> dict:
    """A layer's settings, checked. orth defaults to the paper's Gram–Schmidt
    for several experts, and to plain LoRA for one.

    Every setting of an adapter is declared here, once. The layer keeps each
    as an attribute of the same name; the adapter files, the command line's
    layout and what a resumed run must keep follow from this signature
    (plumbing/adapters.py)."""
    check_layer_args(experts, top_k, rank, alpha, dropout, orth or "none",
                     ORTH_MODES)
    orth = orth or ("orthonormal" if experts > 1 else "none")
    return dict(experts=experts, top_k=top_k, rank=rank, alpha=alpha,
                dropout=dropout, orth=orth)


def ridge(sq: Tensor) -> Tensor:
    """Each token's ridge (N,) from its active experts' |e_k|², sq (N, K)."""
    return RIDGE_ABS + RIDGE_REL * sq.mean(-1)


def gram_schmidt(e: Tensor, normalize: bool = True,
                 eps: float | Tensor = 0.0) -> Tensor:
    """Gram–Schmidt over each token's K vectors in index order:
    e (N, K, D) -> q (N, K, D).

    q[:, k] is e[:, k] minus its projections on q[:, :k], over its length
    (normalize=False keeps the length). The ridge eps, a float or one per
    token (N,), gives vector k private coordinates sqrt(eps)·u_k, dropped at
    the end. eps = 0 is textbook Gram–Schmidt, where a zero vector gives NaN.
    """
    N, K, D = e.shape
    eps = torch.as_tensor(eps, dtype=e.dtype, device=e.device).expand(N)
    private = (eps.sqrt()[:, None, None]
               * torch.eye(K, dtype=e.dtype, device=e.device))  # (N, K, K)
    augmented = torch.cat([e, private], dim=-1)  # (N, K, D+K)
    residuals = []
    for k in range(K):
        v = augmented[:, k]  # (N, D+K)
        # "Modified" Gram–Schmidt: project out each earlier residual in turn.
        for u in residuals:
            v = v - (u * v).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True) * u
        residuals.append(v)
    q = torch.stack(residuals, dim=1)  # (N, K, D+K)
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True)
    return q[..., :D]  # (N, K, D)


class OMoELinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts, a router and Gram–Schmidt."""

    def __init__(self, base_layer: nn.Linear, *, device=None, target=None,
                 role="experts", **settings):
        super().__init__()
        # Each setting of layer_settings becomes an attribute of the same name.
        s = layer_settings(**settings)
        experts, rank = s["experts"], s["rank"]
        alpha, dropout = s["alpha"], s["dropout"]
        self.base_layer = base_layer
        self.experts, self.rank, self.alpha, self.dropout = (
            experts, rank, alpha, dropout)
        self.orth = s["orth"]
        self.top_k = experts if s["top_k"] is None else s["top_k"]
        self.scaling = alpha / rank
        self.impl = "fast"  # or "reference"
        # The target that chose this layer, and its role ("lora": plain LoRA).
        self.target, self.role = target, role
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters stay float32 beside a bf16 base, as PEFT's do, and go on the
        # base's device unless `device` says otherwise (a meta-device base).
        w = base_layer.weight
        kw = dict(dtype=torch.promote_types(w.dtype, torch.float32),
                  device=device or w.device)
        D_in, D_out = base_layer.in_features, base_layer.out_features
        # Each expert's pair: A (E, R, D_in) and B (E, D_out, R).
        self.lora_A = nn.Parameter(torch.empty(experts, rank, D_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(experts, D_out, rank, **kw))
        self.router = (nn.Linear(D_in, experts, bias=False, **kw)
                       if experts > 1 else None)
        # A plumbing.diagnostics recorder, while one records.
        self.recorder = None
        # From the last forward, for load_balancing_loss.
        self.balance_loss = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # PEFT's kaiming_uniform_(a=sqrt(5)) on each (R, D_in) matrix, that is
        # U(±1/sqrt(D_in)). On the stacked (E, R, D_in) tensor it would take
        # fan_in = R·D_in, a bound sqrt(R) times too small.
        bound = 1 / math.sqrt(self.lora_A.shape[-1])
        self.lora_A.uniform_(-bound, bound)
        # B = 0: at step 0 the adapted layer equals the base layer.
        self.lora_B.zero_()
        if self.router is not None:
            # LLaMA's initializer_range, as MoE LLMs' routers use.
            self.router.weight.normal_(std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., D_out)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.lora_A.dtype)  # (N, D_in)
        h = self.lora_dropout(x) @ self.lora_A.flatten(0, 1).T  # (N, E*R)
        h = h.view(x.shape[0], self.experts, self.rank)  # (N, E, R)
        if self.router is None and self.orth == "none":
            # Plain LoRA: base(x) + s·B(A(dropout(x))).
            delta = self.scaling * (h[:, 0] @ self.lora_B[0].T)  # (N, D_out)
        else:
            probs, gates, active, top = self.route(x)
            if self.recorder is not None:
                self.recorder.observe(self, h, probs, active)
            mix = self.mix_reference if self.impl == "reference" else self.mix_fast
            delta = mix(h, gates, top)  # (N, D_out)
        return y + delta.view(*shape[:-1], -1).to(y.dtype)

    def route(self, x: Tensor):
        """x (N, D_in) -> probs (N, E), the router's softmax; gates (N, E),
        renormalised over the top k, 0 elsewhere; active (N, E), a mask;
        top (N, K), the active experts in Gram–Schmidt order (None if all)."""
        if self.router is None:
            # One expert, gate 1.
            probs = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            return probs, probs, probs.bool(), None
        # The router keeps its own precision, float32 at least.
        with torch.autocast(x.device.type, enabled=False):
            probs = (x.to(self.router.weight.dtype)
                     @ self.router.weight.T).softmax(-1)  # (N, E)
        if self.top_k == self.experts:
            # Soft routing: every expert is active, the gates are probs.
            return probs, probs, torch.ones_like(probs, dtype=torch.bool), None
        # Each token's top k in index order (N, K), then as a mask (N, E).
        top = probs.topk(self.top_k, dim=-1).indices.sort(dim=-1).values
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)
        gates = torch.where(active, probs, 0.0)
        # Switch Transformer's balance loss E·Σ_e f_e·P_e, 1 when even: f_e is
        # expert e's share of token slots, P_e its mean router probability.
        f = active.float().mean(0) / self.top_k
        self.balance_loss = self.experts * (f * probs.mean(0)).sum()
        return probs, gates / gates.sum(-1, keepdim=True), active, top

    def mix_reference(self, h, gates, top):
        """Readable: each expert's output, Gram–Schmidt, the gated sum."""
        # e_i = s·B_i h_i for every expert: (N, E, D_out).
        e = self.scaling * torch.einsum("ner,eor->neo", h, self.lora_B)
        g = gates
        if top is not None:
            # The active experts alone: e (N, K, D_out), g (N, K).
            e = e.gather(1, top[:, :, None].expand(-1, -1, e.shape[-1]))
            g = gates.gather(1, top)
        if self.orth != "none":
            # Lengths and divisions in full precision, outside autocast.
            with torch.autocast(h.device.type, enabled=False):
                e = e.to(gates.dtype)
                eps = ridge(e.pow(2).sum(-1))  # (N,)
                if self.orth == "normalized":
                    # What gram_schmidt does to its first vector, to each.
                    e = e / (e.pow(2).sum(-1, keepdim=True)
                             + eps[:, None, None]).sqrt()
                else:
                    e = gram_schmidt(e, self.orth == "orthonormal", eps)
        return torch.einsum("nk,nko->no", g.to(e.dtype), e)  # (N, D_out)

    def mix_fast(self, h, gates, top):
        """Σ_k g_k q_k = Σ_i c_i e_i, with per-token c (N, E) from the Gram."""
        if self.orth == "none":
            c = gates  # vanilla MoE-LoRA
        else:
            # The gates' full precision, float32 or float64, outside autocast.
            with torch.autocast(h.device.type, enabled=False):
                h_full, B_full = h.to(gates.dtype), self.lora_B.to(gates.dtype)
                g = gates if top is None else gates.gather(1, top)  # (N, K)
                if self.orth == "normalized":
                    # The Gram's diagonal is all it needs.
                    sq = expert_sq_lengths(h_full, B_full, self.scaling)
                    sq = sq if top is None else sq.gather(1, top)  # (N, K)
                    c = g / (sq + ridge(sq)[:, None]).sqrt()  # (N, K)
                else:
                    G = self._gram(h_full, B_full)  # (N, E, E)
                    c = _coefficients(active_block(G, top), g, self.orth)
                if top is not None:
                    # One coefficient per expert again, 0 if inactive.
                    c = torch.zeros_like(gates).scatter(1, top, c)  # (N, E)
        # Σ_i c_i e_i = s Σ_i B_i (c_i h_i): one product with the B's.
        ch = c.to(h.dtype)[:, :, None] * h  # (N, E, R)
        return self.scaling * torch.einsum(
            "ner,eor->no", ch, self.lora_B.to(h.dtype))  # (N, D_out)

    def _gram(self, h: Tensor, B: Tensor) -> Tensor:
        """expert_gram, recomputed in backward where that pays: the blocks
        B_iᵀB_j always (a few MFLOP), the (N, E, E, R) product from
        GRAM_CHECKPOINT_MIN numbers per token."""
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint,
                                       use_reentrant=False)
        BtB = checkpoint(_block_products, B)  # (E, E, R, R)
        if self.experts ** 2 * self.rank >= GRAM_CHECKPOINT_MIN:
            return checkpoint(_gram_from_products, h, BtB, self.scaling)
        return _gram_from_products(h, BtB, self.scaling)

    def extra_repr(self):
        return (f"experts={self.experts}, top_k={self.top_k}, rank={self.rank}, "
                f"alpha={self.alpha}, orth={self.orth!r}, impl={self.impl!r}")


# ── The fast path: the Gram in rank space, Cholesky for small K ──────────
def expert_gram(h: Tensor, B: Tensor, s: float) -> Tensor:
    """The Gram of the outputs e_i = s·B_i h_i, without forming them:
    h (N, E, R), B (E, D_out, R) -> G (N, E, E)."""
    return _gram_from_products(h, _block_products(B), s)


def _block_products(B: Tensor) -> Tensor:
    """The blocks B_iᵀ B_j (E, E, R, R), the same for all tokens."""
    return torch.einsum("eor,fot->efrt", B, B)


def _gram_from_products(h: Tensor, BtB: Tensor, s: float) -> Tensor:
    # One batched product over e, then G_ef = s² (h_eᵀ B_eᵀ B_f) h_f.
    hBtB = torch.einsum("ner,efrt->neft", h, BtB)  # (N, E, E, R)
    return s * s * (hBtB * h[:, None]).sum(-1)  # (N, E, E)


def expert_sq_lengths(h: Tensor, B: Tensor, s: float) -> Tensor:
    """The Gram's diagonal alone, s²|B_i h_i|² (N, E)."""
    BtB = torch.einsum("eor,eot->ert", B, B)  # (E, R, R): B_iᵀ B_i
    return s * s * (torch.einsum("ner,ert->net", h, BtB) * h).sum(-1)


def active_block(G: Tensor, top: Tensor | None) -> Tensor:
    """The active experts' block of each token's Gram (N, E, E) -> (N, K, K),
    in Gram–Schmidt order."""
    if top is None:
        return G
    G = G.gather(1, top[:, :, None].expand(-1, -1, G.shape[-1]))  # (N, K, E)
    return G.gather(2, top[:, None, :].expand(-1, top.shape[1], -1))  # (N, K, K)


def _small_cholesky(G: Tensor) -> list[list[Tensor]]:
    """Cholesky of G (N, K, K) row by row, each L[i][j] (j <= i) an (N,)
    tensor: Gram–Schmidt's projection lengths (j < i) and residual lengths
    (j = i), read off the Gram."""
    K = G.shape[-1]
    L = [[None] * K for _ in range(K)]
    for i in range(K):
        for j in range(i + 1):
            t = G[:, i, j]  # (N,)
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t.sqrt() if i == j else t / L[j][j]
    return L


def _small_solve(L: list[list[Tensor]], rhs: Tensor) -> Tensor:
    """Solve Lᵀ c = rhs (N, K) for c (N, K), from the last row up."""
    K = rhs.shape[-1]
    c = [None] * K
    for i in reversed(range(K)):
        t = rhs[:, i]  # (N,)
        for k in range(i + 1, K):
            t = t - L[k][i] * c[k]
        c[i] = t / L[i][i]
    return torch.stack(c, dim=-1)  # (N, K)


def _coefficients(G: Tensor, g: Tensor, orth: str) -> Tensor:
    """c (N, K) with Σ_k g_k q_k = Σ_k c_k e_k, from the active experts' Gram
    G (N, K, K) and gates g (N, K). G = UᵀU makes the Cholesky factor L = Uᵀ,
    and c = U⁻¹ g. The orthogonal residuals are q_k U_kk, so for them
    c = U⁻¹ (diag(U)·g)."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    # The ridge, as in gram_schmidt: G + ridge·I.
    Gr = G + ridge(G.diagonal(dim1=-2, dim2=-1))[:, None, None] * eye
    # Batched LAPACK on 2x2 matrices is slow: a launch per op on a GPU.
    if len(eye) <= SMALL_K:
        L = _small_cholesky(Gr)
        diag = torch.stack([L[i][i] for i in range(len(L))], dim=-1)  # (N, K)
        return _small_solve(L, g if orth == "orthonormal" else g * diag)
    L = torch.linalg.cholesky_ex(Gr).L  # (N, K, K)
    rhs = g if orth == "orthonormal" else g * L.diagonal(dim1=-2, dim2=-1)
    return torch.linalg.solve_triangular(
        L.mT, rhs[:, :, None], upper=True)[:, :, 0]  # (N, K)


# ── Putting experts into a model ─────────────────────────────────────────
def layers_to_adapt(model: nn.Module, targets=TARGETS,
                    lora_targets=()) -> dict[str, tuple]:
    """{layer name: (target, role)}: each nn.Linear whose name is a target or
    ends with ".<target>" gets experts, those that lora_targets name get
    plain LoRA (role "lora"). A target must name some layer, and no layer
    may get both."""
    targets, lora_targets = target_names(targets), target_names(lora_targets)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = {}
    for target, role in ([(t, "experts") for t in targets]
                         + [(t, "lora") for t in lora_targets]):
        hits = [name for name in linears
                if name == target or name.endswith("." + target)]
        check_target_hits(target, role, hits, linears, chosen)
        chosen.update(dict.fromkeys(hits, (target, role)))
    return chosen


def add_experts(model: nn.Module, targets=TARGETS, lora_targets=(),
                device=None, **settings) -> nn.Module:
    """Replace each nn.Linear that layers_to_adapt chooses by an OMoELinear,
    and freeze everything else. Targets get experts, lora_targets plain LoRA
    (MixLoRA's layout: experts on gate/up/down_proj, LoRA on attention).
    `settings` are layer_settings' (experts, top_k, rank, alpha, dropout,
    orth). On a meta-device base, `device` is where the adapters go, to shard
    the model before loading it (plumbing/parallel.py)."""
    settings = layer_settings(**settings)
    if adapted_layers(model):
        raise ValueError("model already has experts: "
                         "call add_experts once, on a fresh model")
    # Plain LoRA: one expert, no router.
    plain = dict(settings, experts=1, top_k=None, orth="none")
    for name, (target, role) in layers_to_adapt(
            model, targets, lora_targets).items():
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        layer = OMoELinear(base, **(plain if role == "lora" else settings),
                           device=device, target=target, role=role)
        setattr(model.get_submodule(parent), leaf, layer)
    # The experts and routers train; the base model is frozen.
    model.requires_grad_(False)
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)
    return model


def adapted_layers(model: nn.Module) -> dict[str, OMoELinear]:
    """The model's adapted layers, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OMoELinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters, what trains, keyed as in the model:
    "<path>.lora_A" (E, R, D_in), ".lora_B" (E, D_out, R) and
    ".router.weight" (E, D_in)."""
    return {f"{path}.{name}": p
            for path, m in adapted_layers(model).items()
            for name, p in m.named_parameters()
            if not name.startswith("base_layer.")}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights, detached: what an adapter file holds."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def load_balancing_loss(model: nn.Module) -> Tensor:
    """Σ over top-k routed layers of E·Σ_e f_e·P_e from their last forward
    (see route), 1 per layer when balanced. Soft routing adds nothing: every
    expert gets every token."""
    layers = adapted_layers(model).values()
    losses = [m.balance_loss for m in layers if m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
