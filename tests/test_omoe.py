"""omoe.py: Gram–Schmidt against QR, the fast layer against the readable one, adapters I/O, PEFT parity."""
import json
import math

import pytest
import torch
import torch.nn as nn

import omoe
from model import ModelArgs, Transformer
from omoe import OMoELinear, gram_schmidt
from plumbing import adapters, cli, diagnostics


def layer(experts=3, top_k=None, orth="orthonormal", d_in=10, d_out=7, rank=3, dtype=torch.float64, seed=0):
    """An OMoELinear with random (nonzero) B, so that the experts' outputs are not zero."""
    torch.manual_seed(seed)
    m = OMoELinear(nn.Linear(d_in, d_out, dtype=dtype), experts=experts, top_k=top_k, rank=rank, alpha=2 * rank,
                   dropout=0.0, orth=orth)
    with torch.no_grad():
        m.lora_B.normal_()
        if m.router is not None:
            m.router.weight.normal_()  # spread the router so that top-k picks differ between tokens
    return m


def outputs(m, x):
    """The layer's output on x with each implementation."""
    out = {}
    for impl in ("reference", "fast"):
        m.impl = impl
        out[impl] = m(x)
    return out


# --- Gram–Schmidt (readable reference) ---------------------------------------------------------

@pytest.mark.parametrize("K,D", [(1, 5), (2, 3), (3, 64), (5, 17), (8, 8), (8, 4096)])
def test_gram_schmidt_is_orthonormal_and_spans_what_qr_spans(K, D):
    torch.manual_seed(K * D)
    E = torch.randn(3, K, D, dtype=torch.float64)
    Q = gram_schmidt(E)                                                        # (N, K, D)
    eye = torch.eye(K, dtype=torch.float64).expand(3, K, K)
    torch.testing.assert_close(Q @ Q.mT, eye, atol=1e-10, rtol=0)
    # QR of Eᵀ (D, K) is Gram–Schmidt of E's rows in the same order: the columns agree up to sign.
    Q_qr, R_qr = torch.linalg.qr(E.mT)                                          # (N, D, K), (N, K, K)
    signs = R_qr.diagonal(dim1=-2, dim2=-1).sign()                              # (N, K)
    torch.testing.assert_close(Q, (Q_qr * signs[:, None, :]).mT, atol=1e-10, rtol=0)


def test_gram_schmidt_order_first_vector_keeps_its_direction():
    torch.manual_seed(1)
    E = torch.randn(4, 3, 6, dtype=torch.float64)
    Q = gram_schmidt(E)
    torch.testing.assert_close(Q[:, 0], E[:, 0] / E[:, 0].norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)
    # The second vector keeps only the part of E[:, 1] orthogonal to E[:, 0].
    e0, e1 = E[:, 0], E[:, 1]
    r1 = e1 - (e0 * e1).sum(-1, keepdim=True) / (e0 * e0).sum(-1, keepdim=True) * e0
    torch.testing.assert_close(Q[:, 1], r1 / r1.norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)
    assert not torch.allclose(gram_schmidt(E.flip(1))[:, -1], Q[:, 0])  # a different order gives other vectors


def test_gram_schmidt_orthogonal_keeps_residual_lengths():
    torch.manual_seed(2)
    E = torch.randn(5, 6, 40, dtype=torch.float64)
    V = gram_schmidt(E, normalize=False)
    n = V.norm(dim=-1)                                                          # (N, K)
    cos = (V @ V.mT) / (n[:, :, None] * n[:, None, :])
    torch.testing.assert_close(cos, torch.eye(6, dtype=torch.float64).expand_as(cos), atol=1e-10, rtol=0)
    torch.testing.assert_close(V[:, 0], E[:, 0], atol=0, rtol=0)              # the first one is untouched
    torch.testing.assert_close(V / n[..., None], gram_schmidt(E), atol=1e-10, rtol=0)


def test_gram_schmidt_ridge_is_augmented_vectors_and_keeps_zero_finite():
    torch.manual_seed(3)
    E = torch.randn(2, 3, 5, dtype=torch.float64)
    eps = torch.tensor([0.3, 2.0], dtype=torch.float64)
    private = eps.sqrt()[:, None, None] * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(gram_schmidt(E, eps=eps), gram_schmidt(torch.cat([E, private], -1))[..., :5])
    assert torch.equal(gram_schmidt(torch.zeros(2, 3, 5), eps=1e-6), torch.zeros(2, 3, 5))
    assert gram_schmidt(torch.zeros(2, 3, 5)).isnan().all()                    # eps = 0 is textbook: 0/0


# --- the layer: fast path against the readable one --------------------------------------------

# K active experts: 1..4 take the elementwise small-K path, 5 and 6 the LAPACK one (omoe.SMALL_K = 4).
ROUTINGS = [(2, None), (3, None), (4, None), (4, 2), (5, 3), (3, 1), (5, None), (6, None), (8, 5)]


@pytest.mark.parametrize("orth", omoe.ORTH_MODES)
@pytest.mark.parametrize("experts,top_k", ROUTINGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fast_equals_reference(orth, experts, top_k, dtype, tol):
    m = layer(experts, top_k, orth, d_in=24, d_out=40, rank=4, dtype=dtype)
    x = torch.randn(3, 11, 24, dtype=dtype)
    base = m.base_layer(x)
    out = outputs(m, x)
    delta_ref, delta_fast = out["reference"] - base, out["fast"] - base
    assert (delta_fast - delta_ref).norm() <= tol * delta_ref.norm()
    assert delta_ref.norm() > 0.1 * base.norm()                               # the experts are not negligible


@pytest.mark.parametrize("orth", omoe.ORTH_MODES)
@pytest.mark.parametrize("experts,top_k", [(1, None), *ROUTINGS])
@pytest.mark.parametrize("B_scale", [0.0, 1.0, 1e3])
@pytest.mark.parametrize("recompute_gram", [False, True])
def test_fast_equals_reference_forward_and_all_gradients(orth, experts, top_k, B_scale, recompute_gram, monkeypatch):
    """float64: the output and the gradients of the input, A, B and the router agree to 1e-10,
    with the Gram's per-token product kept for backward or recomputed (omoe.GRAM_CHECKPOINT_MIN)."""
    monkeypatch.setattr(omoe, "GRAM_CHECKPOINT_MIN", 0 if recompute_gram else 10**9)
    m = layer(experts, top_k, orth, d_in=12, d_out=9, rank=3)
    with torch.no_grad():
        m.lora_B.mul_(B_scale)
    x = torch.randn(17, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(17, 9, dtype=torch.float64)
    wrt = [x] + [p for p in (m.lora_A, m.lora_B, m.router and m.router.weight) if p is not None]
    got = {}
    for impl in ("reference", "fast"):
        m.impl = impl
        y = m(x)
        got[impl] = [y] + list(torch.autograd.grad(y, wrt, gy))
    floor = max(float(t.detach().norm()) for t in got["reference"])
    for name, ref, fast in zip(["output", "input", "lora_A", "lora_B", "router"], got["reference"], got["fast"]):
        # 1e-10 relative; the floor is for gradients that are 0 but for rounding (B = 0: A and the router;
        # top-1: the router, whose only gate is 1)
        assert (ref - fast).norm() <= 1e-10 * ref.norm() + 1e-12 * floor, name
    assert got["fast"][3].norm() > 0                                          # B always learns


def test_top_k_uses_only_the_active_experts_in_index_order(monkeypatch):
    monkeypatch.setattr(omoe, "RIDGE_ABS", 0.0)  # no ridge: compare with Gram–Schmidt by hand exactly
    monkeypatch.setattr(omoe, "RIDGE_REL", 0.0)
    m = layer(experts=4, top_k=2, orth="orthonormal")
    x = torch.randn(6, 10, dtype=torch.float64)
    probs, gates, active, top = m.route(x)
    expected = []
    for n in range(6):
        i, j = sorted(probs[n].topk(2).indices.tolist())                      # lower index first
        e = [m.scaling * m.lora_B[k] @ m.lora_A[k] @ x[n] for k in (i, j)]
        q0 = e[0] / e[0].norm()
        r1 = e[1] - (q0 @ e[1]) * q0
        g = probs[n, [i, j]] / probs[n, [i, j]].sum()
        expected.append(g[0] * q0 + g[1] * r1 / r1.norm())
    expected = torch.stack(expected) + m.base_layer(x)
    for impl, y in outputs(m, x).items():
        torch.testing.assert_close(y, expected, atol=1e-10, rtol=0, msg=impl)


@pytest.mark.parametrize("orth", omoe.ORTH_MODES)
def test_bf16_autocast_is_close_to_float32(orth):
    m = layer(experts=4, top_k=2, orth=orth, d_in=32, d_out=24, rank=4, dtype=torch.float32)
    x = torch.randn(20, 32)
    exact = outputs(m, x)["fast"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = outputs(m, x)
    for impl, y in out.items():
        assert y.dtype == torch.bfloat16
        assert (y.float() - exact).norm() <= 2e-2 * exact.norm(), impl   # bf16 matmuls, float32 Gram


@pytest.mark.parametrize("orth", ["orthonormal", "orthogonal", "normalized"])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_gradcheck(orth, top_k, impl):
    m = layer(experts=3, top_k=top_k, orth=orth, d_in=4, d_out=5, rank=2)
    m.impl = impl
    names = ["lora_A", "lora_B", "router.weight"]
    params = [m.get_parameter(n).detach().clone().requires_grad_() for n in names]
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("orth", omoe.ORTH_MODES)
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_zero_B_gives_the_base_output_and_finite_gradients(orth, top_k, impl):
    m = OMoELinear(nn.Linear(12, 9), experts=3, top_k=top_k, rank=4, dropout=0.0, orth=orth)
    m.impl = impl
    x = torch.randn(5, 12, requires_grad=True)
    y = m(x)
    assert torch.equal(y, m.base_layer(x))
    y.backward(torch.randn_like(y))
    grads = [x.grad, m.lora_A.grad, m.lora_B.grad, m.router.weight.grad]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert m.lora_B.grad.abs().max() > 0                                      # the experts can start learning


@pytest.mark.parametrize("experts,top_k,orth", [(2, None, "orthonormal"), (8, 2, "orthogonal"), (6, None, "normalized"),
                                                 (6, None, "orthonormal")])
def test_layer_compiles_without_graph_breaks(experts, top_k, orth):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without inductor's
    slow code generation (train.py's --compile uses the default backend: see tests/test_train.py)."""
    m = layer(experts, top_k, orth, d_in=12, d_out=9, rank=3, dtype=torch.float32)
    x = torch.randn(2, 7, 12, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    grads = torch.autograd.grad(y.sum(), [x, m.lora_A, m.lora_B, m.router.weight])
    expected = m(x)
    torch.testing.assert_close(y, expected)
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), [x, m.lora_A, m.lora_B, m.router.weight])):
        torch.testing.assert_close(g, e)


def test_zero_B_gradient_scale_is_one_over_sqrt_ridge():
    """The comment at RIDGE_ABS: at B = 0 the B gradient is g_i/sqrt(RIDGE_ABS) times LoRA's."""
    x, gy = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    grads = {}
    for orth in omoe.ORTH_MODES:
        torch.manual_seed(0)
        m = OMoELinear(nn.Linear(12, 9, dtype=torch.float64), experts=3, rank=4, dropout=0.0, orth=orth)
        m(x).backward(gy)
        grads[orth] = m.lora_B.grad
    torch.testing.assert_close(grads["orthogonal"], grads["none"])
    torch.testing.assert_close(grads["orthonormal"], grads["none"] / math.sqrt(omoe.RIDGE_ABS))
    torch.testing.assert_close(grads["normalized"], grads["orthonormal"])


def test_single_expert_is_plain_lora():
    for orth in (None, "none", "orthogonal"):  # None: the default for one expert; orthogonal: G–S of
        m = layer(experts=1, orth=orth)          # one vector without normalising it leaves it as it is
        assert m.router is None and m.orth == (orth or "none")
        x = torch.randn(4, 10, dtype=torch.float64)
        lora = m.base_layer(x) + m.scaling * x @ m.lora_A[0].T @ m.lora_B[0].T
        for impl, y in outputs(m, x).items():
            torch.testing.assert_close(y, lora, atol=1e-12, rtol=0, msg=impl)


def test_one_rule_for_a_single_active_expert():
    """orth acts on the active experts whatever their number: one expert "orthonormal" is a normalised
    LoRA, as top-1 routing normalises its one active expert."""
    x = torch.randn(6, 10, dtype=torch.float64)
    single = layer(experts=1, orth="orthonormal")
    normalised = layer(experts=1, orth="normalized")
    for (impl, a), (_, b) in zip(outputs(single, x).items(), outputs(normalised, x).items()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=impl)
    top1 = layer(experts=3, top_k=1, orth="orthonormal")
    delta = top1(x) - top1.base_layer(x)
    torch.testing.assert_close(delta.norm(dim=-1), torch.ones(6, dtype=torch.float64), atol=1e-3, rtol=0)
    assert layer(experts=3, orth=None).orth == "orthonormal"  # the paper's, with several experts


def test_single_expert_normalized_is_normalised_lora():
    m = layer(experts=1, orth="normalized")
    assert m.router is None and m.orth == "normalized"
    x = torch.randn(4, 10, dtype=torch.float64)
    e = m.scaling * x @ m.lora_A[0].T @ m.lora_B[0].T                          # (N, D_out) plain LoRA's update
    sq = e.pow(2).sum(-1, keepdim=True)
    expected = m.base_layer(x) + e / (sq + omoe.RIDGE_ABS + omoe.RIDGE_REL * sq).sqrt()
    for impl, y in outputs(m, x).items():
        torch.testing.assert_close(y, expected, atol=1e-12, rtol=0, msg=impl)


@pytest.mark.parametrize("experts", [1, 2])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_normalized_at_step_0_is_the_base_model(experts, impl):
    m = OMoELinear(nn.Linear(12, 9), experts=experts, rank=4, dropout=0.0, orth="normalized")
    m.impl = impl
    x = torch.randn(5, 12)
    y = m(x)
    assert torch.equal(y, m.base_layer(x))
    y.backward(torch.randn_like(y))
    assert m.lora_B.grad.isfinite().all() and m.lora_B.grad.abs().max() > 0


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_normalized_outputs_have_unit_length_past_the_ridge(scale):
    """q_k = e_k / sqrt(|e_k|² + ridge): length |e_k| / sqrt(|e_k|² + ridge), ~1 once |e_k|² >> ridge."""
    m = layer(experts=3, top_k=1, orth="normalized", d_in=10, d_out=16)  # top-1: the update is q_k alone
    x = torch.randn(8, 10, dtype=torch.float64)
    with torch.no_grad():
        m.lora_B.mul_(scale)
        e = m.scaling * torch.einsum("ner,eor->neo", (x @ m.lora_A.flatten(0, 1).T).view(8, 3, 3), m.lora_B)
    chosen = m.route(x)[3][:, 0]                                               # (N,)
    sq = e[torch.arange(8), chosen].pow(2).sum(-1)                             # (N,) |e_k|²
    assert (sq > 1e4 * omoe.RIDGE_ABS).all()
    for impl, y in outputs(m, x).items():
        length = (y - m.base_layer(x)).norm(dim=-1)                            # (N,)
        torch.testing.assert_close(length, sq.sqrt() / (sq * (1 + omoe.RIDGE_REL) + omoe.RIDGE_ABS).sqrt(),
                                   atol=1e-12, rtol=0)
        assert (length - 1).abs().max() < 1e-3, impl


@pytest.mark.parametrize("alpha,scale", [(2, 10.0), (32, 10.0), (2, 1000.0)])
def test_orthonormal_update_length_is_the_root_sum_of_squared_gates(alpha, scale):
    """|Σ_k g_k q_k| = sqrt(Σ_k g_k²) per token, whatever B and alpha/r (once past the ridge)."""
    m = layer(experts=3, orth="orthonormal", d_in=10, d_out=16)
    m.scaling = alpha / m.rank
    with torch.no_grad():
        m.lora_B.mul_(scale)
    x = torch.randn(20, 10, dtype=torch.float64)
    probs = m.route(x)[0]
    expected = probs.pow(2).sum(-1).sqrt()                                     # (N,) soft routing: g = probs
    for impl, y in outputs(m, x).items():
        length = (y - m.base_layer(x)).norm(dim=-1)
        # The relative ridge (1e-4 of the mean squared expert length, whatever the scale) shortens a
        # residual that is short beside the others; here by at most 0.1%.
        assert ((length - expected).abs() / expected).max() < 2e-3, impl
    vanilla = layer(experts=3, orth="none", d_in=10, d_out=16)
    vanilla.scaling = m.scaling
    with torch.no_grad():
        vanilla.lora_B.mul_(scale)
    assert ((vanilla(x) - vanilla.base_layer(x)).norm(dim=-1) - expected).abs().max() > 0.1  # not so without it


def test_init_matches_peft():
    m = OMoELinear(nn.Linear(400, 30), experts=3, rank=8)
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on each (R, D_in) matrix
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.95 * bound
    assert torch.equal(m.lora_B, torch.zeros_like(m.lora_B))
    assert 0.015 < m.router.weight.std() < 0.025
    assert m.scaling == 32 / 8


# --- add_experts and its arguments --------------------------------------------------------------

class Tiny(nn.Module):
    """Two blocks with HF names, small enough for unit tests."""

    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.self_attn = nn.Module()
            block.self_attn.q_proj, block.self_attn.v_proj = nn.Linear(d, d), nn.Linear(d, d)
            block.mlp = nn.Module()
            block.mlp.up_proj, block.mlp.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.layers.append(block)
        self.lm_head = nn.Linear(d, 11)

    def forward(self, x):
        for b in self.layers:
            x = x + b.self_attn.q_proj(x) * b.self_attn.v_proj(x).sigmoid()
            x = x + b.mlp.down_proj(b.mlp.up_proj(x).relu())
        return self.lm_head(x)


@pytest.mark.parametrize("kwargs,message", [
    (dict(experts=0), "experts must be an integer >= 1, got 0"),
    (dict(experts=3, top_k=4), "top_k must be None (soft routing) or an integer in 1..experts=3, got 4"),
    (dict(experts=3, top_k=0), "top_k must be None (soft routing) or an integer in 1..experts=3, got 0"),
    (dict(rank=0), "rank must be an integer >= 1, got 0"),
    (dict(dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
    (dict(orth="qr"), "orth must be one of 'orthonormal', 'orthogonal', 'normalized', 'none', got 'qr'"),
    (dict(targets=("q_proj", "gate_proj")),
     "target 'gate_proj' matches no nn.Linear in the model; "
     "its linear layers are named down_proj, lm_head, q_proj, up_proj, v_proj"),
])
def test_add_experts_rejects_bad_arguments(kwargs, message):
    model = Tiny()
    with pytest.raises(ValueError) as err:
        omoe.add_experts(model, **{"targets": ("q_proj",), **kwargs})
    assert str(err.value) == message
    assert not any(isinstance(m, OMoELinear) for m in model.modules())        # nothing half-done


def test_add_experts_wraps_freezes_and_counts(capsys):
    model = Tiny()
    x = torch.randn(3, 8)
    before = model(x)
    omoe.add_experts(model, targets=("q_proj", "mlp.up_proj"), experts=2, rank=2)
    adapted = {n for n, m in model.named_modules() if isinstance(m, OMoELinear)}
    assert adapted == {f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")}
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)              # zero B: the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(omoe.adapter_state_dict(model))
    assert all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)
    t, total = cli.print_trainable_parameters(model)
    assert t == 2 * (2 * 2 * 8 + 2 * 8 * 2 + 2 * 8) + 2 * (2 * 2 * 8 + 2 * 16 * 2 + 2 * 8)
    expected = f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}\n"
    assert capsys.readouterr().out == expected
    with pytest.raises(ValueError, match="model already has experts"):
        omoe.add_experts(model)


def test_single_expert_config_records_plain_lora():
    model = omoe.add_experts(Tiny(), targets=("v_proj",), experts=1, rank=4)  # orth: "none" for one
    assert adapters.adapter_config(model) == dict(targets=["v_proj"], experts=1, top_k=None, rank=4, alpha=32,
                                              dropout=0.05, orth="none")
    assert not any(n.endswith("router.weight") for n in omoe.adapter_state_dict(model))


def test_experts_beside_plain_lora_layout_round_trips(tmp_path):
    """Experts on the MLP, plain LoRA on attention (MixLoRA's layout): the config records both groups, and
    add_experts(**config) plus load_adapters rebuild the same model."""
    model = randomised(omoe.add_experts(Tiny(), targets=("up_proj", "down_proj"), experts=3, top_k=2, rank=2,
                                        lora_targets=("q_proj", "v_proj")))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, OMoELinear)}
    for n, m in layers.items():
        assert (m.experts, m.router is None, m.orth) == ((1, True, "none") if "self_attn" in n else
                                                         (3, False, "orthonormal")), n
    config = adapters.adapter_config(model)
    assert config == dict(targets=["up_proj", "down_proj"], experts=3, top_k=2, rank=2, alpha=32, dropout=0.05,
                          orth="orthonormal", lora_targets=["q_proj", "v_proj"])
    assert json.loads(json.dumps(config)) == config  # a plain JSON-able dict
    adapters.save_adapters(model, tmp_path)
    config, state = adapters.load_adapter_files(tmp_path)
    other = omoe.add_experts(Tiny(), **config)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k not in state}, strict=False)
    adapters.load_adapters(other, state)
    model.eval(), other.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)
    assert adapters.adapter_config(other) == adapters.adapter_config(model)


def test_a_layer_gets_experts_or_lora_not_both():
    model = Tiny()
    with pytest.raises(ValueError) as err:
        omoe.add_experts(model, targets=("q_proj", "up_proj"), lora_targets=("self_attn.q_proj",))
    assert str(err.value) == ("lora target 'self_attn.q_proj' names layers that targets also name "
                              "(layers.0.self_attn.q_proj, ...): a layer gets experts or plain LoRA, not both")
    assert not any(isinstance(m, OMoELinear) for m in model.modules())


# --- adapters I/O -------------------------------------------------------------------------------

def randomised(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in omoe.adapter_state_dict(model).values():
            p.normal_(std=0.3)
    return model


def test_adapters_round_trip(tmp_path):
    model = randomised(omoe.add_experts(Tiny(), targets=("q_proj", "down_proj"), experts=3, top_k=2, rank=2))
    x = torch.randn(4, 8)
    adapters.save_adapters(model, tmp_path)
    config, state = adapters.load_adapter_files(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 1
    assert config == adapters.adapter_config(model)
    other = omoe.add_experts(Tiny(), **config)
    base = {k: v for k, v in model.state_dict().items() if k not in state}
    other.load_state_dict(base, strict=False)  # same base weights (Tiny() is random), fresh adapters
    model.eval(), other.eval()  # no dropout
    assert not torch.allclose(other(x), model(x))
    adapters.load_adapters(other, state)
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)
    assert set(state) == {f"layers.{i}.{p}.{w}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")
                          for w in ("lora_A", "lora_B", "router.weight")}


def test_single_expert_normalized_round_trips(tmp_path):
    model = randomised(omoe.add_experts(Tiny(), targets=("v_proj",), experts=1, rank=4, orth="normalized"))
    adapters.save_adapters(model, tmp_path)
    config, state = adapters.load_adapter_files(tmp_path)
    assert config == dict(targets=["v_proj"], experts=1, top_k=None, rank=4, alpha=32, dropout=0.05,
                          orth="normalized")
    other = omoe.add_experts(Tiny(), **config)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if k not in state}, strict=False)
    adapters.load_adapters(other, state)
    model.eval(), other.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)
    assert other.layers[0].self_attn.v_proj.orth == "normalized"


def test_load_adapters_key_check():
    model = omoe.add_experts(Tiny(), targets=("q_proj",), experts=2, rank=2)
    state = {k: v.clone() for k, v in omoe.adapter_state_dict(model).items()}
    del state["layers.0.self_attn.q_proj.lora_A"]
    state["layers.0.self_attn.k_proj.lora_A"] = torch.zeros(2, 2, 8)
    state["layers.1.self_attn.q_proj.lora_B"] = torch.zeros(2, 8, 3)
    with pytest.raises(ValueError) as err:
        adapters.load_adapters(model, state)
    assert str(err.value) == (
        "adapter weights do not fit this model; missing (1): layers.0.self_attn.q_proj.lora_A; "
        "unexpected (1): layers.0.self_attn.k_proj.lora_A; "
        "shape mismatch (1): layers.1.self_attn.q_proj.lora_B: given (2, 8, 3), model has (2, 8, 2)")
    with pytest.raises(ValueError, match="model has no experts"):
        adapters.load_adapters(Tiny(), state)


def test_load_adapter_files_errors(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json not found"):
        adapters.load_adapter_files(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"format_version": 7}')
    with pytest.raises(ValueError, match="format_version 7 is not 1"):
        adapters.load_adapter_files(tmp_path)


# --- load balancing and diagnostics -------------------------------------------------------------

def test_load_balancing_loss_by_hand():
    m = OMoELinear(nn.Linear(2, 3), experts=2, top_k=1, rank=1)
    model = nn.Sequential(m)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))  # logits = x
    x = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    model(x)
    # probs: three tokens (3/4, 1/4), one (1/4, 3/4). f = (3/4, 1/4), P = (5/8, 3/8): 2·(15/32 + 3/32) = 9/8.
    torch.testing.assert_close(omoe.load_balancing_loss(model), torch.tensor(9 / 8))
    model(x[[0, 2]])  # balanced: f = (1/2, 1/2), P = (1/2, 1/2)
    torch.testing.assert_close(omoe.load_balancing_loss(model), torch.tensor(1.0))
    assert omoe.load_balancing_loss(nn.Sequential(OMoELinear(nn.Linear(2, 3), experts=2))) == 0  # soft


@torch.no_grad()
def raw_cosines(m, x):
    e = torch.einsum("ner,eor->neo", (x @ m.lora_A.flatten(0, 1).T).view(len(x), m.experts, m.rank), m.lora_B)
    e = e / e.norm(dim=-1, keepdim=True)
    return (e @ e.mT).abs()                                                   # (N, E, E)


@pytest.mark.parametrize("orth", omoe.ORTH_MODES)
def test_diagnostics(orth):
    m = layer(experts=3, orth=orth, dtype=torch.float32)
    model = nn.Sequential(m)
    x = torch.randn(2, 5, 10)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with diagnostics.record_diagnostics(model) as rec:
        rec.mask = mask
        y = model(x)
    assert m.recorder is None
    torch.testing.assert_close(model(x), y)
    stats = rec.summary()["0"]
    kept = x.reshape(-1, 10)[mask.reshape(-1).bool()]
    cos = raw_cosines(m, kept)
    assert stats["tokens"] == 7 and stats["load"] == [1.0, 1.0, 1.0]
    torch.testing.assert_close(stats["cos_before"], float(cos.triu(1).sum() / (7 * 3)), rtol=1e-5, atol=0)
    probs = m.route(kept)[0].detach()
    torch.testing.assert_close(torch.tensor(stats["prob"]), probs.mean(0))
    torch.testing.assert_close(stats["entropy"], float(-(probs * probs.log()).sum(-1).mean()), rtol=1e-5, atol=0)
    if orth in ("none", "normalized"):  # rescaling leaves cosines as they are
        assert stats["cos_after"] == stats["cos_before"]
    else:
        assert stats["cos_after"] < 1e-3 < stats["cos_before"]


def test_diagnostics_top_k_load_and_mask_check():
    m = layer(experts=4, top_k=1, dtype=torch.float32)
    x = torch.randn(20, 10)
    with diagnostics.record_diagnostics(nn.Sequential(m)) as rec:
        m(x)
        rec.mask = torch.ones(3, 4)
        with pytest.raises(ValueError, match="recorder.mask has 12 entries but the layer 0 sees 20 tokens"):
            m(x)
    stats = rec.summary()["0"]
    chosen = m.route(x)[0].detach().argmax(-1)
    assert stats["load"] == pytest.approx([(chosen == e).float().mean().item() for e in range(4)])
    assert math.isnan(stats["cos_before"])  # one active expert: no pairs


# --- parity with PEFT's LoRA --------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_single_expert_matches_peft_lora(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import model as model_py
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    targets = list(omoe.TARGETS)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    ours = omoe.add_experts(model_py.Transformer.from_pretrained(tmp_path), targets, experts=1, rank=4, alpha=8,
                            dropout=0.0)
    ours.eval()
    copied = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                copied += 1
                module.lora_B["default"].weight.normal_(std=0.1)  # PEFT starts B at 0: make it count
                mine = ours.get_submodule(name.removeprefix("base_model.model.model."))  # HF names minus "model."
                mine.lora_A[0].copy_(module.lora_A["default"].weight)
                mine.lora_B[0].copy_(module.lora_B["default"].weight)
    assert copied == len(targets) * config.num_hidden_layers == len(omoe.adapter_state_dict(ours)) / 2
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        with hf.disable_adapter():
            base = hf(input_ids=tokens).logits
        got = ours(tokens)
    assert (expected - base).abs().max() > 1e-2                                 # the adapters matter
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_one_ridge_for_every_path(top_k, monkeypatch):
    """The ridge comes from omoe.ridge alone: with another ridge, the fast path, the reference path and
    the diagnostics still agree (the diagnostics' |cos| after Gram–Schmidt is that of the reference
    path's orthonormal outputs)."""
    monkeypatch.setattr(omoe, "ridge", lambda sq: 0.5 + 0.0 * sq.mean(-1))  # far from the default
    m = layer(experts=3, top_k=top_k, orth="orthonormal")
    with torch.no_grad():
        m.lora_B.mul_(0.3)  # outputs of about the ridge's size, where it matters
    x = torch.randn(9, 10, dtype=torch.float64)
    out = outputs(m, x)
    torch.testing.assert_close(out["fast"], out["reference"], atol=1e-10, rtol=0)
    _, gates, active, top = m.route(x)
    h = (x @ m.lora_A.flatten(0, 1).T).view(9, 3, 3)
    e = m.scaling * torch.einsum("ner,eor->neo", h, m.lora_B)
    if top is not None:
        e = e.gather(1, top[:, :, None].expand(-1, -1, e.shape[-1]))
    q = omoe.gram_schmidt(e, eps=omoe.ridge(e.pow(2).sum(-1)))                      # (N, K, D)
    cos = torch.nn.functional.cosine_similarity(q[:, :, None], q[:, None], dim=-1).abs()
    K = q.shape[1]
    expected = cos[:, torch.ones(K, K, dtype=torch.bool).triu(1)].mean()
    with diagnostics.record_diagnostics(torch.nn.Sequential(m)) as recorder:
        m(x)
    got = next(iter(recorder.summary().values()))["cos_after"]
    assert got == pytest.approx(float(expected.detach()), abs=1e-6)  # the recorder works in float32


@pytest.mark.parametrize("settings", [dict(experts=3, top_k=2, rank=5), dict(experts=1, rank=2),
                                      dict(experts=2, rank=3, orth="none")])
def test_expected_shapes_are_the_shapes_add_experts_makes(settings):
    """The doors check memory and adapter files against plumbing/adapters.expected_shapes before
    the adapters exist: it must give exactly the parameters the layer creates."""
    def fresh():
        return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                     vocab_size=16))
    layout = dict(targets=["q_proj", "down_proj"], lora_targets=["v_proj"], **settings)
    made = omoe.adapter_parameters(omoe.add_experts(fresh(), **layout))
    assert adapters.expected_shapes(fresh(), **layout) == {k: tuple(p.shape) for k, p in made.items()}
