"""OMoE: LoRA experts whose outputs are made orthonormal by Gram–Schmidt (arXiv 2501.10062).

Shapes: N tokens (batch and time flattened), D_in/D_out the wrapped layer's features, E experts,
K active experts per token (top_k; K = E is soft routing), R the LoRA rank, s = alpha / R.

    x ─┬─ base_layer (frozen W0) ──────────────────────────────────────────────── W0 x ─┐
       ├─ router W_g ─ softmax ─ top-k, renormalise ─ g ──────────────────┐           │
       └─ dropout ─┬─ A_1 ─ h_1 ─ B_1 ─ e_1 = s·B_1 h_1 ─┐                 ▼           ▼
                   ├─ A_2 ─ h_2 ─ B_2 ─ e_2 ──────────────┼─ Gram–Schmidt ─ q ─ Σ g_k q_k ─ (+) ─> y
                   └─ ...               e_E ──────────────┘   (the active experts, in index order)

`orth` says what happens to the active experts' outputs, however many: "orthonormal" (the paper's:
Gram–Schmidt, each q_k of unit length), "orthogonal" (projections only), "normalized" (each e_k
scaled to unit length, no projections: the control that separates the two) or "none" (vanilla
MoE-LoRA). One expert has no router: with "none" it is plain LoRA, exactly as PEFT computes it.

Two implementations of one layer (`layer.impl`): "reference" builds every expert's output
(N, K, D_out) and runs `gram_schmidt` on it: read it first. "fast" (the default) never does:
Gram–Schmidt is QR, so with the Gram matrix G = RᵀR (in rank space, G_ij = s² h_iᵀ B_iᵀB_j h_j),
Σ_k g_k q_k = E R⁻¹ g = Σ_i c_i e_i: one product with the stacked B's. Notebook 3 derives it.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from plumbing.base.checks import check_layer_args, check_target_hits, target_names

ORTH_MODES = ("orthonormal", "orthogonal", "normalized", "none")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The ridge: B starts at zero, so at step 0 normalising an expert's output is 0/0. Gram–Schmidt
# runs on the outputs augmented by private coordinates of length sqrt(ridge) (the fast path: G +
# ridge·I); notebook 3 shows why these values (and why a far smaller ridge would slow learning).
RIDGE_ABS, RIDGE_REL = 1e-4, 1e-4
SMALL_K = 4  # up to this many active experts, Cholesky is written out elementwise over tokens
# Autograd would keep the Gram's (N, E, E, R) intermediate; from this many numbers per token it is
# recomputed in backward instead (benchmarks/README.md has the measurements behind the value).
GRAM_CHECKPOINT_MIN = 512


def layer_settings(experts=2, top_k=None, rank=16, alpha=32, dropout=0.05, orth=None) -> dict:
    """A layer's settings, checked, with orth's default filled in: the paper's Gram–Schmidt for
    several experts, plain LoRA for one. Every setting of an adapter is declared here, once: the
    layer keeps each as an attribute of the same name, and the adapter files, the resume check and
    the command line's layout follow from this signature (plumbing/adapters.py)."""
    check_layer_args(experts, top_k, rank, alpha, dropout, orth or "none", ORTH_MODES)
    orth = orth or ("orthonormal" if experts > 1 else "none")
    return dict(experts=experts, top_k=top_k, rank=rank, alpha=alpha, dropout=dropout, orth=orth)


def ridge(sq: Tensor) -> Tensor:
    """The ridge of each token (N,) from its active experts' squared output lengths sq (N, K)."""
    return RIDGE_ABS + RIDGE_REL * sq.mean(-1)


def gram_schmidt(E: Tensor, normalize: bool = True, eps: float | Tensor = 0.0) -> Tensor:
    """Gram–Schmidt over the K vectors of each token, in index order: E (N, K, D) -> Q (N, K, D).
    Q[:, k] is E[:, k] minus its projections on Q[:, :k]; normalize=False keeps each residual's
    length. eps, the ridge (a float or (N,)), adds private coordinates sqrt(eps)·u_k, dropped at
    the end; eps = 0 is textbook Gram–Schmidt, where a zero vector gives NaN."""
    N, K, D = E.shape
    eps = torch.as_tensor(eps, dtype=E.dtype, device=E.device).expand(N)              # (N,)
    private = eps.sqrt()[:, None, None] * torch.eye(K, dtype=E.dtype, device=E.device)  # (N, K, K)
    V = torch.cat([E, private], dim=-1)                                                # (N, K, D+K)
    residuals = []
    for k in range(K):
        v = V[:, k]                                                                    # (N, D+K)
        for u in residuals:  # subtract the projection on each earlier residual ("modified" G–S)
            v = v - (u * v).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True) * u
        residuals.append(v)
    Q = torch.stack(residuals, dim=1)                                                  # (N, K, D+K)
    if normalize:
        Q = Q / Q.norm(dim=-1, keepdim=True)
    return Q[..., :D]                                                                  # (N, K, D)


class OMoELinear(nn.Module):
    """A frozen nn.Linear (`base_layer`) plus E LoRA experts, a router and Gram–Schmidt."""

    def __init__(self, base_layer: nn.Linear, device=None, target=None, role="experts",
                 **settings):
        super().__init__()
        # Each setting of layer_settings becomes an attribute of the same name.
        s = layer_settings(**settings)
        experts, rank, alpha, dropout = s["experts"], s["rank"], s["alpha"], s["dropout"]
        self.base_layer = base_layer
        self.experts, self.rank, self.alpha, self.dropout = experts, rank, alpha, dropout
        self.orth, self.top_k = s["orth"], experts if s["top_k"] is None else s["top_k"]
        self.scaling = alpha / rank
        self.impl = "fast"                       # or "reference"
        # The target that chose this layer, and its role: "experts", or "lora" for plain LoRA.
        self.target, self.role = target, role
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters stay float32 (float64 beside float64) even beside a bf16 base, like PEFT's, on
        # the base's device unless told otherwise (a base on the meta device, to be sharded).
        w = base_layer.weight
        kw = dict(dtype=torch.promote_types(w.dtype, torch.float32), device=device or w.device)
        D_in, D_out = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.empty(experts, rank, D_in, **kw))   # (E, R, D_in)
        self.lora_B = nn.Parameter(torch.empty(experts, D_out, rank, **kw))  # (E, D_out, R)
        self.router = nn.Linear(D_in, experts, bias=False, **kw) if experts > 1 else None
        self.recorder = None        # a plumbing.diagnostics recorder, while one records
        self._balance_loss = None   # from the last forward, for load_balancing_loss
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # PEFT's kaiming_uniform_(a=sqrt(5)) on each (R, D_in) matrix: U(±1/sqrt(D_in)). On the
        # stacked (E, R, D_in) tensor it would take fan_in = R·D_in, a bound sqrt(R) too small.
        bound = 1 / math.sqrt(self.lora_A.shape[-1])
        self.lora_A.uniform_(-bound, bound)
        self.lora_B.zero_()  # so that at step 0 the adapted layer equals the base layer
        if self.router is not None:
            self.router.weight.normal_(std=0.02)  # LLaMA's initializer_range, as MoE LLMs' routers

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)                                                       # (..., D_out)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.lora_A.dtype)                           # (N, D_in)
        h = self.lora_dropout(x) @ self.lora_A.flatten(0, 1).T                       # (N, E*R)
        h = h.view(x.shape[0], self.experts, self.rank)                              # (N, E, R)
        if self.router is None and self.orth == "none":  # plain LoRA: base(x) + s·B(A(dropout(x)))
            delta = self.scaling * (h[:, 0] @ self.lora_B[0].T)                      # (N, D_out)
        else:
            probs, gates, active, top = self.route(x)
            if self.recorder is not None:
                self.recorder.observe(self, h, probs, active)
            mix = self._mix_reference if self.impl == "reference" else self._mix_fast
            delta = mix(h, gates, top)                                               # (N, D_out)
        return y + delta.view(*shape[:-1], -1).to(y.dtype)

    def route(self, x: Tensor):
        """x (N, D_in) -> probs (N, E) softmax, gates (N, E) renormalised over the top k (0 else),
        active (N, E) bool, top (N, K) the active experts in (Gram–Schmidt) order or None if all."""
        if self.router is None:  # one expert, gate 1
            probs = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            return probs, probs, probs.bool(), None
        with torch.autocast(x.device.type, enabled=False):  # the router is always float32
            probs = (x.to(self.router.weight.dtype) @ self.router.weight.T).softmax(-1)  # (N, E)
        if self.top_k == self.experts:  # soft routing: every expert active, gates = probs
            return probs, probs, torch.ones_like(probs, dtype=torch.bool), None
        top = probs.topk(self.top_k, dim=-1).indices.sort(dim=-1).values             # (N, K)
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)    # (N, E)
        gates = torch.where(active, probs, 0.0)
        f = active.float().mean(0) / self.top_k  # Switch-style balance: E·Σ_e f_e·P_e, 1 if even
        self._balance_loss = self.experts * (f * probs.mean(0)).sum()
        return probs, gates / gates.sum(-1, keepdim=True), active, top

    def _mix_reference(self, h, gates, top):
        """Readable: every expert's output, Gram–Schmidt on the active ones, the gated sum."""
        e = self.scaling * torch.einsum("ner,eor->neo", h, self.lora_B)              # (N, E, D_out)
        g = gates
        if top is not None:
            e = e.gather(1, top[:, :, None].expand(-1, -1, e.shape[-1]))             # (N, K, D_out)
            g = gates.gather(1, top)                                                 # (N, K)
        if self.orth != "none":
            with torch.autocast(h.device.type, enabled=False):
                e = e.to(gates.dtype)
                eps = ridge(e.pow(2).sum(-1))                                        # (N,)
                if self.orth == "normalized":  # what gram_schmidt does to its first vector, to each
                    e = e / (e.pow(2).sum(-1, keepdim=True) + eps[:, None, None]).sqrt()
                else:
                    e = gram_schmidt(e, self.orth == "orthonormal", eps)       # (N, K, D_out)
        return torch.einsum("nk,nko->no", g.to(e.dtype), e)                          # (N, D_out)

    def _mix_fast(self, h, gates, top):
        """Σ_k g_k q_k = Σ_i c_i e_i with per-token coefficients c (N, E), from the Gram."""
        if self.orth == "none":
            c = gates                                                             # vanilla MoE-LoRA
        else:
            with torch.autocast(h.device.type, enabled=False):
                hf, B = h.to(gates.dtype), self.lora_B.to(gates.dtype)
                g = gates if top is None else gates.gather(1, top)                   # (N, K)
                if self.orth == "normalized":  # the Gram's diagonal is all it needs
                    sq = expert_sq_lengths(hf, B, self.scaling)                      # (N, E)
                    sq = sq if top is None else sq.gather(1, top)                    # (N, K)
                    c = g / (sq + ridge(sq)[:, None]).sqrt()                         # (N, K)
                else:
                    G = self._gram(hf, B)                                            # (N, E, E)
                    c = _coefficients(active_block(G, top), g, self.orth)            # (N, K)
                if top is not None:
                    c = torch.zeros_like(gates).scatter(1, top, c)                   # (N, E)
        ch = c.to(h.dtype)[:, :, None] * h                                           # (N, E, R)
        return self.scaling * torch.einsum("ner,eor->no", ch, self.lora_B.to(h.dtype))  # (N, D_out)

    def _gram(self, h: Tensor, B: Tensor) -> Tensor:
        """expert_gram, recomputed in backward where that pays: B_iᵀB_j always (a few MFLOP), the
        (N, E, E, R) product from GRAM_CHECKPOINT_MIN numbers per token."""
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        BtB = checkpoint(_block_products, B)                                         # (E, E, R, R)
        if self.experts ** 2 * self.rank >= GRAM_CHECKPOINT_MIN:
            return checkpoint(_gram_from_products, h, BtB, self.scaling)
        return _gram_from_products(h, BtB, self.scaling)

    def extra_repr(self):
        return (f"experts={self.experts}, top_k={self.top_k}, rank={self.rank}, "
                f"alpha={self.alpha}, orth={self.orth!r}, impl={self.impl!r}")


# ── The fast path's pieces: the Gram matrix in rank space, and Cholesky for small K ────────────
def expert_gram(h: Tensor, B: Tensor, s: float) -> Tensor:  # (N, E, R), (E, D_out, R) -> (N, E, E)
    return _gram_from_products(h, _block_products(B), s)      # the Gram of e_i = s·B_i h_i


def _block_products(B: Tensor) -> Tensor:  # (E, E, R, R) blocks B_iᵀ B_j, for all tokens
    return torch.einsum("eor,fot->efrt", B, B)


def _gram_from_products(h: Tensor, BtB: Tensor, s: float) -> Tensor:
    hBtB = torch.einsum("ner,efrt->neft", h, BtB)     # (N, E, E, R): one batched product over e
    return s * s * (hBtB * h[:, None]).sum(-1)        # (N, E, E): G_ef = s² (h_eᵀ B_eᵀ B_f) h_f


def expert_sq_lengths(h: Tensor, B: Tensor, s: float) -> Tensor:  # the Gram's diagonal alone
    BtB = torch.einsum("eor,eot->ert", B, B)          # (E, R, R) blocks B_iᵀ B_i
    return s * s * (torch.einsum("ner,ert->net", h, BtB) * h).sum(-1)  # (N, E): s²|B_i h_i|²


def active_block(G: Tensor, top: Tensor | None) -> Tensor:
    """The active experts' block of each token's Gram (N, E, E) -> (N, K, K), in G–S order."""
    if top is None:
        return G
    G = G.gather(1, top[:, :, None].expand(-1, -1, G.shape[-1]))                     # (N, K, E)
    return G.gather(2, top[:, None, :].expand(-1, top.shape[1], -1))                 # (N, K, K)


def _small_cholesky(G: Tensor) -> list[list[Tensor]]:
    """Cholesky of (N, K, K) row by row, each entry L[i][j] (j <= i) an (N,) tensor: Gram–Schmidt's
    projection lengths (j < i) and residual lengths (j = i), read off the Gram."""
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
    """c (N, K) with Σ_k g_k q_k = Σ_k c_k e_k from the active experts' Gram G (N, K, K) and gates
    g (N, K): Q = E R⁻¹ gives c = R⁻¹ g; orthogonal residuals Q·diag(R) give c = R⁻¹ (diag(R)·g)."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    Gr = G + ridge(G.diagonal(dim1=-2, dim2=-1))[:, None, None] * eye                # G + ridge·I
    if len(eye) <= SMALL_K:  # batched LAPACK on 2x2 matrices is slow: a launch per op on a GPU
        L = _small_cholesky(Gr)                                                      # R = Lᵀ
        diag = torch.stack([L[i][i] for i in range(len(L))], dim=-1)                 # (N, K)
        return _small_solve(L, g if orth == "orthonormal" else g * diag)
    L = torch.linalg.cholesky_ex(Gr).L                                               # (N, K, K)
    rhs = g if orth == "orthonormal" else g * L.diagonal(dim1=-2, dim2=-1)
    return torch.linalg.solve_triangular(L.mT, rhs[:, :, None], upper=True)[:, :, 0]  # (N, K)


# ── Putting experts into a model ────────────────────────────────────────────────────────────────
def layers_to_adapt(model: nn.Module, targets=TARGETS, lora_targets=()) -> dict[str, tuple]:
    """{layer name: (target, role)}: every nn.Linear whose name is a target or ends with
    ".<target>" gets experts; those that lora_targets name get plain LoRA (role "lora").
    A target must name some layer, and no layer may get both."""
    targets, lora_targets = target_names(targets), target_names(lora_targets)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = {}
    for target, role in [(t, "experts") for t in targets] + [(t, "lora") for t in lora_targets]:
        hits = [name for name in linears if name == target or name.endswith("." + target)]
        check_target_hits(target, role, hits, linears, chosen)
        chosen.update(dict.fromkeys(hits, (target, role)))
    return chosen


def add_experts(model: nn.Module, targets=TARGETS, lora_targets=(), device=None,
                **settings) -> nn.Module:
    """Replace every nn.Linear that layers_to_adapt chooses by an OMoELinear: experts on targets,
    plain LoRA on lora_targets (MixLoRA's layout: experts on gate/up/down_proj, LoRA on
    attention); freeze everything else. `settings` are layer_settings' (experts, top_k, rank,
    alpha, dropout, orth). On a meta-device base, `device` is where the adapters go (to shard it
    before loading: plumbing/parallel.py)."""
    settings = layer_settings(**settings)
    if adapted_layers(model):
        raise ValueError("model already has experts: call add_experts once, on a fresh model")
    plain = dict(settings, experts=1, top_k=None, orth="none")  # one expert, no router
    for name, (target, role) in layers_to_adapt(model, targets, lora_targets).items():
        parent, _, leaf = name.rpartition(".")
        base = model.get_submodule(name)
        layer = OMoELinear(base, **(plain if role == "lora" else settings), device=device,
                           target=target, role=role)
        setattr(model.get_submodule(parent), leaf, layer)
    model.requires_grad_(False)  # experts and routers train; the base model is frozen
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)
    return model


def adapted_layers(model: nn.Module) -> dict[str, OMoELinear]:
    """The model's adapted layers, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OMoELinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters, what trains, keyed like the model's: "<path>.lora_A"
    (E, R, D_in), ".lora_B" (E, D_out, R), ".router.weight" (E, D_in)."""
    return {f"{path}.{name}": p for path, m in adapted_layers(model).items()
            for name, p in m.named_parameters() if not name.startswith("base_layer.")}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights, detached: what an adapter file holds."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def load_balancing_loss(model: nn.Module) -> Tensor:
    """Σ over top-k routed layers of E·Σ_e f_e·P_e from their last forward (f_e: the share of token
    slots routed to e, P_e: its mean router probability), 1 per layer when balanced. Soft routing
    adds nothing (every expert gets every token)."""
    layers = adapted_layers(model).values()
    losses = [m._balance_loss for m in layers if m._balance_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
