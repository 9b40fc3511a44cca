"""What the experts do, measured while the model runs: routing and how alike the experts' outputs are.

    with record_diagnostics(model) as recorder:
        model(tokens)
    recorder.summary()   # {layer name: {tokens, load, prob, entropy, cos_before, cos_after}}

train.py records the last micro-batch of every logged step (its forward only: recomputed forwards
of gradient checkpointing, which run inside backward, are not counted again), and prints the means
per block at the end. A layer reports to the recorder from its forward (OMoELinear.recorder).
"""
from contextlib import contextmanager

import torch
from torch import Tensor, nn

import omoe


class DiagnosticsRecorder:
    """Per routed layer, averages over the tokens seen while recording: load (E,) the share of tokens
    for which each expert is active; prob (E,) the mean router probability; entropy, the mean router
    entropy in nats (log E is uniform); cos_before / cos_after, the mean |cos| over pairs of active
    experts of their outputs before and after orthogonalisation (from the Gram; "normalized" only
    rescales, so its cosines after equal those before). One-expert layers have no router: not recorded.

    Padding: set `recorder.mask` to the (B, T) attention mask before each forward; layers see the
    B·T tokens flattened in the same order and skip those where the mask is 0."""

    def __init__(self, names: dict):
        self.names, self.mask, self.sums = names, None, {}
        # Host-side bookkeeping (boolean indexing, .cpu()): kept out of compiled graphs. Wrapped here,
        # not by a decorator, since torch.compiler.disable imports the compiler (seconds) when called.
        self.observe = torch.compiler.disable(self.observe)

    @torch.no_grad()
    def observe(self, layer, h: Tensor, probs: Tensor, active: Tensor):
        keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)             # (N,)
        if self.mask is not None:
            if self.mask.numel() != h.shape[0]:
                raise ValueError(f"recorder.mask has {self.mask.numel()} entries but the layer "
                                 f"{self.names[layer]} sees {h.shape[0]} tokens")
            keep = self.mask.reshape(-1).to(device=h.device, dtype=torch.bool)
        h, probs, active = h[keep].float(), probs[keep], active[keep]
        N, E = active.shape
        K = layer.top_k
        top = torch.arange(E, device=h.device).expand(N, E)[active].view(N, K)        # (N, K) in order
        G = omoe.active_block(omoe.expert_gram(h, layer.lora_B.float(), layer.scaling), top)
        after = G  # "none", and "normalized": scaling an output by a positive number keeps its cosines
        if layer.orth in ("orthonormal", "orthogonal"):  # Q = E R⁻¹ has the Gram L⁻¹ G L⁻ᵀ
            eye = torch.eye(K, dtype=G.dtype, device=G.device)
            L = torch.linalg.cholesky_ex(G + omoe.ridge(G.diagonal(dim1=-2, dim2=-1))[:, None, None]
                                         * eye).L                                      # (N, K, K)
            X = torch.linalg.solve_triangular(L, G, upper=False)                     # L⁻¹ G
            after = torch.linalg.solve_triangular(L, X.mT, upper=False)              # L⁻¹ G L⁻ᵀ
        pairs = torch.ones(K, K, dtype=torch.bool, device=h.device).triu(1).expand(N, K, K)  # i < j
        s = self.sums.setdefault(self.names[layer], dict(tokens=0, pairs=0, load=0, prob=0,
                                                         entropy=0, cos_before=0, cos_after=0))
        s["tokens"] += N
        s["pairs"] += int(pairs.sum())
        s["load"] = s["load"] + active.float().sum(0).cpu()
        s["prob"] = s["prob"] + probs.sum(0).cpu()
        s["entropy"] += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        for key, M in (("cos_before", G), ("cos_after", after)):
            d = M.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()                 # (N, K) lengths
            s[key] += float((M / (d[:, :, None] * d[:, None, :])).abs()[pairs].sum())

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, s in self.sums.items():
            t, p = max(s["tokens"], 1), s["pairs"]
            out[name] = dict(tokens=s["tokens"], load=(s["load"] / t).tolist(),
                             prob=(s["prob"] / t).tolist(), entropy=s["entropy"] / t,
                             cos_before=s["cos_before"] / p if p else float("nan"),
                             cos_after=s["cos_after"] / p if p else float("nan"))
        return out


def mean_diagnostics(stats: dict[str, dict]) -> dict:
    """DiagnosticsRecorder.summary() -> the means over its layers of prob, load, cos_before, cos_after."""
    rows = list(stats.values())
    return {k: torch.tensor([r[k] for r in rows]).mean(0).tolist()
            for k in ("prob", "load", "cos_before", "cos_after")} if rows else {}


def diagnostics_by_block(stats: dict[str, dict]) -> dict[str, dict]:
    """DiagnosticsRecorder.summary() -> {block: mean_diagnostics of its layers}
    ("layers.3.mlp.up_proj" is in block "3")."""
    blocks: dict[str, dict] = {}
    for name, s in stats.items():
        block = name.split(".")[1] if name.startswith("layers.") else name
        blocks.setdefault(block, {})[name] = s
    return {block: mean_diagnostics(layers) for block, layers in blocks.items()}


@contextmanager
def record_diagnostics(model: nn.Module):
    """with record_diagnostics(model) as rec: model(tokens); rec.summary(). Costs nothing outside."""
    layers = {m: name for name, m in omoe.adapted_layers(model).items() if m.router is not None}
    recorder = DiagnosticsRecorder(layers)
    for m in layers:
        m.recorder = recorder
    try:
        yield recorder
    finally:
        for m in layers:
            m.recorder = None
