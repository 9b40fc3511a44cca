"""A LLaMA-style decoder that loads Hugging Face checkpoints, written to be read top-down.

ModelArgs -> RMSNorm -> rotary embedding -> Attention -> FeedForward -> Block -> Transformer.
Module names are those of transformers' LlamaForCausalLM without its "model." prefix, so loading
a checkpoint is that one key map (see Transformer.from_pretrained).

Shapes: B batch, T tokens in this call, S keys attended to (cached + new), D dim,
H query heads, K key/value heads, hd head_dim, F hidden_dim of the MLP, V vocab_size.
"""

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from weights import CheckpointError, open_weights, resolve_hf_cache


@dataclass
class ModelArgs:
    dim: int = 4096  # hidden_size: width of the residual stream
    n_layers: int = 32  # num_hidden_layers
    n_heads: int = 32  # num_attention_heads (query heads)
    n_kv_heads: int = 32  # num_key_value_heads; fewer than n_heads = grouped-query attention
    vocab_size: int = 32000
    hidden_dim: int = 11008  # intermediate_size of the SwiGLU feed-forward
    head_dim: int | None = None  # None = dim // n_heads; some checkpoints set it explicitly
    norm_eps: float = 1e-6  # rms_norm_eps
    rope_theta: float = 10000.0  # base of the rotary frequencies
    max_seq_len: int = 2048  # max_position_embeddings: the longest context generate() builds (dynamic RoPE: more)
    tie_embeddings: bool = False  # tie_word_embeddings: lm_head shares embed_tokens' weight
    rope_scaling: dict | None = None  # None = plain RoPE, else {"rope_type": "linear" | "dynamic" | "llama3", ...}
    sliding_window: int | None = None  # Mistral: each token attends to itself and the window - 1 before it

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelArgs":
        """Read a Hugging Face LLaMA config.json dict; refuse what this model does not implement."""
        check_hf_config(d)
        if d.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"model_type={d['model_type']!r} is not supported (only 'llama' and 'mistral')")
        kind = d.get("model_type", "llama")
        if d.get("sliding_window") is not None and kind != "mistral":
            raise ValueError(f"sliding_window={d['sliding_window']!r} with model_type={kind!r}: transformers' "
                             f"LLaMA ignores it, only 'mistral' has a sliding window")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r} is not supported (the projections have no bias)")
        # Older configs: top-level rope_theta and an optional rope_scaling dict.
        # transformers >= 5: rope_parameters = {"rope_theta": ..., "rope_type": "default" or a scaling, ...}.
        rope = d.get("rope_parameters") or {}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size") if k not in d]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        n_heads = d["num_attention_heads"]
        return cls(
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            vocab_size=d["vocab_size"],
            hidden_dim=d["intermediate_size"],
            head_dim=d.get("head_dim"),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            max_seq_len=d.get("max_position_embeddings", 2048),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(d),
            sliding_window=d.get("sliding_window"),
        )


# The parameters each RoPE scaling reads (see rope_inv_freq for what they do).
ROPE_SCALING = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_scaling(d: dict) -> dict | None:
    """The RoPE scaling of a config.json in either layout -> {"rope_type": ..., its parameters} or None."""
    for key in ("rope_parameters", "rope_scaling"):
        value = d.get(key) or {}
        kind = value.get("rope_type", value.get("type", "default"))
        if kind == "default":
            continue
        if kind not in ROPE_SCALING:
            raise ValueError(f"{key} of type {kind!r} is not supported (only default, {', '.join(ROPE_SCALING)})")
        missing = [k for k in ROPE_SCALING[kind] if k not in value]
        if missing:
            raise ValueError(f"{key} of type {kind!r} has no {', '.join(missing)}")
        return {"rope_type": kind, **{k: value[k] for k in ROPE_SCALING[kind]}}
    return None


# The type of every config.json key ModelArgs reads (absent is always allowed: the default applies).
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                 "max_position_embeddings")
OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "sliding_window")  # or null
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
STRINGS = ("model_type", "hidden_act")
OPTIONAL_DICTS = ("rope_scaling", "rope_parameters")  # or null; their contents are read by from_hf_config


def check_hf_config(d) -> None:
    """Refuse a config.json whose values have the wrong type or range, naming the key: a string,
    float or negative where a size belongs would otherwise fail deep inside torch (or not at all)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of settings, found a JSON {type(d).__name__}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    rules = ([(k, lambda v: type(v) is int and v > 0, "a positive integer") for k in POSITIVE_INTS]
             + [(k, lambda v: v is None or type(v) is int and v > 0, "a positive integer or null")
                for k in OPTIONAL_POSITIVE_INTS]
             + [(k, number, "a positive finite number") for k in POSITIVE_NUMBERS]
             + [(k, lambda v: isinstance(v, bool), "true or false") for k in BOOLS]
             + [(k, lambda v: isinstance(v, str), "a string") for k in STRINGS]
             + [(k, lambda v: v is None or isinstance(v, dict), "an object or null") for k in OPTIONAL_DICTS])
    for key, valid, expected in rules:
        if key in d and not valid(d[key]):
            raise ValueError(f"{key}={json.dumps(d[key])[:80]} must be {expected}")


def parameter_count(args: ModelArgs) -> int:
    """The number of parameters Transformer(args) has, from the config alone (a tied lm_head counts once)."""
    D, H, K, hd, F, V = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.vocab_size
    per_block = D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F + 2 * D  # q, k, v, o; gate, up, down; 2 norms
    return V * D * (1 if args.tie_embeddings else 2) + D + args.n_layers * per_block


def check_memory(args: ModelArgs, dtype, device, where, shards: int = 1) -> None:
    """Refuse a model that cannot fit in the memory of `device`, before allocating anything: a config
    with absurd sizes would otherwise build modules for minutes and then fail. shards: the number of
    processes it is split over (FSDP), each holding 1/shards of it."""
    device = torch.device(device or "cpu")
    needed = parameter_count(args) * (dtype or torch.float32).itemsize / shards
    if device.type == "cuda" and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(device)[1]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if needed > available:
        each = f" (1/{shards} of it in each of {shards} processes)" if shards > 1 else ""
        raise ValueError(f"{where}: the model it describes has {parameter_count(args):,} parameters, "
                         f"{needed * shards / 2**30:,.1f} GiB in {dtype or torch.float32}{each}, more than the "
                         f"{available / 2**30:,.1f} GiB of memory of {device}")


def load_config(path) -> ModelArgs:
    """The ModelArgs of a Hugging Face model directory's config.json; errors name the file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (expected a Hugging Face model "
                                f"directory with config.json and model weights)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json in this directory")
    try:
        return ModelArgs.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{config_file}: {e}") from None
    except RecursionError:
        raise ValueError(f"{config_file}: JSON nested too deeply") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even for bf16 activations, then scale: the order HF uses, so bf16
        # results round the same way.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ┌─ Rotary embeddings: two layouts of the same rotation ──────────────────────────────────┐
# │ RoPE rotates pairs of coordinates of each query/key head by an angle pos * freq_i.      │
# │ Meta's original code pairs neighbours (x0,x1), (x2,x3), ...; Hugging Face's rotate_half │
# │ pairs the two halves (x_i, x_{i+hd/2}). HF's convert_llama_weights_to_hf.py makes Meta  │
# │ weights work with rotate_half by permuting the rows of q_proj and k_proj, per head:     │
# │     w.view(n, hd // 2, 2, D).transpose(1, 2).reshape(n * hd, D)                         │
# │ with n = n_heads for q_proj but n = n_kv_heads for k_proj. HF checkpoints are therefore │
# │ used here as they are, with rotate_half. Undoing the permutation is where converters go │
# │ wrong: with grouped-query attention, an un-permute that uses n_heads for k_proj still   │
# │ has valid shapes (the per-head size is derived from the row count) but cuts k into the  │
# │ wrong heads, and the model silently produces nonsense.                                  │
# └─────────────────────────────────────────────────────────────────────────────────────────┘
# ┌─ RoPE scaling: longer contexts from the same weights ───────────────────────────────────┐
# │ Plain RoPE turns pair i by pos * inv_freq_i, inv_freq_i = theta^(-2i/hd): the fast pairs│
# │ (small i) resolve nearby tokens; the slow ones, whose wavelength 2π / inv_freq spans the│
# │ context, tell far-apart tokens apart. The scalings change these frequencies, never the  │
# │ rotation itself:                                                                        │
# │ linear   every inv_freq_i / factor: position p turns as p / factor did in training, so  │
# │          factor times more positions fit into the angles the model knows.               │
# │ dynamic  (NTK-aware) unchanged up to L = max_position_embeddings; once a forward call   │
# │          reaches n > L positions (its largest position + 1), theta becomes              │
# │          theta * (factor * n / L - (factor - 1)) ** (hd / (hd - 2)): the fast pairs     │
# │          barely move, the slowest slow down by about factor * n / L. Computed from each │
# │          call's own positions, so keys in a KV cache keep the angles they got. (Same as │
# │          transformers for one call and through generation; transformers also keeps the  │
# │          largest n seen for later, shorter calls that are still past L.)                │
# │ llama3   by wavelength, against L0 = original_max_position_embeddings: pairs shorter    │
# │          than L0 / high_freq_factor are unchanged, those longer than                    │
# │          L0 / low_freq_factor are divided by factor (as linear), those in between       │
# │          blend the two smoothly.                                                        │
# └─────────────────────────────────────────────────────────────────────────────────────────┘
def rope_inv_freq(args: ModelArgs, seq_len: int, device) -> torch.Tensor:
    """The rotation frequencies (hd/2,) float32 for a forward call whose positions are < seq_len.

    The float32 arithmetic follows transformers' step by step, so that angles at large positions
    (where an ulp of inv_freq times 10^5 is visible) are the same.
    """
    hd, theta = args.head_dim, args.rope_theta
    scaling = args.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len > args.max_seq_len:
        n, factor = torch.tensor(seq_len, device=device), scaling["factor"]
        theta = theta * ((factor * n / args.max_seq_len) - (factor - 1)) ** (hd / (hd - 2))  # float32 tensor
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, device=device).float() / hd)  # (hd/2,)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, L0 = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > L0 / low, inv_freq / factor, inv_freq)
        smooth = (L0 / wavelen - low) / (high - low)  # 0 at wavelength L0 / low, 1 at L0 / high
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < L0 / high) * ~(wavelen > L0 / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(positions, args: ModelArgs, dtype):
    """Angles for integer positions (B, T) or (1, T) -> cos, sin of shape (B, 1, T, hd).

    Computed in float32 on every call rather than kept in a buffer: a buffer would be garbage
    after `to_empty` and would be rounded by `model.to(torch.bfloat16)`, which at position
    1000 turns the angle into noise.
    """
    seq_len = int(positions.max()) + 1 if args.rope_scaling and args.rope_scaling["rope_type"] == "dynamic" else 0
    inv_freq = rope_inv_freq(args, seq_len, positions.device)  # (hd/2,)
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd): the same angle for x_i and x_{i+hd/2}
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin  # (B, H or K, T, hd)


class KVCache:
    """Keys and values of every position seen so far, preallocated for the whole generation.

    generate() uses it so that each new token runs through the model alone, attending to stored
    keys and values, instead of re-running the whole sequence: per new token the work drops
    from a forward over all T positions to a forward over one (which still attends to T keys).
    The cost is memory,
    2 * n_layers * B * n_kv_heads * head_dim * (prompt + new tokens) numbers in the model's
    dtype (for LLaMA-7B in bf16: 0.5 MB per token per row), allocated once up front.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)  # (B, K, S_max, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.length = 0  # positions filled; Transformer.forward advances it after the last layer

    def update(self, layer: int, k, v):
        """Store this call's k, v (B, K, T, hd) after the cached ones; return all (B, K, S, hd)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id  # which KVCache slot is ours
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, allowed=None, cache=None):
        """x (B, T, D); allowed (B, 1, T, S) bool or None for plain causal attention."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, K, S, hd)
        # Grouped-query attention: each key/value head serves n_heads // n_kv_heads consecutive
        # query heads (heads 0..g-1 share kv head 0, as in HF's repeat_kv). enable_gqa lets SDPA
        # do that grouping without materialising repeated copies of k and v.
        gqa = self.n_heads != self.n_kv_heads
        if allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) -> (B, T, D)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, allowed=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)


def attention_allowed(mask, start: int, T: int, window: int | None = None):
    """Padding mask (B, S) of the whole sequence -> (B, 1, T, S) bool for queries start..start+T-1.

    Query t may attend to key s if s is a real token at or before it (causal + padding) and, with
    a sliding window, fewer than `window` real tokens before it (so itself and the window - 1
    before: transformers' `kv_idx > q_idx - sliding_window`, counted in real tokens so that a
    padded row sees exactly what the sequence alone would).
    A padding query of a left-padded row has no real key at or before it, and depending on the
    kernel a softmax over an empty set is NaN, which the next layer would spread: a masked
    value still enters the sum as 0 * NaN = NaN. So every query may also attend to itself;
    real queries already do, and no real query ever sees a padding key.
    """
    S = mask.shape[1]
    q_pos = torch.arange(start, start + T, device=mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & mask[:, None, :].bool()  # (B, T, S)
    if window is not None:
        real = mask.long().cumsum(-1)  # (B, S): real tokens up to and including each position
        allowed &= real[:, start:start + T, None] - real[:, None, :] < window  # (B, T, S)
    return (allowed | (k_pos == q_pos))[:, None]  # (B, 1, T, S)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more time
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens, attention_mask=None, cache: KVCache | None = None):
        """tokens (B, T) -> logits (B, T, V) in the model's dtype.

        attention_mask (B, T), or (B, cache.length + T) with a cache: 1/True = real token,
        0/False = padding, on either side. Positions count real tokens only, so a left-padded
        row gives its real tokens exactly the logits of the same sequence run alone; logits at
        padding positions are finite and meaningless.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        window = self.args.sliding_window
        if attention_mask is None and cache is None and (window is None or T <= window):
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T)
            allowed = None  # plain causal attention: SDPA's fastest path
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, start + T, dtype=torch.long, device=tokens.device)
            if attention_mask.shape != (B, start + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(B, start + T)}")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
            allowed = attention_allowed(attention_mask, start, T, window)  # (B, 1, T, S)
        x = self.embed_tokens(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.args, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, allowed, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, allowed, cache)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.norm(x))  # (B, T, V)

    @torch.no_grad()
    def generate(self, tokens, attention_mask=None, max_new_tokens: int = 32, temperature: float = 0.0,
                 eos_id: int | Iterable[int] | None = None, use_cache: bool = True):
        """Extend each row of tokens (B, T) by up to max_new_tokens -> (B, T + n).

        Greedy (argmax) at temperature 0, else sampling from softmax(logits / temperature).
        Rows of different lengths are left-padded (attention_mask 0 on the left), so that every
        row's new tokens follow its last real token. eos_id is one stop id or several (Llama-3
        instruct ends a turn with any of three): a row that has produced one repeats it from
        then on; generation stops once every row has. With use_cache=False the whole sequence
        is re-run for each new token (same tokens, more work; see KVCache; with dynamic RoPE
        past max_position_embeddings the two differ as they do in transformers, since cached
        keys keep their angles).
        """
        B, T = tokens.shape
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        if not mask[:, -1].all():
            raise ValueError("generate needs left padding: attention_mask must be 1 in the last column")
        dynamic = (self.args.rope_scaling or {}).get("rope_type") == "dynamic"  # made to run past max_seq_len
        if T + max_new_tokens > self.args.max_seq_len and not dynamic:
            raise ValueError(f"{T} + {max_new_tokens} new tokens exceed max_seq_len={self.args.max_seq_len}")
        stop = None if eos_id is None else torch.tensor(
            [eos_id] if isinstance(eos_id, int) else sorted(eos_id), device=tokens.device)  # (n_stop,)
        weight = self.embed_tokens.weight
        cache = KVCache(self.args, B, T + max_new_tokens, weight.dtype, weight.device) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            # With a cache only the newest token goes through the model (all of them the first time).
            new = tokens if cache is None or cache.length == 0 else tokens[:, -1:]
            logits = self(new, mask, cache=cache)[:, -1].float()  # (B, V)
            if temperature == 0:
                next_token = logits.argmax(-1)  # (B,)
            else:
                next_token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]  # (B,)
            if stop is not None:
                next_token = torch.where(done, tokens[:, -1], next_token)  # a finished row repeats its stop id
                done |= torch.isin(next_token, stop)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, T + step)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            if done.all():
                break
        return tokens

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Load a local Hugging Face LLaMA directory (config.json + safetensors or .bin weights).

        dtype defaults to torch.float32, as in transformers, whatever dtype the files hold;
        device defaults to the CPU. The model is built on the meta device (no memory), its
        parameters are then allocated uninitialised on `device` in `dtype`, and each tensor
        is copied in from the memory-mapped files one at a time, so the peak is about one
        copy of the weights. Every parameter must come from the checkpoint: a missing,
        unexpected or wrongly shaped tensor is an error, never a partial load.
        """
        path = resolve_hf_cache(path)
        args = load_config(path)
        device = torch.device(device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for, but CUDA is not available here")
        check_memory(args, dtype, device, path / "config.json")
        with torch.device("meta"):
            model = cls(args)
        model.to(dtype or torch.float32).to_empty(device=device)
        model.tie_weights()  # to_empty gives each module its own tensor, untying lm_head
        # There are no buffers (RoPE angles are computed in forward), so after loading the
        # parameters nothing is left uninitialised.
        ours = model.state_dict()
        with open_weights(path) as reader:
            for name, file_name in checkpoint_names(ours, reader, path, args.tie_embeddings):
                reader.copy_into(file_name, ours[name])
        return model.eval()


def checkpoint_names(ours: dict, reader, path, tied: bool) -> list[tuple[str, str]]:
    """(our name, the checkpoint's name) of every tensor to load, largest first; every one checked first.

    ours: our state_dict (its tensors may be on the meta device: only names and shapes are read).
    Every parameter must come from the checkpoint: a missing, unexpected, wrongly shaped or integer
    tensor is an error naming it, before anything is copied, never a partial load."""
    # Our name -> the checkpoint's name: the whole key map. RoPE frequencies, which some
    # older checkpoints store, are derived, not loaded.
    file_name = {name.removeprefix("model."): name for name in reader.shapes
                 if not name.endswith("rotary_emb.inv_freq")}
    # A tied lm_head is embed_tokens itself; a copy in the file is redundant.
    needed = [n for n in ours if not (tied and n == "lm_head.weight")]
    missing = [n if n.startswith("lm_head.") else "model." + n for n in needed if n not in file_name]
    unexpected = [file_name[n] for n in file_name if n not in ours]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match config.json; missing tensors: "
                              f"{_names(missing)}; unexpected tensors: {_names(unexpected)}")
    wrong = [f"{file_name[n]}: checkpoint {tuple(reader.shapes[file_name[n]])} vs config "
             f"{tuple(ours[n].shape)}" for n in needed if tuple(reader.shapes[file_name[n]]) != tuple(ours[n].shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match config.json: " + "; ".join(wrong))
    for n in needed:  # copy_ would turn integers into float weights without a word
        if not reader.dtypes[file_name[n]].is_floating_point:
            raise CheckpointError(f"{reader.path_of(file_name[n])}: tensor {file_name[n]!r} has dtype "
                                  f"{reader.dtypes[file_name[n]]}, but a floating-point weight belongs there")
    # Largest first: while a tensor is copied its pages in the file are resident too, so memory
    # peaks at the weights loaded so far plus the tensor being read. Starting with the embeddings
    # keeps that peak at about one copy of the weights.
    return [(n, file_name[n]) for n in sorted(needed, key=lambda n: ours[n].numel(), reverse=True)]


def _names(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
